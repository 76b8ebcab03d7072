"""Guidance-embedded toy students (LCM, Luo et al. 2023, arXiv:2310.04378, Sec. 4.2: the student is conditioned on
the CFG scale w, f_theta(x, w, c, t), after Meng et al. 2023).

Class labels are plain (B,) tensors, so a label condition carries its guidance scale in ``GuidedLabels`` (prompts carry
it in ``TextCondition.guidance``, the diffusers path through ``timestep_cond``). ``with_guidance(cond, w)`` builds the
student's condition; ``split_guidance(cond)`` takes it apart. ``GuidanceToyMLPDenoiser`` adds a zero-initialised
projection of the sinusoidal embedding of w (``diffusers_adapter.guidance_embedding``) to its noise-level features, so
at initialisation (and for conditions without w) it is exactly a ``ToyMLPDenoiser``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..conditioning.condition import TextCondition
from .diffusers_adapter import guidance_embedding
from .mlp import ToyMLPDenoiser


@dataclass
class GuidedLabels:
    labels: Tensor | None
    guidance: Tensor

    def __len__(self) -> int:
        return self.guidance.shape[0]


def with_guidance(cond, scale: Tensor):
    if isinstance(cond, TextCondition):
        return cond.with_guidance(scale)
    return GuidedLabels(cond, scale)


def split_guidance(cond):
    """(the plain condition, w or None)."""
    if isinstance(cond, GuidedLabels):
        return cond.labels, cond.guidance
    if isinstance(cond, TextCondition):
        return cond, cond.guidance
    return cond, None


class GuidanceToyMLPDenoiser(ToyMLPDenoiser):
    accepts_guidance = True

    def __init__(self, *args, guidance_embedding_dim: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.guidance_embedding_dim = guidance_embedding_dim
        self.guidance_projection = nn.Linear(guidance_embedding_dim, 64)  # onto the 64 Fourier noise features
        nn.init.zeros_(self.guidance_projection.weight)
        nn.init.zeros_(self.guidance_projection.bias)

    def backbone(self, x: Tensor, c_noise: Tensor, cond) -> Tensor:
        plain, scale = split_guidance(cond)
        features = self.noise_embedding(c_noise).to(x.dtype)
        if scale is not None:
            embedded = guidance_embedding(scale.to(x.device), self.guidance_embedding_dim).to(x.dtype)
            features = features + self.guidance_projection(embedded)
        h = self.input(torch.cat([x, features], dim=1))
        if self.class_embedding is not None:
            labels = torch.full((x.shape[0],), self.num_classes, device=x.device) if plain is None else plain
            h = h + self.class_embedding(labels.long())
        if self.condition_embedding is not None and plain is not None:
            h = h + self.condition_embedding(plain.pooled.to(h.dtype))
        return self.output(self.body(h))
