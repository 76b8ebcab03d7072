"""InstaRevive -- One-Step Image Enhancement via Dynamic Score Matching (Zhu, Wang, Li, Zhao, Niu, Tang, Chen, Zhou &
Lu, ICLR 2025, arXiv:2504.15513).

A one-step enhancement generator G maps the LQ image y (and noise) to an HQ estimate x_g = G(z; y) and is trained by
score distillation from the frozen conditional teacher T with a fake-score critic F fitted to G's outputs -- the
distribution-matching machinery of DMD / DMD2 (dmd2.py): minimising KL(p_G || p_data) given y, whose gradient is

    g = (p_real - p_fake) / mean_CHW |p_real|,  p = x_g - D(x_t),  x_t = alpha_t x_g + sigma_t eps   (dmd_gradient)
    L_DSM = 1/2 || x_g - sg(x_g - g) ||^2,   critic: L_F = lambda(t) || F(sg x_g + sigma_t eps, t; y) - sg x_g ||^2

InstaRevive's change is DYNAMIC CONTROL of the diffusing scope (Sec. 3.2): with a fixed, broad noise range the two
score estimates are least accurate where it matters -- large noise washes out a generator output that is already
close to the HQ image, and the direction g is then mostly estimation error -- so the range of t the score matching
samples shrinks as the generator approaches the target. Two controls are provided:

    "schedule":     the ramp's noise-end bound u_lo (u = 0: sigma_max, 1: sigma_min; t ~ Karras ramp U[u_lo, u_hi])
                    moves linearly from ``scope_start`` to ``scope_end`` over ``scope_steps`` generator updates;
    "discrepancy":  the largest noise level follows the current discrepancy to the HQ image,
                    sigma_hi = clamp(scope_gain * RMS(x_g - x_HQ), sigma(scope_end), sigma(scope_start)),
                    so a generator far from the target is scored over a wide scope, a close one over a narrow one.

Guidance: the paper adds captions of the LQ image (an image captioner) as an extra condition of the teacher. Here
the teacher's guidance is classifier-free over its own condition (``guidance_scale`` != 1: the LQ image against the
blank-image null; with a label-aware teacher the labels the ImageCondition carries travel with it), applied to the
teacher only as in DMD2; DMD2's optional GAN head on the critic is available unchanged. Written from the paper's
description (its training code is not public).
"""
from __future__ import annotations

import torch

from ..diffusion.time_samplers import KarrasRampTime
from ..losses import per_sample_mean
from .dmd2 import DMD2
from .oftsr import karras_ramp_times

SCOPE_CONTROLS = ("schedule", "discrepancy")


