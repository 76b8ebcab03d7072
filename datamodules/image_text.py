"""Image-text pair regime: batches of noise, encoded captions *and the real images those captions describe*.

    ImageTextDataModule(root="data/coco", captions_file="metadata.jsonl", shape=[4, 64, 64], image_size=512,
                        text_encoder=..., batch_size=...)

What it is for. The prompt-only regime (``PromptDataModule``) serves data-free methods. Methods with a real-data term
need real samples too, and for a text-to-image teacher a real sample only means something with its own caption:

* ``needs_real_data = True`` in ``lightning_modules/methods``: SiDA (GAN head on the critic's encoder, real vs
  generated), f-distill and Uni-Instruct (the discriminator that estimates the density ratio is trained on real vs
  generated), consistency distillation (trains on noised real data);
* DMD2 when its GAN term is on (``gan_critic_weight > 0``: the critic's discriminator loss reads ``batch["real"]``,
  conditioned on ``batch["real_cond"]``; ``gan_generator_weight`` alone needs no real data);
* LADD (planned) in the same way.

Batches: ``{"noise": (B, *shape), "cond": TextCondition, "prompts": list[str], "real_images": (B, C, H, W) float32
in [-1, 1], "real_cond": TextCondition}``. Row j of every entry belongs to the same pair: ``prompts[j]`` is the caption
of ``real_images[j]``, ``cond`` / ``real_cond`` are its encoding (the same object: the real side of a GAN term and the
generated side, whose noise row j is generated from ``prompts[j]``, see the same captions). ``shape`` is one *latent*
of the teacher (the noise); ``real_images`` are pixels: ``DistillationModule.prepare_batch`` encodes them with the
module's autoencoder into ``batch["real"]`` (pixel-space teachers use them as they are, so there ``shape`` must be
``(channels, image_size, image_size)``).

Determinism, resume, DDP: exactly ``PromptDataModule``'s (this is its subclass, with ``PromptBatches`` underneath).
Item ``i`` of the training set is a whole batch; its noise comes from generator seed (seed, i); its pairs are positions
i*B .. (i+1)*B - 1 of a stream running through successive permutations of the pair list, permutation k drawn from seed
(seed, k). ``ResumableDataLoader`` resumes mid-epoch at the exact batch; Lightning's distributed sampler shards batch
indices. Images are decoded lazily, per batch (in the loader's workers with ``num_workers > 0``), never all at once.

Captions file (``captions_file``; a relative path is looked up under ``root`` first, then from the working directory):

* ``.jsonl`` -- one JSON object per line, like HuggingFace ``imagefolder``'s ``metadata.jsonl``:
  ``{"file_name": "0001.png", "text": "a cat on a mat"}``;
* ``.csv`` -- a header row naming the columns, then one pair per row;
* ``.parquet`` -- a table with the two columns (image *paths*, not embedded image bytes);
* ``.txt`` -- ``<image path><TAB><caption>`` per line (the caption may contain further tabs).

Columns are ``image_column`` (default ``file_name``) and ``caption_column`` (default ``text``). Image paths are relative
to ``root`` (absolute paths are used as they are). Validation pairs: ``val_captions_file`` (same rules, images under
the same ``root``), else a ``val_fraction`` of the pairs held out by a permutation seeded with ``split_seed`` (not the
training ``seed``), else the training pairs. ``evaluation_prompts`` / ``evaluation_conditions`` / ``evaluation_noise``
(the metric callbacks' API) come from ``PromptDataModule``; ``evaluation_pairs(n)`` adds the real images of
``evaluation_prompts(n)``.

Images: read with PIL (EXIF orientation applied), converted to ``channels`` (1: "L", 3: "RGB"), then ``resize="crop"``
(default: short side to ``image_size`` with ``interpolation``, centre crop to ``image_size`` x ``image_size``; the
ImageFolderDataModule rule) or ``resize="stretch"`` (both sides to ``image_size``, aspect ratio not kept), then mapped
to [-1, 1] as ``v / 127.5 - 1``.

Bad input fails with the file and line named: a missing captions file (``FileNotFoundError``), an empty or blank-only
one, bytes that are not UTF-8, a missing column (the available ones are listed), a non-text caption or image path, a
``.txt`` line without a tab, a row whose image does not exist (the first such row, its path, and how many there are;
checked for every row at construction). Rows with a blank caption are skipped and counted in a warning
(``blank_lines="error"`` makes them an error), as in ``PromptDataModule``. An unreadable / corrupt image raises a
ValueError naming the image and its captions line when its batch is loaded; ``verify_images=True`` (or
``check_images()``) decodes every image once at construction to find them before training starts (a full decoding
pass: slow on large sets).

Embedding cache (``cache_dir``), negative prompt, ``label_parser``: as ``PromptDataModule``'s (captions play the role
of the prompts; the captions of both splits are encoded once, at ``setup``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from lightning_modules.conditioning.text_encoders import TextEncoder

from .image_sources import seeded_split
from .prompts import BLANK_LINE_POLICIES, PromptBatches, PromptDataModule, PromptFileError, _decoded_lines, _rows

log = logging.getLogger(__name__)

__all__ = ["CAPTION_FORMATS", "ImagePairs", "ImageTextBatches", "ImageTextDataModule", "load_image", "read_pairs"]

CAPTION_FORMATS = (".jsonl", ".csv", ".parquet", ".txt")
RESIZE_MODES = ("crop", "stretch")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass
class ImagePairs:
    """Image-caption pairs of one captions file: absolute image paths, captions, and each pair's line in the file."""

    captions_file: str
    files: list[str]
    captions: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: Sequence[int]) -> "ImagePairs":
        index = [int(i) for i in index]
        return ImagePairs(self.captions_file, [self.files[i] for i in index], [self.captions[i] for i in index],
                          [self.lines[i] for i in index])

    def where(self, row: int) -> str:
        return f"{self.captions_file}, line {self.lines[row]}"


