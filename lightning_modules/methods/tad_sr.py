"""TAD-SR -- One Step Diffusion-based Super-Resolution with Time-Aware Distillation (He, Tang, Tu, Zhang, Cheng, Chen,
Guo, Zhu, Wang, Gao & Hu 2024, arXiv:2408.07476).

A one-step student G restores the low-quality (LQ) image y from noise; the frozen SR teacher T gives two signals, and
a time-aware discriminator on T's features a third. With x^_0 = G(z, y) and the teacher's multi-step ODE restoration
x~_0 = ODE_T(z, y) on the same noise and LQ image (no gradient):

  distillation (the SinSR-style regression TAD-SR builds on):
      L_reg  = 1/2 ||x^_0 - x~_0||^2
  high-frequency enhanced score distillation (HFSD, Sec. 3.2): both outputs perturbed by the SAME small noise,
      t ~ p_small(t) (small noise levels: the teacher's score there is about high-frequency detail),
      x^_t = alpha_t x^_0 + sigma_t eps,  x~_t = alpha_t x~_0 + sigma_t eps,
      g = (x^_0 - T(x^_t, t, y)) - (x~_0 - T(x~_t, t, y))                 (x0-space score difference)
      L_HFSD = 1/2 ||x^_0 - sg(x^_0 - g)||^2 / mean_CHW |x^_0 - T(x^_t)|  (DMD's normaliser, optional)
    The score of the noised student output is matched to the score of the noised teacher output instead of to the
    injected noise as in SDS (whose target eps makes g biased: nonzero even when x^_0 = x~_0); here g = 0 exactly
    when the student reproduces the teacher.
  time-aware adversarial loss (Sec. 3.3): a discriminator made of trainable heads on the frozen teacher's features at
    noised inputs, conditioned explicitly on the noise level, real = noised HQ images, fake = noised x^_0:
      L_D = gan_D(D(x_s^HQ, s, y), D(sg x^_s, s, y)),   L_adv = gan_G(D(x^_s, s, y))
    -- the shared teacher-feature game ``adversarial.TeacherFeatureGAN`` on ``TeacherFeatureDiscriminator`` heads,
    as in LADD, so this method is LADD's discriminator plus the two distillation terms.

  generator:  L_G = lambda_reg L_reg + lambda_HFSD L_HFSD + lambda_adv L_adv
  discriminator (critic optimizer; TTUR from ``callbacks.TwoTimeScaleUpdate``): L_D

Written from the paper's description (abstract and method summary); the exact weighting of the paper's HFSD term may
differ. Defaults: small noise levels = the data-side half of the Karras ramp (u ~ U[0.5, 0.98], EDM sigma about
0.003 .. 2.5); non-saturating GAN loss; teacher ODE 8 NFE (Heun). The condition y is whatever the batch's ``cond``
is -- an ``ImageCondition`` from ``datamodules.restoration`` -- and every call passes it through unchanged.
"""
from __future__ import annotations

import torch

from ..conditioning.condition import concat_conditions
from ..diffusion.time_samplers import KarrasRampTime, TimeSampler
from ..losses import per_sample_mean, surrogate_for_gradient
from .ladd import LADD


def hfsd_gradient(x_student, x0_student_noised, x_teacher, x0_teacher_noised, normalize: bool = True):
    """g of HFSD (module docstring): the teacher's x0-space score at the noised student output minus the one at the
    noised teacher output, (x^ - T(x^_t)) - (x~ - T(x~_t)); with ``normalize``, divided per sample by
    mean_CHW |x^ - T(x^_t)| (DMD's normaliser, Yin et al. 2023, Eq. 8)."""
    gradient = (x_student - x0_student_noised) - (x_teacher - x0_teacher_noised)
    if normalize:
        scale = (x_student - x0_student_noised).abs().flatten(1).mean(1).clamp_min(1e-8)
        gradient = gradient / scale.reshape(-1, *[1] * (x_student.ndim - 1))
    return torch.nan_to_num(gradient)


