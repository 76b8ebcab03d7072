"""Export a distilled text-to-image student as a complete diffusers pipeline folder.

    export_text_to_image_pipeline(module, "out/pipe")   # or: distill export ... --pipeline true

writes (staged in a temporary sibling folder and renamed into place, like ``export.export_student``)

    out/pipe/model_index.json     StableDiffusionPipeline (StableDiffusionXLPipeline for an SDXL-style UNet), with
                                  safety_checker / feature_extractor / image_encoder None, requires_safety_checker False
    out/pipe/unet/                the student's UNet2DConditionModel (EMA weights when tracked; LoRA adapters merged)
    out/pipe/vae/  text_encoder/  tokenizer/   the teacher's autoencoder and the prompt encoder the student was trained on
    out/pipe/scheduler/           configured so that ``pipe(prompt, num_inference_steps=K, guidance_scale=1.0)`` runs
                                  the student's own K-step sampler
    out/pipe/distillation.json    provenance (method, steps, schedule, teacher) and the exact sampling recipe
    out/pipe/README.md            usage

so that ``DiffusionPipeline.from_pretrained("out/pipe")`` needs diffusers and transformers only.

The scheduler, against the framework's student sampler (``diffusion.samplers.student_sample``: x = sigma(t_0) z, then
x0 = G(x, t_k) and x = alpha(t_{k+1}) x0 + sigma(t_{k+1}) fresh noise; on a ``VPDiscreteSchedule``
alpha^2 = alphas_cumprod[t], sigma^2 = 1 - alpha^2):

* one step: ``EulerDiscreteScheduler`` with ``timestep_spacing="trailing"`` (Karras et al. 2022's Euler step in
  k-diffusion's variable x / alpha). Its ``init_noise_sigma`` is s = sigma/alpha at t_0 and ``scale_model_input``
  divides by sqrt(s^2 + 1) = 1/alpha, so the UNet sees sigma(t_0) z -- exactly the student's prior -- when the pipeline
  draws (or is given) unit noise z; the step to the final sigma 0 returns x0. ``pipe(..., latents=z)`` is exact.
* K > 1 steps: ``LCMScheduler`` (Luo et al. 2023, arXiv:2310.04378, Alg. 3: multistep consistency sampling) whose step
  is exactly "x0, then re-noise to the next timestep with fresh noise" drawn from the pipeline's ``generator``. Its
  consistency boundary scalings c_skip, c_out are switched off (``timestep_scaling`` so large that c_skip = 0, c_out = 1
  in float32): our students predict x0 directly. ``original_inference_steps`` is chosen so that LCM's default K-step
  grid equals the student's timesteps when such a grid exists (else the README passes ``timesteps=[...]``). LCM's
  ``init_noise_sigma`` is 1, i.e. the UNet first sees the latents as given: ``pipe(..., latents=sigma(t_0) * z)``
  reproduces ``module.sample(z)`` exactly; unit-noise latents differ from the trained prior by the factor
  sigma(t_0) (0.9976 on SD's schedule). distillation.json records it as ``pipeline_latents_scale``.

Prompts: the pipeline calls ``tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
truncation=True)`` and ``text_encoder(input_ids, attention_mask=mask if text_encoder.config.use_attention_mask else
None)[0]``. The exported tokenizer's ``model_max_length`` is the encoder's ``max_length``, and ``use_attention_mask``
is set to whichever call reproduces our ``TextEncoder.encode(prompts).embeds`` (MiniLM / BERT: with the mask); the
export refuses an encoder whose embeddings are neither. A ``BertModel`` loads fine as an SD text encoder: the pipeline
only indexes its output ``[0]`` (the last hidden state).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from .export import FORMAT, _check_target, _jsonable, _move_into_place

_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
#: LCM's boundary condition c_skip = 0.25 / (t s)^2, c_out = t s / sqrt((t s)^2 + 0.25): with s = 1e6 c_out rounds to
#: 1 and c_skip is below 3e-13 for every t >= 1, so the step uses the student's x0 as it is
_NO_BOUNDARY_SCALING = 1.0e6
_PROBE_PROMPTS = ["a photograph of an astronaut riding a horse on the moon", "", "red"]


# --------------------------------------------------------------------------------------------------- export
def export_text_to_image_pipeline(module, folder: str, text_encoder=None, tokenizer=None, vae=None,
                                  use_ema: bool = True, overwrite: bool = False, nfe: int | None = None) -> str:
    """Write ``module``'s text-conditioned student as a diffusers pipeline folder; returns its absolute path.

    ``text_encoder``: our ``TextEncoder`` (e.g. ``MiniLMTextEncoder``; default: ``module.text_encoder`` if it has one,
    else the embedded MiniLM), a transformers model (give ``tokenizer``), or a folder: a diffusers pipeline folder
    (``text_encoder/`` + ``tokenizer/``, plus ``text_encoder_2/`` + ``tokenizer_2/`` for SDXL) or a transformers model
    folder. ``vae``: a diffusers ``AutoencoderKL``, a folder holding one (or a pipeline folder with ``vae/``), or an
    autoencoder wrapper holding one; default ``module.autoencoder``. ``nfe``: the number of pipeline steps the
    scheduler is set up for (default: the student's training steps; others follow ``module.evaluation_times``).
    Refuses an existing non-empty ``folder`` unless ``overwrite``; nothing is left half-written."""
    import diffusers

    folder = os.path.abspath(os.fspath(folder))
    _check_target(folder, overwrite)
    use_ema_weights = bool(use_ema) and getattr(module, "evaluation_student", None) is not None
    network = module.evaluation_student if use_ema_weights else module.student
    unet, denoiser = merged_unet(network)
    if not isinstance(unet, diffusers.UNet2DConditionModel):
        raise TypeError(f"a text-to-image pipeline needs a UNet2DConditionModel student, got {type(unet).__name__}")
    schedule = module.schedule
    times = _pipeline_times(module, nfe)
    scheduler, default_grid = _scheduler_for(denoiser, schedule, times)
    sdxl = unet.config.get("addition_embed_type") == "text_time"
    encoders = _resolve_text_encoders(module, text_encoder, tokenizer, sdxl)
    width = encoders["text_encoder"].config.hidden_size if not sdxl else None
    if width is not None and width != unet.config.cross_attention_dim:
        raise ValueError(f"the text encoder's width {width} differs from the UNet's cross_attention_dim "
                         f"{unet.config.cross_attention_dim}: this is not the encoder the student was trained on")
    autoencoder, scaling = _resolve_vae(module, vae)
    if autoencoder.config.latent_channels != unet.config.in_channels:
        raise ValueError(f"the VAE has {autoencoder.config.latent_channels} latent channels, the UNet takes "
                         f"{unet.config.in_channels}")

    common = dict(vae=autoencoder, unet=unet, scheduler=scheduler, image_encoder=None, feature_extractor=None)
    if sdxl:
        pipe = diffusers.StableDiffusionXLPipeline(
            text_encoder=encoders["text_encoder"], tokenizer=encoders["tokenizer"],
            text_encoder_2=encoders["text_encoder_2"], tokenizer_2=encoders["tokenizer_2"],
            force_zeros_for_empty_prompt=True, add_watermarker=False, **common)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            text_encoder=encoders["text_encoder"], tokenizer=encoders["tokenizer"], safety_checker=None,
            requires_safety_checker=False, **common)
    info = _distillation_info(module, network, denoiser, pipe, times, default_grid, use_ema_weights, encoders)

    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.export-", dir=parent)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        _patch_json(os.path.join(staging, "vae", "config.json"), scaling_factor=scaling)
        for suffix in ("", "_2"):
            if encoders.get(f"max_length{suffix}") is not None:
                _patch_json(os.path.join(staging, f"tokenizer{suffix}", "tokenizer_config.json"),
                            model_max_length=encoders[f"max_length{suffix}"])
            if encoders.get(f"use_attention_mask{suffix}") is not None:
                _patch_json(os.path.join(staging, f"text_encoder{suffix}", "config.json"),
                            use_attention_mask=encoders[f"use_attention_mask{suffix}"])
        with open(os.path.join(staging, "distillation.json"), "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(_readme(name, info))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        _move_into_place(staging, folder, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _patch_json(path: str, **values) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(values)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------------------------------- the student UNet
def merged_unet(network) -> tuple[nn.Module, Any]:
    """(a standalone diffusers UNet computing ``network``'s forward, the DiffusersUNetDenoiser that describes it).

    ``network`` is a ``DiffusersUNetDenoiser`` (its UNet is returned as is, or a merged copy when peft LoRA layers were
    injected into it) or a LoRA wrapper around one (``adapter_layers()`` + ``base_network``, e.g. ``LoRACritic``): the
    base UNet is copied and each adapter's delta weight (peft ``get_delta_weight``: B A * alpha / r) added to the copy,
    so the frozen base (often the shared teacher) is never touched."""
    from .networks.diffusers_adapter import DiffusersUNetDenoiser

    if hasattr(network, "adapter_layers") and hasattr(network, "base_network"):
        base = network.base_network
        if not isinstance(base, DiffusersUNetDenoiser):
            raise TypeError(f"the LoRA student's base must be a DiffusersUNetDenoiser, got {type(base).__name__}")
        unet = copy.deepcopy(base.unet)
        with torch.no_grad():
            for path, layer in network.adapter_layers():
                if not path.startswith("unet."):
                    raise ValueError(f"LoRA layer {path!r} is not inside the base network's UNet")
                _add_delta(unet.get_submodule(path[len("unet."):]), layer, path)
        return _merge_peft_layers(unet), base
    if not isinstance(network, DiffusersUNetDenoiser):
        raise TypeError(f"export writes diffusers UNets: the student must be a DiffusersUNetDenoiser or a LoRA wrapper "
                        f"around one, got {type(network).__name__}")
    return _merge_peft_layers(network.unet), network


def _add_delta(target: nn.Module, layer, path: str) -> None:
    if getattr(layer, "use_dora", {}) and any(layer.use_dora.values()):
        raise ValueError(f"LoRA layer {path!r} uses DoRA; merging it is not supported")
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        delta = layer.get_delta_weight(adapter)
        if delta.shape != target.weight.shape:
            raise ValueError(f"LoRA delta of {path!r} has shape {tuple(delta.shape)}, the layer's weight "
                             f"{tuple(target.weight.shape)}")
        target.weight.add_(delta.to(target.weight.dtype))
        bias = getattr(layer.lora_B[adapter], "bias", None)
        if bias is not None:
            target.bias.add_(bias * layer.scaling[adapter])


def _merge_peft_layers(unet: nn.Module) -> nn.Module:
    """A copy of ``unet`` with peft LoRA layers (``unet.add_adapter`` / ``inject_adapter_in_model``) merged into
    their base layers and removed; ``unet`` itself when it has none."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in unet.modules()):
        return unet
    unet = copy.deepcopy(unet)
    with torch.no_grad():
        for path, layer in [(n, m) for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]:
            layer.merge(adapter_names=list(layer.active_adapters))
            parent_path, _, child = path.rpartition(".")
            (unet.get_submodule(parent_path) if parent_path else unet)._modules[child] = layer.get_base_layer()
    unet.__dict__.pop("peft_config", None)
    if hasattr(unet, "_hf_peft_config_loaded"):
        unet._hf_peft_config_loaded = False
    return unet


# --------------------------------------------------------------------------------------------------- scheduler
def _pipeline_times(module, nfe: int | None) -> torch.Tensor:
    if nfe is not None and nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    times = module.evaluation_times(nfe).detach().to("cpu", torch.float64)
    return times


def _scheduler_for(denoiser, schedule, times: torch.Tensor):
    """(scheduler, whether ``pipe(num_inference_steps=len(times))`` lands on ``times`` without ``timesteps=``)."""
    import diffusers

    from .diffusion.schedules import VPDiscreteSchedule

    if not isinstance(schedule, VPDiscreteSchedule) or denoiser.preconditioning is not None:
        raise ValueError(f"a Stable-Diffusion pipeline runs UNets that see DDPM timesteps: the student needs a "
                         f"VPDiscreteSchedule and preconditioning=None, got {type(schedule).__name__} with "
                         f"preconditioning={denoiser.preconditioning!r}")
    prediction = _PREDICTION.get(denoiser.prediction_type)
    if prediction is None:
        raise ValueError(f"no diffusers prediction_type for a UNet predicting {denoiser.prediction_type!r}; "
                         f"expected one of {sorted(_PREDICTION)}")
    ints = [int(round(t)) for t in times.tolist()]
    if any(abs(t - i) > 1e-9 for t, i in zip(times.tolist(), ints)):
        raise ValueError(f"pipeline timesteps must be integers (DDPM timesteps), got {times.tolist()}")
    n = schedule.num_train_timesteps
    betas = dict(num_train_timesteps=n, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
                 beta_schedule=schedule.beta_schedule, prediction_type=prediction, steps_offset=1)
    if len(ints) == 1:
        scheduler = diffusers.EulerDiscreteScheduler(timestep_spacing="trailing", final_sigmas_type="zero",
                                                     interpolation_type="linear", **betas)
        return scheduler, ints[0] == n - 1
    if ints[-1] < 1:
        raise ValueError(f"a multi-step student's last timestep must be >= 1 for LCMScheduler, got {ints}")
    scheduler = diffusers.LCMScheduler(set_alpha_to_one=True, clip_sample=False, timestep_scaling=_NO_BOUNDARY_SCALING,
                                       original_inference_steps=n, timestep_spacing="trailing", **betas)
    for original in range(n, len(ints) - 1, -1):  # the grid LCM builds for num_inference_steps=K, if one fits
        scheduler.set_timesteps(len(ints), original_inference_steps=original)
        if scheduler.timesteps.tolist() == ints:
            scheduler.register_to_config(original_inference_steps=original)
            return scheduler, True
    return scheduler, False


# --------------------------------------------------------------------------------------------------- text encoders
def _resolve_text_encoders(module, text_encoder, tokenizer, sdxl: bool) -> dict:
    from transformers import PreTrainedModel

    from .conditioning.text_encoders import MiniLMTextEncoder, TextEncoder

    if isinstance(text_encoder, (str, os.PathLike)):
        return _encoders_from_folder(os.fspath(text_encoder), tokenizer, sdxl)
    if sdxl:
        raise ValueError("an SDXL-style student (addition_embed_type='text_time') needs both of SDXL's text encoders: "
                         "pass text_encoder=<the teacher's pipeline folder with text_encoder/, text_encoder_2/, "
                         "tokenizer/, tokenizer_2/>")
    if text_encoder is None:
        text_encoder = getattr(module, "text_encoder", None)
        if not isinstance(text_encoder, TextEncoder):
            text_encoder = MiniLMTextEncoder()
    if isinstance(text_encoder, TextEncoder):
        model = getattr(text_encoder, "model", None)
        tok = tokenizer if tokenizer is not None else getattr(text_encoder, "tokenizer", None)
        if not isinstance(model, PreTrainedModel) or tok is None:
            raise TypeError(f"{type(text_encoder).__name__} exposes no transformers .model and .tokenizer to export")
        max_length = int(text_encoder.max_length)
        mask = _attention_mask_setting(text_encoder, model, tok, max_length)
        return {"text_encoder": model, "tokenizer": _with_max_length(tok, max_length), "max_length": max_length,
                "use_attention_mask": mask, "source": text_encoder.identity}
    if isinstance(text_encoder, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("a transformers text encoder needs its tokenizer: pass tokenizer=")
        return {"text_encoder": text_encoder, "tokenizer": tokenizer, "max_length": None,
                "use_attention_mask": None, "source": type(text_encoder).__name__}
    raise TypeError(f"text_encoder must be a TextEncoder, a transformers model or a folder, got "
                    f"{type(text_encoder).__name__}")


def _with_max_length(tokenizer, max_length: int):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_length
    return tokenizer


@torch.no_grad()
def _attention_mask_setting(encoder, model, tokenizer, max_length: int) -> bool:
    """Whether the pipeline must pass the attention mask (``text_encoder.config.use_attention_mask``) for its prompt
    embeddings to equal ``encoder.encode(prompts).embeds``; raises if neither call reproduces them."""
    expected = encoder.encode(_PROBE_PROMPTS).embeds.float().cpu()
    tokens = tokenizer(_PROBE_PROMPTS, padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    errors = {}
    for use_mask in (False, True):
        got = model(ids, attention_mask=mask if use_mask else None)[0].float().cpu()
        errors[use_mask] = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    best = min(errors, key=errors.get)
    if errors[best] > 1e-5:
        raise ValueError(f"{type(encoder).__name__}'s embeddings are not its model's output [0] with or without the "
                         f"attention mask (max errors {errors[False]:.3g} / {errors[True]:.3g}); a diffusers "
                         "Stable-Diffusion pipeline could not reproduce them")
    return best


def _encoders_from_folder(folder: str, tokenizer, sdxl: bool) -> dict:
    import transformers

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"text encoder folder {folder!r} does not exist")

    def load(sub: str | None, tokenizer_sub: str | None):
        where = os.path.join(folder, sub) if sub else folder
        with open(os.path.join(where, "config.json")) as f:
            architectures = json.load(f).get("architectures") or ["AutoModel"]
        cls = getattr(transformers, architectures[0], transformers.AutoModel)
        model = cls.from_pretrained(where, local_files_only=True)
        tok_where = os.path.join(folder, tokenizer_sub) if tokenizer_sub else folder
        return model, transformers.AutoTokenizer.from_pretrained(tok_where, local_files_only=True)

    pipeline_folder = os.path.isdir(os.path.join(folder, "text_encoder"))
    if sdxl and not os.path.isdir(os.path.join(folder, "text_encoder_2")):
        raise ValueError(f"an SDXL-style student needs {folder!r} to hold text_encoder_2/ and tokenizer_2/")
    model, tok = load("text_encoder", "tokenizer") if pipeline_folder else load(None, None)
    result = {"text_encoder": model, "tokenizer": tokenizer if tokenizer is not None else tok, "max_length": None,
              "use_attention_mask": None, "source": folder}
    if sdxl:
        result["text_encoder_2"], result["tokenizer_2"] = load("text_encoder_2", "tokenizer_2")
    return result


# --------------------------------------------------------------------------------------------------- autoencoder
def _resolve_vae(module, vae):
    """(the diffusers autoencoder, the latent scaling factor the pipeline must divide by)."""
    import diffusers

    source = getattr(module, "autoencoder", None) if vae is None else vae
    if source is None:
        raise ValueError("a latent text-to-image pipeline needs the teacher's VAE: pass vae= (an AutoencoderKL or its "
                         "folder) or train with model.init_args.autoencoder")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        sub = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
        source = diffusers.AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
    autoencoder = source
    if not isinstance(autoencoder, diffusers.ModelMixin):
        inner = [getattr(source, n, None) for n in ("vae", "autoencoder", "model", "module")]
        inner = [m for m in inner if isinstance(m, diffusers.ModelMixin)]
        if not inner:
            raise TypeError(f"vae must be a diffusers autoencoder (AutoencoderKL), its folder, or a wrapper holding "
                            f"one as .vae; got {type(source).__name__}")
        autoencoder = inner[0]
    scaling = float(getattr(source, "scaling_factor", None) or autoencoder.config.get("scaling_factor") or 1.0)
    shift = getattr(source, "shift_factor", None) or autoencoder.config.get("shift_factor")
    if shift:
        raise ValueError(f"the autoencoder shifts its latents (shift_factor={shift}); StableDiffusionPipeline "
                         "decodes latents / scaling_factor only")
    return autoencoder, scaling


# --------------------------------------------------------------------------------------------------- provenance
def _distillation_info(module, network, denoiser, pipe, times, default_grid, use_ema_weights, encoders) -> dict:
    schedule = module.schedule
    scheduler = pipe.scheduler
    timesteps = [int(round(t)) for t in times.tolist()]
    _, sigma0 = schedule.alpha_sigma(times[:1])
    euler = type(scheduler).__name__ == "EulerDiscreteScheduler"
    hparams = dict(getattr(module, "hparams", {}) or {})
    teacher = getattr(module.teacher, "unet", None)
    teacher_source = getattr(getattr(teacher, "config", None), "_name_or_path", None) if teacher is not None else None
    return {
        "format": FORMAT,
        "kind": "text-to-image pipeline",
        "pipeline_class": type(pipe).__name__,
        "method": type(module).__name__,
        "teacher": {"class": type(module.teacher).__name__, "source": teacher_source or None},
        "student_class": type(network).__name__,
        "lora_merged": hasattr(network, "adapter_layers"),
        "weights": "ema" if use_ema_weights else "student",
        "student_timesteps": module.student_times.tolist(),
        "num_steps": len(module.student_times),
        "pipeline_timesteps": timesteps,
        "pipeline_num_inference_steps": len(timesteps),
        "pipeline_needs_timesteps_argument": not default_grid,
        "scheduler_class": type(scheduler).__name__,
        "prediction_type": scheduler.config.prediction_type,
        "schedule": _jsonable(schedule.describe()),
        "guidance_scale": _jsonable(hparams.get("guidance_scale")),
        "pipeline_guidance_scale": 1.0,
        "text_encoder": {"class": type(encoders["text_encoder"]).__name__, "source": encoders.get("source"),
                         "max_length": encoders.get("max_length"),
                         "use_attention_mask": encoders.get("use_attention_mask")},
        "pipeline_latents_scale": 1.0 if euler else float(sigma0.item()),
        "sampling": "student_sample: x = sigma(t_0) z; step k: x0 = G(x, t_k), x = alpha(t_{k+1}) x0 + sigma(t_{k+1}) "
                    "fresh noise. The pipeline given latents = pipeline_latents_scale * z (and the generator that "
                    "draws the fresh noise) reproduces it",
    }


def _readme(name: str, info: dict) -> str:
    steps = info["pipeline_num_inference_steps"]
    call = f"num_inference_steps={steps}"
    if info["pipeline_needs_timesteps_argument"]:
        call = f"timesteps={info['pipeline_timesteps']}"
    scale = info["pipeline_latents_scale"]
    exact = ("Given `latents=z` (unit Gaussian noise, shape (n, C, H, W) of the UNet) the pipeline's latents equal the "
             "student's own `DistillationModule.sample(z, prompt_embeds)` to float32 rounding."
             if scale == 1.0 else
             f"LCMScheduler starts from the latents as given: pass `latents={scale!r} * z` (sigma at the first step) "
             "and a `generator` for the re-noising to reproduce `DistillationModule.sample(z, prompt_embeds)` "
             "exactly; unit noise differs from the trained prior by that factor.")
    return f"""# {info['method']} text-to-image student ({info['weights']} weights), exported by lightning-distill

A {info['num_steps']}-step student distilled with {info['method']}; classifier-free guidance is baked into it, so run
it with `guidance_scale=1.0` (the pipeline's default 7.5 would apply guidance a second time). Plain diffusers:

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{name}")
image = pipe("a photo of a cat", {call}, guidance_scale=1.0).images[0]
```

Scheduler: {info['scheduler_class']} at timesteps {info['pipeline_timesteps']}. {exact}
Text encoder: {info['text_encoder']['class']} (prompts padded / truncated to {info['text_encoder']['max_length']}
tokens). `distillation.json` records the method, steps, schedule and teacher.
"""
