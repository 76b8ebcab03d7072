"""Scoring image generators the same way everywhere (demo report, teacher card, MNIST benchmark).

One protocol: a fixed set of noise and class labels drawn from ``seed`` (labels uniform over classes), samples made in
batches with their wall time measured, and FID / KID / precision-recall against the first ``n`` images of a reference
split through ``image_metrics`` with each requested extractor.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Sequence

import torch

from .image_metrics import image_metrics


def fixed_inputs(n: int, shape: Sequence[int], num_classes: int, seed: int = 1234):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=generator)
    labels = torch.arange(n) % num_classes if num_classes else None
    return noise, labels


def timed_samples(sample: Callable, noise: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 250):
    """(samples, images per second) of ``sample(noise_batch, label_batch)`` over the whole set."""
    outputs, start = [], time.perf_counter()
    for index in range(0, len(noise), batch_size):
        batch_labels = None if labels is None else labels[index:index + batch_size]
        outputs.append(sample(noise[index:index + batch_size], batch_labels).float().cpu())
    seconds = time.perf_counter() - start
    return torch.cat(outputs).clamp(-1, 1), len(noise) / seconds


def score(samples: torch.Tensor, reference: torch.Tensor, reference_key: str, extractors: Sequence[str],
          cache_dir: str | None = None) -> dict:
    """{extractor: metrics} for each extractor; the reference key gets the extractor appended."""
    return {extractor: image_metrics(samples, f"{reference_key}-{extractor}", reference, extractor=extractor,
                                     cache_dir=cache_dir)
            for extractor in extractors}


def write_json_atomic(path: str, data) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, default=float)
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def side_by_side_grid(left: torch.Tensor, right: torch.Tensor, path: str, nrow: int = 10, gap: int = 8) -> None:
    """A PNG with ``left`` and ``right`` image grids (float in [-1, 1]) next to each other."""
    from torchvision.utils import make_grid, save_image

    grids = [make_grid((images.float().cpu() + 1) / 2, nrow=nrow, padding=2, pad_value=1.0) for images in (left, right)]
    separator = torch.ones(grids[0].shape[0], grids[0].shape[1], gap)
    tmp = f"{path}.tmp.png"
    save_image(torch.cat([grids[0], separator, grids[1]], dim=2), tmp)
    os.replace(tmp, path)
