"""The frozen VAE of a latent teacher (Rombach et al. 2022, Sec. 3): images <-> the latents the teacher denoises.

    z = (E(x).mode - shift_factor) * scaling_factor,        x = D(z / scaling_factor + shift_factor)

with the factors from the VAE's own config (SD1.5: scale 0.18215, no shift; SD3 / Flux: scale and shift), unless
given. Images are in [-1, 1]. The module is frozen and always in eval mode; methods never train it.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn


class LatentAutoencoder(nn.Module):
    def __init__(self, pretrained_path: str | None = None, subfolder: str | None = "vae", config: dict | None = None,
                 scaling_factor: float | None = None, shift_factor: float | None = None,
                 sample_latents: bool = False):
        super().__init__()
        from diffusers import AutoencoderKL

        if (config is None) == (pretrained_path is None):
            raise ValueError("give exactly one of LatentAutoencoder pretrained_path= or config=")
        if pretrained_path is not None:
            folder = os.path.join(pretrained_path, subfolder) if subfolder else pretrained_path
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise FileNotFoundError(f"VAE folder {folder!r} has no config.json (expected a diffusers AutoencoderKL)")
            self.vae = AutoencoderKL.from_pretrained(pretrained_path, subfolder=subfolder, local_files_only=True)
        else:
            self.vae = AutoencoderKL(**config)
        self.vae.requires_grad_(False).eval()
        configured_scale = getattr(self.vae.config, "scaling_factor", None)
        configured_shift = getattr(self.vae.config, "shift_factor", None)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else (configured_scale or 1.0))
        self.shift_factor = float(shift_factor if shift_factor is not None else (configured_shift or 0.0))
        self.sample_latents = sample_latents

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return (self.latent_channels, -(-h // self.scale_factor), -(-w // self.scale_factor))

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        distribution = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        latents = distribution.sample() if self.sample_latents else distribution.mode()
        return ((latents - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        scaled = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(scaled).sample.float().clamp(-1, 1)
