"""Diffusion-transformer teachers from diffusers behind the Denoiser contract.

* ``SD3TransformerDenoiser`` -- Stable Diffusion 3's MMDiT (Esser et al. 2024): rectified flow x_t = (1 - t) x0 + t eps
  (``RectifiedFlowSchedule``, native t in [0, 1]); the network sees timestep 1000 t and predicts the velocity
  v = eps - x0 (the framework's ``flow`` space: alpha' x0 + sigma' eps with alpha' = -1, sigma' = 1), conditioned on the
  joint CLIP + T5 token states (``TextCondition.embeds``) and the pooled CLIP embedding (``pooled``).
* ``PixArtTransformerDenoiser`` -- PixArt-alpha / Sigma (Chen et al. 2023 / 2024): a VP-discrete epsilon-prediction DiT
  on T5 states with their attention mask; its learned-variance half of the output channels is dropped (the framework
  uses the mean prediction only, as diffusers' PixArt pipelines do at sampling).
Both load with ``from_pretrained`` from a local folder (nothing is downloaded) or build from a config.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ..conditioning.condition import TextCondition
from ..diffusion.schedules import NoiseSchedule
from .denoiser import Denoiser


def _build(cls_name: str, config: dict | None, pretrained_path: str | None, subfolder: str | None, torch_dtype):
    import diffusers

    cls = getattr(diffusers, cls_name)
    if (config is None) == (pretrained_path is None):
        raise ValueError(f"give exactly one of {cls_name} config= or pretrained_path=")
    if pretrained_path is None:
        model = cls(**config)
    else:
        folder = os.path.join(pretrained_path, subfolder) if subfolder else pretrained_path
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"pretrained_path {folder!r} is not a diffusers model folder (no config.json)")
        model = cls.from_pretrained(pretrained_path, subfolder=subfolder, local_files_only=True)
    if torch_dtype is not None:
        model.to(getattr(torch, torch_dtype))
    return model


def _text(cond, name: str) -> TextCondition:
    if not isinstance(cond, TextCondition):
        raise ValueError(f"{name} is prompt-conditioned: cond must be a TextCondition, got {type(cond).__name__}")
    return cond


class _TransformerDenoiser(Denoiser):
    text_conditioned = True
    transformer_class: str

    def __init__(self, config: dict | None = None, pretrained_path: str | None = None,
                 subfolder: str | None = "transformer", schedule: NoiseSchedule | None = None,
                 prediction_type: str = "epsilon", torch_dtype: str | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__(schedule, prediction_type=prediction_type)
        self.transformer = _build(self.transformer_class, config, pretrained_path, subfolder, torch_dtype)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    @property
    def data_shape(self):
        size = self.transformer.config.sample_size
        return (self.transformer.config.in_channels, size, size)

    def save_pretrained(self, folder: str) -> None:
        self.transformer.save_pretrained(folder, safe_serialization=True)


class SD3TransformerDenoiser(_TransformerDenoiser):
    transformer_class = "SD3Transformer2DModel"

    def __init__(self, *args, prediction_type: str = "flow", **kwargs):
        super().__init__(*args, prediction_type=prediction_type, **kwargs)

    def predict(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        cond = _text(cond, type(self).__name__)
        dtype = self.transformer.dtype
        timestep = (t.double() * 1000.0).to(dtype)
        return self.transformer(x_t.to(dtype), encoder_hidden_states=cond.embeds.to(dtype),
                                pooled_projections=cond.pooled.to(dtype), timestep=timestep).sample


class PixArtTransformerDenoiser(_TransformerDenoiser):
    transformer_class = "PixArtTransformer2DModel"

    def predict(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        cond = _text(cond, type(self).__name__)
        dtype = self.transformer.dtype
        output = self.transformer(x_t.to(dtype), encoder_hidden_states=cond.embeds.to(dtype), timestep=t.to(dtype),
                                  encoder_attention_mask=cond.mask,
                                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return output[:, :x_t.shape[1]] if output.shape[1] == 2 * x_t.shape[1] else output
