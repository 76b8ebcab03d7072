"""Memory options of the diffusers backbones inside a network: gradient checkpointing and the attention kernel.

``attention="auto"`` picks xformers' memory-efficient attention when CUDA is present and xformers imports, and
torch's scaled_dot_product_attention (diffusers' default AttnProcessor2_0) otherwise; "xformers" and "sdpa" force
one. Networks without a diffusers backbone (toy MLPs, exact teachers) have nothing to change; asking them for
gradient checkpointing is an error, since silently training without it would run out of memory later, not here.
"""
from __future__ import annotations

import torch
from torch import nn

ATTENTION_BACKENDS = ("auto", "xformers", "sdpa")


def diffusers_backbones(network: nn.Module) -> list[nn.Module]:
    """The outermost diffusers ModelMixin modules inside ``network`` (a UNet, a transformer), each once."""
    from diffusers import ModelMixin

    found: list[nn.Module] = []
    for module in network.modules():
        if isinstance(module, ModelMixin) and not any(module is m or _contains(m, module) for m in found):
            found.append(module)
    return found


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def resolve_attention(attention: str) -> str:
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    if attention != "auto":
        return attention
    if not torch.cuda.is_available():
        return "sdpa"
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # an xformers wheel built for another torch raises at import, not ImportError only
        return "sdpa"
    return "xformers"


def apply_memory_options(network: nn.Module, gradient_checkpointing: bool = False, attention: str = "auto") -> str | None:
    """Apply the options to every diffusers backbone of ``network``; returns the attention backend used (None when
    the network has no diffusers backbone)."""
    backend = resolve_attention(attention)
    backbones = diffusers_backbones(network)
    if gradient_checkpointing and not any(getattr(b, "_supports_gradient_checkpointing", False) for b in backbones):
        raise ValueError(f"gradient_checkpointing=True, but {type(network).__name__} has no diffusers backbone that "
                         "supports it")
    for backbone in backbones:
        if gradient_checkpointing and getattr(backbone, "_supports_gradient_checkpointing", False):
            backbone.enable_gradient_checkpointing()
        if backend == "xformers":
            try:
                backbone.enable_xformers_memory_efficient_attention()
            except Exception as error:
                raise ValueError(f"attention_backend='xformers' cannot be used on {type(backbone).__name__}: "
                                 f"{error}") from None
    return backend if backbones else None
