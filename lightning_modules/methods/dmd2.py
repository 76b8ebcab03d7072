"""DMD2 -- Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, arXiv:2405.14867).

Algorithm (per batch; the TwoTimeScaleUpdate callback sets how many critic updates come per generator update):
  critic F:     x_g = sg(G(z)); t ~ p(t); x_t = alpha_t x_g + sigma_t eps
                L_F = lambda(t) ||F(x_t, t) - x_g||^2                         (denoising score matching, Eq. 1's mu_fake)
                    + lambda_D [softplus(-D(F_feat(real_t))) + softplus(D(F_feat(x_t)))]   (optional GAN, Eq. 4)
  generator G:  x_g = G(z) (K-step students: backward simulation, Sec. 4.5); t ~ U[0.02 T, 0.98 T]
                g = (p_real - p_fake) / mean_CHW |p_real|, p = x_g - D(x_t)      (Eq. 2 with DMD's normaliser)
                L_G = 1/2 ||x_g - sg(x_g - g)||^2 + lambda_G softplus(-D(F_feat(x_t)))
Guidance is applied to the teacher only. Defaults follow the paper's ImageNet-64 recipe (TTUR 5:1, AdamW wd 0.01,
clip 10); GAN weights default to 0 (data-free), the paper uses lambda_G = 3e-3, lambda_D = 1e-2 with real images.
"""
from __future__ import annotations

import torch

from ..diffusion.time_samplers import KarrasRampTime, TimeSampler
from ..losses import dmd_gradient, non_saturating_gan_generator, surrogate_for_gradient
from .score_distillation import ScoreDistillationModule


class DMD2(ScoreDistillationModule):
    def __init__(self, *args, generator_time_sampler: TimeSampler | None = None,
                 gan_generator_weight: float = 0.0, gan_critic_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.generator_time_sampler = generator_time_sampler or self.default_generator_time_sampler()
        self.gan_generator_weight, self.gan_critic_weight = gan_generator_weight, gan_critic_weight
        uses_gan = gan_generator_weight > 0 or gan_critic_weight > 0
        if uses_gan and self.discriminator is None:
            raise ValueError(f"gan weights ({gan_generator_weight}, {gan_critic_weight}) need a discriminator head")
        self.needs_real_data = gan_critic_weight > 0

    def default_critic_time_sampler(self):
        return KarrasRampTime(0.02, 0.98)

    def default_generator_time_sampler(self) -> TimeSampler:
        """The generator's noise levels when the config gives none: t ~ U[0.02 T, 0.98 T] on the Karras ramp."""
        return KarrasRampTime(0.02, 0.98)

    def fake_x0(self, x_t, t, cond):
        """The critic's x0 estimate D_fake(x_t) seen by the generator step (called without gradient)."""
        return self.critic(x_t, t, cond)

    def matching_gradient(self, x_g, x0_real, x0_fake, x_t, t, cond):
        """The per-sample direction g the generator descends (Eq. 2). Family members that only re-weight it
        (Diff-Instruct, f-distill, ...) override this one hook."""
        return dmd_gradient(x_g, x0_real, x0_fake)

    def generator_loss(self, batch):
        cond = batch.get("cond")
        x_g = self.generator_training_sample(batch)
        x_t, t = self.noised(x_g, self.generator_time_sampler)
        with torch.no_grad():
            x0_real = self.teacher_x0(x_t, t, cond)
            x0_fake = self.fake_x0(x_t, t, cond)
        gradient = self.matching_gradient(x_g.detach(), x0_real, x0_fake, x_t, t, cond)
        distribution_matching = surrogate_for_gradient(x_g, gradient).mean()
        losses = {"distribution_matching": distribution_matching}
        loss = distribution_matching
        if self.gan_generator_weight > 0:
            # Re-noise WITH the gradient path to x_g; the critic's weights are frozen by the optimizer toggle.
            x_t_grad = self.schedule.add_noise(x_g, self.noise_like(x_g), t)
            gan = non_saturating_gan_generator(self.discriminator_logits(x_t_grad, t, cond)).mean()
            losses["gan"] = gan
            loss = loss + self.gan_generator_weight * gan
        losses["loss"] = loss
        return losses

    def critic_loss(self, batch):
        if self.gan_critic_weight <= 0:
            return super().critic_loss(batch)
        return self.critic_loss_with_discriminator(batch, self.gan_critic_weight)
