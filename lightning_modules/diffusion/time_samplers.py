"""Training-time distributions over the native time of a schedule.

Each sampler is a small callable object so configs can pick one by ``class_path``; all return float64 native times
of shape (n,). Distributions defined on noise levels (lognormal) are drawn in EDM sigma and mapped to native time, so
the same sampler means the same noise levels on every schedule.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import NoiseSchedule, karras_sigmas


class TimeSampler:
    def __call__(self, n: int, schedule: NoiseSchedule, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(n, schedule, generator, device)")

    @staticmethod
    def _clamp(t: Tensor, schedule: NoiseSchedule) -> Tensor:
        t = t.clamp(schedule.t_min, schedule.t_max)
        return t.round() if schedule.is_discrete else t


class UniformTime(TimeSampler):
    """t ~ U[t_min + lo (t_max - t_min), t_min + hi (t_max - t_min)]; DMD2 uses lo=0.02, hi=0.98 (Yin et al. 2024)."""

    def __init__(self, low_fraction: float = 0.0, high_fraction: float = 1.0):
        if not 0.0 <= low_fraction < high_fraction <= 1.0:
            raise ValueError(f"need 0 <= low_fraction < high_fraction <= 1, got {low_fraction}, {high_fraction}")
        self.low_fraction, self.high_fraction = low_fraction, high_fraction

    def __call__(self, n, schedule, generator=None, device="cpu"):
        span = schedule.t_max - schedule.t_min
        lo, hi = schedule.t_min + self.low_fraction * span, schedule.t_min + self.high_fraction * span
        u = torch.rand(n, generator=generator, dtype=torch.float64).to(device)
        return self._clamp(lo + (hi - lo) * u, schedule)


class DiscreteUniformTime(TimeSampler):
    """Integer timestep uniform on {floor(lo N), ..., min(floor(hi N), N - 1)} of a discrete schedule with N steps.

    This is the draw of DMD2's released Stable-Diffusion code (Yin et al. 2024, github.com/tianweiy/DMD2,
    ``main/sd_guidance.py``): the distribution-matching loss takes ``randint(min_step, max_step + 1)`` with
    min_step = int(0.02 N) = 20 and max_step = int(0.98 N) = 980 of N = 1000 (lo=0.02, hi=0.98), and the fake unet's
    denoising loss ``randint(0, N)``, every timestep 0..999 (lo=0, hi=1). Unlike ``UniformTime`` on a discrete
    schedule (a continuous draw rounded to the nearest index, whose end points get half the mass), every timestep of
    the range is equally likely. Continuous schedules have no timestep grid: an error."""

    def __init__(self, low_fraction: float = 0.0, high_fraction: float = 1.0):
        if not 0.0 <= low_fraction < high_fraction <= 1.0:
            raise ValueError(f"need 0 <= low_fraction < high_fraction <= 1, got {low_fraction}, {high_fraction}")
        self.low_fraction, self.high_fraction = low_fraction, high_fraction

    def steps(self, schedule: NoiseSchedule) -> tuple[int, int]:
        """(first, last) timestep of the range, both included."""
        if not schedule.is_discrete:
            raise ValueError(f"DiscreteUniformTime needs a discrete-time schedule; {type(schedule).__name__} is "
                             "continuous (use UniformTime or KarrasRampTime)")
        count = int(round(schedule.t_max - schedule.t_min)) + 1
        first = int(schedule.t_min) + int(self.low_fraction * count)
        last = int(schedule.t_min) + min(int(self.high_fraction * count), count - 1)
        return first, last

    def __call__(self, n, schedule, generator=None, device="cpu"):
        first, last = self.steps(schedule)
        return torch.randint(first, last + 1, (n,), generator=generator).to(torch.float64).to(device)


class LogNormalTime(TimeSampler):
    """ln(edm_sigma) ~ N(mean, std^2) (Karras et al. 2022, Table 1: P_mean=-1.2, P_std=1.2)."""

    def __init__(self, mean: float = -1.2, std: float = 1.2):
        if std <= 0:
            raise ValueError(f"LogNormalTime std must be > 0, got {std}")
        self.mean, self.std = mean, std

    def __call__(self, n, schedule, generator=None, device="cpu"):
        log_sigma = self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64)
        return self._clamp(schedule.time_from_edm_sigma(log_sigma.exp()), schedule).to(device)


class LogitNormalTime(TimeSampler):
    """u = sigmoid(N(mean, std^2)) placed on [t_min, t_max] (Esser et al. 2024, Sec. 3.1; sCM uses it on TrigFlow)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if std <= 0:
            raise ValueError(f"LogitNormalTime std must be > 0, got {std}")
        self.mean, self.std = mean, std

    def __call__(self, n, schedule, generator=None, device="cpu"):
        u = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64))
        return self._clamp(schedule.t_min + u * (schedule.t_max - schedule.t_min), schedule).to(device)


