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


def adapter_aware_checkpoint(backbone: nn.Module):
    """diffusers' ``gradient_checkpointing_func`` for a backbone that LoRA networks adapt by swapping their layers in
    for the duration of a forward (``LoRACritic.attached``): the recomputation in backward runs after the swap has
    ended, so it re-attaches the adapters that were in place at forward time (``torch.utils.checkpoint``'s
    ``context_fn``); without this it would recompute the block without them and return wrong gradients."""
    import contextlib

    import torch.utils.checkpoint

    def checkpoint(module, *args):
        owner = backbone.__dict__.get("_attached_lora")
        recompute = owner.attached if owner is not None else contextlib.nullcontext
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), recompute()))
    return checkpoint


def apply_memory_options(network: nn.Module, gradient_checkpointing: bool = False, attention: str = "auto") -> str | None:
    """Apply the options to every diffusers backbone of ``network``; returns the attention backend used (None when
    the network has no diffusers backbone). A LoRA network's backbones are those of its base network (for a LoRA
    student, the shared frozen teacher: checkpointing only acts where gradients flow, so the teacher's own no-grad
    forwards are unchanged)."""
    backend = resolve_attention(attention)
    base = getattr(network, "base_network", None)
    backbones = diffusers_backbones(base if base is not None else network)
    if gradient_checkpointing and not any(getattr(b, "_supports_gradient_checkpointing", False) for b in backbones):
        raise ValueError(f"gradient_checkpointing=True, but {type(network).__name__} has no diffusers backbone that "
                         "supports it")
    for backbone in backbones:
        if gradient_checkpointing and getattr(backbone, "_supports_gradient_checkpointing", False):
            backbone.enable_gradient_checkpointing(adapter_aware_checkpoint(backbone))
        if backend == "xformers":
            try:
                backbone.enable_xformers_memory_efficient_attention()
            except Exception as error:
                raise ValueError(f"attention_backend='xformers' cannot be used on {type(backbone).__name__}: "
                                 f"{error}") from None
    return backend if backbones else None
