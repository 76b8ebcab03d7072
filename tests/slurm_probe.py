"""A callback the Slurm and preemption tests add to fits (``--trainer.callbacks+=tests.slurm_probe.Probe``).

Environment: PROBE_DIR (required) -- where it writes; PROBE_BLOCK_AT=N -- at the end of batch N, unless
PROBE_DIR/released exists, write PROBE_DIR/reached and wait (up to 300 s) for PROBE_DIR/released, so a test can
signal the run at a known point; PROBE_SELF_SIGNAL=SIGUSR1 -- instead of waiting, send that signal to this process
at batch N (the non-Slurm preemption test).
At the end of training every rank writes rank<R>.json (rank, world size, Slurm node and task, cluster environment,
strategy, restart count, global step, a checksum of the student) and final-rank<R>.pt (module state, EMA average,
optimizer and TTUR states) for exact comparisons.
"""
from __future__ import annotations

import json
import os
import signal
import time

import torch
from lightning.pytorch import Callback


class Probe(Callback):
    def __init__(self):
        self.out = os.environ["PROBE_DIR"]
        os.makedirs(self.out, exist_ok=True)
        self.block_at = int(os.environ["PROBE_BLOCK_AT"]) if os.environ.get("PROBE_BLOCK_AT") else None
        self.self_signal = os.environ.get("PROBE_SELF_SIGNAL")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.block_at is None or batch_idx != self.block_at or trainer.global_rank != 0:
            return
        released = os.path.join(self.out, "released")
        if os.path.exists(released):
            return
        with open(os.path.join(self.out, "reached"), "w") as handle:
            handle.write(f"{trainer.global_step}\n")
        if self.self_signal:
            open(released, "w").close()
            os.kill(os.getpid(), getattr(signal, self.self_signal))
            return
        deadline = time.time() + 300
        while not os.path.exists(released) and time.time() < deadline:
            time.sleep(0.05)

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        student = torch.cat([p.detach().double().flatten() for p in pl_module.student.parameters()])
        info = {"global_rank": rank, "world_size": trainer.world_size, "local_rank": trainer.local_rank,
                "node_rank": trainer.node_rank, "node": os.environ.get("SLURMD_NODENAME"),
                "procid": os.environ.get("SLURM_PROCID"), "job": os.environ.get("SLURM_JOB_ID"),
                "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                "cluster_environment": type(trainer._accelerator_connector.cluster_environment).__name__,
                "strategy": type(trainer.strategy).__name__, "global_step": trainer.global_step,
                "student_sum": float(student.sum()), "student_abs_sum": float(student.abs().sum()),
                "ckpt_path": None if trainer.ckpt_path is None else str(trainer.ckpt_path)}
        with open(os.path.join(self.out, f"rank{rank}.json"), "w") as handle:
            json.dump(info, handle)
        callbacks = {type(c).__name__: c.state_dict() for c in trainer.callbacks
                     if type(c).__name__ in ("StudentEMA", "TwoTimeScaleUpdate")}
        torch.save({"module": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                    "callbacks": callbacks, "optimizers": [o.state_dict() for o in trainer.optimizers],
                    "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
                    "global_step": trainer.global_step},
                   os.path.join(self.out, f"final-rank{rank}.pt"))


def write_short_toy_config(path: str, method: str = "dmd2", batches: int = 40, batch_size: int = 128,
                           warm_start_steps: int = 100, metric_samples: int = 500, root: str | None = None) -> str:
    """A full copy of experiments/toy/ring8/<method>.yaml sized for tests: few batches, no logger, no sample images,
    no ModelCheckpoint, ground-truth metrics on ``metric_samples`` samples at the end of the epoch."""
    import yaml

    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "experiments", "toy", "ring8", f"{method}.yaml")) as handle:
        config = yaml.safe_load(handle)
    trainer = config["trainer"]
    trainer.update({"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "max_epochs": 1, "val_check_interval": None})
    callbacks = [c for c in trainer["callbacks"] if c["class_path"] in ("callbacks.TwoTimeScaleUpdate",
                                                                       "callbacks.StudentEMA")]
    callbacks.append({"class_path": "callbacks.GroundTruthMetrics",
                      "init_args": {"num_samples": metric_samples, "nfe": [1], "num_floor_sets": 1,
                                    "verbose": False}})
    trainer["callbacks"] = callbacks
    config["data"]["init_args"].update({"batch_size": batch_size, "batches_per_epoch": batches, "val_batches": 1})
    config["model"]["init_args"]["warm_start_steps"] = warm_start_steps
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    return path