# ---------------------------------------------------------------------------------------------------- reading
def _txt_rows(path: str) -> list[tuple[int, object, object]]:
    rows = []
    for number, line in enumerate(_decoded_lines(path), start=1):
        if not line.strip():
            rows.append((number, "", None))
            continue
        if "\t" not in line:
            raise PromptFileError(f"{path}, line {number}: expected '<image path>\\t<caption>' but the line has no "
                                  f"tab: {line[:80]!r}")
        image, caption = line.split("\t", 1)
        rows.append((number, caption, image))
    return rows


def read_pairs(captions_file: str, root: str, image_column: str = "file_name", caption_column: str = "text",
               blank_lines: str = "skip") -> ImagePairs:
    """The image-caption pairs of a captions file, every image checked to exist (see the module docstring)."""
    if blank_lines not in BLANK_LINE_POLICIES:
        raise ValueError(f"blank_lines must be one of {BLANK_LINE_POLICIES}, got {blank_lines!r}")
    if not os.path.isfile(captions_file):
        raise FileNotFoundError(f"captions file {captions_file!r} does not exist")
    suffix = os.path.splitext(captions_file)[1].lower()
    if suffix not in CAPTION_FORMATS:
        raise PromptFileError(f"{captions_file}: unknown captions file type {suffix!r}; expected one of "
                              f"{CAPTION_FORMATS}")
    # csv / jsonl / parquet rows come as (line, caption, image path): the image column rides in _rows' label slot
    rows = _txt_rows(captions_file) if suffix == ".txt" else _rows(captions_file, caption_column, image_column)
    files, captions, lines, blank, missing = [], [], [], [], []
    for number, caption, image in rows:
        where = f"{captions_file}, line {number}"
        if caption is not None and not isinstance(caption, str):
            raise PromptFileError(f"{where}: caption must be text, got {type(caption).__name__} {caption!r}")
        if caption is None or not caption.strip():
            blank.append(number)
            continue
        if image is not None and not isinstance(image, str):
            raise PromptFileError(f"{where}: image path must be text, got {type(image).__name__} {image!r}")
        if image is None or not image.strip():
            raise PromptFileError(f"{where}: no image path (column {image_column!r}) for caption {caption.strip()!r}")
        full = os.path.normpath(os.path.join(root, image.strip()))
        if not os.path.isfile(full):
            missing.append((number, image.strip(), full))
            continue
        files.append(full)
        captions.append(caption.strip())
        lines.append(number)
    if missing:
        number, image, full = missing[0]
        more = f"; {len(missing)} row(s) in all name missing images" if len(missing) > 1 else ""
        raise PromptFileError(f"{captions_file}, line {number}: image {image!r} does not exist (looked for "
                              f"{full}){more}")
    if blank:
        if blank_lines == "error":
            raise PromptFileError(f"{captions_file}: {len(blank)} row(s) with a blank caption, first at line "
                                  f"{blank[0]} (blank_lines='error')")
        log.warning("%s: skipped %d row(s) with a blank caption (first at line %d)", captions_file, len(blank),
                    blank[0])
    if not files:
        raise PromptFileError(f"{captions_file}: no image-caption pairs (the file is empty or only blank)")
    return ImagePairs(captions_file, files, captions, lines)


