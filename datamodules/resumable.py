"""A DataLoader that resumes mid-epoch exactly where the trainer stopped (Lightning's stateful-loader protocol).

Lightning saves ``state_dict()`` of every training loader that has one in each checkpoint and hands it back through
``load_state_dict()`` before the resumed fit iterates; without it a fit resumed mid-epoch would start the epoch's data
over. Two things make the position exact:

- the count is what the *trainer* has processed in this epoch (its batch progress, read from ``progress_source``'s
  trainer), not what the loader has yielded -- Lightning prefetches one batch ahead, so the loader is always one
  batch past the checkpoint;
- the shuffling generator's state as it was when the epoch's iterator was created is saved with the count, so the
  resumed epoch draws the same permutation (DataLoader(generator=...), RandomSampler); a DistributedSampler derives
  its order from (seed, epoch) and needs nothing.

On resume the first ``count`` indices of the (possibly distributed) sampler are skipped without loading them, and
creating the resumed iterator leaves the global RNG untouched (the interrupted run drew from it when the epoch began,
before its checkpoint captured the RNG states).
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch.utils.data import DataLoader

__all__ = ["ResumableDataLoader"]


class _SkipOnce:
    """An index sampler whose first iteration skips ``skip`` entries; later iterations (persistent workers' next
    epochs) see the full sampler. ``len`` stays the full length (Lightning counts the skipped batches itself)."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        skip, self.skip = self.skip, 0
        iterator = iter(self.sampler)
        return itertools.islice(iterator, skip, None) if skip else iterator

    def __len__(self):
        return len(self.sampler)


class ResumableDataLoader(DataLoader):
    """``DataLoader`` plus ``state_dict`` / ``load_state_dict``.

    progress_source: an object with a ``trainer`` attribute (the LightningDataModule that builds the loader); the
        position saved is that trainer's count of training batches processed in the current epoch. Without one the
        loader counts the batches it has yielded (exact when nothing prefetches)."""

    _pending_skip = 0
    _pending_generator_state = None
    _creating_iterator = False
    _epoch_generator_state = None
    _yielded = 0

    def __init__(self, *args: Any, progress_source: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.progress_source = progress_source

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        if self._pending_generator_state is not None and self.generator is not None:
            self.generator.set_state(self._pending_generator_state)
        self._pending_generator_state = None
        self._epoch_generator_state = None if self.generator is None else self.generator.get_state().clone()
        self._yielded = self._pending_skip
        resuming_mid_epoch = self._pending_skip > 0
        # Creating an iterator draws a base seed from the global RNG (DataLoader without a generator). The
        # interrupted run drew it when the epoch began, before its checkpoint saved the RNG states; the resumed
        # run must not draw it again, or every later random number shifts by one.
        global_state = torch.get_rng_state() if resuming_mid_epoch else None
        self._creating_iterator = True
        try:
            iterator = super().__iter__()
        finally:
            self._creating_iterator = False
            if global_state is not None:
                torch.set_rng_state(global_state)
        return _Counting(iterator, self)

    @property
    def _index_sampler(self):
        sampler = super()._index_sampler
        if self._creating_iterator and self._pending_skip:
            sampler, self._pending_skip = _SkipOnce(sampler, self._pending_skip), 0
        return sampler

    # ------------------------------------------------------------------ Lightning's stateful-loader protocol
    def _processed(self) -> int:
        trainer = getattr(self.progress_source, "trainer", None) if self.progress_source is not None else None
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if loop is not None:
            return int(loop.batch_progress.current.processed)
        return self._yielded

    def state_dict(self) -> dict[str, Any]:
        done = self._processed()
        try:
            length = len(self)
        except TypeError:
            length = None
        epoch_finished = length is not None and done >= length
        generator_state = None
        if self.generator is not None:
            # a finished epoch resumes into the next one: the generator as it is now; else as the epoch began
            state = self.generator.get_state() if epoch_finished or self._epoch_generator_state is None \
                else self._epoch_generator_state
            generator_state = state.clone()
        return {"batches_done": 0 if epoch_finished else done, "generator_state": generator_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_skip = int(state_dict.get("batches_done", 0))
        state = state_dict.get("generator_state")
        self._pending_generator_state = None if state is None else torch.as_tensor(state, dtype=torch.uint8)


class _Counting:
    """Iterator wrapper counting yielded batches (the fallback position when no trainer is attached)."""

    def __init__(self, iterator, loader: ResumableDataLoader):
        self.iterator, self.loader = iterator, loader

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterator)
        self.loader._yielded += 1
        return item

    def __len__(self):
        return len(self.iterator)

    def __getattr__(self, name):
        return getattr(self.iterator, name)
