"""Export a trained student as a diffusers folder, and an independent reference loader for such a folder.

    export_student(module, "out/student")       # or: distill export -c CONFIG --ckpt_path CKPT --export_dir DIR

writes (atomically: built in a temporary sibling folder, then renamed into place)

    out/student/unet/                          config.json + diffusion_pytorch_model.safetensors (UNet2DModel or
                                               UNet2DConditionModel; the EMA student when one is tracked)
    out/student/scheduler/scheduler_config.json
                                               EDMEulerScheduler for EDM-preconditioned students (its
                                               precondition_inputs / precondition_noise / precondition_outputs are
                                               exactly the student's c_in, c_noise, c_skip, c_out), DDPMScheduler with
                                               the schedule's betas for UNets that see DDPM timesteps
    out/student/distillation.json              method, student step times (native and EDM sigmas), schedule,
                                               conditioning, preconditioning
    out/student/README.md                      a runnable snippet: load with diffusers and sample in one step

One student step from noise z is x0 = G(x_T, T) with x_T = sigma(T) z. In diffusers terms:
  * EDM (x~ = x_T / alpha(T) = s z with s the EDM sigma of T): x0 = precondition_outputs(x~, F(precondition_inputs(x~, s),
    precondition_noise(s), labels), s);
  * DDPM (abar = alphas_cumprod[T]): x_T = sqrt(1 - abar) z, out = UNet(x_T, T, labels), x0 from ``prediction_type``.
``one_step_sample_from_export`` does exactly this with diffusers classes only, which proves the folder is self-describing.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
from typing import Any

import torch

FORMAT = "lightning-distill-export/1"
_DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


# --------------------------------------------------------------------------------------------------- export
def export_student(module, folder: str, use_ema: bool = True, overwrite: bool = False) -> str:
    """Write ``module``'s student (its EMA copy when ``use_ema`` and one is tracked) to ``folder`` as a diffusers
    folder; returns the folder's absolute path. Refuses an existing non-empty folder unless ``overwrite``."""
    from .networks.diffusers_adapter import DiffusersUNetDenoiser

    use_ema_weights = bool(use_ema) and getattr(module, "evaluation_student", None) is not None
    network = module.evaluation_student if use_ema_weights else module.student
    for candidate in (module.student, network):
        if not isinstance(candidate, DiffusersUNetDenoiser):
            raise TypeError(f"export writes diffusers UNets: the student must be a DiffusersUNetDenoiser, got "
                            f"{type(candidate).__name__}")
    schedule = module.schedule
    scheduler = _scheduler_for(network, schedule)
    times = module.student_times.detach().to("cpu", torch.float64)
    sigmas = schedule.edm_sigma(times)
    info = _distillation_info(module, network, scheduler, times, sigmas, use_ema_weights)

    folder = os.path.abspath(os.fspath(folder))
    _check_target(folder, overwrite)
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.export-", dir=parent)
    try:
        network.unet.save_pretrained(os.path.join(staging, "unet"), safe_serialization=True)
        scheduler.save_pretrained(os.path.join(staging, "scheduler"))
        with open(os.path.join(staging, "distillation.json"), "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(_readme(name, info))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; give it an ordinary folder's mode
        _move_into_place(staging, folder, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _check_target(folder: str, overwrite: bool) -> None:
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"export folder {folder!r} exists and is not a directory")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise FileExistsError(f"export folder {folder!r} exists and is not empty; choose another folder or pass "
                              "overwrite=True (distill export --overwrite true) to replace it")
    # os.makedirs below would say only "[Errno 17] File exists: <some ancestor>" or "Permission denied"
    ancestor = os.path.dirname(folder)
    while ancestor and not os.path.lexists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if os.path.lexists(ancestor) and not os.path.isdir(ancestor):
        raise NotADirectoryError(f"export folder {folder!r} cannot be created: {ancestor!r} is a file, not a folder")
    if os.path.isdir(ancestor) and not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"export folder {folder!r} cannot be created: {ancestor!r} is not writable")


