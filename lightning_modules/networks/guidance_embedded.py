"""A w-conditioned student for guidance distillation (Meng et al. 2023, arXiv:2210.03142, Sec. 4.1): any Denoiser
plus an embedding of the guidance scale w added to one of its hidden activations.

``GuidanceEmbeddedDenoiser(base, embed_module)``: the submodule of ``base`` named by the dotted path ``embed_module``
(default ``input``, the first Linear of ``ToyMLPDenoiser``; ``unet.time_embedding`` for a diffusers UNet2DModel, where
Meng et al. add w to the time embedding) is replaced by a small module whose output is the original's plus
Linear(guidance_embedding(w)). The projection starts at zero, so the wrapped student is the base network until it
learns to use w -- a teacher copy stays a teacher copy. Calling without ``guidance`` (the warm start, a plain
sampler) adds nothing. The w enters through ``forward(..., guidance=w)``; a TextCondition's ``guidance`` field is used
when no explicit w is given (the path guidance-embedded UNets already take), and so is the w of LCM's
``GuidedLabels`` (``guidance_mlp.with_guidance``), which makes any Denoiser an LCM student conditioned on w.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .denoiser import Denoiser
from .diffusers_adapter import guidance_embedding
from .guidance_mlp import split_guidance
from .wrapped import WrappedDenoiser


class _GuidanceAdd(nn.Module):
    def __init__(self, original: nn.Module, out_features: int, embedding_dim: int):
        super().__init__()
        self.original = original
        self.embedding_dim = embedding_dim
        self.projection = nn.Linear(embedding_dim, out_features)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)
        self.guidance: Tensor | None = None  # set for the duration of one call by GuidanceEmbeddedDenoiser

    def forward(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        if self.guidance is None:
            return out
        w = self.guidance.to(out.device).reshape(-1)
        if w.numel() == 1:
            w = w.expand(out.shape[0])
        added = self.projection(guidance_embedding(w, self.embedding_dim).to(out.device, self.projection.weight.dtype))
        return out + added.to(out.dtype).reshape(added.shape + (1,) * (out.ndim - added.ndim))


def _resolve(module: nn.Module, path: str):
    parent, *_ = [module]
    names = path.split(".")
    for name in names[:-1]:
        parent = getattr(parent, name)
    return parent, names[-1]


class GuidanceEmbeddedDenoiser(WrappedDenoiser):
    #: LCM draws w per sample and hands it over in the condition (``guidance_mlp.with_guidance``)
    accepts_guidance = True

    def __init__(self, base: Denoiser, embed_module: str = "input", embedding_dim: int = 64):
        super().__init__(base.schedule, prediction_type=base.prediction_type)
        self.base = base
        parent, name = _resolve(base, embed_module)
        original = getattr(parent, name)
        linears = [m for m in original.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"embed_module {embed_module!r} of {type(base).__name__} holds no nn.Linear to size the "
                             "guidance projection")
        self.embed = _GuidanceAdd(original, linears[-1].out_features, embedding_dim)
        setattr(parent, name, self.embed)
        self.embed_module = embed_module

    def predict(self, x_t, t, cond):
        return self.base.predict(x_t, t, cond)

    def forward(self, x_t: Tensor, t: Tensor, cond=None, prediction: str = "x0", guidance: Tensor | float | None = None):
        plain, carried = split_guidance(cond)  # LCM's GuidedLabels / a TextCondition's guidance field
        if guidance is None:
            guidance = carried
        self.base.schedule = self.schedule
        self.embed.guidance = None if guidance is None else torch.as_tensor(guidance, dtype=torch.float64)
        try:
            return super().forward(x_t, t, plain, prediction)
        finally:
            self.embed.guidance = None
