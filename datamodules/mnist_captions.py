"""Captions of MNIST digits read off the images themselves: "a thin handwritten seven, slanted right".

Three attributes, each measured on the 28x28 image so the caption says something true about it:

* the digit (the MNIST label);
* stroke weight -- ink mass ``sum((x + 1) / 2)`` against the terciles of the same digit's training images
  ("thin" / no word / "thick"), per digit because a one has far less ink than an eight;
* slant -- the shear of the ink's second moments, ``mu11 / mu02`` (x against y, image rows growing downwards), with
  "slanted left" below ``SLANT_BOUNDS[0]``, "slanted right" above ``SLANT_BOUNDS[1]`` and nothing in between (MNIST
  writers lean right: the bounds are roughly the training set's slant terciles, so each word covers about a third).

These are the captions the shipped text-to-image teacher (assets/mnist-t2i) and its CLIP were trained on, the
prompt file of experiments/mnist_t2i, and the evaluation prompts of the t2i report (digit ``i % 10`` for the i-th).
"""
from __future__ import annotations

import functools
import os

import torch

# the caption language itself lives in the core, so evaluation code can parse prompts; re-exported here
from lightning_modules.conditioning.mnist_captions import (DIGIT_WORDS, SLANT_BOUNDS, SLANTS, WEIGHTS,  # noqa: F401
                                                           all_prompts, caption, caption_digit, evaluation_captions,
                                                           ink_and_slant)


@functools.lru_cache(maxsize=1)
def _weight_terciles() -> torch.Tensor:
    """(10, 2) ink-mass terciles of each digit over the MNIST training split."""
    from .images import MNISTDataModule

    images, labels = MNISTDataModule().split("train")
    mass, _ = ink_and_slant(images)
    return torch.stack([torch.quantile(mass[labels == d], torch.tensor([1 / 3, 2 / 3])) for d in range(10)])


def describe(images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """The caption of each 28x28 [-1, 1] MNIST image with its label."""
    mass, slant = ink_and_slant(images)
    terciles = _weight_terciles()[labels.long()]
    weight = (mass > terciles[:, 0]).long() + (mass > terciles[:, 1]).long()
    tilt = (slant > SLANT_BOUNDS[0]).long() + (slant > SLANT_BOUNDS[1]).long()
    return [caption(int(d), WEIGHTS[w], SLANTS[s]) for d, w, s in zip(labels.tolist(), weight.tolist(), tilt.tolist())]


def mnist_captions(split: str = "train") -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(images (N, 1, 28, 28) in [-1, 1], their captions, their digits) of one MNIST split."""
    from .images import MNISTDataModule

    images, labels = MNISTDataModule().split(split)
    return images, describe(images, labels), labels


def write_prompt_file(path: str, split: str = "train") -> int:
    """Write the captions of a split, one per line, atomically; returns how many."""
    _, captions, _ = mnist_captions(split)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write("\n".join(captions) + "\n")
    os.replace(path + ".tmp", path)
    return len(captions)
