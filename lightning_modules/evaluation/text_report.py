"""Scoring text-to-image generators one way everywhere (demo-t2i report, the t2i teacher card, bench-t2i).

One protocol: ``n`` MNIST captions asking for digit ``i % 10`` (``evaluation_prompts``), a fixed noise, samples made in
batches and decoded to images, then FID against the first ``n`` MNIST test images (each extractor), prompt adherence
(the shipped MNIST classifier's accuracy on the prompted digit) and CLIP score (the shipped tiny MNIST open_clip).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import torch

from ..conditioning.condition import select_conditions
from ..conditioning.mnist_captions import evaluation_captions
from .image_metrics import image_metrics


def evaluation_prompts(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """``n`` captions, the i-th asking for digit i % 10 with attributes drawn from ``seed``; and those digits."""
    return evaluation_captions(n, seed)


def timed_text_samples(sample: Callable, module, noise: torch.Tensor, cond, batch_size: int = 250):
    """(images in [-1, 1], images per second) of ``sample(noise_batch, cond_batch)`` decoded by ``module.to_images``;
    the time includes decoding (what a user of the exported pipeline waits for)."""
    outputs, start = [], time.perf_counter()
    device = module.device
    for index in range(0, len(noise), batch_size):
        rows = torch.arange(index, min(index + batch_size, len(noise)))
        part = select_conditions(cond, rows).to(device)
        latents = sample(noise[rows].to(device), part)
        outputs.append(module.to_images(latents).float().cpu())
    seconds = time.perf_counter() - start
    return torch.cat(outputs).clamp(-1, 1), len(noise) / seconds


def mnist_reference(n: int, shape: Sequence[int]) -> torch.Tensor:
    from callbacks.text_metrics import match_images
    from datamodules.images import MNISTDataModule

    images = MNISTDataModule().split("test")[0][:n]
    return match_images(images, shape, pad=shape[-1] > images.shape[-1])


def score_text_to_image(images: torch.Tensor, prompts: Sequence[str], labels: torch.Tensor,
                        extractors: Sequence[str], clip_scorer=None, cache_dir: str | None = None) -> dict:
    """{"fid": {extractor: FID}, "prompt_adherence": accuracy, "clip_score": mean CLIPScore} of one sample set."""
    from .clip_score import CLIPScorer
    from .prompt_adherence import prompt_adherence

    reference = mnist_reference(len(images), images.shape[1:])
    key = f"mnist-test-first{len(images)}-{'x'.join(map(str, images.shape[1:]))}"
    fids = {e: float(image_metrics(images, f"{key}-{e}", reference, extractor=e, cache_dir=cache_dir)["fid"])
            for e in extractors}
    scorer = clip_scorer if clip_scorer is not None else CLIPScorer.shipped_mnist()
    adherence = prompt_adherence(images, labels)
    adherence = float(adherence["accuracy"] if isinstance(adherence, dict) else adherence)
    return {"fid": fids, "prompt_adherence": adherence,
            "clip_score": float(scorer.score(images, list(prompts)).mean())}


def labelled_grid(prompts: Sequence[str], left: torch.Tensor, right: torch.Tensor, path: str,
                  columns: int = 1, scale: int = 2) -> None:
    """A PNG with one row per prompt: the prompt, then ``left`` (e.g. teacher) and ``right`` (student) images."""
    from PIL import Image, ImageDraw

    def tile(image: torch.Tensor) -> Image.Image:
        array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte()
        array = array.expand(3, -1, -1) if array.shape[0] == 1 else array[:3]
        picture = Image.fromarray(array.permute(1, 2, 0).numpy())
        return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)

    tiles = [(tile(a), tile(b)) for a, b in zip(left, right)]
    cell_w, cell_h = tiles[0][0].size
    text_w, pad = 7 * max(len(p) for p in prompts) + 16, 4
    sheet = Image.new("RGB", (text_w + 2 * (cell_w + pad) + pad, 20 + len(tiles) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((text_w, 4), "teacher", fill="black")
    draw.text((text_w + cell_w + pad, 4), "student", fill="black")
    for row, (prompt, (a, b)) in enumerate(zip(prompts, tiles)):
        y = 20 + row * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 5), prompt, fill="black")
        sheet.paste(a, (text_w, y))
        sheet.paste(b, (text_w + cell_w + pad, y))
    tmp = f"{path}.tmp.png"
    sheet.save(tmp)
    os.replace(tmp, path)
