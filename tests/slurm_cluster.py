"""A real Slurm cluster on this machine for the tests: munged, slurmctld and two slurmd emulating nodes n1 and n2
(one CPU each), all configured under a temporary folder and stopped by their recorded PIDs.

Debian's ``slurm-wlm`` and ``munge`` are installed with apt when ``sbatch`` is missing and we are root (CI and the
development machines are); anywhere else ``require_slurm()`` returns a reason to skip. Recipe and the facts it
relies on: shared/slurm-local.md.

Usable from a shell too (``scripts/local_slurm.sh``)::

    python -m tests.slurm_cluster start DIR     # prints export SLURM_CONF=...; daemons keep running
    python -m tests.slurm_cluster stop DIR
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SBIN = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
APT_PACKAGES = ["slurm-wlm", "munge"]


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN:
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _have_slurm() -> bool:
    return all(_which(n) for n in ("sbatch", "srun", "scontrol", "slurmctld", "slurmd", "munged", "munge"))


def require_slurm(install: bool = True, timeout: float = 900) -> str | None:
    """None when Slurm and munge are usable (installing them with apt if needed and possible), else the reason."""
    if _have_slurm():
        return None
    if not install:
        return "slurm-wlm/munge are not installed"
    if os.name != "posix" or os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and installing them needs root"
    if not _which("apt-get"):
        return "slurm-wlm/munge are not installed and apt-get is unavailable"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", *APT_PACKAGES]):
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{' '.join(command)} failed: {error}"
        if result.returncode != 0:
            return f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-400:]}"
    return None if _have_slurm() else "apt-get installed slurm-wlm/munge but the binaries were not found"


def _free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


class LocalSlurm:
    """Start with ``start()``, stop with ``stop()`` (idempotent; kills only the PIDs it started)."""

    def __init__(self, root: str | os.PathLike, nodes: tuple[str, ...] = ("n1", "n2"), cpus_per_node: int = 1):
        self.root = Path(root).absolute()
        self.nodes, self.cpus_per_node = nodes, cpus_per_node
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "run" / "munge.socket"  # munged wants a socket folder all can enter
        self.pids: dict[str, int] = {}
        self._processes: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ environment for clients and jobs
    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def client_env(self, extra: dict | None = None) -> dict[str, str]:
        return {**os.environ, **self.env, **(extra or {})}

    # ------------------------------------------------------------------ start / stop
    def _spawn(self, name: str, command: list[str], log: Path) -> None:
        handle = open(log, "ab")
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=self.client_env())
        handle.close()
        self._processes[name] = process
        self.pids[name] = process.pid
        (self.root / "pids.json").write_text(json.dumps(self.pids))

    def start(self, timeout: float = 60) -> "LocalSlurm":
        reason = require_slurm(install=False)
        if reason:
            raise RuntimeError(reason)
        for sub in ("etc", "munge", "run", "state", "log", "jobcomp", *[f"spool/{n}" for n in self.nodes]):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "run", 0o755)
        os.chmod(self.root / "munge", 0o700)
        self._start_munge(timeout)
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)],
                    self.root / "log" / "slurmctld.stdout")
        self._wait(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0, timeout, "slurmctld")
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)],
                        self.root / "log" / f"slurmd-{node}.stdout")
        self._wait(self._nodes_idle, timeout, "slurmd nodes idle")
        return self

    def _start_munge(self, timeout: float) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", [_which("munged"), "-F", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"],
                    self.root / "log" / "munged.stdout")

        def munge_works() -> bool:
            if self._processes["munged"].poll() is not None:
                raise RuntimeError("munged exited: " + (self.root / "log" / "munged.stdout").read_text()[-2000:])
            if not self.munge_socket.exists():
                return False
            encoded = subprocess.run([_which("munge"), "-S", str(self.munge_socket), "-n"], capture_output=True)
            if encoded.returncode != 0:
                return False
            decoded = subprocess.run([_which("unmunge") or "unmunge", "-S", str(self.munge_socket)],
                                     input=encoded.stdout, capture_output=True)
            return decoded.returncode == 0
        self._wait(munge_works, timeout, "munged")

    def _write_conf(self) -> None:
        controller_port, *node_ports = _free_ports(1 + len(self.nodes))
        root = self.root
        lines = [
            "ClusterName=distilltest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={controller_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={root / 'jobcomp' / 'jobs.txt'}",
            "MpiDefault=none", "ReturnToService=2", "MinJobAge=3600", "KillWait=5", "MailProg=/bin/true",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "SlurmctldTimeout=30", "SlurmdTimeout=60", "InactiveLimit=0", "Waittime=0",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'state' / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'spool' / '%n.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
            "SlurmctldDebug=info", "SlurmdDebug=info",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _nodes_idle(self) -> bool:
        result = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return result.returncode == 0 and all(states.get(n, "").startswith("idle") for n in self.nodes)

    @staticmethod
    def _wait(predicate, timeout: float, what: str, interval: float = 0.25) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(interval)
        raise TimeoutError(f"{what} not ready after {timeout} s")

    def stop(self) -> None:
        """Stop slurmd(s), then slurmctld, then munged -- each by its recorded PID."""
        order = [n for n in self.pids if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            pid = self.pids.get(name)
            if pid is None:
                continue
            process = self._processes.get(name)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not self._reap(name, pid, process, 15):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._reap(name, pid, process, 5)
            self.pids.pop(name, None)
        if (self.root / "pids.json").exists():
            (self.root / "pids.json").write_text(json.dumps(self.pids))

    @staticmethod
    def _reap(name: str, pid: int, process: subprocess.Popen | None, timeout: float) -> bool:
        if process is not None:
            try:
                process.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.time() + timeout
        while time.time() < deadline:  # not our child (stop from another process): poll /proc
            try:
                state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                return True
            if state == "Z":
                return True
            time.sleep(0.1)
        return False

    # ------------------------------------------------------------------ clients
    def _run(self, command: list[str], check: bool = True, env: dict | None = None, **kwargs):
        binary = _which(command[0]) or command[0]
        result = subprocess.run([binary, *command[1:]], capture_output=True, text=True,
                                env=self.client_env(env), **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> str:
        result = self._run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (for an array job: its first task)."""
        result = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if result.returncode != 0 or not result.stdout.strip():
            return {}
        fields = {}
        for item in re.findall(r"(\w+)=(\S*)", result.stdout.splitlines()[0]):
            fields.setdefault(item[0], item[1])
        return fields

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        result = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in result.stdout.splitlines() if line.strip()]

    def wait_for(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"),
                 timeout: float = 300, all_tasks: bool = True, interval: float = 0.5) -> list[dict[str, str]]:
        deadline = time.time() + timeout
        records: list[dict[str, str]] = []
        while time.time() < deadline:
            records = self.jobs(job_id)
            if records and (all if all_tasks else any)(r.get("JobState") in states for r in records):
                return records
            time.sleep(interval)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: "
                           f"{[(r.get('JobId'), r.get('JobState')) for r in records]}")

    def release_requeued(self, job_id: str, timeout: float = 60) -> None:
        """A requeued job waits ~120 s (BeginTime); start it now (retried until slurmctld accepts)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job(job_id).get("JobState")
            if state in ("RUNNING", "COMPLETED", "COMPLETING"):
                return
            if state == "PENDING":
                self._run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=False)
            time.sleep(0.5)
        raise TimeoutError(f"requeued job {job_id} did not start within {timeout} s")

    def logs(self) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")
            out.append(f"==> {path.name} <==\n{text[-3000:]}")
        return "\n".join(out)


def _cli(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__)
        return 2
    command, root = argv
    cluster = LocalSlurm(root)
    if command == "start":
        reason = require_slurm()
        if reason:
            print(f"cannot start Slurm: {reason}", file=sys.stderr)
            return 1
        cluster.start()
        # the daemons are our children; detach so they outlive this command (stop reads pids.json)
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    pids_file = Path(root) / "pids.json"
    if pids_file.exists():
        cluster.pids = json.loads(pids_file.read_text())
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
