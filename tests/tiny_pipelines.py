"""Tiny randomly initialised diffusers pipeline folders (SD1.5, SDXL, SD3, PixArt architectures) for offline tests:
each ``save_tiny_*`` writes model_index.json, the backbone, a VAE and the scheduler with ``save_pretrained``, exactly the
layout of a real local pipeline folder (text encoders are not needed by the teacher loader and are left out)."""
from __future__ import annotations

import json
import os

import torch

TEXT_WIDTH = 16
POOLED_WIDTH = 8


def _vae(folder: str, latent_channels: int = 4, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=16, scaling_factor=0.5,
                        shift_factor=shift_factor)
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)


def _index(folder: str, pipeline: str, backbone: tuple[str, str], scheduler: str):
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump({"_class_name": pipeline, "_diffusers_version": "0.42.1", backbone[0]: ["diffusers", backbone[1]],
                   "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", scheduler]}, handle)


def _unet(sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * 4) if sdxl else {}
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=TEXT_WIDTH, attention_head_dim=2, norm_num_groups=4, **extra)


def save_tiny_sd15(folder: str, prediction_type: str = "epsilon") -> str:
    from diffusers import DDPMScheduler

    _unet().save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    _vae(folder)
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type=prediction_type).save_pretrained(os.path.join(folder, "scheduler"))
    _index(folder, "StableDiffusionPipeline", ("unet", "UNet2DConditionModel"), "DDPMScheduler")
    return folder


def save_tiny_sdxl(folder: str) -> str:
    from diffusers import EulerDiscreteScheduler

    _unet(sdxl=True).save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    _vae(folder)
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                           beta_end=0.012).save_pretrained(os.path.join(folder, "scheduler"))
    _index(folder, "StableDiffusionXLPipeline", ("unet", "UNet2DConditionModel"), "EulerDiscreteScheduler")
    return folder


def save_tiny_sd3(folder: str) -> str:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, caption_projection_dim=16,
                          pooled_projection_dim=POOLED_WIDTH, out_channels=4,
                          pos_embed_max_size=8).save_pretrained(os.path.join(folder, "transformer"),
                                                                safe_serialization=True)
    _vae(folder, shift_factor=0.1)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(folder, "scheduler"))
    _index(folder, "StableDiffusion3Pipeline", ("transformer", "SD3Transformer2DModel"),
           "FlowMatchEulerDiscreteScheduler")
    return folder


def save_tiny_pixart(folder: str) -> str:
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(0)
    PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                             num_layers=1, cross_attention_dim=8, sample_size=8, patch_size=2,
                             caption_channels=TEXT_WIDTH, norm_num_groups=4).save_pretrained(
        os.path.join(folder, "transformer"), safe_serialization=True)
    _vae(folder)
    DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001,
                                beta_end=0.02).save_pretrained(os.path.join(folder, "scheduler"))
    _index(folder, "PixArtSigmaPipeline", ("transformer", "PixArtTransformer2DModel"), "DPMSolverMultistepScheduler")
    return folder


BUILDERS = {"sd15": save_tiny_sd15, "sdxl": save_tiny_sdxl, "sd3": save_tiny_sd3, "pixart": save_tiny_pixart}


def random_condition(batch: int, tokens: int = 5, seed: int = 0, mask: bool = False):
    """A TextCondition of random prompt embeddings (width TEXT_WIDTH, pooled POOLED_WIDTH) with a null branch."""
    from lightning_modules.conditioning import TextCondition

    g = torch.Generator().manual_seed(seed)
    embeds, pooled = torch.randn(batch, tokens, TEXT_WIDTH, generator=g), torch.randn(batch, POOLED_WIDTH, generator=g)
    null_embeds, null_pooled = torch.randn(1, tokens, TEXT_WIDTH, generator=g), torch.zeros(1, POOLED_WIDTH)
    token_mask = torch.ones(batch, tokens, dtype=torch.long) if mask else None
    return TextCondition(embeds, pooled, token_mask, null_embeds.expand(batch, -1, -1).clone(),
                         null_pooled.expand(batch, -1).clone(), None if token_mask is None else token_mask.clone())
