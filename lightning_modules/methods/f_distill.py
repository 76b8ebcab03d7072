"""f-distill -- One-step Diffusion Models with f-Divergence Distribution Matching (Xu, Nie & Vahdat 2025,
arXiv:2502.15681).

Minimising D_f(p_data,t || p_student,t) instead of DMD's reverse KL changes the generator gradient only by a per-sample
weight of the density ratio r = p_data,t / p_student,t (Sec. 4, the gradient of D_f):
    grad_theta D_f = E_{z, eps, t}[ h(r(x_t)) (s_student(x_t) - s_data(x_t)) dx_t/dtheta ],  h(r) = f''(r) r^2,
so a less mode-seeking f (forward KL h = r, JS h = r / (1 + r), ...) up-weights samples where the data is denser than
the student, i.e. under-covered modes; reverse KL (h = 1) is DMD / DMD2 itself.

Algorithm (per batch; TwoTimeScaleUpdate sets the critic : generator ratio):
  critic F + discriminator head D on F's bottleneck:
        L = lambda(t) ||F(x_t) - sg(x_g)||^2 + lambda_D [softplus(-D(real_t)) + softplus(D(x_t))]     (as DMD2, Eq. 4)
  generator G:  x_g = G(z); t ~ U[0.02 T, 0.98 T] (Karras ramp); x_t = alpha x_g + sigma eps
        g   = (D_fake - D_real) / mean_CHW |x_g - D_real|                       (DMD2's normalised direction)
        r   = clip(exp(clamp(D(x_t), +-10)), 0.1, 20) / EMA_bin(t)[r]          (Sec. 4: ratio, 2-stage normalisation)
        w   = h(r) / mean_global_batch h(r)
        L_G = 1/2 ||x_g - sg(x_g - w g)||^2 + lambda_G softplus(-D(x_t))         (optional GAN term, as DMD2)
The divergences and the ratio estimate live in density_ratio.py (shared with Uni-Instruct). Defaults: JS, the paper's
best ImageNet-64 / COCO choice; ratio EMA 0.5 over 10 noise-level bins and lambda_G = 3e-3 as in the ImageNet-64 recipe
of the authors' release (NVlabs FastGen, ``fastgen/configs/experiments/EDM/config_f_distill_in64.py``).
``ratio_bin_spacing``: "time" (default) -- the release's bins, equal slices of the native time [t_min, t_max], i.e. of
sigma on EDM teachers (``fastgen/methods/distribution_matching/f_distill.py``); "karras_ramp" -- equal slices of the
Karras ramp coordinate (about equally populated under the generator's draws; this project's earlier choice, whose
per-bin normalisers differ from the release's by up to a third).
"""
from __future__ import annotations

import torch

from ..losses import dmd_gradient
from .density_ratio import DensityRatioEstimate, get_divergence, normalize_by_global_mean
from .dmd2 import DMD2


class FDistill(DMD2):
    needs_real_data = True
    real_data_reason = "the discriminator that estimates the density ratio is trained on real versus generated samples"

    def __init__(self, *args, divergence: str = "js", gan_generator_weight: float = 3e-3,
                 gan_critic_weight: float = 1e-2, ratio_logit_bound: float = 10.0, ratio_min: float = 0.1,
                 ratio_max: float = 20.0, ratio_time_bins: int = 10, ratio_ema_decay: float = 0.5,
                 normalize_ratio_per_bin: bool = True, ratio_bin_spacing: str = "time", **kwargs):
        super().__init__(*args, gan_generator_weight=gan_generator_weight, gan_critic_weight=gan_critic_weight,
                         **kwargs)
        self.divergence = get_divergence(divergence)
        self.density_ratio = DensityRatioEstimate.for_module(
            "f-distill", self, gan_critic_weight, ratio_logit_bound, ratio_min, ratio_max, ratio_time_bins,
            ratio_ema_decay, normalize_ratio_per_bin, ratio_bin_spacing)
        self._last_weights = None

    def ratio_weights(self, x_t, t, cond):
        """w = h(r) / mean h(r) over the global batch, r from the discriminator at the generator's (x_t, t)."""
        with torch.no_grad():
            logits = self.discriminator_logits(x_t, t, cond)
        ratio, _ = self.density_ratio.estimate(self, logits, t)
        return normalize_by_global_mean(self, self.divergence.h(ratio) * torch.ones_like(ratio))

    def matching_gradient(self, x_g, x0_real, x0_fake, x_t, t, cond):
        weights = self.ratio_weights(x_t, t, cond)
        self._last_weights = weights.detach()
        direction = dmd_gradient(x_g, x0_real, x0_fake)
        return direction * weights.to(direction.dtype).reshape(-1, *[1] * (direction.ndim - 1))

    def generator_loss(self, batch):
        losses = super().generator_loss(batch)
        # how far the update is from reverse KL's uniform weights
        losses["ratio_weight_max"] = self._last_weights.max()
        return losses