class InstaRevive(DMD2):
    """DMD2's generator and critic with InstaRevive's dynamic diffusing scope (module docstring)."""

    stage_lengths = ("scope_steps",)

    def __init__(self, *args, scope_control: str = "schedule", scope_start: float = 0.02, scope_end: float = 0.5,
                 scope_high: float = 0.98, scope_steps: int = 1000, scope_gain: float = 4.0, scope_rho: float = 7.0,
                 **kwargs):
        if "generator_time_sampler" in kwargs and kwargs["generator_time_sampler"] is not None:
            raise ValueError("InstaRevive draws the generator's noise levels from its dynamic scope; give scope_* "
                             "options instead of generator_time_sampler")
        super().__init__(*args, **kwargs)
        if scope_control not in SCOPE_CONTROLS:
            raise ValueError(f"scope_control must be one of {SCOPE_CONTROLS}, got {scope_control!r}")
        if not 0.0 <= scope_start <= scope_end < scope_high <= 1.0:
            raise ValueError(f"need 0 <= scope_start <= scope_end < scope_high <= 1 (ramp positions, 0 = sigma_max), "
                             f"got scope_start={scope_start}, scope_end={scope_end}, scope_high={scope_high}")
        if scope_steps < 1:
            raise ValueError(f"scope_steps must be >= 1, got {scope_steps}")
        if not scope_gain > 0:
            raise ValueError(f"scope_gain must be > 0, got {scope_gain}")
        self.scope_control, self.scope_start, self.scope_end, self.scope_high = scope_control, scope_start, scope_end, \
            scope_high
        self.scope_steps, self.scope_gain, self.scope_rho = int(scope_steps), scope_gain, scope_rho
        self.current_discrepancy_scope = scope_start  # widest until the first generator output is measured
        if scope_control == "discrepancy":
            self.needs_real_data = True
            self.real_data_reason = "its dynamic scope follows the outputs' discrepancy to the HQ images"
        self.register_buffer("generator_steps", torch.tensor(0, dtype=torch.long), persistent=True)

    # ------------------------------------------------------------------ the dynamic scope
    def _sigma_range(self) -> tuple[float, float]:
        s_min = self.schedule.edm_sigma(torch.tensor(self.schedule.t_min, dtype=torch.float64)).item()
        s_max = self.schedule.edm_sigma(torch.tensor(self.schedule.t_max, dtype=torch.float64)).item()
        return s_min, s_max

    def ramp_sigma(self, u: float) -> float:
        """EDM sigma at Karras-ramp position u (0: sigma_max, 1: sigma_min)."""
        t = karras_ramp_times(self.schedule, torch.tensor([float(u)], dtype=torch.float64), self.scope_rho)
        return float(self.schedule.edm_sigma(t)[0])

    def ramp_position(self, sigma: float) -> float:
        """Inverse of ``ramp_sigma``."""
        s_min, s_max = self._sigma_range()
        r = self.scope_rho
        return (s_max ** (1 / r) - sigma ** (1 / r)) / (s_max ** (1 / r) - s_min ** (1 / r))

    def scheduled_scope(self, step: int | None = None) -> float:
        """The ramp's noise-end bound u_lo after ``step`` generator updates ("schedule" control)."""
        step = int(self.generator_steps) if step is None else step
        progress = min(step / self.scope_steps, 1.0)
        return self.scope_start + progress * (self.scope_end - self.scope_start)

    def discrepancy_scope(self, x_g: torch.Tensor, hq: torch.Tensor) -> float:
        """u_lo from the current discrepancy ("discrepancy" control): sigma_hi = scope_gain * RMS(x_g - x_HQ),
        clamped to the noise levels of scope_end (narrowest) and scope_start (widest)."""
        rms = float(per_sample_mean((x_g.detach() - hq) ** 2).mean().sqrt())
        widest, narrowest = self.ramp_sigma(self.scope_start), self.ramp_sigma(self.scope_end)
        return self.ramp_position(min(max(self.scope_gain * rms, narrowest), widest))

    @property
    def generator_time_sampler(self) -> KarrasRampTime:
        """The generator's noise levels now: t ~ Karras ramp U[u_lo, scope_high] with u_lo from the control. DMD2's
        generator loss reads this attribute, so the distribution-matching step itself is DMD2's, unchanged."""
        low = self.scheduled_scope() if self.scope_control == "schedule" else self.current_discrepancy_scope
        return KarrasRampTime(min(low, self.scope_high - 1e-6), self.scope_high, self.scope_rho)

    @generator_time_sampler.setter
    def generator_time_sampler(self, value) -> None:
        """DMD2's constructor sets a fixed sampler; InstaRevive's is the dynamic scope above (nothing to store)."""

    def generator_training_sample(self, batch: dict) -> torch.Tensor:
        x_g = super().generator_training_sample(batch)
        if self.scope_control == "discrepancy":
            # the scope of the step that uses this x_g follows its discrepancy to the batch's HQ images
            self.current_discrepancy_scope = self.discrepancy_scope(x_g, batch["real"])
        return x_g

    def on_generator_step_end(self) -> None:
        self.generator_steps += 1

    def generator_loss(self, batch):
        low = self.generator_time_sampler.low if self.scope_control == "schedule" else None
        losses = super().generator_loss(batch)  # DMD2's distribution matching at the dynamic scope's noise levels
        losses["scope_low"] = torch.tensor(self.current_discrepancy_scope if low is None else low)
        return losses
