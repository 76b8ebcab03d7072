"""PSO -- Pairwise Sample Optimization (Miao, Yang, Lin, Wang, Liu, Wang & Qiu, ICLR 2025, "Tuning Timestep-Distilled
Diffusion Model Using Pairwise Sample Optimization", arXiv:2410.03190).

Fine-tunes an already distilled few-step student G_theta without a teacher: it raises the model's relative likelihood
of a preferred ("target") sample over a dispreferred ("reference") one, each measured against a frozen copy G_ref of
the distilled model, so the student keeps its few-step sampling while its output distribution moves (Sec. 3). The
online variant (Sec. 3.3) with preferences from a reward, per batch:

  c, z_a ~ batch;  z_b = rho z_a + sqrt(1 - rho^2) xi          (a neighbour noise of the same condition)
  x_a, x_b = sg G_theta(z_a, c), sg G_theta(z_b, c)            (the student's own samples, K steps)
  (x_w, x_l) = the pair ordered by the reward r(x, c)          (rewards.py: exact mixture log-density on the toy
                                                               suite, MNIST classifier log-prob, CLIP score of
                                                               the prompt: experiments/mnist_t2i/pso.yaml)
  t ~ the student's own sampling times (or ``time_sampler``);  eps ~ N(0, I), shared by the pair and both networks
  d_net(x) = mean (x - net(alpha_t x + sigma_t eps, t, c))^2   (the denoising error: the likelihood surrogate)
  L = - log sigmoid( -beta [ (d_theta(x_w) - d_ref(x_w)) - (d_theta(x_l) - d_ref(x_l)) ] )
    = softplus( beta [ Delta_w - Delta_l ] )                   (the Diffusion-DPO form PSO builds on, its Eq. 5-7)

At the start theta = ref, so L = log 2 and grad L = beta / 2 grad [d_theta(x_w) - d_theta(x_l)]: the first steps
denoise toward the preferred sample and away from the dispreferred one; the reference term bounds how far the
student drifts (it saturates once the margin is large). Timesteps: PSO noises the pair to the distilled model's own
timesteps, so the likelihood is measured where the student actually samples.

The target-image variant (``pair_source: target``; the paper's style transfer and concept customisation, where the
training images are the preferred side and "reference images sampled from the current distilled model" the other,
its abstract and Sec. 3.2): per batch

  x_w = a training image x ~ batch["real"] with its condition c;  x_l = sg G_theta(z, c), z ~ N(0, I)

and the same loss, so the student moves toward the training set's distribution while keeping its few-step sampler;
no reward is needed (``reward`` may be left out). The DataModule must serve real samples (the real-image regime).

The reference G_ref is a frozen copy of the student as the method starts (after the toy warm start), registered so
checkpoints carry it. With ``student_lora`` only the adapters train and G_ref copies them at B = 0.
Not reproduced: pairs from a fixed offline preference dataset (Pick-a-Pic style, the paper's offline preference
tuning), which would be a pair DataModule rather than a change here.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import DistillationModule
from ..diffusion.time_samplers import TimeSampler
from ..losses import per_sample_mean


def pairwise_preference_loss(margin_winner: Tensor, margin_loser: Tensor, beta: float) -> Tensor:
    """-log sigmoid(-beta (Delta_w - Delta_l)) per pair, Delta = d_theta - d_ref (softplus for stability)."""
    return F.softplus(beta * (margin_winner - margin_loser))


#: where the preferred / dispreferred pairs come from (module docstring)
PAIR_SOURCES = ("online", "target")


class PairwiseSampleOptimization(DistillationModule):
    def __init__(self, *args, reward: nn.Module | None = None, beta: float = 1.0, pair_correlation: float = 0.5,
                 time_sampler: TimeSampler | None = None, pair_source: str = "online", **kwargs):
        if pair_source not in PAIR_SOURCES:
            raise ValueError(f"unknown pair_source {pair_source!r}; expected one of {PAIR_SOURCES}")
        if pair_source == "online" and reward is None:
            raise ValueError("pair_source: online orders the student's own pairs by a reward: give model.init_args."
                             "reward (e.g. lightning_modules.methods.rewards.MixtureLogDensity), or use pair_source: "
                             "target with training images")
        if not beta > 0:
            raise ValueError(f"beta (the preference temperature) must be > 0, got {beta}")
        if not 0.0 <= pair_correlation < 1.0:
            raise ValueError(f"pair_correlation (rho of the pair's neighbour noise) must be in [0, 1), got "
                             f"{pair_correlation}")
        super().__init__(*args, **kwargs)
        for store in (self.hparams, getattr(self, "_hparams_initial", None) or {}):  # a network: state, not hparams
            if isinstance(store.get("reward"), nn.Module):
                store.pop("reward")
        self.reward = reward.requires_grad_(False).eval() if reward is not None else None
        self.beta, self.pair_correlation = float(beta), float(pair_correlation)
        self.pair_source = pair_source
        self.needs_real_data = pair_source == "target"
        self.real_data_reason = "pair_source: target prefers training images over the student's own samples"
        self.time_sampler = time_sampler
        self.reference = self._frozen_copy()

    def _frozen_copy(self) -> nn.Module:
        return copy.deepcopy(self.student).requires_grad_(False).eval()

    def on_warm_start_end(self) -> None:
        """G_ref is the student PSO starts from: the warm-started one on the toy suite."""
        self.reference.load_state_dict(self.student.state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in ("reference", "reward"):
            if getattr(self, frozen, None) is not None:
                getattr(self, frozen).eval()
        return self

    # ------------------------------------------------------------------ pairs and preferences
    def neighbour_noise(self, noise: Tensor) -> Tensor:
        rho = self.pair_correlation
        return rho * noise + math.sqrt(1 - rho ** 2) * torch.randn_like(noise)

    def score(self, x0: Tensor, cond, prompts=None) -> Tensor:
        """The reward of each sample (decoded to images first for an image reward on a latent teacher; a text reward
        such as rewards.CLIPReward reads the batch's prompts)."""
        images = self.to_images(x0) if getattr(self.reward, "reads_images", False) else x0
        return self.reward(images, cond, prompts).float()

    @torch.no_grad()
    def preference_pairs(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """(x_w, x_l, reward gap r_w - r_l) from two student samples per condition."""
        noise, cond, prompts = batch["noise"], batch.get("cond"), batch.get("prompts")
        x_a = self.generate(noise, cond)
        x_b = self.generate(self.neighbour_noise(noise), cond)
        r_a, r_b = self.score(x_a, cond, prompts), self.score(x_b, cond, prompts)
        a_wins = (r_a >= r_b).view(-1, *([1] * (x_a.dim() - 1)))
        winner, loser = torch.where(a_wins, x_a, x_b), torch.where(a_wins, x_b, x_a)
        return winner, loser, (r_a - r_b).abs()

    @torch.no_grad()
    def target_pairs(self, batch: dict) -> tuple[Tensor, Tensor, object]:
        """(x_w, x_l, c): training images and the current student's samples of their conditions."""
        target, cond = batch["real"], batch.get("real_cond")
        noise = torch.randn((target.shape[0], *batch["noise"].shape[1:]), device=target.device,
                            dtype=batch["noise"].dtype)
        return target.to(noise.dtype), self.generate(noise, cond), cond

    def pair_times(self, n: int, device) -> Tensor:
        if self.time_sampler is not None:
            return self.sample_times(self.time_sampler, n)
        index = torch.randint(0, len(self.student_times), (n,), device=device)
        return self.student_times.to(device)[index]

    # ------------------------------------------------------------------ the loss
    def denoising_error(self, network: nn.Module, x0: Tensor, t: Tensor, eps: Tensor, cond) -> Tensor:
        """d_net(x0) at (t, eps): the per-sample mean squared x0 error."""
        return per_sample_mean((network(self.schedule.add_noise(x0, eps, t), t, cond) - x0) ** 2)

    def pairwise_loss(self, winner: Tensor, loser: Tensor, t: Tensor, eps: Tensor, cond) -> dict[str, Tensor]:
        with torch.no_grad():
            reference_w = self.denoising_error(self.reference, winner, t, eps, cond)
            reference_l = self.denoising_error(self.reference, loser, t, eps, cond)
        margin_w = self.denoising_error(self.student, winner, t, eps, cond) - reference_w
        margin_l = self.denoising_error(self.student, loser, t, eps, cond) - reference_l
        per_pair = pairwise_preference_loss(margin_w, margin_l, self.beta)
        accuracy = (margin_w < margin_l).float().mean()  # the student prefers the winner more than G_ref does
        return {"loss": per_pair.mean(), "margin_winner": margin_w.detach().mean(),
                "margin_loser": margin_l.detach().mean(), "preference_accuracy": accuracy}

    def generator_loss(self, batch):
        if self.pair_source == "target":
            winner, loser, cond = self.target_pairs(batch)
            t = self.pair_times(winner.shape[0], winner.device)
            return self.pairwise_loss(winner, loser, t, self.noise_like(winner), cond)
        cond = batch.get("cond")
        winner, loser, gap = self.preference_pairs(batch)
        t = self.pair_times(winner.shape[0], winner.device)
        losses = self.pairwise_loss(winner, loser, t, self.noise_like(winner), cond)
        losses["reward_winner"] = self.score(winner, cond, batch.get("prompts")).mean()
        losses["reward_gap"] = gap.mean()
        return losses
