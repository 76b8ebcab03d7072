"""Adapters that put diffusers' UNets behind the Denoiser contract.

A UNet is built from a config dict or loaded from a local diffusers folder (``from_pretrained`` on a path; nothing is
downloaded). Two ways to condition on time:
  * ``preconditioning=None``: the UNet sees the schedule's native time (diffusers' DDPM timesteps) and predicts in
    ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``) -- a Stable-Diffusion-style teacher;
  * ``preconditioning="edm"``: the UNet is EDM's raw network F, fed c_in x / alpha and c_noise = ln(sigma) / 4.
Class labels go to ``class_labels`` (UNet2DModel with ``num_class_embeds``; the label ``num_classes`` is the null
label for guidance); for UNet2DConditionModel ``cond`` is the encoder hidden states (B, L, C).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ..diffusion.schedules import NoiseSchedule
from .denoiser import Denoiser
from .preconditioning import edm_precondition

_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def build_unet(unet_class: str, config: dict | None, pretrained_path: str | None, subfolder: str | None = None):
    import diffusers

    if unet_class not in _UNET_CLASSES:
        raise ValueError(f"unknown unet_class {unet_class!r}; expected one of {_UNET_CLASSES}")
    cls = getattr(diffusers, unet_class)
    if (config is None) == (pretrained_path is None):
        raise ValueError("give exactly one of unet config= or pretrained_path=")
    if pretrained_path is not None:
        folder = os.path.join(pretrained_path, subfolder) if subfolder else pretrained_path
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"pretrained_path {folder!r} is not a diffusers model folder (no config.json)")
        return cls.from_pretrained(pretrained_path, subfolder=subfolder, local_files_only=True)
    return cls(**config)


class DiffusersUNetDenoiser(Denoiser):
    def __init__(self, config: dict | None = None, pretrained_path: str | None = None, subfolder: str | None = None,
                 unet_class: str = "UNet2DModel", prediction_type: str = "epsilon",
                 preconditioning: str | None = None, sigma_data: float = 0.5, boundary_condition: bool = False,
                 schedule: NoiseSchedule | None = None):
        if preconditioning not in (None, "edm"):
            raise ValueError(f"unknown preconditioning {preconditioning!r}; expected None or 'edm'")
        super().__init__(schedule, prediction_type="x0" if preconditioning == "edm" else prediction_type)
        self.unet = build_unet(unet_class, config, pretrained_path, subfolder)
        self.unet_class, self.preconditioning = unet_class, preconditioning
        self.sigma_data, self.boundary_condition = sigma_data, boundary_condition
        # class-conditional UNets embed num_classes + 1 labels; the last one is the null label for guidance
        embeds = getattr(self.unet.config, "num_class_embeds", None)
        self.num_classes = embeds - 1 if unet_class == "UNet2DModel" and embeds else 0

    @property
    def data_shape(self):
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)

    def feature_module(self):
        return self.unet.mid_block

    def _call_unet(self, x: Tensor, time_input: Tensor, cond: Tensor | None) -> Tensor:
        if self.unet_class == "UNet2DConditionModel":
            return self.unet(x, time_input, encoder_hidden_states=cond).sample
        if cond is None and self.num_classes:
            cond = torch.full((x.shape[0],), self.num_classes, device=x.device)
        return self.unet(x, time_input, class_labels=None if cond is None else cond.long()).sample

    def predict(self, x_t, t, cond):
        if self.preconditioning == "edm":
            return edm_precondition(self._call_unet, x_t, t, cond, self.schedule, self.sigma_data,
                                    self.boundary_condition)
        return self._call_unet(x_t, t.to(x_t.dtype), cond)

    def save_pretrained(self, folder: str) -> None:
        self.unet.save_pretrained(folder, safe_serialization=True)
