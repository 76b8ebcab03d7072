"""EDM preconditioning (Karras et al. 2022, Table 1 and Eq. 7), written once for every schedule.

With x~ = x_t / alpha and s = edm_sigma(t):  D(x_t) = c_skip(s) x~ + c_out(s) F(c_in(s) x~, c_noise(s), cond).
With ``boundary_condition`` the consistency-model variant is used (Song et al. 2023, Appendix C):
c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = (s - s_min) sd / sqrt(s^2 + sd^2), so D(x, s_min) = x exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion.schedules import NoiseSchedule, broadcast_to_data


def edm_coefficients(edm_sigma: Tensor, sigma_data: float, boundary_sigma: float | None = None):
    total = edm_sigma ** 2 + sigma_data ** 2
    c_in = total.rsqrt()
    c_noise = edm_sigma.log() / 4
    if boundary_sigma is None:
        c_skip = sigma_data ** 2 / total
        c_out = edm_sigma * sigma_data * c_in
    else:
        offset = edm_sigma - boundary_sigma
        c_skip = sigma_data ** 2 / (offset ** 2 + sigma_data ** 2)
        c_out = offset * sigma_data * c_in
    return c_skip, c_out, c_in, c_noise


def edm_precondition(backbone, x_t: Tensor, t: Tensor, cond, schedule: NoiseSchedule, sigma_data: float,
                     boundary_condition: bool = False) -> Tensor:
    """x0 prediction of ``backbone(scaled_input, c_noise, cond)`` under EDM preconditioning."""
    alpha, _ = schedule.alpha_sigma(t.double())
    edm_sigma = schedule.edm_sigma(t.double())
    t_min = torch.tensor(schedule.t_min, dtype=torch.float64)
    boundary = schedule.edm_sigma(t_min).item() if boundary_condition else None
    c_skip, c_out, c_in, c_noise = edm_coefficients(edm_sigma, sigma_data, boundary)
    scaled = x_t.double() / broadcast_to_data(alpha, x_t)
    network_input = (broadcast_to_data(c_in, x_t) * scaled).to(x_t.dtype)
    output = backbone(network_input, c_noise.to(x_t.dtype), cond)
    x0 = broadcast_to_data(c_skip, x_t) * scaled + broadcast_to_data(c_out, x_t) * output.double()
    return x0.to(output.dtype)
