"""Samplers as short pure functions (in the spirit of k-diffusion's ``sampling.py``).

The model contract is ``denoise(x_t, t) -> x0`` in the schedule's native time; samplers never see epsilon or v.
``times`` are descending native times; after the last one the sampler returns the denoised estimate (sigma = 0),
so a list of N times costs N network evaluations for Euler/DDIM and the student sampler, 2N - 1 for Heun.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .schedules import NoiseSchedule, broadcast_to_data

Denoise = Callable[[Tensor, Tensor], Tensor]


def _per_sample(t: Tensor | float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)


def prior_sample(noise: Tensor, t: Tensor | float, schedule: NoiseSchedule) -> Tensor:
    """The starting point x_T = sigma(T) z (the data mean contributes alpha(T) E[x0], taken as 0)."""
    _, sigma = schedule.alpha_sigma(_per_sample(t, noise))
    return (broadcast_to_data(sigma, noise) * noise.double()).to(noise.dtype)


def ddim_step(x_t: Tensor, x0: Tensor, t: Tensor, s: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, Eq. 12 with eta = 0): x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0)/sigma_t.
    This is exactly an Euler step of the probability-flow ODE in (edm_sigma, x / alpha)."""
    alpha_t, sigma_t = (broadcast_to_data(c, x_t) for c in schedule.alpha_sigma(t))
    alpha_s, sigma_s = (broadcast_to_data(c, x_t) for c in schedule.alpha_sigma(s))
    epsilon = (x_t.double() - alpha_t * x0.double()) / sigma_t
    return (alpha_s * x0.double() + sigma_s * epsilon).to(x_t.dtype)


@torch.no_grad()
def euler_sample(denoise: Denoise, x: Tensor, times: Tensor, schedule: NoiseSchedule) -> Tensor:
    """DDIM / Euler probability-flow sampler; NFE = len(times)."""
    for i, t in enumerate(times):
        t_vec = _per_sample(t, x)
        x0 = denoise(x, t_vec)
        x = x0 if i == len(times) - 1 else ddim_step(x, x0, t_vec, _per_sample(times[i + 1], x), schedule)
    return x


def heun_step(denoise: Denoise, x_t: Tensor, t: Tensor, s: Tensor, schedule: NoiseSchedule,
              x0_at_t: Tensor | None = None) -> Tensor:
    """One second-order step of Karras et al. (2022) Alg. 1 (lines 5-8) in x / alpha against edm_sigma."""
    alpha_t, alpha_s = (broadcast_to_data(schedule.alpha_sigma(v)[0], x_t) for v in (t, s))
    sigma_t, sigma_s = (broadcast_to_data(schedule.edm_sigma(v), x_t) for v in (t, s))
    x0_t = denoise(x_t, t) if x0_at_t is None else x0_at_t
    scaled = x_t.double() / alpha_t
    slope = (scaled - x0_t.double()) / sigma_t
    euler = scaled + (sigma_s - sigma_t) * slope
    x0_s = denoise((alpha_s * euler).to(x_t.dtype), s).double()
    slope_next = (euler - x0_s) / sigma_s
    return (alpha_s * (scaled + (sigma_s - sigma_t) * 0.5 * (slope + slope_next))).to(x_t.dtype)


@torch.no_grad()
def heun_sample(denoise: Denoise, x: Tensor, times: Tensor, schedule: NoiseSchedule) -> Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1); the last step to sigma = 0 is Euler."""
    for i, t in enumerate(times):
        t_vec = _per_sample(t, x)
        if i == len(times) - 1:
            return denoise(x, t_vec)
        x = heun_step(denoise, x, t_vec, _per_sample(times[i + 1], x), schedule)
    return x


def student_sample(generate: Denoise, noise: Tensor, times: Tensor, schedule: NoiseSchedule,
                   generator: torch.Generator | None = None) -> Tensor:
    """K-step student sampling (Song et al. 2023, Alg. 1; DMD2's multi-step generator): x0 = G(x, t_k), then re-noise
    x0 to t_{k+1} with fresh noise. One step is G(sigma(T) z, T). Gradients flow if the caller enables them."""
    return student_steps(generate, prior_sample(noise, times[0], schedule), times, schedule, generator)


def hybrid_sample(teacher_denoise: Denoise, generate: Denoise, noise: Tensor, times: Tensor, schedule: NoiseSchedule,
                  teacher_steps: int = 1, method: str = "heun", generator: torch.Generator | None = None) -> Tensor:
    """Diversity distillation's hybrid inference (Gandikota & Bau 2025, "Distilling diversity and control in
    diffusion models", arXiv:2503.10637, Sec. 5): the first step(s), where a sample's composition -- here its mode --
    is decided, are the teacher's; the student takes over for the rest. The first ``teacher_steps`` intervals of the
    student's own grid ``times`` are probability-flow ODE steps of the teacher (Heun: 2 evaluations each, Euler /
    DDIM: 1), then the student samples from x_{times[teacher_steps]} with its remaining steps (``student_steps``).
    NFE: teacher 2 m (Heun) or m (Euler) + student len(times) - m. A one-step student needs a grid of >= 2 times."""
    if not 0 < teacher_steps < len(times):
        raise ValueError(f"teacher_steps must be in [1, {len(times) - 1}] for a grid of {len(times)} student times, "
                         f"got {teacher_steps} (a one-step student needs nfe >= 2 to hand over)")
    if method not in ("heun", "euler", "ddim"):
        raise ValueError(f"unknown hybrid teacher step {method!r}; expected 'heun', 'euler' or 'ddim'")
    with torch.no_grad():
        x = prior_sample(noise, times[0], schedule)
        for i in range(teacher_steps):
            t, s = _per_sample(times[i], x), _per_sample(times[i + 1], x)
            x = heun_step(teacher_denoise, x, t, s, schedule) if method == "heun" else \
                ddim_step(x, teacher_denoise(x, t), t, s, schedule)
    return student_steps(generate, x, times[teacher_steps:], schedule, generator)


def student_steps(generate: Denoise, x: Tensor, times: Tensor, schedule: NoiseSchedule,
                  generator: torch.Generator | None = None) -> Tensor:
    """The student sampler's loop from x = x_{times[0]}: x0 = G(x, t_k), re-noised to t_{k+1} with fresh noise."""
    for i, t in enumerate(times):
        x0 = generate(x, _per_sample(t, x))
        if i == len(times) - 1:
            return x0
        fresh = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x = schedule.add_noise(x0, fresh, _per_sample(times[i + 1], x0))
    return x


