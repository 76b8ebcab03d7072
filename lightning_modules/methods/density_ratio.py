"""Density-ratio weighting shared by f-distill and Uni-Instruct: the f-divergence table and the ratio estimate.

Both methods minimise an f-divergence D_f(p_data,t || p_student,t) = E_student[f(r)] with the density ratio
r = p_data,t / p_student,t, and both end up weighting a score-distillation gradient by functions of r:

* f-distill (Xu et al. 2025, arXiv:2502.15681, Sec. 4, the gradient of D_f):
  grad D_f = E[ h(r) (s_student - s_data) dx_t/dtheta ] with h(r) = f''(r) r^2 -- the DMD gradient re-weighted per
  sample. Reverse KL gives h = 1 (DMD / DMD2).
* Uni-Instruct (Wang et al. 2025, arXiv:2505.20755, Thm. 3.1-3.2): the expansion
  D_f(p_data || p_student) = int g^2/2 E_student[h(r) ||s_data - s_student||^2] dt uses the same h, and its
  tractable gradient needs h, h' and h'' (see uni_instruct.py).

The ratio is read off a discriminator D trained to tell re-noised data (label 1) from re-noised student samples
(label 0): at its optimum the logit is log r. Following f-distill's practical recipe (Sec. 4: GAN-based
ratio estimation and a two-stage normalisation; constants as in the authors' public release, NVlabs FastGen, for
ImageNet-64):
  1. r = exp(clamp(logit, -10, 10)), clipped to [0.1, 20];
  2. r is divided by a running (EMA) mean of r within its noise-level bin -- at the optimum E_student[r] = 1 at every
     noise level, so this removes the discriminator's per-level calibration drift and makes weights comparable
     across noise levels; the bins are equal slices of the schedule's native time [t_min, t_max] (= equal slices of
     sigma on EDM teachers), as in the release (``FdistillModel._get_f_div_weighting_h``: bin width
     (max_t - min_t) / bin_num, bin 0 at min_t);
  3. the weights are divided by the mean of h(r) over the global batch (all DDP ranks), so their scale is 1.

Conventions here: constant factors of h are immaterial (step 3 removes them), so h is the paper's table entry and
``scale`` records h / (f'' r^2) (2 for squared Hellinger, 1/2 for Neyman chi^2, 1 otherwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..diffusion.schedules import NoiseSchedule


@dataclass(frozen=True)
class FDivergence:
    """An f-divergence D_f(p || q) = E_q[f(p/q)] and its weighting h(r) = scale * f''(r) r^2 with two derivatives."""
    name: str
    f: Callable[[Tensor], Tensor]
    h: Callable[[Tensor], Tensor]
    h_prime: Callable[[Tensor], Tensor]
    h_second: Callable[[Tensor], Tensor]
    scale: float = 1.0


def _ones(r):
    return torch.ones_like(r)


def _zeros(r):
    return torch.zeros_like(r)


# f-distill's table of divergences and weights (p = data, q = student, r = p / q); derivatives by hand, checked against
# autograd in the tests.
DIVERGENCES: dict[str, FDivergence] = {d.name: d for d in [
    FDivergence("reverse_kl", f=lambda r: -torch.log(r), h=_ones, h_prime=_zeros, h_second=_zeros),
    FDivergence("kl", f=lambda r: r * torch.log(r), h=lambda r: r, h_prime=_ones, h_second=_zeros),
    FDivergence("js", f=lambda r: r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2),
                h=lambda r: 1 - 1 / (1 + r), h_prime=lambda r: (1 + r) ** -2, h_second=lambda r: -2 * (1 + r) ** -3),
    FDivergence("squared_hellinger", f=lambda r: (torch.sqrt(r) - 1) ** 2, h=torch.sqrt,
                h_prime=lambda r: 0.5 * r ** -0.5, h_second=lambda r: -0.25 * r ** -1.5, scale=2.0),
    FDivergence("jeffreys", f=lambda r: (r - 1) * torch.log(r), h=lambda r: 1 + r, h_prime=_ones, h_second=_zeros),
    FDivergence("neyman", f=lambda r: (1 - r) ** 2 / r, h=lambda r: 1 / r, h_prime=lambda r: -r ** -2,
                h_second=lambda r: 2 * r ** -3, scale=0.5),
]}


def get_divergence(name: str) -> FDivergence:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; expected one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def ratio_from_logits(logits: Tensor, logit_bound: float = 10.0, ratio_min: float = 0.1,
                      ratio_max: float = 20.0) -> tuple[Tensor, Tensor]:
    """(r, inside): r = clip(exp(clamp(logit, +-bound)), ratio_min, ratio_max) in float64, and a mask of the samples
    where neither bound is active (there r still varies with x_t; Uni-Instruct differentiates it only there)."""
    logits = logits.detach().double()
    raw = logits.clamp(-logit_bound, logit_bound).exp()
    inside = (logits.abs() < logit_bound) & (raw > ratio_min) & (raw < ratio_max)
    return raw.clamp(ratio_min, ratio_max), inside


def global_sum(module, x: Tensor) -> Tensor:
    """``x`` summed over the DDP ranks (``x`` itself on a single process); every rank must pass the same shape."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.world_size <= 1:
        return x
    return module.all_gather(x.detach()).sum(0)


