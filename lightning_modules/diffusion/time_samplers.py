"""Training-time distributions over the native time of a schedule.

Each sampler is a small callable object so configs can pick one by ``class_path``; all return float64 native times
of shape (n,). Distributions defined on noise levels (lognormal) are drawn in EDM sigma and mapped to native time, so
the same sampler means the same noise levels on every schedule.
"""
from __future__ import annotations

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
