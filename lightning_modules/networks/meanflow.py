"""A two-time student for MeanFlow (Geng et al. 2025, arXiv:2505.13447): any Denoiser plus an embedding of the
interval h = t - r, added (through a forward hook) to the output of the wrapped network's time embedding --
``noise_embedding`` of ToyMLPDenoiser, ``unet.time_embedding`` of diffusers UNets, or ``embedding_module``. The
embedding's last layer starts at zero, so at h = anything the wrapper starts as the wrapped denoiser.

In linear-interpolation coordinates (z_t = (1 - t) x + t e, t = s / (1 + s) for the schedule's EDM noise level s,
z = (1 - t) x_native / alpha): u(z, r, t) = (z - D_{t-r}(x_native, tau)) / t, so u(z, t, t) = v is the denoiser's
velocity and z_t - t u(z, 0, t) = D_t: ``forward`` (the framework's x0 prediction) is the jump to r = 0.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..diffusion.schedules import broadcast_to_data
from .denoiser import Denoiser
from .mlp import FourierFeatures
from .wrapped import WrappedDenoiser


class MeanFlowStudent(WrappedDenoiser):
    wrapped_name = "network"

    def __init__(self, network: Denoiser, embedding_module: str | None = None, embedding_dim: int | None = None,
                 num_features: int = 64, hidden: int = 128, scale: float = 1.0):
        super().__init__(network.schedule, prediction_type="x0")
        self.network = network
        if embedding_module is None:
            embedding_module = next((name for name in ("noise_embedding", "unet.time_embedding")
                                     if _find(network, name) is not None), None)
        module = None if embedding_module is None else _find(network, embedding_module)
        if module is None:
            raise ValueError(f"MeanFlowStudent found no time-embedding module {embedding_module!r} in "
                             f"{type(network).__name__}; name one with embedding_module")
        if embedding_dim is None:
            if hasattr(module, "frequencies"):
                embedding_dim = 2 * module.frequencies.numel()
            elif hasattr(module, "linear_2"):
                embedding_dim = module.linear_2.out_features
            else:
                raise ValueError("give embedding_dim, the width of the time embedding's output")
        self.embedding_module = embedding_module
        self.interval_embedding = nn.Sequential(FourierFeatures(num_features, scale), nn.Linear(num_features, hidden),
                                                nn.SiLU(), nn.Linear(hidden, embedding_dim))
        nn.init.zeros_(self.interval_embedding[-1].weight)
        nn.init.zeros_(self.interval_embedding[-1].bias)
        self._interval = None
        module.register_forward_hook(self._add_interval)

    def _add_interval(self, module, inputs, output):
        if self._interval is None:
            return output
        return output + self.interval_embedding(self._interval).to(output.dtype)

    def _denoise(self, x_native: Tensor, tau: Tensor, interval: Tensor, cond) -> Tensor:
        self._interval = interval
        try:
            return self.network(x_native, tau, cond)
        finally:
            self._interval = None

    def to_native(self, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_native, tau) of the interpolation point z at time t."""
        t = t.double()
        tau = self.schedule.time_from_edm_sigma(t / (1 - t))
        alpha, _ = self.schedule.alpha_sigma(tau)
        return (broadcast_to_data(alpha / (1 - t), z) * z.double()).to(z.dtype), tau

    def average_velocity(self, z: Tensor, r: Tensor, t: Tensor, cond=None) -> Tensor:
        """u(z_t, r, t) = (z - D_{t-r}) / t."""
        x_native, tau = self.to_native(z, t)
        denoised = self._denoise(x_native, tau, (t - r).double(), cond)
        return ((z.double() - denoised.double()) / broadcast_to_data(t.double(), z)).to(z.dtype)

    def predict(self, x_t, t, cond):
        """x0 = z_t - t u(z_t, 0, t) = D_t(x_t, t): the one-step jump to r = 0."""
        s = self.schedule.edm_sigma(t.double())
        return self._denoise(x_t, t, s / (1 + s), cond)


def _find(network: nn.Module, name: str):
    module = network
    for part in name.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module
