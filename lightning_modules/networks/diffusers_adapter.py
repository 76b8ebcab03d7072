"""Adapters that put diffusers' UNets behind the Denoiser contract.

A UNet is built from a config dict or loaded from a local diffusers folder (``from_pretrained`` on a path; nothing is
downloaded). Two ways to condition on time:
  * ``preconditioning=None``: the UNet sees the schedule's native time (diffusers' DDPM timesteps) and predicts in
    ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``) -- a Stable-Diffusion-style teacher;
  * ``preconditioning="edm"``: the UNet is EDM's raw network F, fed c_in x / alpha and c_noise = ln(sigma) / 4.
Class labels go to ``class_labels`` (UNet2DModel with ``num_class_embeds``; the label ``num_classes`` is the null
label for guidance); for UNet2DConditionModel ``cond`` is a ``TextCondition`` (encoded prompts: per-token states,
attention mask, and for SDXL-style UNets (``addition_embed_type: text_time``) the pooled embedding and the size ids,
(original size, crop top-left, target size) = (latent size x ``vae_scale_factor``, (0, 0), the same), as the SDXL
pipeline builds them; for guidance-embedded UNets (``time_cond_proj_dim``, LCM) the guidance scale it carries) or the
raw encoder hidden states (B, L, C).
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ..conditioning.condition import TextCondition
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


def guidance_embedding(scale: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of a CFG scale w for guidance-embedded students (LCM, Luo et al. 2023, Sec. 4.2, after
    Meng et al. 2023): the Transformer position embedding of 1000 (w - 1), sin half then cos half."""
    w = (scale.double().reshape(-1) - 1.0) * 1000.0
    half = dim // 2
    frequencies = torch.exp(-torch.arange(half, dtype=torch.float64, device=w.device) * (math.log(10000.0) / (half - 1)))
    angles = w[:, None] * frequencies[None]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding.float()


class DiffusersUNetDenoiser(Denoiser):
    def __init__(self, config: dict | None = None, pretrained_path: str | None = None, subfolder: str | None = None,
                 unet_class: str = "UNet2DModel", prediction_type: str = "epsilon",
                 preconditioning: str | None = None, sigma_data: float = 0.5, boundary_condition: bool = False,
                 schedule: NoiseSchedule | None = None, vae_scale_factor: int = 8, torch_dtype: str | None = None):
        if preconditioning not in (None, "edm"):
            raise ValueError(f"unknown preconditioning {preconditioning!r}; expected None or 'edm'")
        super().__init__(schedule, prediction_type="x0" if preconditioning == "edm" else prediction_type)
        self.unet = build_unet(unet_class, config, pretrained_path, subfolder)
        if torch_dtype is not None:
            self.unet.to(getattr(torch, torch_dtype))
        self.vae_scale_factor = vae_scale_factor
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

    @property
    def text_conditioned(self) -> bool:
        return self.unet_class == "UNet2DConditionModel"

    def _call_unet(self, x: Tensor, time_input: Tensor, cond) -> Tensor:
        if self.unet_class == "UNet2DConditionModel":
            return self._call_text_unet(x, time_input, cond)
        if cond is None and self.num_classes:
            cond = torch.full((x.shape[0],), self.num_classes, device=x.device)
        return self.unet(x, time_input, class_labels=None if cond is None else cond.long()).sample

    def _call_text_unet(self, x: Tensor, time_input: Tensor, cond) -> Tensor:
        if not isinstance(cond, TextCondition):
            return self.unet(x, time_input, encoder_hidden_states=cond).sample
        dtype = self.unet.dtype
        kwargs = {"encoder_hidden_states": cond.embeds.to(dtype)}
        if cond.mask is not None:
            kwargs["encoder_attention_mask"] = cond.mask
        if getattr(self.unet.config, "addition_embed_type", None) == "text_time":
            if cond.pooled is None:
                raise ValueError("an SDXL-style UNet (addition_embed_type text_time) needs the pooled prompt "
                                 "embedding (TextCondition.pooled); use SDXLTextEncoder")
            size = [s * self.vae_scale_factor for s in x.shape[-2:]]
            time_ids = torch.tensor([*size, 0, 0, *size], dtype=dtype, device=x.device).expand(x.shape[0], -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids}
        if getattr(self.unet.config, "time_cond_proj_dim", None):
            if cond.guidance is None:
                raise ValueError("a guidance-embedded UNet (time_cond_proj_dim) needs TextCondition.guidance")
            kwargs["timestep_cond"] = guidance_embedding(cond.guidance, self.unet.config.time_cond_proj_dim).to(dtype)
        return self.unet(x.to(dtype), time_input.to(dtype), **kwargs).sample

    def predict(self, x_t, t, cond):
        if self.preconditioning == "edm":
            return edm_precondition(self._call_unet, x_t, t, cond, self.schedule, self.sigma_data,
                                    self.boundary_condition)
        return self._call_unet(x_t, t.to(x_t.dtype), cond)

    def save_pretrained(self, folder: str) -> None:
        self.unet.save_pretrained(folder, safe_serialization=True)
