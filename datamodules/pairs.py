"""Datamodules whose batches also carry precomputed teacher ODE pairs (for DMD's regression term, KD, reflow).

Each batch gets ``pair_noise`` (P, *shape), ``pair_target`` (P, *shape) and, for conditional pair files,
``pair_cond`` (P,), drawn with replacement from the file (``lightning_modules.trajectory_pairs``) by the same seeded
generator that draws the rest of the batch, so a run, a resumed run and every DDP rank see reproducible pairs and the
batch's other keys are exactly those of the parent datamodule.

    ToyMixturePairsDataModule  -- ToyMixtureDataModule + pairs (P = pair_batch_size, default batch_size)
    MNISTPairsDataModule       -- MNISTDataModule + one pair per item (P = batch_size)

The file is read in ``setup`` (never at construction, so configs instantiate without it) and checked: a missing or
unreadable file, a sample shape other than the data's, or pairs from another teacher (class, schedule, guidance
scale, law, weights fingerprint) raise an error naming the file and the offending value. ``generate`` (a dict with
``num_pairs``, ``nfe``, ``sampler``, ``seed``, optional ``batch_size``) makes the file from the fitted model's teacher
when it is missing -- cheap for the exact toy teachers -- and then also requires the stored settings to equal it.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lightning_modules.trajectory_pairs import (TeacherPairs, _condition_law, check_same_teacher, generate_pairs,
                                                load_pairs)

from .images import MNISTDataModule
from .toy import ToyMixtureDataModule

GENERATE_KEYS = {"num_pairs", "nfe", "sampler", "seed", "batch_size"}
CHECKED_SETTINGS = {"num_pairs": int, "nfe": int, "sampler": str, "seed": int}


class TeacherPairsMixin:
    """Loading, checking and (optionally) generating the pair file; subclasses put pairs into their batches."""

    def _init_pairs(self, pairs_path: str, generate: dict | None) -> None:
        if not pairs_path:
            raise ValueError(f"pairs_path must name a teacher-pairs file, got {pairs_path!r}")
        if generate is not None:
            unknown = set(generate) - GENERATE_KEYS
            if unknown or "num_pairs" not in generate:
                raise ValueError(f"generate needs num_pairs and only keys {sorted(GENERATE_KEYS)}, "
                                 f"got {dict(generate)}")
        self.pairs_path, self.generate = pairs_path, None if generate is None else dict(generate)
        self.pairs: TeacherPairs | None = None

    def _model(self):
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else trainer.lightning_module

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.pairs is None:
            self.pairs = self.load_checked_pairs(self._model())

    def load_checked_pairs(self, module=None) -> TeacherPairs:
        import os
        if not os.path.isfile(self.pairs_path) and self.generate is not None:
            if module is None:
                raise ValueError(f"teacher pairs {self.pairs_path!r} are missing and generating them needs the model: "
                                 "run through Trainer.fit or `distill pairs`")
            settings = {k: v for k, v in self.generate.items()}
            num_classes, class_weights = _condition_law(self)
            generate_pairs(module, self.pairs_path, num_classes=num_classes, class_weights=class_weights,
                           shape=self.pairs_shape(), **settings)
        pairs = load_pairs(self.pairs_path)
        expected = tuple(self.pairs_shape())
        if pairs.shape != expected:
            raise ValueError(f"teacher pairs {pairs.path!r} hold samples of shape {list(pairs.shape)}, but this "
                             f"datamodule's (and teacher's) samples have shape {list(expected)}")
        if self.generate is not None:
            for key, kind in CHECKED_SETTINGS.items():
                if key in self.generate and kind(pairs.metadata[key]) != kind(self.generate[key]):
                    raise ValueError(f"teacher pairs {pairs.path!r} were generated with {key}={pairs.metadata[key]}, "
                                     f"but generate asks for {key}={self.generate[key]}; delete the file to regenerate")
        num_classes, _ = _condition_law(self)
        if num_classes > 0 and pairs.cond is None:
            raise ValueError(f"teacher pairs {pairs.path!r} are unconditional, but this datamodule is conditional")
        if num_classes == 0 and pairs.cond is not None:
            raise ValueError(f"teacher pairs {pairs.path!r} are conditional, but this datamodule is unconditional")
        if pairs.cond is not None and (pairs.cond.min() < 0 or pairs.cond.max() >= num_classes):
            raise ValueError(f"teacher pairs {pairs.path!r} hold labels in [{pairs.cond.min()}, {pairs.cond.max()}], "
                             f"outside the datamodule's {num_classes} classes")
        if module is not None and getattr(module, "teacher", None) is not None:
            check_same_teacher(pairs, module)
        return pairs

    def pairs_shape(self) -> tuple[int, ...]:
        return tuple(self.shape)

    def _require_pairs(self) -> TeacherPairs:
        if self.pairs is None:  # dataloaders requested without setup (e.g. a direct call in a script)
            self.pairs = self.load_checked_pairs(self._model())
        return self.pairs


def draw_pairs(pairs: TeacherPairs, count: int, generator: torch.Generator) -> dict:
    """``count`` pairs drawn uniformly with replacement by ``generator``."""
    index = torch.randint(0, len(pairs), (count,), generator=generator)
    batch = {"pair_noise": pairs.noise[index], "pair_target": pairs.target[index]}
    if pairs.cond is not None:
        batch["pair_cond"] = pairs.cond[index]
    return batch


class ToyMixturePairsDataModule(TeacherPairsMixin, ToyMixtureDataModule):
    """``ToyMixtureDataModule`` whose batches add ``pair_batch_size`` (default ``batch_size``) teacher pairs."""

    def __init__(self, pairs_path: str, law: str = "ring8", batch_size: int = 256, batches_per_epoch: int = 1000,
                 val_batches: int = 4, conditional: bool = False, seed: int = 0, num_workers: int = 0,
                 pair_batch_size: int | None = None, generate: dict | None = None):
        super().__init__(law=law, batch_size=batch_size, batches_per_epoch=batches_per_epoch, val_batches=val_batches,
                         conditional=conditional, seed=seed, num_workers=num_workers)
        if pair_batch_size is not None and pair_batch_size < 1:
            raise ValueError(f"pair_batch_size must be >= 1, got {pair_batch_size}")
        self.pair_batch_size = pair_batch_size or batch_size
        self._init_pairs(pairs_path, generate)

    def _extra(self):
        parent = super()._extra()
        pairs, count = self._require_pairs(), self.pair_batch_size

        def real_samples_and_pairs(batch_size, generator):
            extra = parent(batch_size, generator) if parent is not None else {}
            extra.update(draw_pairs(pairs, count, generator))  # drawn after the parent's, which stay unchanged
            return extra
        return real_samples_and_pairs


class PairedItems(Dataset):
    """Adds one pair to each item of ``base``; item i's pair index comes from generator seed (seed, i)."""

    def __init__(self, base: Dataset, pairs: TeacherPairs, seed: int):
        self.base, self.pairs, self.seed = base, pairs, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        item = dict(self.base[index])
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 500_009 + int(index))
        drawn = draw_pairs(self.pairs, 1, generator)
        item.update({key: value[0] for key, value in drawn.items()})
        return item


class MNISTPairsDataModule(TeacherPairsMixin, MNISTDataModule):
    """``MNISTDataModule`` whose items add one teacher pair each (so ``batch_size`` pairs per batch)."""

    def __init__(self, pairs_path: str, batch_size: int = 64, conditional: bool = True, pad_to: int | None = None,
                 seed: int = 0, num_workers: int = 0, train_split: str = "train", val_split: str = "val",
                 max_val_images: int | None = 1024, path: str | None = None, generate: dict | None = None):
        super().__init__(batch_size=batch_size, conditional=conditional, pad_to=pad_to, seed=seed,
                         num_workers=num_workers, train_split=train_split, val_split=val_split,
                         max_val_images=max_val_images, path=path)
        self._init_pairs(pairs_path, generate)

    def dataset(self, split, seed_offset=0, limit=None):
        return PairedItems(super().dataset(split, seed_offset, limit), self._require_pairs(), self.seed + seed_offset)
