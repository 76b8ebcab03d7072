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
``gan_loss: hinge`` swaps the softplus terms for LADD's hinge pair (losses.GAN_LOSSES); the default is the paper's.

Noise levels and the critic's weighting, as in the authors' release (github.com/tianweiy/DMD2), when the config sets
none of ``generator_time_sampler``, ``critic_time_sampler``, ``critic_weighting``:
  * EDM-type teachers (``main/edm/edm_guidance.py``, ImageNet-64): a 1000-point Karras grid (rho 7). The generator
    draws an index uniformly in [min_step, max_step] = [0.02 N, 0.98 N] -- ``KarrasRampTime(0.02, 0.98)``; the fake
    unet's denoising loss draws an index uniformly over the WHOLE grid (``randint(0, N)``; min/max_step_percent apply
    to the generator only) -- ``KarrasRampTime(0, 1)`` -- weighted by EDM's lambda = 1/sigma^2 + 1/sigma_data^2
    (``critic_weighting: edm``). The continuous ramp has the grid's law up to its 1/999 quantisation.
  * discrete VP teachers (``main/sd_guidance.py``, SD1.5 / SDXL, epsilon prediction, N = 1000 timesteps): the
    generator draws t uniformly in {20, ..., 980} (``DiscreteUniformTime(0.02, 0.98)``); the fake unet's loss draws t
    uniformly in {0, ..., 999} (``DiscreteUniformTime(0, 1)``) and is the unweighted epsilon-MSE
    mean (eps_F - eps)^2 (``critic_weighting: epsilon``: alpha^2 / sigma^2 ||D_F - x0||^2 is exactly that).
  * other continuous schedules (VP-SDE, flow, TrigFlow) use the EDM-type defaults through the EDM noise level.
Giving any of the three in the config overrides only that one.
"""
from __future__ import annotations

import torch

from ..diffusion.time_samplers import DiscreteUniformTime, KarrasRampTime, TimeSampler
from ..losses import dmd_gradient, surrogate_for_gradient
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
        self.real_data_reason = "its GAN term (gan_critic_weight > 0) compares real and generated samples"

    def default_critic_time_sampler(self):
        """The fake score's noise levels (module docstring): every timestep of a discrete VP schedule, else the whole
        Karras ramp -- DMD2's ``compute_loss_fake`` draws ``randint(0, num_train_timesteps)`` in both releases."""
        if self.schedule.is_discrete:
            return DiscreteUniformTime(0.0, 1.0)
        return KarrasRampTime(0.0, 1.0)

    def default_critic_weighting(self) -> str:
        """DMD2's SD release trains the fake unet with the unweighted epsilon-MSE, its EDM release with EDM's weight."""
        return "epsilon" if self.schedule.is_discrete else "edm"

    def default_generator_time_sampler(self) -> TimeSampler:
        """The generator's noise levels when the config gives none: t ~ U[0.02 T, 0.98 T] -- timesteps {20..980} of
        a discrete VP schedule, else that range of the Karras ramp (module docstring)."""
        if self.schedule.is_discrete:
            return DiscreteUniformTime(0.02, 0.98)
        return KarrasRampTime(0.02, 0.98)

    def fake_x0(self, x_t, t, cond):
        """The critic's x0 estimate D_fake(x_t) seen by the generator step (called without gradient, in eval mode:
        see score_distillation.py)."""
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
            gan = self.gan_generator_term(self.discriminator_logits(x_t_grad, t, cond)).mean()
            losses["gan"] = gan
            loss = loss + self.gan_generator_weight * gan
        losses["loss"] = loss
        return losses

    def critic_loss(self, batch):
        if self.gan_critic_weight <= 0:
            return super().critic_loss(batch)
        return self.critic_loss_with_discriminator(batch, self.gan_critic_weight)
