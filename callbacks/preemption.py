"""Preemption-safe training: a signal becomes a checkpoint at the next batch boundary, a requeue and a clean stop.

Slurm warns a job before it ends it: ``#SBATCH --signal=USR1@120`` (time limit), ``scancel --signal=USR1``,
preemption (SIGTERM, then SIGKILL after KillWait). On SIGUSR1 or SIGTERM this callback only records the signal; when
the batch in flight has finished (critic and generator updates, EMA tick, TTUR count -- a consistent state), every
rank agrees to stop (one all-reduce per batch), a checkpoint ``hpc_ckpt_<N>.ckpt`` is written atomically to
``trainer.default_root_dir``, rank 0 runs ``scontrol requeue <job>`` (``<array job>_<task>`` in arrays) and the fit
stops. When Slurm starts the job again, Lightning finds the newest ``hpc_ckpt_*`` in that folder by itself (its
SLURM auto-resume) and the fit continues exactly: module, optimizers, schedulers, callbacks (EMA, TTUR phase), the
RNG states the module saves and the training loader's position (``datamodules.resumable``).

Lightning's own SLURM handler saves from inside the signal handler -- in the middle of a training step, between
the critic and the generator updates of a distillation step -- so it cannot resume exactly. This callback installs
its handlers in ``setup`` (so a signal during set-up or the warm start is not fatal) and again when training starts
(Lightning chains its own SIGTERM handler in between, which would stop the loop before this callback could save).

Outside Slurm the checkpoint is written the same way and the fit stops; resume it with ``--ckpt_path hpc``.
The callback also makes the strategy's checkpoint writer ``AtomicCheckpointIO`` (unless another one was configured),
so ModelCheckpoint's files are atomic too. Older ``hpc_ckpt_*`` beyond ``keep`` are removed after a good save.
"""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import threading
import time

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback

from lightning_modules.checkpoint_io import AtomicCheckpointIO

__all__ = ["PreemptionCheckpoint", "slurm_job_id"]


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` needs: ``ARRAYJOB_TASK`` inside an array task, else ``SLURM_JOB_ID``."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def _hpc_number(path: str) -> int:
    match = re.search(r"hpc_ckpt_(\d+)\.ckpt$", path)
    return int(match.group(1)) if match else -1


class PreemptionCheckpoint(Callback):
    """signals: names of the signals that mean "save, requeue and stop" (default SIGUSR1 and SIGTERM).
    requeue: run ``scontrol requeue`` from rank 0 when inside a Slurm job.
    keep: how many ``hpc_ckpt_*`` files to keep (the newest; older ones are removed after a successful save).
    check_every_n_batches: how often the ranks agree on whether a signal came (one all-reduce each time).
    atomic_checkpoints: install AtomicCheckpointIO as the strategy's writer when it uses Lightning's default one.
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue: bool = True,
                 keep: int = 2, check_every_n_batches: int = 1, atomic_checkpoints: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if check_every_n_batches < 1:
            raise ValueError(f"check_every_n_batches must be >= 1, got {check_every_n_batches}")
        self.signals = [self._signal(name) for name in signals]
        self.requeue, self.keep = requeue, keep
        self.check_every_n_batches, self.atomic_checkpoints = check_every_n_batches, atomic_checkpoints
        self.received: int | None = None
        #: set once the checkpoint is written: the signal's name, the file, whether scontrol accepted the requeue
        self.preempted: dict | None = None
        self._previous_handlers: dict = {}

    @staticmethod
    def _signal(name) -> signal.Signals:
        if isinstance(name, int):
            return signal.Signals(name)
        key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        if not hasattr(signal, key):
            raise ValueError(f"unknown signal {name!r}")
        return getattr(signal, key)

    # ------------------------------------------------------------------ handlers
    def _handle(self, signum, frame) -> None:
        if self.preempted is None and self.received is None:
            self.received = signum
            # os.write is safe in a handler; print may not be
            os.write(2, f"[preemption] received {signal.Signals(signum).name}; checkpoint at the end of this "
                        f"batch\n".encode())

    def _install(self) -> None:
        if self._previous_handlers or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if self.atomic_checkpoints and type(getattr(strategy, "_checkpoint_io", None) or TorchCheckpointIO()) \
                is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        self.received, self.preempted = None, None
        self._install()

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registered its handlers after setup: it left SIGUSR1 to us but chained SIGTERM to a notifier
        # that makes the loop raise SIGTERMException at the end of the batch in flight -- possibly after this
        # callback's batch-end hook, so without a checkpoint. While training, the signals are ours alone.
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                signal.signal(signum, self._handle)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.preempted is not None or (batch_idx + 1) % self.check_every_n_batches:
            return
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)  # any rank signalled
        if stop:
            self._checkpoint_and_requeue(trainer)

    # ------------------------------------------------------------------ the work
    def checkpoint_path(self, trainer) -> str:
        folder = str(trainer.default_root_dir)
        numbers = [_hpc_number(p) for p in glob.glob(os.path.join(folder, "hpc_ckpt_*.ckpt"))]
        return os.path.join(folder, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")

    def _checkpoint_and_requeue(self, trainer) -> None:
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        path = trainer.strategy.broadcast(self.checkpoint_path(trainer), src=0)
        start = time.perf_counter()
        trainer.save_checkpoint(path)  # collective; rank 0 writes (atomically)
        seconds = time.perf_counter() - start
        requeued = None
        if trainer.is_global_zero:
            self._prune(os.path.dirname(path))
            job = slurm_job_id()
            if self.requeue and job is not None:
                requeued = self._scontrol_requeue(job)
            sys.stderr.write(f"[preemption] {name}: saved {path} at global step {trainer.global_step} "
                             f"({seconds:.2f} s); requeue {'not requested' if requeued is None else requeued}\n")
            sys.stderr.flush()
        self.preempted = {"signal": name, "checkpoint": path, "global_step": trainer.global_step,
                          "requeued": requeued}
        trainer.should_stop = True

    @staticmethod
    def _scontrol_requeue(job: str) -> bool:
        if not re.fullmatch(r"[0-9_]+", job):
            return False
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            sys.stderr.write(f"[preemption] scontrol requeue {job} failed: {error}\n")
            return False
        if result.returncode != 0:
            sys.stderr.write(f"[preemption] scontrol requeue {job} failed ({result.returncode}): "
                             f"{result.stderr.strip()}\n")
        return result.returncode == 0

    def _prune(self, folder: str) -> None:
        files = sorted(glob.glob(os.path.join(folder, "hpc_ckpt_*.ckpt")), key=_hpc_number)
        for old in files[:-self.keep]:
            try:
                os.remove(old)
            except OSError:
                pass
