"""SiD -- Score identity Distillation (Zhou et al., ICML 2024, arXiv:2404.04057).

Algorithm 1 (critic step, then generator step):
  critic F:     x_g = sg(G(z)); sigma ~ lognormal(-1.2, 1.2); L_F = lambda_EDM(sigma) ||F(x_g + sigma n) - x_g||^2
  generator G:  x_g = G(z); sigma from a Karras ramp at 1 - U[0, t_max/1000] (t_max = 800);
                x_t = x_g + sigma n WITH the gradient path to x_g (frozen T and F pass gradients to their input);
                y_r = T(x_t), y_f = F(x_t), w = sg(mean_CHW |x_g - y_r|) clamped >= 1e-5
                L_G = sum_CHW (y_r - y_f) * [(y_r - x_g) - alpha (y_r - y_f)] / w          (Eq. 23 with alpha = 1.2)
Samples whose T, F or G outputs are not finite are dropped from the generator loss (as the reference does).
The one-step generator starts at sigma_init = 2.5 on EDM teachers (set ``student_sigmas: [2.5]``).
No gradient clipping by default (``generator_clip_norm`` / ``critic_clip_norm`` None): the release's training loop
(github.com/mingyuanzhou/SiD, ``training/sid_training_loop.py``) clips neither network, it only replaces non-finite
gradient entries (nan -> 0, +-inf -> +-1e5). The critic is evaluated in eval mode in the generator step, as the
release does (score_distillation.py).
"""
from __future__ import annotations

import torch

from ..diffusion.time_samplers import KarrasRampTime, LogNormalTime, TimeSampler
from ..losses import per_sample_sum
from .score_distillation import ScoreDistillationModule


def sid_normalizer(x_g, y_real):
    """SiD's per-sample loss normaliser sg(mean_CHW |x_g - y_r|), clamped >= 1e-5 (shared by SIM and SiDA)."""
    return (x_g - y_real).detach().abs().flatten(1).mean(1).clamp_min(1e-5)


def sid_generator_loss(x_g, y_real, y_fake, alpha: float):
    """Per-sample SiD loss (Eq. 23): sum (y_r - y_f) . ((y_r - x_g) - alpha (y_r - y_f)) / sg(mean |x_g - y_r|)."""
    weight = sid_normalizer(x_g, y_real)
    return per_sample_sum((y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake))) / weight


class SiD(ScoreDistillationModule):
    def __init__(self, *args, alpha: float = 1.2, generator_time_sampler: TimeSampler | None = None,
                 generator_clip_norm: float | None = None, critic_clip_norm: float | None = None, **kwargs):
        super().__init__(*args, generator_clip_norm=generator_clip_norm, critic_clip_norm=critic_clip_norm, **kwargs)
        self.alpha = alpha
        self.generator_time_sampler = generator_time_sampler or KarrasRampTime(0.2, 1.0)

    def default_critic_time_sampler(self):
        return LogNormalTime(-1.2, 1.2)

    def generator_denoised(self, batch):
        """(x_g, y_real, y_fake, finite): x_g = G(z); x_t = alpha x_g + sigma n with the gradient path to x_g;
        y_real = T(x_t), y_fake = F(x_t); ``finite`` marks the samples whose x_g, y_real and y_fake are finite."""
        cond = batch.get("cond")
        x_g = self.generator_training_sample(batch)
        x_t, t = self.noised(x_g, self.generator_time_sampler, with_gradient=True)
        y_real = self.teacher_x0(x_t, t, cond)
        y_fake = self.critic(x_t, t, cond)
        finite = torch.stack([v.flatten(1).isfinite().all(1) for v in (x_g, y_real, y_fake)]).all(0)
        return x_g, y_real, y_fake, finite

    def per_sample_generator_loss(self, x_g, y_real, y_fake):
        """Eq. 23 per sample. Members of the family that only change this formula (SIM) override this one hook."""
        return sid_generator_loss(x_g, y_real, y_fake, self.alpha)

    def generator_loss(self, batch):
        x_g, y_real, y_fake, finite = self.generator_denoised(batch)
        per_sample = self.per_sample_generator_loss(x_g[finite], y_real[finite], y_fake[finite])
        return {"loss": per_sample.mean(), "finite_fraction": finite.float().mean()}
