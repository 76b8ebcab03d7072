"""The ``distill`` command: Lightning's CLI over every method, datamodule and callback.

    distill fit -c experiments/toy/ring8/dmd2.yaml [--model.init_args.guidance_scale 2 ...]
    distill validate -c experiments/toy/ring8/dmd2.yaml --ckpt_path PATH
    distill fit -c CONFIG --print_config

Configs are parsed in OmegaConf mode, so ``${...}`` interpolation works inside YAML files.
"""
from __future__ import annotations

import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

# Importing registers the classes so configs can name them by short class name (``class_path: DMD2``).
import callbacks  # noqa: F401
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401


class DistillCLI(LightningCLI):
    """LightningCLI with the framework's defaults (TensorBoard logger, resolved config saved per run)."""


def main(args: list[str] | None = None, run: bool = True) -> DistillCLI:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return DistillCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True}, args=args, run=run,
        seed_everything_default=0, auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
