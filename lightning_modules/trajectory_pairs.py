"""Teacher ODE pairs: (noise z, condition c, teacher sample ODE_T(z, c)) stored once, reused by trajectory methods.

DMD's regression term (Yin et al. 2023, Sec. 3.3), knowledge distillation (Luhman & Luhman 2021) and reflow
(Liu et al. 2022) all train on a fixed coupling between noise and the teacher's deterministic sample. Generating it
costs ``nfe`` teacher evaluations per pair, so it is done once, by the command

    distill pairs --config CONFIG.yaml --num-pairs 10000 --nfe 32 --sampler heun \\
        --seed 0 --output pairs.safetensors [--batch-size 256] [--device auto] [--overwrite] [--model.init_args... ]

(``lightning_modules.pairs_command``), which builds the model from any distillation config (the teacher, its schedule and guidance scale come from there;
other ``--section.key`` arguments override the config) and, without ``--output``, writes to the config's
``data.init_args.pairs_path``. The same is available as the function ``generate_pairs``.

File format (safetensors, written to a temporary file in the same folder and moved into place with ``os.replace``):
tensors ``noise`` (N, *shape) float32, ``target`` (N, *shape) and, for conditional teachers, ``cond`` (N,) int64;
string metadata ``format`` (= FORMAT), ``teacher`` (JSON, see ``describe_teacher``), ``sampler``, ``nfe``, ``seed``,
``num_pairs``, ``shape`` (JSON list), ``num_classes``, ``class_weights`` (JSON list or null).
Noise and conditions of the whole set come from one ``torch.Generator`` seeded with ``seed``, drawn before any teacher
call, so the file does not depend on ``batch_size`` or device.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .diffusion.samplers import SAMPLERS

FORMAT = "lightning-distill/teacher-pairs/v1"


@dataclass
class TeacherPairs:
    """A loaded pair file. ``cond`` is None for unconditional teachers."""

    path: str
    noise: Tensor
    target: Tensor
    cond: Tensor | None
    metadata: dict

    def __len__(self) -> int:
        return self.noise.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.noise.shape[1:])

    @property
    def teacher(self) -> dict:
        return json.loads(self.metadata["teacher"])


# ---------------------------------------------------------------------------------------------------- description
def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 over the teacher's state dict (names, dtypes, shapes and values): pairs made by other weights differ."""
    digest = hashlib.sha256()
    for name, value in sorted(teacher.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def describe_teacher(module) -> dict:
    """What identifies the function ODE_T: the teacher's class, schedule, sample shape, class count, the guidance scale
    the module applies, the exact law's name (toy teachers), the weights' fingerprint and (informational) its path."""
    teacher = module.teacher
    law = getattr(teacher, "law", None)
    shape = teacher.data_shape
    return {
        "class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
        "schedule": module.schedule.describe(),
        "data_shape": None if shape is None else list(shape),
        "num_classes": int(getattr(teacher, "num_classes", 0) or 0),
        "guidance_scale": float(module.hparams.guidance_scale),
        "law": None if law is None else law.name,
        "weights_sha256": teacher_fingerprint(teacher),
        "pretrained_path": getattr(teacher, "pretrained_path", None),
    }


#: fields of ``describe_teacher`` that must agree between a pair file and the model it is used with
IDENTIFYING_FIELDS = ("class", "schedule", "data_shape", "num_classes", "guidance_scale", "law", "weights_sha256")


def check_same_teacher(pairs: TeacherPairs, module) -> None:
    """ValueError naming the file and the first field where the file's teacher differs from ``module``'s."""
    stored, current = pairs.teacher, describe_teacher(module)
    for field in IDENTIFYING_FIELDS:
        if stored.get(field) != current.get(field):
            raise ValueError(f"teacher pairs {pairs.path!r} were made by a different teacher: {field} is "
                             f"{stored.get(field)!r} in the file but {current.get(field)!r} in this model; "
                             "regenerate them (distill pairs ... --overwrite)")


# ---------------------------------------------------------------------------------------------------- generation
def _draw_conditions(n: int, num_classes: int, class_weights: Sequence[float] | None,
                     generator: torch.Generator) -> Tensor | None:
    if num_classes <= 0:
        return None
    weights = torch.ones(num_classes, dtype=torch.float64) if class_weights is None else \
        torch.as_tensor(list(class_weights), dtype=torch.float64)
    if weights.shape != (num_classes,) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"class_weights must be {num_classes} non-negative numbers, got {list(class_weights)}")
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def generate_pairs(module, output: str, num_pairs: int, nfe: int = 32, sampler: str = "heun", seed: int = 0,
                   num_classes: int | None = None, class_weights: Sequence[float] | None = None,
                   shape: Sequence[int] | None = None, batch_size: int = 256, overwrite: bool = False) -> str:
    """Sample ``num_pairs`` teacher ODE pairs with ``module.sample_teacher`` (its guidance scale applies) and write
    them to ``output`` (see the module docstring for the format). Returns the absolute path.

    ``module``: a DistillationModule (any method; only its teacher and schedule are used), on the device to run on.
    ``num_classes``: conditions drawn from ``class_weights`` (uniform if None); default: the teacher's class count
    (0 = unconditional). ``shape``: one sample's shape; default: the teacher's ``data_shape``."""
    output = os.path.abspath(output)
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"teacher pairs {output!r} already exist; pass overwrite=True (--overwrite) to replace")
    for name, value in [("num_pairs", num_pairs), ("nfe", nfe), ("batch_size", batch_size)]:
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    shape = tuple(int(s) for s in (shape if shape is not None else (module.teacher.data_shape or ())))
    if not shape:
        raise ValueError("the teacher does not know its sample shape; pass shape=[...] (--shape)")
    teacher_shape = module.teacher.data_shape
    if teacher_shape is not None and tuple(teacher_shape) != shape:
        raise ValueError(f"shape {list(shape)} does not match the teacher's data shape {list(teacher_shape)}")
    if num_classes is None:
        num_classes = int(getattr(module.teacher, "num_classes", 0) or 0)

    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((num_pairs, *shape), generator=generator)
    cond = _draw_conditions(num_pairs, num_classes, class_weights, generator)
    device = next((p.device for p in module.teacher.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    targets = []
    try:
        with torch.no_grad():
            for start in range(0, num_pairs, batch_size):
                z = noise[start:start + batch_size].to(device)
                c = None if cond is None else cond[start:start + batch_size].to(device)
                targets.append(module.sample_teacher(z, c, nfe=nfe, method=sampler).float().cpu())
    finally:
        module.train(was_training)
    target = torch.cat(targets)
    if not torch.isfinite(target).all():
        raise ValueError(f"the teacher produced non-finite samples ({(~torch.isfinite(target)).sum().item()} values); "
                         "nothing written")

    tensors = {"noise": noise.contiguous(), "target": target.contiguous()}
    if cond is not None:
        tensors["cond"] = cond.long().contiguous()
    metadata = {
        "format": FORMAT, "teacher": json.dumps(describe_teacher(module), sort_keys=True), "sampler": sampler,
        "nfe": str(int(nfe)), "seed": str(int(seed)), "num_pairs": str(int(num_pairs)),
        "shape": json.dumps(list(shape)),
        "num_classes": str(int(num_classes)),
        "class_weights": json.dumps(None if class_weights is None else [float(w) for w in class_weights]),
    }
    _write_atomically(tensors, metadata, output)
    return output


def _write_atomically(tensors: dict, metadata: dict, output: str) -> None:
    from safetensors.torch import save_file

    folder = os.path.dirname(output)
    os.makedirs(folder, exist_ok=True)
    # a unique temporary name per writer, so concurrent writers (e.g. DDP ranks) never share a half-written file
    handle, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(output) + ".", dir=folder)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------------- loading
def load_pairs(path: str) -> TeacherPairs:
    """Load and validate a pair file; ValueError / FileNotFoundError naming the file and what is wrong."""
    from safetensors import safe_open

    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher pairs {path!r} do not exist; generate them with `python -m "
                                f"lightning_modules.trajectory_pairs --config CONFIG --output {path}`")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated / corrupt headers
        raise ValueError(f"teacher pairs {path!r} are not a readable safetensors file (truncated or corrupt?): "
                         f"{error}") from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"teacher pairs {path!r}: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    missing = [key for key in ("noise", "target") if key not in tensors]
    missing += [key for key in ("teacher", "sampler", "nfe", "seed", "num_pairs", "shape") if key not in metadata]
    if missing:
        raise ValueError(f"teacher pairs {path!r} lack {missing}")
    noise, target, cond = tensors["noise"], tensors["target"], tensors.get("cond")
    shape = json.loads(metadata["shape"])
    num_pairs = int(metadata["num_pairs"])
    expected = (num_pairs, *shape)
    for name, tensor in [("noise", noise), ("target", target)]:
        if tuple(tensor.shape) != expected:
            raise ValueError(f"teacher pairs {path!r}: {name} has shape {list(tensor.shape)}, metadata says "
                             f"{list(expected)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"teacher pairs {path!r}: {name} holds non-finite values")
    if cond is not None and tuple(cond.shape) != (num_pairs,):
        raise ValueError(f"teacher pairs {path!r}: cond has shape {list(cond.shape)}, expected [{num_pairs}]")
    return TeacherPairs(path, noise, target, None if cond is None else cond.long(), metadata)


# ---------------------------------------------------------------------------------------------------- command
def _condition_law(datamodule) -> tuple[int, list[float] | None]:
    """(num_classes, class_weights) of the conditions a config's datamodule feeds the generator (0 = none)."""
    if datamodule is None or not getattr(datamodule, "conditional", True):
        return 0, None
    classes = int(getattr(datamodule, "num_classes", 0) or 0)
    weights = getattr(datamodule, "class_weights", None)
    return classes, None if weights is None or classes == 0 else [float(w) for w in weights]