def _move_into_place(staging: str, folder: str, overwrite: bool) -> None:
    _check_target(folder, overwrite)  # again, right before the rename
    if not os.path.isdir(folder):
        os.rename(staging, folder)
        return
    parent, name = os.path.split(folder)
    previous = tempfile.mkdtemp(prefix=f".{name}.previous-", dir=parent)
    os.rmdir(previous)
    os.rename(folder, previous)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(previous, folder)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _scheduler_for(network, schedule):
    import diffusers

    from .diffusion.schedules import EDMSchedule, VPDiscreteSchedule

    if network.preconditioning == "edm":
        lo = schedule.edm_sigma(torch.tensor(schedule.t_min, dtype=torch.float64)).item()
        hi = schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=torch.float64)).item()
        return diffusers.EDMEulerScheduler(
            sigma_min=lo, sigma_max=hi, sigma_data=float(network.sigma_data), sigma_schedule="karras",
            prediction_type="epsilon",  # diffusers' name for c_out = s sd / sqrt(s^2 + sd^2) (EDM's F)
            rho=float(schedule.rho) if isinstance(schedule, EDMSchedule) else 7.0)
    if isinstance(schedule, VPDiscreteSchedule):
        prediction = _DIFFUSERS_PREDICTION.get(network.prediction_type)
        if prediction is None:
            raise ValueError(f"a DDPM-timestep UNet predicting {network.prediction_type!r} has no diffusers "
                             f"DDPMScheduler prediction_type; expected one of {sorted(_DIFFUSERS_PREDICTION)}")
        return diffusers.DDPMScheduler(
            num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
            beta_end=schedule.beta_end, beta_schedule=schedule.beta_schedule, prediction_type=prediction,
            clip_sample=False, timestep_spacing="trailing")
    raise ValueError(f"no diffusers scheduler describes a UNet without preconditioning on {type(schedule).__name__}; "
                     "export supports preconditioning='edm' (any schedule) or a VPDiscreteSchedule")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _conditioning(network, module) -> dict:
    config = network.unet.config
    if network.unet_class == "UNet2DConditionModel":
        return {"type": "encoder_hidden_states", "cross_attention_dim": _jsonable(config.cross_attention_dim),
                "argument": "encoder_hidden_states"}
    embeds = config.get("num_class_embeds")
    if not embeds:
        return {"type": "unconditional"}
    # the framework's convention: labels 0..num_classes-1, label num_classes = null (num_class_embeds = num_classes + 1)
    known = getattr(network, "num_classes", None) or getattr(module.teacher, "num_classes", None)
    num_classes = int(known) if known else int(embeds) - 1
    return {"type": "class_labels", "argument": "class_labels", "num_class_embeds": int(embeds),
            "num_classes": num_classes, "null_label": num_classes,
            "note": f"labels 0..{num_classes - 1}; label {num_classes} is the null (unconditional) label of "
                    "classifier-free guidance"}


def _distillation_info(module, network, scheduler, times, sigmas, use_ema_weights: bool) -> dict:
    schedule = module.schedule
    if network.preconditioning == "edm":
        boundary = None
        if network.boundary_condition:
            boundary = schedule.edm_sigma(torch.tensor(schedule.t_min, dtype=torch.float64)).item()
        preconditioning = {
            "type": "edm", "sigma_data": float(network.sigma_data), "boundary_condition": bool(network.boundary_condition),
            "boundary_sigma": boundary,
            "formula": "x0 = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s), cond) on x = x_t / alpha(t), s = EDM sigma; "
                       "c_in, c_noise, c_skip, c_out = EDMEulerScheduler.precondition_inputs / precondition_noise / "
                       "precondition_outputs (prediction_type 'epsilon')"
                       + ("" if boundary is None else "; with boundary_condition c_skip = sd^2 / ((s - s0)^2 + sd^2), "
                          "c_out = (s - s0) sd / sqrt(s^2 + sd^2), s0 = boundary_sigma"),
        }
        unet_timesteps = (sigmas.log() / 4).tolist()
    else:
        preconditioning = {"type": None, "prediction_type": scheduler.config.prediction_type,
                           "formula": "the UNet sees x_t and the integer DDPM timestep t and predicts prediction_type; "
                                      "abar = scheduler.alphas_cumprod[t]"}
        unet_timesteps = [int(round(t)) for t in times.tolist()]
    hparams = dict(getattr(module, "hparams", {}) or {})
    return {
        "format": FORMAT,
        "method": type(module).__name__,
        "student_class": type(network).__name__,
        "unet_class": network.unet_class,
        "scheduler_class": type(scheduler).__name__,
        "weights": "ema" if use_ema_weights else "student",
        "student_timesteps": times.tolist(),
        "student_sigmas": sigmas.tolist(),
        "unet_timesteps": unet_timesteps,
        "num_steps": len(times),
        "schedule": _jsonable(schedule.describe()),
        "preconditioning": preconditioning,
        "conditioning": _conditioning(network, module),
        "data_shape": _jsonable(list(network.data_shape)),
        "guidance_scale": _jsonable(hparams.get("guidance_scale")),
        "sampling": "step k: x0 = G(x, t_k); then x = alpha(t_{k+1}) x0 + sigma(t_{k+1}) fresh_noise (in EDM terms "
                    "x / alpha = x0 + s_{k+1} fresh_noise); one step from noise z starts at x = sigma(t_0) z",
    }


