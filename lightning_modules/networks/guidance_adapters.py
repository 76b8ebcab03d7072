"""Guidance adapters on a frozen base denoiser (adapter guidance distillation, Jensen & Sadat 2025,
"Efficient Distillation of Classifier-Free Guidance using Adapters", TMLR 2025, arXiv:2503.07274).

``GuidanceAdapterDenoiser(base)`` leaves every weight of ``base`` frozen and adds small residual adapters, conditioned
on the guidance scale w, to the outputs of chosen submodules (``adapter_modules``, dotted paths):
    h  <-  h + U silu(D h + E phi(w))            (D: channels -> bottleneck, E: embedding -> bottleneck, U: back)
phi is the sinusoidal guidance embedding of Meng et al. / LCM (``diffusers_adapter.guidance_embedding``). U starts at
zero, so the adapted network IS its base until trained (AGD's residual formulation: switching the adapters off gives
back the original model and its CFG). The correction depends on h, i.e. on (x_t, t, c), not only on w: CFG's
correction w (D_c - D_u) is a function of the state, which a w-only offset at one layer cannot express.

Calling without ``guidance`` runs the base alone (adapters off). The adapters act through forward hooks registered
only for the duration of the adapted call, so the base's module tree, state-dict keys and hooks are untouched: with a
shared base (the teacher, ``own_base=False``) the teacher's own forward stays exactly the teacher's, and its weights
are held once (outside this module's registry). An owned base (``own_base=True``: e.g. the toy suite's warm-started
MLP, the exact mixture teacher having no layers to adapt) is registered so checkpoints carry it.
Submodules returning tuples (diffusers down / up blocks) get the adapter on their first element.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor, nn

from .denoiser import Denoiser
from .wrapped import WrappedDenoiser, deepcopy_sharing_base
from .diffusers_adapter import DiffusersUNetDenoiser, guidance_embedding


class ResidualGuidanceAdapter(nn.Module):
    """h + U silu(D h + E phi(w)) over the channel axis (dim 1) of h; U zero-initialised."""

    def __init__(self, features: int, bottleneck: int, embedding_dim: int):
        super().__init__()
        self.down = nn.Linear(features, bottleneck)
        self.guidance = nn.Linear(embedding_dim, bottleneck)
        self.up = nn.Linear(bottleneck, features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor, embedding: Tensor) -> Tensor:
        channels_last = h.movedim(1, -1)
        shift = self.guidance(embedding.to(self.guidance.weight.dtype))
        shift = shift.reshape(shift.shape[0], *[1] * (h.ndim - 2), shift.shape[1])
        hidden = torch.nn.functional.silu(self.down(channels_last.to(self.down.weight.dtype)) + shift)
        return h + self.up(hidden).to(h.dtype).movedim(-1, 1)


def default_adapter_modules(network: nn.Module) -> list[str]:
    """Where adapters go when the config names none: the time embedding, the mid block and every up block of a
    diffusers UNet (AGD adapts every block of its DiT / UNet backbones); the input layer and the hidden body of the
    toy MLP."""
    if isinstance(network, DiffusersUNetDenoiser):
        ups = len(network.unet.up_blocks)
        return ["unet.time_embedding", "unet.mid_block", *[f"unet.up_blocks.{i}" for i in range(ups)]]
    names = dict(network.named_children())
    if "input" in names and "body" in names:
        return ["input", "body"]
    raise ValueError(f"no default adapter places for {type(network).__name__}; give adapter_modules (dotted paths "
                     "of submodules whose outputs the adapters correct)")


def _output_features(module: nn.Module, path: str) -> int:
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ValueError(f"adapter module {path!r} holds no nn.Linear / nn.Conv2d to size its adapter")
    last = layers[-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


class GuidanceAdapterDenoiser(WrappedDenoiser):
    overwrite_wrapped_schedule = False  # the base may be the shared teacher

    def __init__(self, base: Denoiser, adapter_modules: Sequence[str] | None = None, bottleneck: int = 32,
                 embedding_dim: int = 64, own_base: bool = True):
        if bottleneck < 1 or embedding_dim < 2:
            raise ValueError(f"need bottleneck >= 1 and embedding_dim >= 2, got {bottleneck}, {embedding_dim}")
        super().__init__(None, prediction_type=base.prediction_type)
        base.requires_grad_(False).eval()
        self.own_base = own_base
        if own_base:
            self.base = base
        else:
            self.__dict__["_shared_base"] = base
        paths = default_adapter_modules(base) if adapter_modules is None else list(adapter_modules)
        if not paths:
            raise ValueError("adapter_modules is empty: AGD needs at least one adapted submodule")
        self.adapter_modules, self.embedding_dim = paths, embedding_dim
        self.adapters = nn.ModuleDict()
        for path in paths:
            try:
                module = base.get_submodule(path)
            except AttributeError as error:
                raise ValueError(f"adapter module {path!r} is not a submodule of {type(base).__name__}") from error
            self.adapters[path.replace(".", "__")] = ResidualGuidanceAdapter(_output_features(module, path),
                                                                            bottleneck, embedding_dim)
        self.schedule = base.schedule

    # ------------------------------------------------------------------ the frozen base
    @property
    def base_network(self) -> Denoiser:
        return self.base if self.own_base else self.__dict__["_shared_base"]

    def wrapped_denoiser(self) -> Denoiser | None:
        base = self.__dict__.get("_modules", {}).get("base")
        return self.__dict__.get("_shared_base") if base is None else base

    def adapter_parameter_count(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters())

    @torch.no_grad()
    def reset_adapters(self) -> None:
        """U = 0: the adapted network equals its base again (after the toy warm start refits an owned base)."""
        for adapter in self.adapters.values():
            nn.init.zeros_(adapter.up.weight)
            nn.init.zeros_(adapter.up.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base_network.eval()  # the frozen base never runs in training mode
        return self

    def __deepcopy__(self, memo):
        """A copy (the EMA average) with its own adapters on the SAME shared base: the frozen teacher is not cloned."""
        return deepcopy_sharing_base(self, memo)

    # ------------------------------------------------------------------ forward
    def predict(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        return self.base_network.predict(x_t, t, cond)

    @staticmethod
    def _correct(adapter: ResidualGuidanceAdapter, embedding: Tensor, _module, _inputs, output):
        if isinstance(output, tuple):
            return (adapter(output[0], embedding), *output[1:])
        return adapter(output, embedding)

    def forward(self, x_t: Tensor, t: Tensor, cond=None, prediction: str = "x0",
                guidance: Tensor | float | None = None) -> Tensor:
        if guidance is None and getattr(cond, "guidance", None) is not None:
            guidance = cond.guidance
        base = self.base_network
        if base.schedule is None:
            base.schedule = self.schedule
        if guidance is None:
            return base(x_t, t, cond, prediction=prediction)  # adapters off: the base network itself
        w = torch.as_tensor(guidance, dtype=torch.float64, device=x_t.device).reshape(-1)
        w = w.expand(x_t.shape[0]) if w.numel() == 1 else w
        if w.numel() != x_t.shape[0]:
            raise ValueError(f"guidance has {w.numel()} scales for a batch of {x_t.shape[0]}")
        embedding = guidance_embedding(w, self.embedding_dim).to(x_t.device)
        handles = [base.get_submodule(path).register_forward_hook(
            functools.partial(self._correct, self.adapters[path.replace(".", "__")], embedding))
            for path in self.adapter_modules]
        try:
            return base(x_t, t, cond, prediction=prediction)
        finally:
            for handle in handles:
                handle.remove()

    def extra_repr(self) -> str:
        return (f"adapters={self.adapter_modules}, adapter_parameters={self.adapter_parameter_count()}, "
                f"own_base={self.own_base}")
