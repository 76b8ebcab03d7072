"""Exponential moving average of the student, ticking on generator updates only.

Built on torch's ``AveragedModel`` with ``get_ema_multi_avg_fn``. Lightning's own ``WeightAveraging`` callback
averages after every optimizer step, which in manual optimization with a critic would tick on critic updates too
(the flaw noted in FastGen), hence this small callback. The average is registered as the module's evaluation student,
so validation metrics, sample grids and exports use it. Its state travels in the Lightning checkpoint.

``warmup``: the decay after n generator updates is min(decay, (1 + n) / (10 + n)) (diffusers' ``EMAModel`` default),
so a short run's average is not dominated by its first weights: with a fixed 0.99 the first update's student (one
step from the initial network) still has weight 0.99^199 = 13.5% after 200 updates. (``AveragedModel`` starts the
average as a copy of the student at the first update.)

``restart_at_stage_change``: the average restarts from the student when the method's ``averaging_phase()`` changes
(progressive distillation's halving stages, guidance distillation's two stages, TCM's stage 2): with decay 0.999 an
average that ran on through a stage change would still be 37% the previous stage's weights after 1000 updates, and
that student was trained for another step count or time range.
"""
from __future__ import annotations

import torch
from lightning.pytorch import Callback
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lightning_modules.strategies import full_parameters


def warmup_ema_multi_avg_fn(decay: float):
    """``AveragedModel`` multi_avg_fn: EMA with decay min(decay, (1 + n) / (10 + n)) after n averaged updates."""
    @torch.no_grad()
    def update(averaged: list, current: list, num_averaged) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:
            for a, c in zip(averaged, current):
                a.copy_(a * (1.0 - weight) + c * weight)
    return update


class StudentEMA(Callback):
    def __init__(self, decay: float = 0.999, start_step: int = 0, evaluate_with_ema: bool = True,
                 warmup: bool = False, restart_at_stage_change: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start_step, self.evaluate_with_ema = decay, start_step, evaluate_with_ema
        self.warmup, self.restart_at_stage_change = warmup, restart_at_stage_change
        self.average: AveragedModel | None = None
        self.generator_updates = 0
        self.phase: int | None = None   # the method's averaging_phase() the average belongs to
        self._pending_state: dict | None = None

    def _ensure(self, pl_module):
        if self.average is None:
            average_fn = (warmup_ema_multi_avg_fn if self.warmup else get_ema_multi_avg_fn)(self.decay)
            self.average = AveragedModel(pl_module.averaged_network(), multi_avg_fn=average_fn,
                                         use_buffers=True).requires_grad_(False)
            if self._pending_state is not None:
                self.average.load_state_dict(self._pending_state)
                self._pending_state = None
        self.average.to(pl_module.device)
        if self.evaluate_with_ema:
            pl_module.set_evaluation_network(self.average.module)

    def setup(self, trainer, pl_module, stage):
        self._ensure(pl_module)

    def on_fit_start(self, trainer, pl_module):
        # after the warm start and any checkpoint restore: start from the student unless the average was restored
        self._ensure(pl_module)
        if int(self.average.n_averaged) == 0:
            with full_parameters(pl_module.averaged_network()) as network:  # gathered if FSDP shards it
                self.average.module.load_state_dict(network.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if getattr(pl_module, "generator_stepped", True):
            self.generator_updates += 1
            if self.generator_updates > self.start_step:
                phase = pl_module.averaging_phase() if hasattr(pl_module, "averaging_phase") else 0
                if self.restart_at_stage_change and self.phase is not None and phase != self.phase:
                    self.average.n_averaged.zero_()   # the next update copies the student (AveragedModel)
                self.phase = phase
                with full_parameters(pl_module.averaged_network()) as network:
                    self.average.update_parameters(network)

    def state_dict(self):
        return {"generator_updates": self.generator_updates, "phase": self.phase,
                "average": None if self.average is None else self.average.state_dict()}

    def load_state_dict(self, state_dict):
        self.generator_updates = state_dict["generator_updates"]
        self.phase = state_dict.get("phase")
        if state_dict["average"] is not None:
            if self.average is None:
                self._pending_state = state_dict["average"]
            else:
                self.average.load_state_dict(state_dict["average"])
