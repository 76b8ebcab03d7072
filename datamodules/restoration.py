"""Conditional-restoration regime: (low-quality, high-quality) image pairs made on the fly from a clean dataset.

Each high-quality (HQ) image x is degraded by a configurable pipeline applied in the listed order -- the classical
degradation model y = JPEG((x * k_sigma) downarrow_s + n) of Real-ESRGAN (Wang et al., ICCVW 2021, arXiv:2107.10833,
Sec. 3.1), one stage at a time:

  * ``blur``       Gaussian blur, ``sigma`` (pixels; kernel ``2 ceil(3 sigma) + 1`` wide, normalised to sum 1, reflect
                   padding);
  * ``downsample`` area (box-average) downsampling by an integer ``factor`` (28 -> 14 for 2, 28 -> 7 for 4 on MNIST);
  * ``noise``      additive Gaussian noise of standard deviation ``std`` (in the [-1, 1] units of the images);
  * ``jpeg``       JPEG compression at ``quality`` (1..95, PIL), on the 8-bit image.

A parameter is a number, a list of choices (``factor: [2, 4]``) or a range ``{low: a, high: b}`` (uniform); each item
draws its own from a generator seeded by (``seed``, split, index), so every pair -- training, validation, test -- is
the same on every run, rank and resume, and validation / test pairs never change.

The low-quality (LQ) image is brought back to the HQ grid (``upsample``: bicubic by default, as SR3 conditions its
denoiser) and handed over as an ``ImageCondition`` (the conditioning layer's image kind). Batches:

    {"real": HQ (B, C, H, W) in [-1, 1], "noise": (B, C, H, W) seeded per item,
     "cond": ImageCondition(image=LQ upsampled (B, C, H, W), scale=(B,) factor, labels=(B,) digit),
     "real_cond": the same ImageCondition, "lq": the LQ image at its own size (only when every row has the same
     factor), "labels": (B,) class of the HQ image}

so teacher training (``real``, ``real_cond``) and every distillation method (``noise``, ``cond``) read it unchanged.
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from lightning_modules.conditioning.condition import ImageCondition

from .images import SPLITS, ImageDataModule, MNISTDataModule
from .resumable import ResumableDataLoader

DEGRADATIONS = ("blur", "downsample", "noise", "jpeg")
PARAMETERS = {"blur": "sigma", "downsample": "factor", "noise": "std", "jpeg": "quality"}
UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")


# ---------------------------------------------------------------------------------------------- the degradations
def gaussian_kernel(sigma: float) -> Tensor:
    """(K, K) Gaussian kernel, K = 2 ceil(3 sigma) + 1, normalised to sum to 1 (float64)."""
    if sigma <= 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    radius = math.ceil(3.0 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    line = torch.exp(-offsets ** 2 / (2.0 * sigma ** 2))
    kernel = line[:, None] * line[None, :]
    return kernel / kernel.sum()


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Blur (N, C, H, W) images channel by channel with ``gaussian_kernel(sigma)`` (reflect padding)."""
    if sigma == 0:
        return images
    kernel = gaussian_kernel(sigma).to(images)
    radius = kernel.shape[0] // 2
    channels = images.shape[1]
    padded = F.pad(images, (radius,) * 4, mode="reflect" if radius < min(images.shape[-2:]) else "replicate")
    return F.conv2d(padded, kernel.expand(channels, 1, *kernel.shape), groups=channels)


def downsample(images: Tensor, factor: int) -> Tensor:
    """Area downsampling: the mean of each ``factor`` x ``factor`` block (H and W must be multiples of it)."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"downsample factor must be an integer >= 1, got {factor}")
    height, width = images.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"downsample factor {factor} does not divide the image size {height}x{width}")
    return images if factor == 1 else F.avg_pool2d(images, factor)


def add_noise(images: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return images + std * torch.randn(images.shape, generator=generator, dtype=images.dtype)


def jpeg(images: Tensor, quality: int) -> Tensor:
    """JPEG-compress (N, C, H, W) images in [-1, 1] at ``quality`` (PIL, 8-bit, grayscale or RGB) and decode."""
    import numpy
    from PIL import Image

    quality = int(quality)
    if not 1 <= quality <= 95:
        raise ValueError(f"jpeg quality must be an integer in [1, 95], got {quality}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"jpeg needs 1 or 3 channels, got {images.shape[1]}")
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    decoded = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded_image:
            out = torch.from_numpy(numpy.asarray(decoded_image, dtype=numpy.float32).copy())
        decoded.append(out.reshape(array.shape))
    return (torch.stack(decoded).permute(0, 3, 1, 2) / 127.5 - 1.0).to(images.dtype)


def upsample(images: Tensor, size: Sequence[int], mode: str = "bicubic") -> Tensor:
    """Bring LQ images back to the HQ grid ``size`` (clamped to [-1, 1]: bicubic overshoots)."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(images, size=tuple(size), mode=mode, **kwargs).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------- the pipeline
