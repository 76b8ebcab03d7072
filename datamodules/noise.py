"""Data-free regime: batches of Gaussian noise and condition labels, nothing else.

Each batch is generated from its own seed (seed, index), so a run is reproducible, a resumed run sees the same
batches, and Lightning's distributed sampler hands different batches to different ranks without any coordination.
"""
from __future__ import annotations

from typing import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from .resumable import ResumableDataLoader


class NoiseBatches(Dataset):
    """Map-style dataset whose item ``i`` is a whole batch {"noise", "cond"} drawn from generator seed (seed, i)."""

    def __init__(self, shape: Sequence[int], batch_size: int, num_batches: int, num_classes: int = 0,
                 class_weights: Sequence[float] | None = None, seed: int = 0, extra=None):
        self.shape, self.batch_size, self.num_batches = tuple(shape), batch_size, num_batches
        self.num_classes, self.seed, self.extra = num_classes, seed, extra
        self.class_weights = (torch.as_tensor(class_weights, dtype=torch.float64) if class_weights is not None
                              else torch.ones(max(num_classes, 1), dtype=torch.float64))

    def __len__(self):
        return self.num_batches

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        batch = {"noise": torch.randn((self.batch_size, *self.shape), generator=generator)}
        if self.num_classes > 0:
            batch["cond"] = torch.multinomial(self.class_weights, self.batch_size, replacement=True, generator=generator)
        if self.extra is not None:
            batch.update(self.extra(self.batch_size, generator))
        return batch


class NoiseDataModule(LightningDataModule):
    """``shape``: one latent's shape (e.g. [2] or [3, 32, 32]); ``num_classes`` > 0 adds uniform (or
    ``class_weights``-weighted) class labels as the condition."""
    provides_real_data = False  # noise only: methods with a real-data term refuse it before training

    def __init__(self, shape: Sequence[int], batch_size: int = 256, batches_per_epoch: int = 1000,
                 val_batches: int = 4, num_classes: int = 0, class_weights: Sequence[float] | None = None,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        if any(int(s) < 1 for s in shape) or len(shape) == 0:
            raise ValueError(f"shape must be a non-empty list of positive sizes, got {list(shape)}")
        for name, value in [("batch_size", batch_size), ("batches_per_epoch", batches_per_epoch),
                            ("val_batches", val_batches)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} entries but num_classes={num_classes}")
        self.shape, self.batch_size = tuple(int(s) for s in shape), batch_size
        self.batches_per_epoch, self.val_batches = batches_per_epoch, val_batches
        self.num_classes, self.class_weights, self.seed, self.num_workers = num_classes, class_weights, seed, num_workers

    def _extra(self):
        return None

    def _dataset(self, num_batches: int, seed: int) -> NoiseBatches:
        return NoiseBatches(self.shape, self.batch_size, num_batches, self.num_classes, self.class_weights, seed,
                            self._extra())

    def _loader(self, dataset, shuffle: bool, resumable: bool = False):
        # batch_size=None: each item already is a batch
        kwargs = {"progress_source": self} if resumable else {}  # mid-epoch resume at the exact batch
        return (ResumableDataLoader if resumable else DataLoader)(
            dataset, batch_size=None, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self):
        return self._loader(self._dataset(self.batches_per_epoch, self.seed), shuffle=False, resumable=True)

    def val_dataloader(self):
        # a fixed validation stream, independent of the training seed
        return self._loader(self._dataset(self.val_batches, 10_000 + self.seed), shuffle=False)
