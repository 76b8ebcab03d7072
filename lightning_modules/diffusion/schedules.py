"""Noise schedules: the forward process x_t = alpha(t) * x0 + sigma(t) * eps, eps ~ N(0, I).

Every schedule is stateless and speaks its own *native* time (integer index for VP-discrete, sigma for EDM,
t in [0, 1] for rectified flow, an angle for TrigFlow). All schedules share one common currency, the EDM noise level
``edm_sigma = sigma / alpha`` (Karras et al. 2022, Eq. 3 with s(t) = alpha): x_t / alpha = x0 + edm_sigma * eps, so a
time grid or time distribution defined on sigmas transfers to every schedule through ``time_from_edm_sigma``.

Time arithmetic is float64 throughout (the cast back to the data dtype happens in ``add_noise``).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "VPDiscreteSchedule",
    "VPContinuousSchedule",
    "EDMSchedule",
    "RectifiedFlowSchedule",
    "TrigFlowSchedule",
    "karras_sigmas",
    "broadcast_to_data",
]


def _f64(t) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def broadcast_to_data(coefficient: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample coefficient (B,) or scalar so it broadcasts against data shaped (B, ...)."""
    coefficient = torch.as_tensor(coefficient, device=like.device)
    if coefficient.ndim == 0:
        return coefficient
    return coefficient.reshape(coefficient.shape + (1,) * (like.ndim - coefficient.ndim))