class DegradationPipeline:
    """An ordered list of degradations, each ``{"name": <one of DEGRADATIONS>, <its parameter>: value}``; the
    parameter is a number, a list of choices or ``{"low": a, "high": b}`` (uniform). At most one ``downsample``."""

    def __init__(self, stages: Sequence[dict[str, Any]]):
        self.stages = []
        for position, stage in enumerate(stages):
            if not isinstance(stage, dict) or "name" not in stage:
                raise ValueError(f"degradation {position} must be a mapping with a 'name', got {stage!r}")
            name = stage["name"]
            if name not in DEGRADATIONS:
                raise ValueError(f"unknown degradation {name!r} (stage {position}); expected one of {DEGRADATIONS}")
            parameter = PARAMETERS[name]
            extra = sorted(set(stage) - {"name", parameter})
            if extra or parameter not in stage:
                raise ValueError(f"degradation {name!r} takes exactly the parameter {parameter!r}, got "
                                 f"{sorted(set(stage) - {'name'})}")
            self.stages.append((name, self._check(name, parameter, stage[parameter])))
        if sum(name == "downsample" for name, _ in self.stages) > 1:
            raise ValueError("at most one downsample stage (the super-resolution factor) is allowed")

    @staticmethod
    def _check(name: str, parameter: str, value):
        values = value if isinstance(value, (list, tuple)) else \
            [value["low"], value["high"]] if isinstance(value, dict) else [value]
        if isinstance(value, dict) and (set(value) != {"low", "high"} or value["low"] > value["high"]):
            raise ValueError(f"{name} {parameter} range must be {{low: a, high: b}} with a <= b, got {value!r}")
        if not values:
            raise ValueError(f"{name} {parameter} has no choices")
        for v in values:
            bad = (not isinstance(v, (int, float)) or isinstance(v, bool)
                   or (name == "blur" and v < 0) or (name == "noise" and v < 0)
                   or (name == "downsample" and (int(v) != v or v < 1))
                   or (name == "jpeg" and (int(v) != v or not 1 <= v <= 95)))
            if bad:
                limits = {"blur": "a number >= 0", "noise": "a number >= 0", "downsample": "an integer >= 1",
                          "jpeg": "an integer in [1, 95]"}[name]
                raise ValueError(f"{name} {parameter} must be {limits}, got {v!r}")
        if name == "downsample" and isinstance(value, dict):
            raise ValueError("downsample factor takes a number or a list of choices, not a range")
        return value

    @staticmethod
    def _draw(value, generator: torch.Generator):
        if isinstance(value, (list, tuple)):
            return value[int(torch.randint(len(value), (1,), generator=generator))]
        if isinstance(value, dict):
            return value["low"] + (value["high"] - value["low"]) * float(torch.rand((), generator=generator))
        return value

    def describe(self) -> list[dict]:
        """The stages as the config gives them (for cards and logs)."""
        return [{"name": name, PARAMETERS[name]: value} for name, value in self.stages]

    @property
    def factors(self) -> list[int]:
        """The downsampling factors the pipeline can produce ([1] without a downsample stage)."""
        for name, value in self.stages:
            if name == "downsample":
                return sorted({int(v) for v in (value if isinstance(value, (list, tuple)) else [value])})
        return [1]

    def __call__(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, int]:
        """(LQ images, downsampling factor) of (N, C, H, W) images, all with the parameters drawn once."""
        factor = 1
        for name, value in self.stages:
            drawn = self._draw(value, generator)
            if name == "blur":
                images = gaussian_blur(images, float(drawn))
            elif name == "downsample":
                factor = int(drawn)
                images = downsample(images, factor)
            elif name == "noise":
                images = add_noise(images, float(drawn), generator)
            else:
                images = jpeg(images, int(round(drawn)))
        return images, factor