def load_image(path: str, image_size: int, channels: int = 3, resize: str = "crop",
               interpolation: str = "bicubic") -> torch.Tensor:
    """One image as uint8 (channels, image_size, image_size); a ValueError naming the file if it cannot be read."""
    from PIL import Image, ImageOps
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image = image.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    mode = InterpolationMode(interpolation)
    if resize == "crop":
        image = TF.resize(image, image_size, interpolation=mode)
        image = TF.center_crop(image, [image_size, image_size])
    else:
        image = TF.resize(image, [image_size, image_size], interpolation=mode)
    return TF.pil_to_tensor(image)


def _resolve(root: str, path: str) -> str:
    path = os.path.expanduser(str(path))
    if os.path.isabs(path):
        return path
    under_root = os.path.join(root, path)
    return under_root if os.path.exists(under_root) or not os.path.exists(path) else os.path.abspath(path)


# ---------------------------------------------------------------------------------------------------- batches
class ImageTextBatches(PromptBatches):
    """``PromptBatches`` whose item ``i`` also carries the real images of its pairs, decoded on access."""

    def __init__(self, owner: "ImageTextDataModule", pairs: ImagePairs, labels: list[int] | None, num_batches: int,
                 seed: int):
        super().__init__(owner, pairs.captions, labels, num_batches, seed)
        self.pairs = pairs

    def __getitem__(self, index: int) -> dict:
        batch = super().__getitem__(index)
        batch["real_images"] = self.owner.real_images(self.pairs, self.indices(index))
        batch["real_cond"] = batch["cond"]
        return batch


