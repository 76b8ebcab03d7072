"""The adversarial game on a frozen network's features, shared by the methods with a discriminator on the teacher
(LADD, Sauer et al. 2024, arXiv:2403.12015; SANA-Sprint's LADD term, Chen et al. 2025, arXiv:2503.09641).

Per call, for clean samples x (real, or the student's outputs):
  s ~ p(s) (``time_sampler``; LADD: rectified-flow logit-normal biased to high noise), x_s = alpha_s x + sigma_s n
  D(x_s, s, c) = heads(frozen teacher features at (x_s, s, c))     (``networks.feature_discriminator``), (B, heads)
  generator:      L_G = E gan_G(D(x_s^fake))                         gradient reaches x_fake through x_s and the teacher
  discriminator:  L_D = E gan_D(D(x_s^real), D(sg x_s^fake)) + gamma R(x_s^real)
with gan = hinge (LADD, SANA-Sprint) or non-saturating (DMD2's), and R the R1 penalty of the real side
(Mescheder et al. 2018): ``exact`` sum_k ||grad_x D_k||^2 through a second derivative, or ``approximate``
||D(x_s) - D(x_s + eps n')||^2 (Lin et al. 2025, arXiv:2501.08316), a finite difference that costs one more forward
pass and no double backward (its mean is about eps^2 times the exact penalty: an exact-R1 gamma becomes
gamma / eps^2 there). The frozen teacher is held by the module (``module.teacher``); the heads are
``module.discriminator`` (a ``TeacherFeatureDiscriminator``), trained by the module's critic optimizer.

A module using this needs: ``teacher``, ``discriminator``, ``schedule``, ``sample_times(sampler, n)`` and
``noise_like(x)`` -- every ``DistillationModule`` has them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .diffusion.time_samplers import FlowLogitNormalTime, TimeSampler
from .losses import approximate_r1_penalty, gan_loss_pair, r1_penalty

R1_MODES = ("exact", "approximate")


class TeacherFeatureGAN:
    """The game's settings and its two losses (module docstring). Holds no networks: the module passes itself."""

    def __init__(self, time_sampler: TimeSampler | None = None, gan_loss: str = "hinge", r1_weight: float = 0.0,
                 r1_mode: str = "approximate", r1_noise_std: float = 0.01):
        self.generator_term, self.discriminator_term = gan_loss_pair(gan_loss)
        if r1_mode not in R1_MODES:
            raise ValueError(f"unknown r1_mode {r1_mode!r}; expected one of {R1_MODES}")
        if not r1_weight >= 0:
            raise ValueError(f"r1_weight must be >= 0, got {r1_weight}")
        if r1_mode == "approximate" and not r1_noise_std > 0:
            raise ValueError(f"r1_noise_std must be > 0 for the approximate R1, got {r1_noise_std}")
        self.time_sampler = time_sampler or FlowLogitNormalTime(1.0, 1.0)
        self.gan_loss, self.r1_weight, self.r1_mode, self.r1_noise_std = gan_loss, float(r1_weight), r1_mode, r1_noise_std

    def noised(self, module, x0: Tensor) -> tuple[Tensor, Tensor]:
        """(x_s, s): x0 re-noised at s ~ the game's time sampler (the gradient path to x0 kept)."""
        s = module.sample_times(self.time_sampler, x0.shape[0])
        return module.schedule.add_noise(x0, module.noise_like(x0), s), s

    @staticmethod
    def logits(module, x_s: Tensor, s: Tensor, cond) -> Tensor:
        return module.discriminator(module.teacher, x_s, s, cond)

    def generator_loss(self, module, x_fake: Tensor, cond) -> Tensor:
        """E gan_G(D(x_s^fake)); the heads are frozen by the optimizer toggle, the teacher is always frozen."""
        x_s, s = self.noised(module, x_fake)
        return self.generator_term(self.logits(module, x_s, s, cond)).mean()

    def discriminator_loss(self, module, x_real: Tensor, real_cond, x_fake: Tensor, fake_cond) -> dict[str, Tensor]:
        """{"gan", "r1" (if weighted), "loss"}: both sides re-noised independently; R1 on the noised real side."""
        real_s, s_real = self.noised(module, x_real.detach())
        fake_s, s_fake = self.noised(module, x_fake.detach())
        exact_r1 = self.r1_weight > 0 and self.r1_mode == "exact" and torch.is_grad_enabled()
        if exact_r1:
            real_s = real_s.requires_grad_(True)
        real_logits = self.logits(module, real_s, s_real, real_cond)
        gan = self.discriminator_term(real_logits, self.logits(module, fake_s, s_fake, fake_cond)).mean()
        losses = {"gan": gan, "real_logit": real_logits.mean().detach()}
        loss = gan
        if self.r1_weight > 0 and (exact_r1 or self.r1_mode == "approximate"):
            if exact_r1:
                penalty = r1_penalty(real_logits, real_s)
            else:
                perturbed = real_s + self.r1_noise_std * module.noise_like(real_s)
                penalty = approximate_r1_penalty(real_logits, self.logits(module, perturbed, s_real, real_cond))
            losses["r1"] = penalty.mean()
            loss = loss + self.r1_weight * penalty.mean()
        losses["loss"] = loss
        return losses