def karras_sigmas(num: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) Eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, descending."""
    if num < 1:
        raise ValueError(f"karras_sigmas needs num >= 1, got num={num}")
    if num == 1:
        return _f64([sigma_max])
    ramp = torch.linspace(0, 1, num, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho


class NoiseSchedule(ABC):
    """alpha(t), sigma(t) of a Gaussian forward process and the maps between native time and EDM sigma."""

    #: native times of the data end and the noise end of the process
    t_min: float
    t_max: float
    #: True when the network only knows integer timesteps (diffusers' DDPM convention)
    is_discrete: bool = False

    @abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha(t), sigma(t) in float64."""

    @abstractmethod
    def time_from_edm_sigma(self, edm_sigma: Tensor) -> Tensor:
        """Native time whose sigma/alpha equals ``edm_sigma`` (nearest index for discrete schedules)."""

    def alpha_sigma_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """d alpha / dt and d sigma / dt (used for flow-velocity conversions); central differences by default."""
        t = _f64(t)
        h = 1e-6 * max(1.0, abs(self.t_max))
        a_plus, s_plus = self.alpha_sigma(t + h)
        a_minus, s_minus = self.alpha_sigma(t - h)
        return (a_plus - a_minus) / (2 * h), (s_plus - s_minus) / (2 * h)

    def edm_sigma(self, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise, computed in float64 and returned in x0's dtype."""
        alpha, sigma = self.alpha_sigma(_f64(t).to(x0.device))
        alpha, sigma = broadcast_to_data(alpha, x0), broadcast_to_data(sigma, x0)
        return (alpha * x0.double() + sigma * noise.double()).to(x0.dtype)

    def karras_times(self, num: int, rho: float = 7.0, edm_sigma_min: float | None = None,
                     edm_sigma_max: float | None = None) -> Tensor:
        """A descending Karras grid (Eq. 5) in EDM sigma mapped to native time, without the final 0."""
        lo = self.edm_sigma(_f64(self.t_min)).item() if edm_sigma_min is None else edm_sigma_min
        hi = self.edm_sigma(_f64(self.t_max)).item() if edm_sigma_max is None else edm_sigma_max
        return self.time_from_edm_sigma(karras_sigmas(num, lo, hi, rho))

    def describe(self) -> dict:
        return {"class": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class VPDiscreteSchedule(NoiseSchedule):
    """Discrete variance-preserving process exactly as diffusers' DDPMScheduler (Ho et al. 2020):
    alpha_t = sqrt(prod_{s<=t} (1 - beta_s)), sigma_t = sqrt(1 - alpha_t^2), t in {0, ..., N-1}."""

    is_discrete = True

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear"):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            # Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = cos^2((t/T + s)/(1 + s) pi/2), s = 0.008; beta <= 0.999
            steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
            alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected 'linear', 'scaled_linear' or "
                             "'squaredcos_cap_v2'")
        self.num_train_timesteps, self.beta_start, self.beta_end = num_train_timesteps, beta_start, beta_end
        self.beta_schedule = beta_schedule
        self._alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.t_min, self.t_max = 0.0, float(num_train_timesteps - 1)

    def _index(self, t: Tensor) -> Tensor:
        return _f64(t).round().long().clamp(0, self.num_train_timesteps - 1)

    def alpha_sigma(self, t):
        t = _f64(t)
        alphas_cumprod = self._alphas_cumprod.to(t.device)[self._index(t).to(t.device)]
        return alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt()

    def alpha_sigma_derivative(self, t):
        t = _f64(t)
        a_next, s_next = self.alpha_sigma((t + 1).clamp(max=self.t_max))
        a_prev, s_prev = self.alpha_sigma((t - 1).clamp(min=self.t_min))
        span = ((t + 1).clamp(max=self.t_max) - (t - 1).clamp(min=self.t_min))
        return (a_next - a_prev) / span, (s_next - s_prev) / span

    def time_from_edm_sigma(self, edm_sigma):
        edm_sigma = _f64(edm_sigma)
        table = ((1.0 - self._alphas_cumprod) / self._alphas_cumprod).sqrt().log().to(edm_sigma.device)
        distance = (edm_sigma.clamp_min(1e-30).log().unsqueeze(-1) - table).abs()
        return distance.argmin(dim=-1).to(torch.float64)


class VPContinuousSchedule(NoiseSchedule):
    """Continuous VP-SDE with linear beta (Song et al. 2021, Eq. 11): alpha(t) = exp(-B(t)/2),
    B(t) = beta_min t + (beta_max - beta_min) t^2 / 2, t in [t_min, 1]."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max, self.t_min, self.t_max = beta_min, beta_max, t_min, 1.0

    def _integral(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2

    def alpha_sigma(self, t):
        t = _f64(t)
        log_alpha = -0.5 * self._integral(t)
        return log_alpha.exp(), (-torch.expm1(2 * log_alpha)).sqrt()

    def alpha_sigma_derivative(self, t):
        t = _f64(t)
        alpha, sigma = self.alpha_sigma(t)
        beta = self.beta_min + (self.beta_max - self.beta_min) * t
        d_alpha = -0.5 * beta * alpha
        return d_alpha, -alpha * d_alpha / sigma

    def time_from_edm_sigma(self, edm_sigma):
        # B(t) = log(1 + s^2): solve the quadratic for t >= 0.
        target = torch.log1p(_f64(edm_sigma) ** 2)
        a, b = 0.5 * (self.beta_max - self.beta_min), self.beta_min
        if a == 0:
            return target / b
        return (-b + torch.sqrt(b * b + 4 * a * target)) / (2 * a)


class EDMSchedule(NoiseSchedule):
    """Variance-exploding process of EDM (Karras et al. 2022, Table 1): alpha = 1, sigma(t) = t."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max, self.sigma_data, self.rho = sigma_min, sigma_max, sigma_data, rho
        self.t_min, self.t_max = sigma_min, sigma_max

    def alpha_sigma(self, t):
        t = _f64(t)
        return torch.ones_like(t), t

    def alpha_sigma_derivative(self, t):
        t = _f64(t)
        return torch.zeros_like(t), torch.ones_like(t)

    def time_from_edm_sigma(self, edm_sigma):
        return _f64(edm_sigma)

    def karras_times(self, num, rho=None, edm_sigma_min=None, edm_sigma_max=None):
        return super().karras_times(num, self.rho if rho is None else rho, edm_sigma_min, edm_sigma_max)


class RectifiedFlowSchedule(NoiseSchedule):
    """Linear interpolation of rectified flow (Liu et al. 2022): x_t = (1 - t) x0 + t eps, t in [0, 1]."""

    def __init__(self, t_min: float = 1e-4, t_max: float = 1.0 - 1e-4):
        if not 0 <= t_min < t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = t_min, t_max

    def alpha_sigma(self, t):
        t = _f64(t)
        return 1.0 - t, t

    def alpha_sigma_derivative(self, t):
        t = _f64(t)
        return -torch.ones_like(t), torch.ones_like(t)

    def time_from_edm_sigma(self, edm_sigma):
        edm_sigma = _f64(edm_sigma)
        return edm_sigma / (1.0 + edm_sigma)


class TrigFlowSchedule(NoiseSchedule):
    """TrigFlow (Lu & Song 2024, Eq. 2): x_t = cos(t) x0 + sin(t) z with z ~ N(0, sigma_d^2 I), t in [0, pi/2].
    In unit-noise form alpha = cos t, sigma = sigma_d sin t, so edm_sigma = sigma_d tan t."""

    def __init__(self, sigma_data: float = 0.5, t_min: float = 1e-4, t_max: float = math.atan(80.0 / 0.5)):
        if not 0 <= t_min < t_max <= math.pi / 2:
            raise ValueError(f"need 0 <= t_min < t_max <= pi/2, got t_min={t_min}, t_max={t_max}")
        self.sigma_data, self.t_min, self.t_max = sigma_data, t_min, t_max

    def alpha_sigma(self, t):
        t = _f64(t)
        return torch.cos(t), self.sigma_data * torch.sin(t)

    def alpha_sigma_derivative(self, t):
        t = _f64(t)
        return -torch.sin(t), self.sigma_data * torch.cos(t)

    def time_from_edm_sigma(self, edm_sigma):
        return torch.atan(_f64(edm_sigma) / self.sigma_data)
