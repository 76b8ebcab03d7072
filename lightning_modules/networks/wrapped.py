"""A Denoiser around another Denoiser that adds an input to it (a guidance scale, MeanFlow's interval, adapters).

The DistillationModule hands its schedule and data scale to the network it trains; a wrapper must pass them on to the
network it wraps and answer for it what the framework asks of a student (classes, prompt conditioning, data shape, the
features a discriminator reads). That delegation lives here once; a wrapper names the submodule it wraps
(``wrapped_name``) or overrides ``wrapped_denoiser``.
"""
from __future__ import annotations

import copy

from torch import nn

from .denoiser import Denoiser


class WrappedDenoiser(Denoiser):
    #: the attribute under which the wrapper registers the Denoiser it wraps
    wrapped_name: str = "base"
    #: False where the wrapped network may be the shared teacher, whose own schedule must then stand
    overwrite_wrapped_schedule: bool = True

    def wrapped_denoiser(self) -> Denoiser | None:
        return self.__dict__.get("_modules", {}).get(self.wrapped_name)

    @property
    def schedule(self):
        return self.__dict__.get("_schedule")

    @schedule.setter
    def schedule(self, value):
        self.__dict__["_schedule"] = value
        inner = self.wrapped_denoiser()
        if inner is not None and value is not None and (self.overwrite_wrapped_schedule or inner.schedule is None):
            inner.schedule = value

    @property
    def sigma_data(self):
        return getattr(self.wrapped_denoiser(), "sigma_data", None)

    @sigma_data.setter
    def sigma_data(self, value):
        self.wrapped_denoiser().sigma_data = value

    @property
    def sigma_data_from_law(self) -> bool:
        return bool(getattr(self.wrapped_denoiser(), "sigma_data_from_law", False))

    @property
    def num_classes(self) -> int:
        return getattr(self.wrapped_denoiser(), "num_classes", 0)

    @property
    def text_conditioned(self) -> bool:
        return bool(getattr(self.wrapped_denoiser(), "text_conditioned", False))

    @property
    def data_shape(self):
        return self.wrapped_denoiser().data_shape

    def feature_module(self) -> nn.Module | None:
        return self.wrapped_denoiser().feature_module()


def deepcopy_sharing_base(network: nn.Module, memo: dict) -> nn.Module:
    """``__deepcopy__`` of a network that holds a frozen base it does not own (``own_base`` False, the base in
    ``__dict__["_shared_base"]``, outside nn.Module's registry): the copy -- an EMA average, a critic that starts as
    the student -- gets its own trainable parts on the SAME base. The base, its submodules, parameters and buffers are
    pre-seeded in ``memo``, so no hidden second teacher (which ``.to()`` would not move) is made."""
    if not network.own_base:
        base = network.__dict__["_shared_base"]
        for shared in [base, *base.modules(), *base.parameters(), *base.buffers()]:
            memo.setdefault(id(shared), shared)
    duplicate = type(network).__new__(type(network))
    memo[id(network)] = duplicate
    for key, value in network.__dict__.items():
        duplicate.__dict__[key] = copy.deepcopy(value, memo)
    return duplicate