SAMPLERS = {"euler": euler_sample, "ddim": euler_sample, "heun": heun_sample}


def teacher_sample(denoise: Denoise, noise: Tensor, times: Tensor, schedule: NoiseSchedule, method: str = "heun") -> Tensor:
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[method](denoise, prior_sample(noise, times[0], schedule), times, schedule)


def sampler_times(schedule: NoiseSchedule, nfe: int, method: str = "heun", edm_sigma_max: float | None = None) -> Tensor:
    """Descending native times for a sampler that may spend ``nfe`` evaluations: N levels (N = nfe for Euler and
    student sampling, 2N - 1 <= nfe for Heun) of a Karras grid of N + 1 points whose last point, sigma_min, is dropped;
    the final denoising then replaces the step to sigma_min. Keeping sigma_min as a level would waste an evaluation and
    make a coarse Heun step divide by sigma_min (EDM's Alg. 1 assumes many steps)."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    levels = max(1, (nfe + 1) // 2) if method == "heun" else nfe
    return schedule.karras_times(levels + 1, edm_sigma_max=edm_sigma_max)[:levels]


Velocity = Callable[[Tensor, Tensor], Tensor]


def flow_sample(velocity: Velocity, z: Tensor, steps: int, tau_max: float = 1.0, method: str = "euler",
                return_path: bool = False):
    """Integrate dy/dtau = v(y, tau) from y = tau_max z at tau_max to tau = 0 on a uniform grid of ``steps`` intervals
    (Euler: ``steps`` evaluations; Heun: 2 per interval, the last interval Euler so tau = 0 is never evaluated).
    Returns y(0), or (y(0), taus, ys, velocities) with the velocity used on each interval."""
    grid = _flow_grid(steps, tau_max, method)
    y, ys, velocities = _flow_integrate(velocity, (tau_max * z.double()).to(z.dtype), grid, method)
    if return_path:
        return y, grid, ys, velocities
    return y


def flow_hybrid_sample(teacher_velocity: Velocity, student_velocity: Velocity, z: Tensor, steps: int,
                       tau_max: float = 1.0, teacher_steps: int = 1, teacher_method: str = "heun",
                       student_method: str = "euler") -> Tensor:
    """``hybrid_sample`` for flow students (Gandikota & Bau 2025, Sec. 5): the first ``teacher_steps`` intervals of
    the student's uniform ``steps``-interval tau grid are the teacher's flow ODE (Heun: 2 evaluations each; Euler /
    DDIM, which coincide for a linear interpolant: 1), the student integrates the rest with its own sampler."""
    if not 0 < teacher_steps < steps:
        raise ValueError(f"teacher_steps must be in [1, {steps - 1}] for a {steps}-step flow student, got "
                         f"{teacher_steps} (a one-step student needs nfe >= 2 to hand over)")
    if teacher_method not in ("heun", "euler", "ddim"):
        raise ValueError(f"unknown hybrid teacher step {teacher_method!r}; expected 'heun', 'euler' or 'ddim'")
    grid = _flow_grid(steps, tau_max, student_method)
    with torch.no_grad():
        # the teacher never takes the final interval, so its Heun steps never evaluate tau = 0
        y, _, _ = _flow_integrate(teacher_velocity, (tau_max * z.double()).to(z.dtype), grid[:teacher_steps + 1],
                                  "heun" if teacher_method == "heun" else "euler", last_interval_euler=False)
    return _flow_integrate(student_velocity, y, grid[teacher_steps:], student_method)[0]


def _flow_grid(steps: int, tau_max: float, method: str) -> Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown flow sampler {method!r}; expected 'euler' or 'heun'")
    return torch.linspace(tau_max, 0.0, steps + 1, dtype=torch.float64)


def _flow_integrate(velocity: Velocity, y: Tensor, grid: Tensor, method: str, last_interval_euler: bool = True):
    """Euler / Heun along the descending ``grid`` from y at grid[0]; returns (y at grid[-1], ys, velocities)."""
    ys, velocities = [y], []
    intervals = len(grid) - 1
    for i in range(intervals):
        tau = torch.full((y.shape[0],), float(grid[i]), dtype=torch.float64, device=y.device)
        dt = float(grid[i + 1] - grid[i])
        v = velocity(y, tau)
        if method == "heun" and (i < intervals - 1 or not last_interval_euler):
            v_next = velocity(y + dt * v, torch.full_like(tau, float(grid[i + 1])))
            v = 0.5 * (v + v_next)
        y = y + dt * v
        velocities.append(v)
        ys.append(y)
    return y, ys, velocities
