"""The LightningCLI over every method, datamodule and callback, as a function the commands share.

``lightning_modules.cli`` (the ``distill`` command), ``sweep`` (one fit per Slurm task) and ``pairs_command`` build
their runs here, so none of them imports another command (imports run one way: core <- datamodules <- methods <- CLI).
Configs are parsed in OmegaConf mode, so ``${...}`` interpolation works inside YAML files and across overrides.
"""
from __future__ import annotations

import os

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

# Importing registers the classes so configs can name them by short class name (``class_path: DMD2``).
import callbacks  # noqa: F401
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401


class DistillCLI(LightningCLI):
    """LightningCLI with the framework's defaults (TensorBoard logger, resolved config saved per run)."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI torch.loads an explicit --ckpt_path for its hyperparameters before the trainer's checkpoint
        # reader runs; check the file first so a damaged one gets the error that names it and its good neighbours.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and "://" not in str(ckpt_path) and os.path.isfile(ckpt_path):
            from lightning_modules.checkpoint_io import check_checkpoint_file
            check_checkpoint_file(ckpt_path)
        super()._parse_ckpt_path()


def build_cli(args: list[str] | None, run: bool) -> DistillCLI:
    """``args`` as after ``distill`` (e.g. ``["fit", "-c", CONFIG]``; with ``run=False`` no subcommand)."""
    # "omegaconf+" resolves ${...} after the command line is merged, so one override (``--data.init_args.law ...``)
    # reaches every interpolation of it (the teacher's law, the metrics'); configs write their interpolations
    # absolute from the config's root (``${data.init_args.law}``), which this setting keeps valid under subcommands.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return DistillCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True}, args=args, run=run,
        seed_everything_default=0, auto_configure_optimizers=False,
    )
