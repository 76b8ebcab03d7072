"""Straightness and curvature of a flow's ODE trajectories (pure functions of a velocity field).

For the ODE dy/dtau = v(y, tau), integrated from y(1) = z (noise) to y(0) = x (data), Liu et al. (2022,
arXiv:2209.03003, Sec. 2.2, the definition of straightness) measure

    S(v) = int_0^1 E || (y(1) - y(0)) - v(y(tau), tau) ||^2 dtau,

zero iff every trajectory is a straight line travelled at constant speed (then one Euler step is exact). Here it is
estimated along the trajectories of the solver: the velocity used on each of ``steps`` intervals of a uniform grid,
against the end-to-end displacement y(1) - y(0) of the same trajectory. ``curvature`` is the scale-free version
S / E||y(1) - y(0)||^2 (in [0, inf); 0 for straight flows). Any velocity ``v(y, tau)`` works: a flow student through
``methods.rectified_flow.flow_velocity``, or a closed form.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion.samplers import Velocity, flow_sample


@torch.no_grad()
def trajectories(velocity: Velocity, z: Tensor, steps: int = 128, method: str = "heun", tau_max: float = 1.0):
    """(taus (steps+1,), ys list of steps+1 points, velocities list of steps) of the ODE from y(tau_max) = tau_max z
    to y(0) on a uniform grid (``diffusion.samplers.flow_sample``: Heun averages the slopes of an interval, its last
    interval Euler, so tau = 0 is never evaluated)."""
    _, grid, ys, velocities = flow_sample(velocity, z, steps, tau_max, method, return_path=True)
    return grid, ys, velocities


def straightness_from_path(grid: Tensor, ys: list, velocities: list) -> Tensor:
    """Per-trajectory S = sum_i (tau_i - tau_{i+1}) / (tau_0 - tau_N) ||(y_0 - y_N) / (tau_0 - tau_N) - v_i||^2,
    the Riemann sum of Liu et al.'s integral (per sample, summed over dimensions)."""
    span = float(grid[0] - grid[-1])
    displacement = (ys[0] - ys[-1]).double() / span  # the average velocity; = y(1) - y(0) when tau_max = 1
    total = torch.zeros(ys[0].shape[0], dtype=torch.float64, device=ys[0].device)
    for i, v in enumerate(velocities):
        weight = float(grid[i] - grid[i + 1]) / span
        total += weight * (displacement - v.double()).flatten(1).pow(2).sum(1)
    return total


def straightness(velocity: Velocity, z: Tensor, steps: int = 128, method: str = "heun", tau_max: float = 1.0) -> float:
    """E S over the trajectories started at the noise ``z`` (Liu et al. 2022's straightness)."""
    return float(straightness_from_path(*trajectories(velocity, z, steps, method, tau_max)).mean())


def curvature(velocity: Velocity, z: Tensor, steps: int = 128, method: str = "heun", tau_max: float = 1.0) -> float:
    """E S / E ||y(1) - y(0)||^2: straightness relative to the squared length of the transport."""
    grid, ys, velocities = trajectories(velocity, z, steps, method, tau_max)
    span = float(grid[0] - grid[-1])
    length = ((ys[0] - ys[-1]).double() / span).flatten(1).pow(2).sum(1).mean()
    return float(straightness_from_path(grid, ys, velocities).mean() / length)
