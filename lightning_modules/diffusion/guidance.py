"""Classifier-free guidance (Ho & Salimans 2022, Eq. 6), in x0 space: D_w = D_u + w (D_c - D_u).

w = 1 is the conditional model alone (diffusers' ``guidance_scale`` convention). Per DMD2 (Yin et al. 2024, Sec. 4.2)
guidance is applied to the teacher only and the critic runs at w = 1; VSD/SwiftBrush and SNOOPI guide both.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..conditioning.condition import concat_conditions
from .schedules import broadcast_to_data


def guided_x0(x0_conditional: Tensor, x0_unconditional: Tensor, scale: Tensor | float) -> Tensor:
    scale = broadcast_to_data(torch.as_tensor(scale, dtype=x0_conditional.dtype), x0_conditional)
    return x0_unconditional + scale * (x0_conditional - x0_unconditional)


def classifier_free_guidance(denoiser, x_t: Tensor, t: Tensor, cond: Tensor | None, null_cond: Tensor | None,
                             scale: Tensor | float, prediction: str = "x0") -> Tensor:
    """Guided prediction of ``denoiser`` with both branches in one batched call; returns ``prediction`` space."""
    if cond is None or (not torch.is_tensor(scale) and scale == 1.0):
        return denoiser(x_t, t, cond, prediction=prediction)
    both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_conditions(cond, null_cond), prediction="x0")
    x0 = guided_x0(*both.chunk(2), scale)
    return denoiser.convert(x0, "x0", prediction, x_t, t)
