"""The caption language of the MNIST text-to-image teacher: "a thin handwritten seven, slanted right".

Pure text and image arithmetic (no data loading), so evaluation code can parse prompts without reaching into the
datamodules; ``datamodules.mnist_captions`` applies it to the MNIST images and re-exports everything here.
Stroke weight is the ink mass ``sum((x + 1) / 2)`` against per-digit terciles; slant is the shear of the ink's second
moments ``mu11 / mu02`` with "slanted left" below ``SLANT_BOUNDS[0]`` and "slanted right" above ``SLANT_BOUNDS[1]``.
"""
from __future__ import annotations

import re

import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WEIGHTS = ("thin", "", "thick")
SLANTS = ("slanted left", "", "slanted right")
SLANT_BOUNDS = (0.0, 0.22)
_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def caption(digit: int, weight: str = "", slant: str = "") -> str:
    """The caption of one combination, e.g. ``caption(7, "thin", "slanted right")``."""
    if weight not in WEIGHTS or slant not in SLANTS:
        raise ValueError(f"weight must be one of {WEIGHTS} and slant one of {SLANTS}; got {weight!r}, {slant!r}")
    text = "a " + (weight + " " if weight else "") + "handwritten " + DIGIT_WORDS[int(digit)]
    return text + (", " + slant if slant else "")


def all_prompts() -> list[str]:
    """Every caption there is (10 digits x 3 weights x 3 slants = 90), digit-major."""
    return [caption(d, w, s) for d in range(10) for w in WEIGHTS for s in SLANTS]


def caption_digit(prompt: str) -> int:
    """The digit a prompt asks for (its first digit word or numeral); a ValueError naming the prompt otherwise."""
    match = _DIGIT_PATTERN.search(prompt)
    if match is None:
        raise ValueError(f"no digit (zero..nine or 0..9) in prompt {prompt!r}")
    word = match.group(1).lower()
    return int(word) if word.isdigit() else DIGIT_WORDS.index(word)


def ink_and_slant(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ink mass, slant ``mu11 / mu02``) of [-1, 1] images (N, 1, H, W)."""
    ink = ((images.float() + 1.0) / 2.0).clamp(0, 1).flatten(1).view(len(images), images.shape[-2], images.shape[-1])
    mass = ink.sum((1, 2)).clamp_min(1e-6)
    rows = torch.arange(ink.shape[1], dtype=torch.float32).view(1, -1, 1)
    cols = torch.arange(ink.shape[2], dtype=torch.float32).view(1, 1, -1)
    mean_r = (ink * rows).sum((1, 2)) / mass
    mean_c = (ink * cols).sum((1, 2)) / mass
    dr, dc = rows - mean_r.view(-1, 1, 1), cols - mean_c.view(-1, 1, 1)
    mu02 = (ink * dr * dr).sum((1, 2)) / mass
    mu11 = (ink * dr * dc).sum((1, 2)) / mass
    # rows grow downwards: a top-right-leaning stroke has column decreasing with row, so slant right = -mu11 / mu02
    return mass, -mu11 / mu02.clamp_min(1e-6)


def evaluation_captions(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """``n`` prompts, the i-th asking for digit ``i % 10`` with a weight and slant drawn from ``seed``; and digits."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randint(0, 3, (n,), generator=generator)
    slants = torch.randint(0, 3, (n,), generator=generator)
    digits = torch.arange(n) % 10
    prompts = [caption(int(d), WEIGHTS[w], SLANTS[s])
               for d, w, s in zip(digits.tolist(), weights.tolist(), slants.tolist())]
    return prompts, digits