class TADSR(LADD):
    """TAD-SR's generator and time-aware discriminator (module docstring). ``real_data`` stays ``data``: the
    discriminator's real side is the batch's HQ images."""

    def __init__(self, *args, regression_weight: float = 1.0, hfsd_weight: float = 1.0,
                 adversarial_weight: float = 0.1, hfsd_time_sampler: TimeSampler | None = None,
                 hfsd_normalize: bool = True, gan_loss: str = "non_saturating",
                 discriminator_time_sampler: TimeSampler | None = None, teacher_nfe: int = 8, **kwargs):
        super().__init__(*args, real_data="data", gan_loss=gan_loss, teacher_nfe=teacher_nfe,
                         discriminator_time_sampler=discriminator_time_sampler or KarrasRampTime(0.0, 1.0), **kwargs)
        for name, value in [("regression_weight", regression_weight), ("hfsd_weight", hfsd_weight),
                            ("adversarial_weight", adversarial_weight)]:
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if regression_weight + hfsd_weight + adversarial_weight == 0:
            raise ValueError("regression_weight, hfsd_weight and adversarial_weight are all 0: nothing to train")
        self.regression_weight, self.hfsd_weight, self.adversarial_weight = regression_weight, hfsd_weight, adversarial_weight
        self.hfsd_time_sampler = hfsd_time_sampler or KarrasRampTime(0.5, 0.98)
        self.hfsd_normalize = hfsd_normalize
        self.real_data_reason = "its time-aware discriminator compares noised HQ images with the student's outputs"

    def teacher_restoration(self, batch: dict) -> torch.Tensor:
        """x~_0: the teacher's ``teacher_nfe``-step ODE restoration on the batch's noise and LQ image (a pair file's
        target when the datamodule serves one)."""
        if batch.get("pair_target") is not None:
            return batch["pair_target"]
        return self.sample_teacher(batch["noise"], batch.get("cond"), nfe=self.teacher_nfe, method=self.teacher_sampler)

    def hfsd_loss(self, x_student, x_teacher, cond):
        """Per-sample L_HFSD: both outputs noised at one small t with one eps, scored by the teacher."""
        t = self.sample_times(self.hfsd_time_sampler, x_student.shape[0])
        eps = self.noise_like(x_student)
        with torch.no_grad():
            noised = self.schedule.add_noise(torch.cat([x_student.detach(), x_teacher]), torch.cat([eps, eps]),
                                             torch.cat([t, t]))
            # one batched teacher call for both points (the condition repeated row-wise, whatever its kind)
            both = self.teacher_x0(noised, torch.cat([t, t]), concat_conditions(cond, cond))
            x0_student_noised, x0_teacher_noised = both.chunk(2)
        gradient = hfsd_gradient(x_student.detach(), x0_student_noised, x_teacher, x0_teacher_noised,
                                 self.hfsd_normalize)
        return surrogate_for_gradient(x_student, gradient)

    def generator_loss(self, batch):
        cond = batch.get("cond")
        x_student = self.generator_training_sample(batch)
        losses, loss = {}, torch.zeros((), device=x_student.device)
        x_teacher = None
        if self.regression_weight > 0 or self.hfsd_weight > 0:
            with torch.no_grad():
                x_teacher = self.teacher_restoration(batch)
        if self.regression_weight > 0:
            losses["regression"] = 0.5 * per_sample_mean((x_student - x_teacher) ** 2).mean()
            loss = loss + self.regression_weight * losses["regression"]
        if self.hfsd_weight > 0:
            losses["hfsd"] = self.hfsd_loss(x_student, x_teacher, cond).mean()
            loss = loss + self.hfsd_weight * losses["hfsd"]
        if self.adversarial_weight > 0:
            losses["adversarial"] = self.adversary.generator_loss(self, x_student, cond)
            loss = loss + self.adversarial_weight * losses["adversarial"]
        losses["loss"] = loss
        return losses
