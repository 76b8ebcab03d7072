"""What ``distill`` adds to LightningCLI so that bad input fails clearly, naming the bad value, and nothing written
is lost. Each item is a case of ``tests/test_fault_catalogue.py``.

* ``check_config_files``: a ``-c`` file that is not valid YAML, or whose top level is not a mapping, fails before
  parsing with the file's path, line and column (jsonargparse reports only ``"<unicode string>", line 2``).
* ``GuardedCLI._parse_ckpt_path`` (an explicit ``--ckpt_path FILE``):
  - the file is read once with ``load_lightning_checkpoint`` (weights_only; errors name the file and what it is);
  - a path that names no file fails at once, not after the trainer has been set up;
  - a checkpoint written by another method fails (``CheckpointMismatchError``). LightningCLI's own
    ``_parse_ckpt_path`` copies the checkpoint's ``hyper_parameters`` over the config -- ``_class_path``
    included -- so ``-c dmd2.yaml --ckpt_path cd.ckpt`` silently trained consistency distillation, and a
    hyperparameter changed on the command line for the resumed run (``--model.init_args.guidance_scale 3``)
    was silently replaced by the checkpoint's. Here the config is what runs; values that differ from the
    checkpoint's are listed in a warning.
* ``GuardedCLI.instantiate_trainer``:
  - the strategy's checkpoint writer becomes ``AtomicCheckpointIO`` (unless one was configured): Lightning's
    default writer copies from a temporary file without fsync, so kill -9 during a save could leave a truncated
    ``last.ckpt`` in place of the good one;
  - ``callbacks.RunGuard`` (``guard_callback``) is added unless the config lists one (unwritable checkpoint folders
    fail before the warm start; a NaN/inf gradient stops the fit before it reaches the weights or a checkpoint);
  - ``val_check_interval`` (an int) larger than the epoch is clamped to the epoch, with a warning: Lightning raises
    ``ValueError`` for it in ``fit_loop.setup_data`` after set-up and the warm start, and the shipped configs' 1000
    made every run shorter than 1000 batches (``--data.init_args.batches_per_epoch 100``) fail.
* ``GuardedCLI._run_subcommand``: torch's ``load_state_dict`` error on resume (a changed ``hidden``, ``depth``, LoRA
  rank...) becomes a ``CheckpointMismatchError`` that also names the checkpoint file.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.utilities import rank_zero_warn

from .checkpoint_io import AtomicCheckpointIO, CheckpointFileError, CheckpointMismatchError, checkpoint_mismatch, \
    load_lightning_checkpoint

__all__ = ["GuardedCLI", "check_config_files"]

#: values of --ckpt_path that Lightning resolves itself (not file names)
SPECIAL_CKPT_PATHS = ("last", "hpc", "best", "registry")


def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg[len("--config="):])
    return paths


def check_config_files(argv: list[str]) -> None:
    """Exit with status 2 and a message naming the file, line and column when a ``-c`` file is not a YAML mapping.
    Missing files are left to jsonargparse ("File does not exist: ..."); non-file values (inline YAML) too."""
    import yaml

    for path in _config_paths(argv):
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                data = yaml.safe_load(handle)
        except UnicodeDecodeError as error:
            bad = error.object[error.start:error.start + 1]
            _usage_error(f"config file {path} is not UTF-8 text (byte {error.start} is {bad!r})")
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            _usage_error(f"config file {path}{where}: invalid YAML ({problem})")
        if data is not None and not isinstance(data, dict):
            _usage_error(f"config file {path} holds a YAML {type(data).__name__}, not a mapping of settings "
                         "(trainer:, model:, data:, ...)")


def _usage_error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def _import(class_path: str):
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _ShortEpochFitLoop(_FitLoop):
    """Lightning's fit loop, except that an int ``val_check_interval`` beyond the epoch validates at the epoch's end."""

    def setup_data(self) -> None:
        try:
            super().setup_data()
        except ValueError as error:
            trainer = self.trainer
            interval = trainer.val_check_interval
            if "val_check_interval" not in str(error) or not isinstance(interval, int) \
                    or not interval > self.max_batches:
                raise
            # Lightning raised at the very end of setup_data (only a log-interval warning follows), so the loop's
            # state is complete; validate once per epoch instead.
            trainer.val_check_batch = int(self.max_batches)
            rank_zero_warn(f"val_check_interval={interval} is more than the {self.max_batches} training batches of an "
                           "epoch: validating at the end of each epoch instead (Lightning stops with a ValueError "
                           "here; set --trainer.check_val_every_n_epoch=null to count batches across epochs)")


class GuardedCLI:
    """Mixin for LightningCLI (``class DistillCLI(GuardedCLI, LightningCLI)``); see the module docstring."""

    _explicit_ckpt: str | None = None
    #: the callback added to every trainer whose config lists none (``callbacks.RunGuard``; set by the command, since
    #: core modules do not import callbacks)
    guard_callback: type | None = None

    def _parse_ckpt_path(self) -> None:
        self._explicit_ckpt = None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or "://" in str(ckpt_path) or str(ckpt_path) in SPECIAL_CKPT_PATHS:
            return
        ckpt_path = str(ckpt_path)
        if not os.path.exists(ckpt_path):
            folder = os.path.dirname(os.path.abspath(ckpt_path))
            others = sorted(f for f in os.listdir(folder) if f.endswith(".ckpt")) if os.path.isdir(folder) else []
            hint = f"; checkpoints in {folder}: {', '.join(others[:8])}" if others else \
                (f"; {folder} holds no .ckpt file" if os.path.isdir(folder) else f"; folder {folder} does not exist")
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file{hint}")
        checkpoint = load_lightning_checkpoint(ckpt_path, resume=True)
        self._explicit_ckpt = ckpt_path
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        self._explicit_hparams = {"hyper_parameters": hparams}
        del checkpoint
        model = self.config[subcommand].get("model")
        written, configured = hparams.get("_class_path"), getattr(model, "class_path", None)
        if written and configured and _import(written) is not _import(configured):
            raise CheckpointMismatchError(
                f"checkpoint {ckpt_path} was written by {written}, but the config trains {configured}; resume with "
                "the config of the run that wrote it (config.yaml in its run folder)")
        init_args = _plain(getattr(model, "init_args", None) or {})
        changed = [f"{key}={init_args[key]!r} (checkpoint: {value!r})" for key, value in sorted(hparams.items())
                   if not key.startswith("_") and key in init_args and _plain(value) != init_args[key]]
        if changed:
            rank_zero_warn(f"--ckpt_path {ckpt_path}: the config's {', '.join(changed)}; the config's values are used")
        # Deliberately no super()._parse_ckpt_path(): it would copy the checkpoint's hyperparameters over the config.

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        strategy = trainer.strategy
        if type(getattr(strategy, "_checkpoint_io", None) or TorchCheckpointIO()) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        guard = self.guard_callback
        if guard is not None and not any(isinstance(c, guard) for c in trainer.callbacks):
            # before the checkpoint callbacks (Lightning keeps those last), so a bad step stops before they save
            first = next((i for i, c in enumerate(trainer.callbacks) if c in trainer.checkpoint_callbacks),
                         len(trainer.callbacks))
            trainer.callbacks.insert(first, guard())
        old = trainer.fit_loop
        if type(old) is _FitLoop:
            loop = _ShortEpochFitLoop(trainer, min_epochs=old.min_epochs, max_epochs=old.max_epochs)
            loop.epoch_loop = old.epoch_loop
            trainer.fit_loop = loop
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as error:
            path = self._explicit_ckpt or getattr(self.trainer, "ckpt_path", None)
            if path and "Error(s) in loading state_dict" in str(error) and not isinstance(error, CheckpointFileError):
                raise checkpoint_mismatch(path, error, self.model, getattr(self, "_explicit_hparams", None)) \
                    from error
            raise
