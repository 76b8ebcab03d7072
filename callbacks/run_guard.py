"""Stop a fit at the first sign of a bad run, before it can overwrite a good checkpoint.

``distill fit`` adds this callback to every run whose config does not list it (see ``lightning_modules.cli_guards``):

* before the warm start and the first step (``setup``), every folder the fit will write checkpoints to must be
  writable -- otherwise Lightning fails only at the first save, when the run's work so far is lost;
* before each optimizer step (``on_before_optimizer_step``, after backward -- the gradients of that step), a NaN or
  infinite gradient stops the fit with ``NonFiniteTrainingError`` naming the step, the parameter and the losses last
  logged. Nothing has been applied yet, so the weights in memory and every checkpoint written so far are finite.
  Lightning itself trains on through NaN losses (``detect_anomaly`` only finds them in the autograd graph, at a large
  cost); a manual-optimization step would otherwise write NaN into the weights and the next ``last.ckpt`` over the
  last good one. Skipped under fp16 loss scaling, whose GradScaler expects and skips inf steps itself;
* when a checkpoint is about to be written (``on_save_checkpoint``), non-finite weights refuse the save, so the
  previous checkpoint of that name stays.

One scalar per optimizer step leaves the device (and one all-reduce of it under a sharded strategy); set
``check_every_n_steps`` higher to check less often, or list ``callbacks.RunGuard`` with ``check_finite: false``.
"""
from __future__ import annotations

import errno
import os
import uuid

import torch
from torch.nn.utils import get_total_norm
from lightning.pytorch import Callback

__all__ = ["NonFiniteTrainingError", "RunGuard"]


class NonFiniteTrainingError(FloatingPointError):
    """A NaN or infinite gradient or weight: the fit was stopped before it was applied or saved."""


def check_writable_folder(folder: str, what: str) -> None:
    """Create ``folder`` if needed and write (then remove) a probe file in it; an OSError naming ``folder`` and
    ``what`` writes there otherwise. ``os.access`` is not enough: it says yes to root for a read-only mode."""
    if not folder or "://" in str(folder):
        return
    folder = os.path.abspath(os.fspath(folder))
    probe = os.path.join(folder, f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"ok")
        os.remove(probe)
    except OSError as error:
        code = error.errno if error.errno is not None else errno.EIO
        raise type(error)(code, f"{what} {folder} cannot be written ({error.strerror or error}); nothing has been "
                                "trained yet -- choose another folder (e.g. --trainer.default_root_dir)") from error


class RunGuard(Callback):
    """check_finite: stop at the first non-finite gradient and refuse to save non-finite weights.
    check_every_n_steps: check the gradients of every n-th optimizer step (1: all).
    check_folders: check at setup that the checkpoint folders can be written."""

    def __init__(self, check_finite: bool = True, check_every_n_steps: int = 1, check_folders: bool = True):
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_finite, self.check_every_n_steps, self.check_folders = \
            check_finite, check_every_n_steps, check_folders
        self._optimizer_steps = 0

    # ------------------------------------------------------------------ folders
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not self.check_folders:
            return
        folders = {}
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                folders.setdefault(callback.dirpath, f"the checkpoint folder of {type(callback).__name__} (dirpath)")
        if trainer.checkpoint_callbacks or any(type(c).__name__ == "PreemptionCheckpoint" for c in trainer.callbacks):
            folders.setdefault(trainer.default_root_dir, "the run folder (trainer.default_root_dir)")
        for folder, what in folders.items():
            check_writable_folder(folder, what)

    # ------------------------------------------------------------------ gradients
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.check_finite or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        self._optimizer_steps += 1
        if (self._optimizer_steps - 1) % self.check_every_n_steps:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = not _all_finite([p.grad for p in params])
        if trainer.world_size > 1:  # sharded gradients differ per rank: every rank must stop together
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        names = {id(p): n for n, p in pl_module.named_parameters()}
        first = next((p for p in params if not _all_finite([p.grad])), None)
        where = (f"parameter {names.get(id(first), '?')!r} has {int((~torch.isfinite(first.grad)).sum())} NaN/inf "
                 f"gradient values") if first is not None else "another rank saw a NaN/inf gradient"
        index = next((i for i, o in enumerate(trainer.optimizers) if o is getattr(optimizer, "optimizer", optimizer)),
                     None)
        raise NonFiniteTrainingError(
            f"non-finite gradient at global step {trainer.global_step} (epoch {trainer.current_epoch}, optimizer "
            f"{index}): {where}; losses logged at the previous step: {_logged_losses(trainer)}. The fit was stopped "
            "before this update, so the weights and the checkpoints written so far are finite"
            f"{_last_checkpoint(trainer)}. "
            "Usual causes: a learning rate too high, no gradient clipping, fp16 overflow, NaN in the data.")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if not self.check_finite:
            return
        for key, value in checkpoint.get("state_dict", {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not _all_finite([value]):
                raise NonFiniteTrainingError(
                    f"refusing to write a checkpoint at global step {trainer.global_step}: {key!r} holds NaN/inf "
                    f"values; the checkpoints already written are unchanged{_last_checkpoint(trainer)}")


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    # the max-abs norm: NaN and inf propagate, and finite fp16 values cannot overflow it (torch's own foreach pass)
    return not tensors or bool(torch.isfinite(get_total_norm(tensors, float("inf"))))


def _logged_losses(trainer) -> str:
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if "loss" in k and torch.is_tensor(v)
              and v.numel() == 1}
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(losses.items())) or "none yet"


def _last_checkpoint(trainer) -> str:
    paths = [getattr(c, "last_model_path", "") or getattr(c, "best_model_path", "")
             for c in trainer.checkpoint_callbacks]
    paths = [p for p in paths if p]
    return f" (the last one: {paths[0]})" if paths else ""