def _readme(name: str, info: dict) -> str:
    cond = info["conditioning"]
    unet_class = info["unet_class"]
    scheduler_class = info["scheduler_class"]
    shape = ", ".join(str(s) for s in info["data_shape"])
    if cond["type"] == "class_labels":
        labels_line = (f"labels = torch.randint(0, {cond['num_classes']}, (n,))  # class labels 0..{cond['num_classes'] - 1}"
                       f"; {cond['null_label']} = unconditional")
        kwargs = ", class_labels=labels"
    elif cond["type"] == "encoder_hidden_states":
        labels_line = "labels = ...  # encoder hidden states (n, L, cross_attention_dim) from your text encoder"
        kwargs = ", encoder_hidden_states=labels"
    else:
        labels_line = "labels = None  # unconditional"
        kwargs = ""
    head = f"""import torch
from diffusers import {scheduler_class}, {unet_class}

folder = "{name}"  # path of this folder
unet = {unet_class}.from_pretrained(folder, subfolder="unet").eval()
scheduler = {scheduler_class}.from_pretrained(folder, subfolder="scheduler")

n = 4
noise = torch.randn(n, {shape})
{labels_line}
"""
    if scheduler_class == "EDMEulerScheduler":
        sigma = info["student_sigmas"][0]
        body = f"""sigma = torch.tensor({sigma!r}, dtype=torch.float64)  # the student's step (EDM sigma)
x = sigma * noise.double()
with torch.no_grad():
    out = unet(scheduler.precondition_inputs(x, sigma).float(), scheduler.precondition_noise(sigma).float(){kwargs}).sample
sample = scheduler.precondition_outputs(x, out.double(), sigma).float()
"""
        if info["preconditioning"].get("boundary_condition"):
            body += ("# this student uses the consistency-model boundary condition: replace precondition_outputs by\n"
                     "# c_skip x + c_out out with the formulas in distillation.json['preconditioning']\n")
    else:
        t = info["unet_timesteps"][0]
        prediction = info["preconditioning"]["prediction_type"]
        recover = {"epsilon": "(x.double() - b * out) / a",
                   "v_prediction": "a * x.double() - b * out",
                   "sample": "out"}[prediction]
        body = f"""t = {t}  # the student's step (DDPM timestep)
abar = scheduler.alphas_cumprod[t].double()
a, b = abar.sqrt(), (1 - abar).sqrt()
x = (b * noise.double()).float()  # x_T = sigma(T) z
with torch.no_grad():
    out = unet(x, torch.tensor(t){kwargs}).sample.double()  # prediction_type {prediction!r}
sample = ({recover}).float()
"""
    steps = info["num_steps"]
    multi = "" if steps == 1 else (
        f"\nThis student was trained for {steps} steps (`student_timesteps` / `student_sigmas` in `distillation.json`): "
        "after each step re-noise the estimate to the next step's noise level with fresh noise and repeat.\n")
    return f"""# {info['method']} student ({info['weights']} weights), exported by lightning-distill

A {unet_class} distilled with {info['method']} into a {steps}-step generator. Load it with diffusers alone:
`unet/` (safetensors) and `scheduler/` ({scheduler_class}); `distillation.json` records the step times, schedule,
conditioning and preconditioning. One-step sampling (run from the folder that contains `{name}`):

```python
{head}{body}```
{multi}
The sample equals the student's own one-step sample (`DistillationModule.sample(noise, labels, nfe=1)`) to float32
rounding.
"""


