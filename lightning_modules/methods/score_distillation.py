"""The mechanism shared by the distribution-matching family (DMD, DMD2, Diff-Instruct, SiD, SIM, ...).

A critic F (the "fake score") is trained by denoising score matching on the student's own samples,
    L_F = lambda(t) ||F(alpha_t sg(x_g) + sigma_t eps, t) - sg(x_g)||^2,
so that F tracks the score of the student's distribution, while the frozen teacher T gives the data score. The methods
differ only in how they turn (T, F, x_g, x_t) into the generator's loss; that is all a subclass writes.

The critic's mode in the generator step: every ``generator_loss`` of a subclass runs with the critic and its
discriminator head in eval mode (``critic_in_eval_mode``; each submodule's own mode is restored afterwards), while the
critic step trains them in the mode the module is in. The fake score the generator descends is then the critic's
deterministic estimate, not a dropout sample of it, as in the references: SiD's training loop puts the fake score
network in eval mode before the generator update (Zhou et al. 2024, github.com/mingyuanzhou/SiD,
``training/sid_training_loop.py``; SiDA's branch likewise); DMD2's releases evaluate the fake unet under no_grad in
the distribution-matching loss with dropout 0 (github.com/tianweiy/DMD2, ``main/edm/edm_network.py`` sets
``dropout=0.0``; ``main/sd_guidance.py``'s UNet has none). Diff-Instruct's release instead runs teacher and fake
score both in training mode on one shared dropout RNG state (github.com/pkulwj1994/diff_instruct,
``training/di_loss.py``), so that F = T gives a zero direction; with the teacher here always in eval mode, the
eval-mode critic is what keeps that property (diff_instruct.py).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from ..base import DistillationModule
from ..diffusion.time_samplers import TimeSampler
from ..losses import denoising_score_matching, dsm_weight, gan_loss_pair
from ..networks.denoiser import FeatureTap


def _with_critic_in_eval_mode(generator_loss):
    @functools.wraps(generator_loss)
    def wrapped(self, *args, **kwargs):
        with self.critic_in_eval_mode():
            return generator_loss(self, *args, **kwargs)
    wrapped.runs_critic_in_eval_mode = True
    return wrapped


class ScoreDistillationModule(DistillationModule):
    uses_critic = True

    def __init_subclass__(cls, **kwargs):
        # Every generator_loss a method writes evaluates the critic in eval mode (module docstring); nested calls
        # through super() are harmless (the inner call finds the networks already in eval mode and leaves them so).
        super().__init_subclass__(**kwargs)
        loss = cls.__dict__.get("generator_loss")
        if loss is not None and not getattr(loss, "runs_critic_in_eval_mode", False):
            cls.generator_loss = _with_critic_in_eval_mode(loss)

    def __init__(self, *args, critic_time_sampler: TimeSampler | None = None, critic_weighting: str | None = None,
                 gan_loss: str = "non_saturating", **kwargs):
        super().__init__(*args, **kwargs)
        # the discriminator head's game (losses.GAN_LOSSES): DMD2's non-saturating one by default, or LADD's hinge
        self.gan_loss = gan_loss
        self.gan_generator_term, self.gan_discriminator_term = gan_loss_pair(gan_loss)
        self.critic_time_sampler = critic_time_sampler or self.default_critic_time_sampler()
        critic_weighting = critic_weighting or self.default_critic_weighting()
        dsm_weight(self.schedule, torch.ones(1), critic_weighting)  # fail early on an unknown weighting
        self.critic_weighting = critic_weighting

    def default_critic_time_sampler(self) -> TimeSampler:
        """The critic's noise-level distribution when the config gives none (each paper has its own)."""
        raise NotImplementedError(f"{type(self).__name__} must define default_critic_time_sampler() or be given "
                                  "critic_time_sampler")

    def default_critic_weighting(self) -> str:
        """lambda(t) of the critic's DSM loss when the config gives none: EDM's (Karras et al. 2022, Eq. 8), the
        weighting of the EDM-based references (SiD, Diff-Instruct, DMD2 on ImageNet)."""
        return "edm"

    @contextmanager
    def critic_in_eval_mode(self):
        """The critic and discriminator head in eval mode (no dropout, no batch-statistics updates) for the block;
        afterwards every submodule gets back the mode it had, so the critic step still trains in training mode."""
        networks = [n for n in (self.critic, self.discriminator) if n is not None]
        modes = [(module, module.training) for network in networks for module in network.modules()]
        for network in networks:
            network.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training

    def noised(self, x0, sampler, with_gradient: bool = False):
        """(x_t, t) with t from ``sampler``; the gradient path to x0 is kept only if asked for."""
        t = self.sample_times(sampler, x0.shape[0])
        source = x0 if with_gradient else x0.detach()
        return self.schedule.add_noise(source, self.noise_like(x0), t), t

    def critic_denoising_loss(self, x_g, cond):
        """Per-sample DSM loss of the critic on the student's samples (and the noised input, for extra heads)."""
        x_t, t = self.noised(x_g, self.critic_time_sampler)
        weight = dsm_weight(self.schedule, t, self.critic_weighting)
        return denoising_score_matching(self.critic(x_t, t, cond), x_g, weight), x_t, t

    def critic_loss(self, batch):
        with torch.no_grad():
            x_g = self.generator_training_sample(batch)
        loss, _, _ = self.critic_denoising_loss(x_g, batch.get("cond"))
        return {"loss": loss.mean()}

    # ------------------------------------------------------------------ a discriminator on the critic's encoder
    # DMD2 (Sec. 4.3), SiDA, f-distill and Uni-Instruct put a classifier head on the critic's bottleneck, trained on
    # re-noised real versus generated samples; its logit estimates log p_real,t(x_t) / p_student,t(x_t).
    def discriminator_logits(self, x_t, t, cond):
        """Logits of the discriminator head on the critic's bottleneck features at (x_t, t)."""
        if self.discriminator is None:
            raise ValueError(f"{type(self).__name__} needs a discriminator head (model.init_args.discriminator)")
        with FeatureTap(self.critic) as tap:
            self.critic(x_t, t, cond)
        return self.discriminator(tap.features)

    def critic_loss_with_discriminator(self, batch, discriminator_weight: float):
        """Critic DSM on sg(x_g) + weight * GAN loss of the head (``gan_loss``), real (batch["real"]) vs generated,
        both re-noised with the critic's time sampler; one critic pass per side serves both terms on the fake side."""
        cond = batch.get("cond")
        with torch.no_grad():
            x_g = self.generator_training_sample(batch)
        with FeatureTap(self.critic) as fake_tap:
            denoising, _, _ = self.critic_denoising_loss(x_g, cond)
        real_t, t_real = self.noised(batch["real"], self.critic_time_sampler)
        real_logits = self.discriminator_logits(real_t, t_real, batch.get("real_cond"))
        gan = self.gan_discriminator_term(real_logits, self.discriminator(fake_tap.features)).mean()
        return {"denoising": denoising.mean(), "gan": gan, "loss": denoising.mean() + discriminator_weight * gan}
