"""Conversions between prediction spaces for x_t = alpha x0 + sigma eps.

Spaces (the names used across the framework):
  * ``x0``      the clean-data estimate E[x0 | x_t] (the "denoiser" D of EDM)
  * ``epsilon`` the noise estimate, eps = (x_t - alpha x0) / sigma
  * ``v``       v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4; diffusers' ``v_prediction``)
  * ``flow``    the velocity of the conditional path, u = dx_t/dt = alpha' x0 + sigma' eps (for rectified flow
                u = eps - x0, Liu et al. 2022)
  * ``score``   grad log p_t(x_t) = -eps / sigma (Tweedie: x0 = (x_t + sigma^2 score) / alpha)

Every conversion goes through x0, so any pair is two short formulas. Coefficients are float64; the result keeps the
prediction's dtype.
"""
from __future__ import annotations

from torch import Tensor

from .schedules import NoiseSchedule, broadcast_to_data

PREDICTION_SPACES = ("x0", "epsilon", "v", "flow", "score")
_ALIASES = {"sample": "x0", "eps": "epsilon", "v_prediction": "v", "velocity": "flow"}


def canonical_space(name: str) -> str:
    space = _ALIASES.get(name, name)
    if space not in PREDICTION_SPACES:
        raise ValueError(f"unknown prediction space {name!r}; expected one of {PREDICTION_SPACES} "
                         f"or aliases {sorted(_ALIASES)}")
    return space


def _coefficients(schedule: NoiseSchedule, t: Tensor, like: Tensor, with_derivative: bool):
    t = t.double().to(like.device)
    alpha, sigma = schedule.alpha_sigma(t)
    out = [broadcast_to_data(alpha, like), broadcast_to_data(sigma, like)]
    if with_derivative:
        d_alpha, d_sigma = schedule.alpha_sigma_derivative(t)
        out += [broadcast_to_data(d_alpha, like), broadcast_to_data(d_sigma, like)]
    return out


def to_x0(prediction: Tensor, space: str, x_t: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    space = canonical_space(space)
    if space == "x0":
        return prediction
    alpha, sigma, *derivatives = _coefficients(schedule, t, x_t, with_derivative=space == "flow")
    pred, x = prediction.double(), x_t.double()
    if space == "epsilon":
        x0 = (x - sigma * pred) / alpha
    elif space == "v":
        x0 = (alpha * x - sigma * pred) / (alpha ** 2 + sigma ** 2)
    elif space == "score":
        x0 = (x + sigma ** 2 * pred) / alpha
    else:  # flow: solve [x_t; u] = [[alpha, sigma], [alpha', sigma']] [x0; eps]
        d_alpha, d_sigma = derivatives
        x0 = (d_sigma * x - sigma * pred) / (alpha * d_sigma - sigma * d_alpha)
    return x0.to(prediction.dtype)


def from_x0(x0: Tensor, space: str, x_t: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    space = canonical_space(space)
    if space == "x0":
        return x0
    alpha, sigma, *derivatives = _coefficients(schedule, t, x_t, with_derivative=space == "flow")
    x0d, x = x0.double(), x_t.double()
    epsilon = (x - alpha * x0d) / sigma
    if space == "epsilon":
        out = epsilon
    elif space == "v":
        out = alpha * epsilon - sigma * x0d
    elif space == "score":
        out = -epsilon / sigma
    else:
        d_alpha, d_sigma = derivatives
        out = d_alpha * x0d + d_sigma * epsilon
    return out.to(x0.dtype)


def convert(prediction: Tensor, source: str, target: str, x_t: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Re-express a prediction made in space ``source`` in space ``target``."""
    if canonical_space(source) == canonical_space(target):
        return prediction
    return from_x0(to_x0(prediction, source, x_t, t, schedule), target, x_t, t, schedule)