# --------------------------------------------------------------------------------------------------- loading back
def one_step_sample_from_export(folder: str, noise: torch.Tensor, class_labels: torch.Tensor | None = None,
                                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
    """The student's one-step sample from an exported folder, using diffusers classes only (no lightning_modules code):
    the folder alone must describe the sampler. ``noise`` is z ~ N(0, I) shaped (B, *data_shape)."""
    import diffusers

    with open(os.path.join(folder, "distillation.json")) as f:
        info = json.load(f)
    unet = getattr(diffusers, info["unet_class"]).from_pretrained(folder, subfolder="unet", local_files_only=True)
    unet = unet.to(noise.device).eval()
    scheduler = getattr(diffusers, info["scheduler_class"]).from_pretrained(folder, subfolder="scheduler",
                                                                           local_files_only=True)
    kwargs = {}
    if info["unet_class"] == "UNet2DConditionModel":
        kwargs["encoder_hidden_states"] = encoder_hidden_states
    elif class_labels is not None:
        kwargs["class_labels"] = class_labels.long()
    elif info["conditioning"]["type"] == "class_labels":  # unconditional sample of a class-conditional student
        kwargs["class_labels"] = torch.full((noise.shape[0],), info["conditioning"]["null_label"], device=noise.device)
    dtype = unet.dtype
    with torch.no_grad():
        if isinstance(scheduler, diffusers.EDMEulerScheduler):
            sigma = torch.tensor(info["student_sigmas"][0], dtype=torch.float64, device=noise.device)
            x = sigma * noise.double()  # x_T / alpha(T)
            out = unet(scheduler.precondition_inputs(x, sigma).to(dtype),
                       scheduler.precondition_noise(sigma).to(dtype), **kwargs).sample.double()
            precondition = info["preconditioning"]
            if precondition.get("boundary_condition"):
                sd, s0 = precondition["sigma_data"], precondition["boundary_sigma"]
                c_skip = sd ** 2 / ((sigma - s0) ** 2 + sd ** 2)
                c_out = (sigma - s0) * sd / (sigma ** 2 + sd ** 2).sqrt()
                x0 = c_skip * x + c_out * out
            else:
                x0 = scheduler.precondition_outputs(x, out, sigma)
        elif isinstance(scheduler, diffusers.DDPMScheduler):
            t = int(info["unet_timesteps"][0])
            abar = scheduler.alphas_cumprod[t].double()
            a, b = abar.sqrt(), (1 - abar).sqrt()
            x = b * noise.double()  # x_T = alpha(T) * 0 + sigma(T) z
            out = unet(x.to(dtype), torch.tensor([float(t)], device=noise.device), **kwargs).sample.double()
            prediction = scheduler.config.prediction_type
            if prediction == "epsilon":
                x0 = (x.to(dtype).double() - b * out) / a
            elif prediction == "v_prediction":
                x0 = (a * x.to(dtype).double() - b * out) / (a ** 2 + b ** 2)
            elif prediction == "sample":
                x0 = out
            else:
                raise ValueError(f"unsupported prediction_type {prediction!r} in {folder}")
        else:
            raise ValueError(f"unsupported scheduler {type(scheduler).__name__} in {folder}")
    return x0.to(noise.dtype)


# --------------------------------------------------------------------------------------------------- checkpoints
def load_checkpoint_for_export(module, ckpt_path: str, use_ema: bool = True):
    """Load a Lightning checkpoint's weights into ``module`` (``weights_only=True``) and, when the checkpoint holds a
    StudentEMA average and ``use_ema``, attach it as ``module.evaluation_student`` (as the callback does in training).
    Errors name the file: missing, damaged, not a Lightning checkpoint, pickled objects (refused, never run), or
    weights that do not fit the model the config builds (``CheckpointMismatchError`` naming the parameters)."""
    from .checkpoint_io import load_lightning_checkpoint

    checkpoint = load_lightning_checkpoint(ckpt_path, map_location="cpu")
    state = checkpoint["state_dict"]
    prefix = "evaluation_student."
    own = {k: v for k, v in state.items() if not k.startswith(prefix)}
    evaluation = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    _set_evaluation_network(module, None)
    with _naming_the_checkpoint(ckpt_path, checkpoint, module):
        module.load_state_dict(own, strict=True)
    average = None
    for key, value in (checkpoint.get("callbacks") or {}).items():
        if "StudentEMA" in str(key) and isinstance(value, dict) and value.get("average") is not None:
            average = {k[len("module."):]: v for k, v in value["average"].items() if k.startswith("module.")}
            break
    ema_state = average if average is not None else (evaluation or None)
    if use_ema and ema_state:
        ema = copy.deepcopy(module.averaged_network())
        with _naming_the_checkpoint(ckpt_path, checkpoint, module, part="its StudentEMA average"):
            ema.load_state_dict(ema_state, strict=True)
        _set_evaluation_network(module, ema.requires_grad_(False).eval())
    return module


@contextlib.contextmanager
def _naming_the_checkpoint(ckpt_path: str, checkpoint: dict, module, part: str = "its weights"):
    """torch's load_state_dict error names parameters and shapes but not the file, nor the method that wrote it."""
    from .checkpoint_io import checkpoint_mismatch

    try:
        yield
    except RuntimeError as error:
        if "Error(s) in loading state_dict" not in str(error):
            raise
        raise checkpoint_mismatch(ckpt_path, error, module, checkpoint, part) from error


def _set_evaluation_network(module, network) -> None:
    setter = getattr(module, "set_evaluation_network", None)
    if setter is not None:
        setter(network)
    else:
        module.evaluation_student = network