# ---------------------------------------------------------------------------------------------- data
class RestorationPairs(Dataset):
    """Item i: the HQ image i, its LQ version (parameters and noise from generator seed (seed, i)), upsampled."""

    def __init__(self, images: Tensor, labels: Tensor, pipeline: DegradationPipeline, upsample_mode: str, seed: int):
        self.images, self.labels, self.pipeline = images, labels, pipeline
        self.upsample_mode, self.seed = upsample_mode, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        hq = self.images[index]
        lq, factor = self.pipeline(hq[None], generator)
        return {"real": hq, "noise": torch.randn(hq.shape, generator=generator), "lq": lq[0],
                "lq_up": upsample(lq, hq.shape[-2:], self.upsample_mode)[0], "scale": factor,
                "labels": self.labels[index]}


def collate_pairs(items: list[dict]) -> dict:
    """Stack items and wrap the upsampled LQ images into the batch's ``ImageCondition`` (``cond`` = ``real_cond``)."""
    lq = [item.pop("lq") for item in items]
    batch = default_collate(items)
    cond = ImageCondition(batch.pop("lq_up"), scale=batch.pop("scale").long(), labels=batch["labels"])
    batch["cond"] = batch["real_cond"] = cond
    if len({tuple(x.shape) for x in lq}) == 1:
        batch["lq"] = torch.stack(lq)
    return batch


class RestorationDataModule(LightningDataModule):
    """LQ -> HQ pairs over a clean image datamodule (MNIST by default, 28x28, [-1, 1]).

    ``degradations``: the pipeline (see the module docstring); default: area downsampling by 2 or 4 (14 -> 28 and
    7 -> 28 super-resolution). ``upsample``: how LQ returns to the HQ grid. ``source``: the clean ImageDataModule
    (default ``MNISTDataModule(pad_to=pad_to)``). ``max_val_images`` caps the validation set; ``evaluation_pairs``
    gives fixed test pairs for reports.
    """

    provides_real_data = True
    DEFAULT_DEGRADATIONS = ({"name": "downsample", "factor": [2, 4]},)

    def __init__(self, degradations: Sequence[dict] | None = None, upsample: str = "bicubic",
                 batch_size: int = 64, seed: int = 0, num_workers: int = 0, source: ImageDataModule | None = None,
                 pad_to: int | None = None, train_split: str = "train", val_split: str = "val",
                 max_val_images: int | None = 1024):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        for name, split in [("train_split", train_split), ("val_split", val_split)]:
            if split not in SPLITS:
                raise ValueError(f"{name} must be one of {SPLITS}, got {split!r}")
        self.pipeline = DegradationPipeline(list(degradations or self.DEFAULT_DEGRADATIONS))
        self.upsample_mode, self.batch_size, self.seed, self.num_workers = upsample, batch_size, seed, num_workers
        self.source = source if source is not None else MNISTDataModule(pad_to=pad_to, conditional=False)
        self.train_split, self.val_split, self.max_val_images = train_split, val_split, max_val_images
        self.num_classes = 0  # the condition is an image: samplers must not invent class labels

    @property
    def factors(self) -> list[int]:
        return self.pipeline.factors

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        """The clean (HQ) images and labels of a split."""
        return self.source.split(split)

    def dataset(self, split: str, limit: int | None = None) -> RestorationPairs:
        images, labels = self.split(split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        # each split its own seed stream: the same index in two splits never shares degradation noise
        return RestorationPairs(images, labels, self.pipeline, self.upsample_mode,
                                self.seed + 10_000 * SPLITS.index(split))

    def evaluation_pairs(self, n: int, split: str = "test") -> dict:
        """The first ``n`` pairs of ``split`` as one batch (fixed: the same on every call and run)."""
        dataset = self.dataset(split, limit=n)
        if len(dataset) < n:
            raise ValueError(f"split {split!r} has {len(dataset)} images, fewer than the {n} asked for")
        return collate_pairs([dataset[i] for i in range(n)])

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableDataLoader(self.dataset(self.train_split), batch_size=self.batch_size, shuffle=True,
                                   drop_last=True, generator=generator, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0, collate_fn=collate_pairs,
                                   progress_source=self)

    def val_dataloader(self):
        return DataLoader(self.dataset(self.val_split, limit=self.max_val_images), batch_size=self.batch_size,
                          shuffle=False, num_workers=self.num_workers, collate_fn=collate_pairs)