def global_mean(module, values: Tensor) -> Tensor:
    """Mean of ``values`` over the global batch (all DDP ranks; local batches may differ in size)."""
    total = global_sum(module, torch.stack([values.detach().sum(), values.new_tensor(values.numel())]))
    return total[0] / total[1].clamp_min(1)


def normalize_by_global_mean(module, weights: Tensor) -> Tensor:
    """weights / mean(weights) over the global batch (f-distill's h / E[h])."""
    return weights / global_mean(module, weights).clamp_min(1e-12)


BIN_SPACINGS = ("time", "karras_ramp")


class TimeBinnedRatioNormalizer(nn.Module):
    """f-distill's running normalisation of the ratio per noise-level bin (step 2 above).

    ``spacing`` (f-distill's and Uni-Instruct's ``ratio_bin_spacing``):
      * ``time`` (default, the release's): equal intervals of the native time t in [t_min, t_max], bin 0 at t_min
        (the data end). On EDM teachers t = sigma: bins of width (80 - 0.002) / num_bins, so with DMD2's generator
        draws (Karras ramp, mostly small sigma) the low bins hold most samples.
      * ``karras_ramp``: equal intervals of the Karras ramp coordinate u in [0, 1] (u = 0 at sigma_max, 1 at sigma_min,
        rho = 7), the coordinate of DMD2's generator draws, so the bins are about equally populated; bin 0 at sigma_max.
    Each generator step (in training mode) moves the bin's mean towards the batch mean of r in that bin:
    m <- decay m + (1 - decay) mean(r); decay 0 uses the current batch alone. The means are buffers, so they are
    saved in and restored from checkpoints (a checkpoint's bins follow the spacing it was trained with).
    """

    def __init__(self, schedule: NoiseSchedule, num_bins: int = 10, ema_decay: float = 0.5, rho: float = 7.0,
                 spacing: str = "time"):
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"ratio_time_bins must be >= 1, got {num_bins}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ratio_ema_decay must be in [0, 1), got {ema_decay}")
        if spacing not in BIN_SPACINGS:
            raise ValueError(f"unknown ratio_bin_spacing {spacing!r}; expected one of {list(BIN_SPACINGS)}")
        self.num_bins, self.ema_decay, self.rho, self.spacing = num_bins, ema_decay, rho, spacing
        self.schedule = schedule
        self.t_min, self.t_max = float(schedule.t_min), float(schedule.t_max)
        sigmas = schedule.edm_sigma(torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64))
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[1])
        self.register_buffer("bin_mean_ratio", torch.ones(num_bins, dtype=torch.float64))
        self.register_buffer("bin_updates", torch.zeros(num_bins, dtype=torch.long))

    def bin_edges(self) -> Tensor:
        """The num_bins + 1 bin boundaries, in native time for ``time`` and in EDM sigma for ``karras_ramp``
        (descending there: bin 0 starts at sigma_max)."""
        u = torch.linspace(0, 1, self.num_bins + 1, dtype=torch.float64)
        if self.spacing == "time":
            return self.t_min + u * (self.t_max - self.t_min)
        inv = 1.0 / self.rho
        return (self.sigma_max ** inv + u * (self.sigma_min ** inv - self.sigma_max ** inv)) ** self.rho

    def bin_index(self, t: Tensor) -> Tensor:
        """The bin of each native time ``t``."""
        if self.spacing == "time":
            position = (t.double() - self.t_min) / (self.t_max - self.t_min)
        else:
            inv = 1.0 / self.rho
            top, bottom = self.sigma_max ** inv, self.sigma_min ** inv
            position = (self.schedule.edm_sigma(t.double()) ** inv - top) / (bottom - top)
        return (position * self.num_bins).floor().long().clamp(0, self.num_bins - 1)

    def batch_statistics(self, ratio: Tensor, bins: Tensor) -> Tensor:
        """(2, num_bins): sum of r and number of samples in each bin (summable over DDP ranks)."""
        counts = torch.bincount(bins, minlength=self.num_bins).double()
        sums = torch.bincount(bins, weights=ratio.detach().double(), minlength=self.num_bins)
        return torch.stack([sums, counts])

    @torch.no_grad()
    def update(self, statistics: Tensor) -> None:
        """EMA step of each visited bin's mean from (global-batch) ``batch_statistics``."""
        sums, counts = statistics.to(self.bin_mean_ratio.device)
        seen = counts > 0
        batch_mean = sums[seen] / counts[seen]
        self.bin_mean_ratio[seen] = self.ema_decay * self.bin_mean_ratio[seen] + (1 - self.ema_decay) * batch_mean
        self.bin_updates[seen] += 1

    def forward(self, ratio: Tensor, bins: Tensor) -> Tensor:
        return ratio / self.bin_mean_ratio.to(ratio.device)[bins]