class ImageTextDataModule(PromptDataModule):
    """Image-caption pairs under ``root`` listed in ``captions_file`` (see the module docstring).

    ``shape``: one latent of the teacher (the noise's shape, e.g. [4, 64, 64] for SD1.5 at 512 px); ``image_size`` /
    ``channels``: the real images' pixels (what the teacher's autoencoder encodes). ``text_encoder``,
    ``negative_prompt``, ``label_parser``, ``batch_size``, ``batches_per_epoch``, ``val_batches``, ``seed``,
    ``num_workers``, ``cache_dir``, ``blank_lines``: as ``PromptDataModule``'s."""
    provides_real_data = True

    def __init__(self, root: str, captions_file: str, shape: Sequence[int], image_size: int, channels: int = 3,
                 text_encoder: TextEncoder | None = None, image_column: str = "file_name",
                 caption_column: str = "text", label_parser: str | None = None, negative_prompt: str | None = None,
                 batch_size: int = 32, batches_per_epoch: int = 1000, val_captions_file: str | None = None,
                 val_fraction: float = 0.0, split_seed: int = 0, val_batches: int = 4, seed: int = 0,
                 num_workers: int = 0, cache_dir: str | None = None, blank_lines: str = "skip", resize: str = "crop",
                 interpolation: str = "bicubic", verify_images: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_captions_file is not None and val_fraction > 0:
            raise ValueError("give val_captions_file or val_fraction, not both")
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image root {self.root} does not exist or is not a directory")
        self.image_size, self.channels, self.resize, self.interpolation = image_size, channels, resize, interpolation
        self.image_column, self.val_fraction, self.split_seed = image_column, val_fraction, split_seed
        self.captions_file = _resolve(self.root, captions_file)
        self.val_captions_file = None if val_captions_file is None else _resolve(self.root, val_captions_file)
        self.train_pairs: ImagePairs | None = None
        self.val_pairs: ImagePairs | None = None
        super().__init__(self.captions_file, shape, text_encoder, column=caption_column, label_parser=label_parser,
                         negative_prompt=negative_prompt, batch_size=batch_size, batches_per_epoch=batches_per_epoch,
                         val_prompt_file=self.val_captions_file, val_batches=val_batches, seed=seed,
                         num_workers=num_workers, cache_dir=cache_dir, blank_lines=blank_lines)
        if verify_images:
            self.check_images()

    # ------------------------------------------------------------------ reading (PromptDataModule's hook)
    def read_prompt_files(self, prompt_file, val_prompt_file, column, label_column, blank_lines):
        train = read_pairs(prompt_file, self.root, self.image_column, column, blank_lines)
        if val_prompt_file is not None:
            val = read_pairs(val_prompt_file, self.root, self.image_column, column, blank_lines)
        elif self.val_fraction > 0:
            split = seeded_split(len(train), self.val_fraction, 0.0, self.split_seed)
            if len(split["val"]) == 0:
                raise ValueError(f"val_fraction={self.val_fraction} of {len(train)} pairs in {prompt_file} holds out "
                                 "no validation pair; raise it or give val_captions_file")
            # each split keeps file order (evaluation_prompts cycles the validation pairs in file order)
            train, val = (train.subset(sorted(split[name].tolist())) for name in ("train", "val"))
        else:
            val = train
        self.train_pairs, self.val_pairs = train, val
        return train.captions, None, val.captions, None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One real image's shape (channels, image_size, image_size)."""
        return (self.channels, self.image_size, self.image_size)

    # ------------------------------------------------------------------ images
    def real_images(self, pairs: ImagePairs, rows: Sequence[int]) -> torch.Tensor:
        """The images of ``rows`` of ``pairs``, float32 (len(rows), C, H, W) in [-1, 1]."""
        images = []
        for row in rows:
            try:
                images.append(load_image(pairs.files[row], self.image_size, self.channels, self.resize,
                                         self.interpolation))
            except ValueError as error:
                raise ValueError(f"{error} (the image of {pairs.where(row)})") from None
        return torch.stack(images).float() / 127.5 - 1.0

    def check_images(self) -> None:
        """Decode every image of both splits once; a ValueError names the first unreadable one and its line."""
        seen = set()
        for pairs in (self.train_pairs, self.val_pairs):
            for row, path in enumerate(pairs.files):
                if path not in seen:
                    seen.add(path)
                    self.real_images(pairs, [row])

    def evaluation_pairs(self, n: int) -> tuple[torch.Tensor, list[str]]:
        """(real images, captions) of the first ``n`` validation pairs cycling in file order: the captions are
        ``evaluation_prompts(n)``, the images their own (e.g. a paired reference set for prompt-set metrics)."""
        rows = [i % len(self.val_pairs) for i in range(n)]
        return self.real_images(self.val_pairs, rows), [self.val_pairs.captions[r] for r in rows]

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self):
        self.setup("fit")
        return self._loader(ImageTextBatches(self, self.train_pairs, self.labels, self.batches_per_epoch, self.seed),
                            True)

    def val_dataloader(self):
        self.setup("validate")
        return self._loader(ImageTextBatches(self, self.val_pairs, self.val_labels, self.val_batches,
                                             10_000 + self.seed), False)
