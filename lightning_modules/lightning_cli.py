"""The LightningCLI over every method, datamodule and callback, as a function the commands share.

``lightning_modules.cli`` (the ``distill`` command), ``sweep`` (one fit per Slurm task) and ``pairs_command`` build
their runs here, so none of them imports another command (imports run one way: core <- datamodules <- methods <- CLI).
Configs are parsed in OmegaConf mode, so ``${...}`` interpolation works inside YAML files and across overrides.
"""
from __future__ import annotations

import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

# Importing registers the classes so configs can name them by short class name (``class_path: DMD2``).
import callbacks  # noqa: F401
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
from callbacks.run_guard import RunGuard
from lightning_modules.cli_guards import GuardedCLI, check_config_files


class DistillCLI(GuardedCLI, LightningCLI):
    """LightningCLI with the framework's defaults (TensorBoard logger, resolved config saved per run) and the guards
    of ``lightning_modules.cli_guards``: explicit ``--ckpt_path`` files checked (damaged, foreign, pickled objects,
    another method) and the config's values kept over the checkpoint's; atomic checkpoint writes; RunGuard (NaN/inf
    stops the fit before it reaches a checkpoint, unwritable checkpoint folders fail before training); an int
    val_check_interval beyond the epoch clamped to it."""

    guard_callback = RunGuard


def build_cli(args: list[str] | None, run: bool) -> DistillCLI:
    """``args`` as after ``distill`` (e.g. ``["fit", "-c", CONFIG]``; with ``run=False`` no subcommand)."""
    # "omegaconf+" resolves ${...} after the command line is merged, so one override (``--data.init_args.law ...``)
    # reaches every interpolation of it (the teacher's law, the metrics'); configs write their interpolations
    # absolute from the config's root (``${data.init_args.law}``), which this setting keeps valid under subcommands.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    check_config_files(sys.argv[1:] if args is None else list(args))  # YAML errors name the file (jsonargparse's don't)
    return DistillCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True}, args=args, run=run,
        seed_everything_default=0, auto_configure_optimizers=False,
    )