class FlowLogitNormalTime(TimeSampler):
    """Rectified-flow time u = sigmoid(N(mean, std^2)) (Esser et al. 2024, SD3, Sec. 3.1) put on any schedule through
    its noise level: x_u = (1 - u) x0 + u eps has EDM sigma u / (1 - u), mapped to native time and clamped to the
    schedule's range. LADD draws the discriminator's noise levels so, biased to high noise with mean = 1, std = 1
    (Sauer et al. 2024, arXiv:2403.12015, Sec. 3.2). ``LogitNormalTime`` instead spreads u over native time."""

    def __init__(self, mean: float = 1.0, std: float = 1.0):
        if not std > 0:
            raise ValueError(f"FlowLogitNormalTime std must be > 0, got {std}")
        self.mean, self.std = mean, std

    def __call__(self, n, schedule, generator=None, device="cpu"):
        u = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64))
        return self._clamp(schedule.time_from_edm_sigma(u / (1.0 - u)), schedule).to(device)


class KarrasIndexTime(TimeSampler):
    """Uniform index n into a Karras grid of ``num_steps`` noise levels (Song et al. 2023, Alg. 2).

    ``pairs`` returns (t_{n}, t_{n+1}) with t_n the noisier of two adjacent grid points, as consistency distillation
    needs; ``__call__`` returns only the noisier one."""

    def __init__(self, num_steps: int = 18, rho: float = 7.0):
        if num_steps < 2:
            raise ValueError(f"KarrasIndexTime num_steps must be >= 2, got {num_steps}")
        self.num_steps, self.rho = num_steps, rho

    def grid(self, schedule: NoiseSchedule) -> Tensor:
        lo = schedule.edm_sigma(torch.tensor(schedule.t_min, dtype=torch.float64)).item()
        hi = schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=torch.float64)).item()
        return schedule.time_from_edm_sigma(karras_sigmas(self.num_steps, lo, hi, self.rho))

    def pairs(self, n, schedule, generator=None, device="cpu") -> tuple[Tensor, Tensor]:
        grid = self.grid(schedule)
        index = torch.randint(0, self.num_steps - 1, (n,), generator=generator)
        return grid[index].to(device), grid[index + 1].to(device)

    def __call__(self, n, schedule, generator=None, device="cpu"):
        return self.pairs(n, schedule, generator, device)[0]


class KarrasRampTime(TimeSampler):
    """Noise level on a continuous Karras ramp (Karras et al. 2022, Eq. 5) with ramp u ~ U[low, high]:
    u = 0 is the noise end (sigma_max) and u = 1 the data end (sigma_min).

    DMD2 on EDM teachers (github.com/tianweiy/DMD2, ``main/edm/edm_guidance.py``) indexes a 1000-point Karras grid:
    its generator uniformly in [20, 980] (min/max_step_percent 0.02 / 0.98: low=0.02, high=0.98), its fake-score
    critic uniformly over all 1000 points (low=0, high=1); the continuous ramp here has the same law up to the grid's
    1/999 quantisation. SiD draws sigma at ramp 1 - U[0, t_max / 1000] with t_max = 800 (low=0.2, high=1.0)."""

    def __init__(self, low: float = 0.02, high: float = 0.98, rho: float = 7.0):
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"KarrasRampTime needs 0 <= low < high <= 1, got low={low}, high={high}")
        self.low, self.high, self.rho = low, high, rho

    def __call__(self, n, schedule, generator=None, device="cpu"):
        s_min = schedule.edm_sigma(torch.tensor(schedule.t_min, dtype=torch.float64)).item()
        s_max = schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=torch.float64)).item()
        u = self.low + (self.high - self.low) * torch.rand(n, generator=generator, dtype=torch.float64)
        sigma = (s_max ** (1 / self.rho) + u * (s_min ** (1 / self.rho) - s_max ** (1 / self.rho))) ** self.rho
        return self._clamp(schedule.time_from_edm_sigma(sigma), schedule).to(device)


