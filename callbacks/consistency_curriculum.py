"""The consistency family's discretisation curriculum: before every training batch the method's
``apply_curriculum(k, K)`` gets k, the number of generator updates so far, and K, the run's total (iCT's
N(k) = min(s0 2^floor(k/K'), s1) + 1, Song & Dhariwal 2023 Sec. 3.4; ECT's stage = floor(k / d), Geng et al. 2024
Sec. 3). k is this callback's state in the checkpoint, and the method keeps the value it set in a persistent buffer,
so a resumed run continues the same curriculum."""
from __future__ import annotations

from lightning.pytorch import Callback


class ConsistencyCurriculum(Callback):
    def __init__(self, total_steps: int | None = None):
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.step = 0

    def _total(self, trainer) -> int:
        if self.total_steps is not None:
            return self.total_steps
        total = trainer.estimated_stepping_batches
        if total is None or total == float("inf") or total < 1:
            raise ValueError("ConsistencyCurriculum needs total_steps when the trainer's length is unbounded")
        return int(total)

    def on_fit_start(self, trainer, pl_module):
        if not hasattr(pl_module, "apply_curriculum"):
            raise ValueError(f"ConsistencyCurriculum needs a consistency-family method; {type(pl_module).__name__} "
                             "has no apply_curriculum")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.apply_curriculum(self.step, self._total(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if getattr(pl_module, "generator_stepped", True):
            self.step += 1

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state_dict):
        self.step = int(state_dict["step"])
