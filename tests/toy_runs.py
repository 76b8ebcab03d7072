"""Build and run a toy experiment exactly as `distill fit -c CONFIG` would, with overrides for short runs."""
from __future__ import annotations

import time

from callbacks import GroundTruthMetrics
from lightning_modules.cli import main

QUIET = ["--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0"]


def build(config: str, *overrides: str, root: str | None = None):
    args = ["-c", config, *QUIET, *overrides]
    if root is not None:
        args += ["--trainer.default_root_dir", root]
    return main(args, run=False)


def fit_and_measure(config: str, *overrides: str, root: str | None = None, num_samples: int = 3000, nfe: int = 1):
    """(metrics after warm start, metrics after fit, seconds of fit) for the student at ``nfe`` steps."""
    cli = build(config, *overrides, root=root)
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    module.setup("fit")  # the warm start, so the 'before' numbers describe the student the method starts from
    metric = GroundTruthMetrics(num_samples=num_samples, nfe=[nfe], num_floor_sets=1, verbose=False)
    before = metric.evaluate(module, datamodule.law)[nfe]
    start = time.time()
    trainer.fit(module, datamodule)
    seconds = time.time() - start
    after = metric.evaluate(module, datamodule.law)[nfe]
    return before, after, seconds
