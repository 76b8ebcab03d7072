"""The one network contract shared by teacher, student and critic: ``(x_t, t, cond) -> prediction in any space``.

A concrete network implements ``predict`` in its native space (``prediction_type``); ``forward`` converts to the
space the caller asks for, so methods are written once in x0 space whatever the backbone predicts
(FastGen's per-network conversion; NVlabs EDM keeps the same math in its preconditioners).
"""
from __future__ import annotations

from abc import abstractmethod

from torch import Tensor, nn

from ..diffusion.parameterization import canonical_space, convert
from ..diffusion.schedules import NoiseSchedule


class Denoiser(nn.Module):
    #: True for networks conditioned on encoded prompts (a ``TextCondition``) rather than class labels
    text_conditioned: bool = False

    def __init__(self, schedule: NoiseSchedule | None = None, prediction_type: str = "x0"):
        super().__init__()
        self.schedule = schedule
        self.prediction_type = canonical_space(prediction_type)

    @abstractmethod
    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The network's native prediction (``self.prediction_type``) at native times ``t`` (shape (B,))."""

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, prediction: str = "x0") -> Tensor:
        if self.schedule is None:
            raise RuntimeError(f"{type(self).__name__} has no noise schedule; pass schedule= or let the "
                               "DistillationModule share the teacher's")
        return self.convert(self.predict(x_t, t, cond), self.prediction_type, prediction, x_t, t)

    def convert(self, prediction: Tensor, source: str, target: str, x_t: Tensor, t: Tensor) -> Tensor:
        return convert(prediction, source, target, x_t, t, self.schedule)

    def feature_module(self) -> nn.Module | None:
        """The module whose output is this network's bottleneck (None if it has none)."""
        return None

    @property
    def data_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample, where the network knows it (used to validate configs)."""
        return None


class FeatureTap:
    """Capture a Denoiser's bottleneck features during a normal forward call (for discriminator heads on the
    critic, DMD2 Sec. 4.3). The network names its bottleneck through ``feature_module()``."""

    def __init__(self, network: Denoiser):
        module = network.feature_module()
        if module is None:
            raise ValueError(f"{type(network).__name__} exposes no feature_module() for a discriminator head")
        self.module, self.features, self._handle = module, None, None

    def __enter__(self):
        def hook(_module, _inputs, output):
            self.features = output[0] if isinstance(output, tuple) else output
        self._handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False
