"""Teachers from a local diffusers pipeline folder: latent text-to-image (Stable Diffusion 1.x/2.x, SDXL, SD3,
PixArt) and pixel-space (DDPMPipeline / DDIMPipeline folders: a UNet2DModel, unconditional or class-conditional).

    teacher:     {class_path: lightning_modules.pipelines.LatentTeacher, init_args: {pipeline_path: /models/sd15}}
    autoencoder: {class_path: lightning_modules.networks.LatentAutoencoder, init_args: {pretrained_path: /models/sd15}}

``LatentTeacher(pipeline_path)`` reads ``model_index.json`` and ``scheduler/scheduler_config.json`` and returns the
framework's Denoiser for the folder's backbone -- ``DiffusersUNetDenoiser`` (unet/: UNet2DConditionModel, or
UNet2DModel whose data shape is the image itself, so no autoencoder is configured) or a
transformer denoiser (transformer/: SD3Transformer2DModel, PixArtTransformer2DModel) -- with the teacher's own noise
schedule mapped onto the framework's time parameterisation (``schedule_from_scheduler_config``):

* DDPM-family schedulers (DDPM, DDIM, PNDM, Euler, Euler-ancestral, DPM-Solver, LCM, ...) with ``beta_schedule``
  linear / scaled_linear / squaredcos_cap_v2 -> ``VPDiscreteSchedule`` with the same alphas_cumprod (native time: the
  integer timestep), prediction type from the config (epsilon / v_prediction / sample);
* ``FlowMatchEulerDiscreteScheduler`` -> ``RectifiedFlowSchedule`` (native time t = sigma in [0, 1], the network's
  timestep 1000 t), velocity prediction. The scheduler's ``shift`` s re-spaces *sampling* times,
  t' = s t / (1 + (s - 1) t), i.e. EDM sigma' = s * sigma (sigma = t / (1 - t)); it does not change the forward
  process, so it is kept as ``schedule_shift`` for samplers and time samplers and reported, not baked in.
Nothing is downloaded (``local_files_only``); unknown pipeline, backbone or scheduler classes are an error naming them.
"""
from __future__ import annotations

import json
import os

from .diffusion.schedules import NoiseSchedule, RectifiedFlowSchedule, VPDiscreteSchedule
from .networks.denoiser import Denoiser

VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "LCMScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler", "DEISMultistepScheduler",
                 "TCDScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
TRANSFORMERS = {"SD3Transformer2DModel": "SD3TransformerDenoiser",
                "PixArtTransformer2DModel": "PixArtTransformerDenoiser"}


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path!r} is not valid JSON ({error.msg}, line {error.lineno})") from None


def schedule_from_scheduler_config(config: dict) -> tuple[NoiseSchedule, str]:
    """(the framework's schedule, the network's prediction space) for a diffusers scheduler config."""
    name = config.get("_class_name")
    if name in VP_SCHEDULERS:
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler configs with explicit trained_betas are not supported")
        schedule = VPDiscreteSchedule(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                                      beta_start=float(config.get("beta_start", 0.0001)),
                                      beta_end=float(config.get("beta_end", 0.02)),
                                      beta_schedule=config.get("beta_schedule", "linear"))
        return schedule, config.get("prediction_type", "epsilon")
    if name in FLOW_SCHEDULERS:
        schedule = RectifiedFlowSchedule()
        schedule.schedule_shift = float(config.get("shift", 1.0))
        return schedule, "flow"
    raise ValueError(f"scheduler {name!r} is not supported; expected one of {VP_SCHEDULERS + FLOW_SCHEDULERS}")


def read_pipeline(pipeline_path: str) -> tuple[dict, dict]:
    if not os.path.isdir(pipeline_path):
        raise FileNotFoundError(f"pipeline_path {pipeline_path!r} is not a folder")
    index = _read_json(os.path.join(pipeline_path, "model_index.json"), "pipeline index")
    scheduler = _read_json(os.path.join(pipeline_path, "scheduler", "scheduler_config.json"), "scheduler config")
    return index, scheduler


class LatentTeacher(Denoiser):
    """The teacher Denoiser of a local diffusers pipeline folder (see the module docstring).

    Constructing it returns the backbone's own Denoiser (``DiffusersUNetDenoiser`` / ``SD3TransformerDenoiser`` /
    ``PixArtTransformerDenoiser``), so export, LoRA targets and NASA see the usual classes; it is a Denoiser subclass
    only so configs can name it where a Denoiser is expected."""

    def __new__(cls, pipeline_path: str, torch_dtype: str | None = None, gradient_checkpointing: bool = False,
                vae_scale_factor: int | None = None):
        from .networks.diffusers_adapter import DiffusersUNetDenoiser
        from .networks import transformer_teachers

        index, scheduler_config = read_pipeline(pipeline_path)
        schedule, prediction = schedule_from_scheduler_config(scheduler_config)
        if vae_scale_factor is None:
            vae_config = os.path.join(pipeline_path, "vae", "config.json")
            channels = _read_json(vae_config, "VAE config").get("block_out_channels", [0] * 4) \
                if os.path.isfile(vae_config) else [0] * 4
            vae_scale_factor = 2 ** (len(channels) - 1)
        if "unet" in index:
            unet_class = index["unet"][1] if isinstance(index["unet"], list) else "UNet2DConditionModel"
            if unet_class not in ("UNet2DConditionModel", "UNet2DModel"):
                raise ValueError(f"{pipeline_path}: unet class {unet_class!r} is not supported (UNet2DConditionModel, "
                                 "or UNet2DModel for pixel-space pipelines such as DDPMPipeline)")
            teacher = DiffusersUNetDenoiser(pretrained_path=pipeline_path, subfolder="unet",
                                            unet_class=unet_class, prediction_type=prediction,
                                            schedule=schedule, vae_scale_factor=vae_scale_factor,
                                            torch_dtype=torch_dtype)
            if gradient_checkpointing:
                teacher.unet.enable_gradient_checkpointing()
        elif "transformer" in index:
            backbone = index["transformer"][1] if isinstance(index["transformer"], list) else None
            if backbone not in TRANSFORMERS:
                raise ValueError(f"{pipeline_path}: transformer class {backbone!r} is not supported; expected one of "
                                 f"{sorted(TRANSFORMERS)}")
            denoiser = getattr(transformer_teachers, TRANSFORMERS[backbone])
            teacher = denoiser(pretrained_path=pipeline_path, subfolder="transformer", schedule=schedule,
                               prediction_type=prediction, torch_dtype=torch_dtype,
                               gradient_checkpointing=gradient_checkpointing)
        else:
            raise ValueError(f"{pipeline_path}: model_index.json ({index.get('_class_name')!r}) has neither a unet "
                             "nor a transformer")
        teacher.pipeline_class = index.get("_class_name")
        teacher.pipeline_path = os.path.abspath(pipeline_path)
        return teacher