def ict_discretization_steps(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential discretisation curriculum (Song & Dhariwal 2023, arXiv:2310.14189, Sec. 3.4):

      N(k) = min(s0 2^floor(k / K'), s1) + 1,   K' = floor(K / (log2 floor(s1 / s0) + 1))

    k = training step, K = total steps; s0 = 10, s1 = 1280 in the paper (Table / Sec. 3.4)."""
    if total_steps < 1 or s0 < 1 or s1 < s0:
        raise ValueError(f"need total_steps >= 1 and 1 <= s0 <= s1, got K={total_steps}, s0={s0}, s1={s1}")
    k_prime = max(1, int(total_steps // (math.log2(s1 // s0) + 1)))
    return int(min(s0 * 2 ** (k // k_prime), s1) + 1)


class LogNormalIndexTime(KarrasIndexTime):
    """iCT's discrete lognormal pair draw (Song & Dhariwal 2023, Sec. 3.5): on the Karras grid
    sigma_min = sigma_1 < ... < sigma_N = sigma_max (rho = 7), the pair (sigma_i, sigma_{i+1}) has probability

      p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) / (sqrt(2) P_std)),

    i = 1, ..., N - 1, P_mean = -1.1, P_std = 2.0. ``num_steps`` (= N) is what the curriculum changes; ``pairs``
    returns (sigma_{i+1}, sigma_i) in native time, the noisier first, as ``KarrasIndexTime`` does."""

    def __init__(self, num_steps: int = 11, mean: float = -1.1, std: float = 2.0, rho: float = 7.0):
        super().__init__(num_steps, rho)
        if std <= 0:
            raise ValueError(f"LogNormalIndexTime std must be > 0, got {std}")
        self.mean, self.std = mean, std

    def probabilities(self, schedule: NoiseSchedule) -> Tensor:
        """p over the pairs (grid[j], grid[j + 1]) of the descending grid, j = 0..N-2 (j = N - 1 - i)."""
        sigma = schedule.edm_sigma(self.grid(schedule))  # descending
        cdf = torch.erf((sigma.log() - self.mean) / (math.sqrt(2.0) * self.std))
        mass = (cdf[:-1] - cdf[1:]).clamp_min(0)
        return mass / mass.sum()

    def pairs(self, n, schedule, generator=None, device="cpu") -> tuple[Tensor, Tensor]:
        grid = self.grid(schedule)
        index = torch.multinomial(self.probabilities(schedule), n, replacement=True, generator=generator)
        return grid[index].to(device), grid[index + 1].to(device)


def ect_ratio(t_sigma: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's mapping r / t (Geng et al. 2024, "Consistency models made easy", arXiv:2406.14548, Sec. 3, the mapping
    function n(t) = 1 + k sigmoid(-b t)):  r = t (1 - q^-(stage+1) n(t)), clamped at 0; stage = floor(i / d) for
    training iteration i and stage length d (the paper writes q^ceil(i/d); locuslab/ect's loss uses
    q^(stage+1) with stage = floor(tick / double_ticks), which this follows). q = 2, k = 8, b = 1 on CIFAR-10."""
    ratio = 1.0 - q ** -(stage + 1) * (1.0 + k * torch.sigmoid(-b * t_sigma))
    return ratio.clamp_min(0.0)


class ECTMappingTime(TimeSampler):
    """ECT's continuous pair draw: t (EDM sigma) ~ lognormal(P_mean = -1.1, P_std = 2.0), r = t * ect_ratio(t, stage)
    (see ``ect_ratio``), both mapped to native time; r is kept >= t_min (r = 0 in the paper is the data end, where the
    boundary condition f(x, t_min) = x makes the target x_{t_min} ~ x). ``stage`` is what the curriculum changes."""

    def __init__(self, mean: float = -1.1, std: float = 2.0, q: float = 2.0, k: float = 8.0, b: float = 1.0,
                 stage: int = 0):
        if std <= 0 or q <= 1:
            raise ValueError(f"ECTMappingTime needs std > 0 and q > 1, got std={std}, q={q}")
        self.mean, self.std, self.q, self.k, self.b, self.stage = mean, std, q, k, b, stage

    def pairs(self, n, schedule, generator=None, device="cpu") -> tuple[Tensor, Tensor]:
        s_min = schedule.edm_sigma(torch.tensor(schedule.t_min, dtype=torch.float64)).item()
        s_max = schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=torch.float64)).item()
        sigma_t = (self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64)).exp()
        sigma_t = sigma_t.clamp(s_min, s_max)
        sigma_r = (sigma_t * ect_ratio(sigma_t, self.stage, self.q, self.k, self.b)).clamp_min(s_min)
        return (schedule.time_from_edm_sigma(sigma_t).to(device), schedule.time_from_edm_sigma(sigma_r).to(device))

    def __call__(self, n, schedule, generator=None, device="cpu"):
        return self.pairs(n, schedule, generator, device)[0]