class DensityRatioEstimate(nn.Module):
    """Steps 1-2 for a LightningModule with a discriminator: logits at (x_t, t) -> normalised r (float64) and the mask
    of samples whose r is not clipped. ``estimate(module, logits, t)`` updates the bin statistics from the global batch
    when ``module.training``."""

    def __init__(self, schedule: NoiseSchedule, logit_bound: float = 10.0, ratio_min: float = 0.1,
                 ratio_max: float = 20.0, time_bins: int = 10, ema_decay: float = 0.5, normalize_per_bin: bool = True,
                 bin_spacing: str = "time"):
        super().__init__()
        if not 0.0 < ratio_min < 1.0 < ratio_max or not math.isfinite(ratio_max):
            raise ValueError(f"need 0 < ratio_min < 1 < ratio_max < inf, got ratio_min={ratio_min}, "
                             f"ratio_max={ratio_max}")
        if logit_bound <= 0:
            raise ValueError(f"ratio_logit_bound must be > 0, got {logit_bound}")
        if bin_spacing not in BIN_SPACINGS:
            raise ValueError(f"unknown ratio_bin_spacing {bin_spacing!r}; expected one of {list(BIN_SPACINGS)}")
        self.schedule = schedule
        self.logit_bound, self.ratio_min, self.ratio_max = logit_bound, ratio_min, ratio_max
        self.normalizer = (TimeBinnedRatioNormalizer(schedule, time_bins, ema_decay, spacing=bin_spacing)
                           if normalize_per_bin else None)

    @classmethod
    def for_module(cls, method: str, module, gan_critic_weight: float, *args, **kwargs) -> "DensityRatioEstimate":
        """The estimate of a method whose ``module`` reads r from its discriminator head, trained through the critic
        loss with weight ``gan_critic_weight``; a clear error naming ``method`` when either is missing."""
        if module.discriminator is None:
            raise ValueError(f"{method} estimates the density ratio with a discriminator head: set "
                             "model.init_args.discriminator")
        if gan_critic_weight <= 0:
            raise ValueError(f"{method} trains its discriminator through gan_critic_weight, which must be > 0, "
                             f"got {gan_critic_weight}")
        if getattr(module, "gan_loss", "non_saturating") != "non_saturating":
            raise ValueError(f"{method} reads log r from the discriminator's logit, which only the logistic game "
                             f"estimates: gan_loss must be 'non_saturating', got {module.gan_loss!r}")
        return cls(module.schedule, *args, **kwargs)

    def estimate(self, module, logits: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        ratio, inside = ratio_from_logits(logits.reshape(logits.shape[0]), self.logit_bound, self.ratio_min,
                                          self.ratio_max)
        if self.normalizer is None:
            return ratio, inside
        bins = self.normalizer.bin_index(t)
        if module.training:
            self.normalizer.update(global_sum(module, self.normalizer.batch_statistics(ratio, bins)))
        return self.normalizer(ratio, bins), inside
