"""Against a real Slurm (munged + slurmctld + two slurmd emulating nodes n1 and n2 on this machine, see
tests/slurm_cluster.py): a 2-point sweep as one job array with its summary job, a 2-node x 1-task srun DDP fit
through Lightning's SLURMEnvironment, and a fit signalled with USR1 that checkpoints, requeues itself and, started
again by Slurm, resumes to the same final state as an uninterrupted fit.

Skipped (with the reason) where Slurm is missing and cannot be installed (not root, no apt-get); on CI and the
development machines the fixture installs Debian's slurm-wlm and munge. About 2-4 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.slurm_cluster import LocalSlurm, require_slurm
from tests.slurm_probe import write_short_toy_config
from tests.helpers import state_difference

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def slurm():
    reason = require_slurm(install=True)
    if reason:
        pytest.skip(f"no local Slurm: {reason}")
    # not under pytest's tmp_path: munged refuses a socket folder whose ancestors others cannot enter
    root = tempfile.mkdtemp(prefix="distill-slurm-")
    cluster = LocalSlurm(root)
    failed = False
    try:
        cluster.start()
        yield cluster
    except BaseException:
        failed = True
        raise
    finally:
        cluster.stop()
        if not failed:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def job_env(slurm, monkeypatch):
    """The environment jobs inherit (sbatch exports it): this venv first on PATH, the repo importable, one thread,
    the rendezvous on loopback (node names n1/n2 do not resolve), gloo on the loopback interface."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
            monkeypatch.delenv(key)
    values = {**slurm.env, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin",
              "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
              "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def _fail_with_logs(slurm, message, *paths):
    texts = [message, slurm.logs()]
    for path in paths:
        for file in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
            if file.is_file() and file.suffix in (".out", ".err", ".log", ".txt", ""):
                texts.append(f"==> {file} <==\n{file.read_text(errors='replace')[-4000:]}")
    pytest.fail("\n".join(texts))


def test_sweep_job_array_runs_both_points_and_summarizes(slurm, job_env, tmp_path):
    from lightning_modules.sweep import submit_sweep

    config = write_short_toy_config(str(tmp_path / "ring8_dmd2.yaml"), batches=30)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(json.dumps({
        "name": "t-seeds", "configs": [config], "grid": {"seed_everything": [0, 1]},
        "overrides": {"trainer.log_every_n_steps": 5},
        "metrics": ["val/nfe1/sliced_w2", "val/nfe1/modes_covered"],
        "slurm": {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1, "timeout_min": 15, "signal_delay_s": 30}}))
    out = tmp_path / "sweep"
    info = submit_sweep(str(sweep_file), out=str(out), cluster="slurm")
    assert len(info["jobs"]) == 2 and {j.split("_")[0] for j in info["jobs"]} == {info["array_job"]}

    deadline = time.time() + 420
    while not (out / "summary.json").exists():
        states = [r.get("JobState") for r in slurm.jobs(info["array_job"])]
        if any(s in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") for s in states) or time.time() > deadline:
            _fail_with_logs(slurm, f"sweep array states {states}", out / "submitit")
        time.sleep(1)
    time.sleep(0.5)
    tasks = slurm.jobs(info["array_job"])
    assert sorted(r.get("ArrayTaskId") for r in tasks) == ["0", "1"]
    assert all(r.get("JobState") == "COMPLETED" for r in tasks), [(r.get("JobId"), r.get("JobState")) for r in tasks]

    summary = json.loads((out / "summary.json").read_text())
    rows = {row["point"]: row for row in summary["rows"]}
    assert set(rows) == {"000-seed0", "001-seed1"}
    for name, row in rows.items():
        assert row["status"] == "completed", row
        assert row["global_step"] == 30 + 6  # 30 critic updates + a generator update every 5th batch
        assert 0 < row["metrics"]["val/nfe1/sliced_w2"] < 5
        assert any((out / "tensorboard" / "t-seeds" / name).glob("events.out.tfevents.*"))
        assert (out / "runs" / name / "result.json").exists()
    # the two seeds are different runs
    assert rows["000-seed0"]["metrics"] != rows["001-seed1"]["metrics"]
    table = (out / "summary.md").read_text()
    assert "000-seed0" in table and "001-seed1" in table and "val/nfe1/sliced_w2" in table


def test_two_node_srun_ddp_uses_slurm_environment(slurm, job_env, tmp_path):
    config = write_short_toy_config(str(tmp_path / "ring8_dmd2.yaml"), batches=24)
    probe = tmp_path / "probe"
    output = tmp_path / "multi.out"
    job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={output}",
                        str(ROOT / "experiments" / "slurm" / "multi_node.sbatch"), config,
                        "--trainer.callbacks+=tests.slurm_probe.Probe"],
                       env={**job_env, "PROBE_DIR": str(probe), "RUN_DIR": str(tmp_path / "run")}, cwd=str(tmp_path))
    records = slurm.wait_for(job, timeout=400)
    if records[0].get("JobState") != "COMPLETED":
        _fail_with_logs(slurm, f"multi-node job {records[0].get('JobState')}", output)
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["cluster_environment"] == "SLURMEnvironment" for r in ranks)
    assert all(r["strategy"] == "DDPStrategy" for r in ranks)
    assert [r["node"] for r in ranks] == ["n1", "n2"]  # rank 0 on one node, rank 1 on the other
    assert [r["node_rank"] for r in ranks] == [0, 1] and [r["procid"] for r in ranks] == ["0", "1"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 12 + 3
    assert ranks[0]["student_sum"] == ranks[1]["student_sum"]  # DDP kept the replicas identical
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output.read_text()


def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, job_env, tmp_path):
    config = write_short_toy_config(str(tmp_path / "ring8_dmd2.yaml"), batches=40)
    template = str(ROOT / "experiments" / "slurm" / "single_node.sbatch")
    common = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1"]
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    ref_job = slurm.sbatch([*common, f"--output={tmp_path / 'reference.out'}", template, config,
                            "--trainer.callbacks+=tests.slurm_probe.Probe"],
                           env={**job_env, "PROBE_DIR": str(reference), "RUN_DIR": str(reference / "run")})
    job = slurm.sbatch([*common, f"--output={tmp_path / 'preempted.out'}", template, config,
                        "--trainer.callbacks+=tests.slurm_probe.Probe"],
                       env={**job_env, "PROBE_DIR": str(preempted), "RUN_DIR": str(preempted / "run"),
                            "PROBE_BLOCK_AT": "12"})
    deadline = time.time() + 300
    while not (preempted / "reached").exists():
        state = slurm.job(job).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING") or time.time() > deadline:
            _fail_with_logs(slurm, f"job {job} is {state} before reaching batch 12", tmp_path / "preempted.out")
        time.sleep(0.2)

    slurm._run(["scancel", "--signal=USR1", job])  # to the job step (the training process)
    (preempted / "released").touch()

    deadline = time.time() + 120
    while True:  # the job checkpoints, runs `scontrol requeue` on itself and goes back to the queue
        record = slurm.job(job)
        if int(record.get("Restarts", "0")) >= 1 and record.get("JobState") in ("PENDING", "REQUEUED", "RUNNING",
                                                                                 "COMPLETED"):
            break
        if record.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT") or time.time() > deadline:
            _fail_with_logs(slurm, f"job {job} not requeued: {record.get('JobState')}", tmp_path / "preempted.out")
        time.sleep(0.3)
    checkpoint = preempted / "run" / "hpc_ckpt_1.ckpt"
    assert checkpoint.exists()
    slurm.release_requeued(job)  # skip the ~120 s a requeued job waits before it may start again

    for job_id, output in ((job, "preempted.out"), (ref_job, "reference.out")):
        record = slurm.wait_for(job_id, timeout=400)[0]
        if record.get("JobState") != "COMPLETED":
            _fail_with_logs(slurm, f"job {job_id} {record.get('JobState')}", tmp_path / output)
    log = (tmp_path / "preempted.out").read_text()
    assert "[preemption] SIGUSR1: saved" in log and "requeue True" in log
    resumed = json.loads((preempted / "rank0.json").read_text())
    assert resumed["restart_count"] == 1 and resumed["ckpt_path"] == str(checkpoint)
    assert resumed["cluster_environment"] == "SLURMEnvironment"
    straight = torch.load(reference / "final-rank0.pt", weights_only=False)
    finished = torch.load(preempted / "final-rank0.pt", weights_only=False)
    assert finished["global_step"] == straight["global_step"] == 40 + 8
    for key in ("module", "callbacks", "optimizers", "schedulers"):
        assert state_difference(straight[key], finished[key], key) <= 1e-6, key
