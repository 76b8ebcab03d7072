"""SiDA -- Adversarial Score identity Distillation (Zhou, Zheng, Gu, Wang & Huang, ICLR 2025, arXiv:2410.14919).

SiD plus a GAN term whose discriminator is a head on the fake-score network's encoder (no separate discriminator
network), trained on real versus generated samples; real data are therefore needed in every batch.

Algorithm (per batch):
  critic F + head D:  x_g = sg(G(z)); real x_r from the data
        L_F = lambda_EDM(sigma) mean_CHW (F(x_g + sigma n) - x_g)^2          (SiD's critic, DSM on student samples)
            + lambda_D [softplus(-D(F_enc(x_r,t'))) + softplus(D(F_enc(x_g,t)))]   (non-saturating GAN; both
              sides re-noised at the critic's lognormal noise levels: critic_loss_with_discriminator)
  generator G:  x_g = G(z); sigma from SiD's Karras ramp; x_t = x_g + sigma n with the gradient path; ONE critic pass
                gives F(x_t) and the encoder features, so the GAN logit is taken at SiD's own x_t;
                w_i = sg(mean_CHW |x_g,i - T(x_t,i)|)                            (SiD's per-sample normaliser)
                L_SiD,i = (T - F) . ((T - x_g) - alpha (T - F)) / w_i             (SiD's Eq. 23, sid_generator_loss)
                L_adv,i = dim * mean_{j in batch} softplus(-clamp(D(F_enc(x_t,j)), -10, 10)) / w_i
                L_G = mean_i L_SiD,i + lambda_G mean_i L_adv,i
The adversarial loss is "batch-normalized within each GPU and then combined with the original SiD loss", which
"incorporates the average 'fakeness' per GPU batch into the pixel-based SiD loss" (the paper's abstract): its per-sample
BCE is first averaged over the batch, then -- like the pixel-summed SiD loss -- scaled by the number of dimensions and
divided by each sample's SiD normaliser. The authors' released training loop combines the two as
0.5 lambda_sid L_sid + 0.5 lambda_adv L_adv with lambda_sid = 100 and lambda_adv = 0.01 in its CIFAR-10 example, i.e.
lambda_G = lambda_adv / lambda_sid = 1e-4 relative to the SiD loss (the default here; the common factor only rescales
the step under Adam). The +-10 logit clamp on the generator side follows the release too.

Deviations, kept on purpose (the shared helper serves DMD2 and SiDA alike): the release weights the discriminator's
BCE by lambda_EDM(sigma), halves it and re-noises real and fake with the same (sigma, n); here the critic's GAN term is
the unweighted non-saturating loss with independent noise, scaled by ``gan_critic_weight`` (against a DSM term
averaged, not summed, over pixels: the release's relative weight is lambda_EDM(sigma) / (2 dim)). The release also
delays the GAN terms (and the first generator updates) by a warm-up measured in images; here they act from the start.
Non-finite samples are dropped from both generator terms, as in SiD.

Clipping: SiD's defaults, no norm clipping of either network (``generator_clip_norm`` / ``critic_clip_norm`` None).
The release (github.com/mingyuanzhou/SiD, branch ``sida``) never clips the generator; its EDM training loop
(``sida_training/sida_training_loop.py``) clips the fake score network's gradient entries by VALUE at 1 when the GAN
term is on, its EDM2 loop does not (the line is commented out). Value clipping is not reproduced here (only norm
clipping is offered); set ``critic_clip_norm`` to bound the critic's step instead.
"""
from __future__ import annotations

import math

from ..networks.denoiser import FeatureTap
from .sid import SiD, sid_generator_loss, sid_normalizer


class SiDA(SiD):
    needs_real_data = True
    real_data_reason = "its GAN term compares real and generated samples"

    def __init__(self, *args, gan_generator_weight: float = 1e-4, gan_critic_weight: float = 1e-2,
                 logit_clamp: float | None = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        for name, value in [("gan_generator_weight", gan_generator_weight), ("gan_critic_weight", gan_critic_weight)]:
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if logit_clamp is not None and not logit_clamp > 0:
            raise ValueError(f"logit_clamp must be > 0 or null, got {logit_clamp}")
        if self.discriminator is None:
            raise ValueError("SiDA needs a discriminator head on the critic's encoder (model.init_args.discriminator, "
                             "e.g. lightning_modules.networks.DiscriminatorHead)")
        self.gan_generator_weight, self.gan_critic_weight = gan_generator_weight, gan_critic_weight
        self.logit_clamp = logit_clamp

    def generator_loss(self, batch):
        # The critic's one forward pass at SiD's x_t gives both F(x_t) and the encoder features the head reads
        # (the critic's and head's weights are frozen by the optimizer toggle; gradients reach x_g through x_t).
        with FeatureTap(self.critic) as tap:
            x_g, y_real, y_fake, finite = self.generator_denoised(batch)
        x_g, y_real, y_fake = x_g[finite], y_real[finite], y_fake[finite]
        sid = sid_generator_loss(x_g, y_real, y_fake, self.alpha).mean()
        logits = self.discriminator(tap.features)[finite]
        if self.logit_clamp is not None:
            logits = logits.clamp(-self.logit_clamp, self.logit_clamp)
        adversarial = self.adversarial_loss(logits, x_g, y_real)
        return {"loss": sid + self.gan_generator_weight * adversarial, "sid": sid, "gan": adversarial,
                "finite_fraction": finite.float().mean()}

    def adversarial_loss(self, logits, x_g, y_real):
        """mean_i [dim * mean_j softplus(-logit_j) / w_i]: the batch's average non-saturating generator loss (or
        the ``gan_loss`` chosen), put on the pixel-summed, per-sample-normalised scale of SiD's loss."""
        dim = math.prod(x_g.shape[1:])
        return dim * self.gan_generator_term(logits).mean() * (1.0 / sid_normalizer(x_g, y_real)).mean()

    def critic_loss(self, batch):
        return self.critic_loss_with_discriminator(batch, self.gan_critic_weight)
