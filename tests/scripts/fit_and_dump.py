"""Fit a config and dump every rank's final training state (for the DDP and resume tests).

    python tests/scripts/fit_and_dump.py OUT_DIR [--ckpt_path PATH] -c CONFIG [overrides...]
Lightning's DDP launcher re-runs this script for rank 1, so all work happens in the script body.
"""
import os
import sys

import torch
from lightning.pytorch import Callback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lightning_modules.cli import main  # noqa: E402


class DumpState(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        state = {"module": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                 "callbacks": {type(c).__name__: c.state_dict() for c in trainer.callbacks
                               if type(c).__name__ in ("StudentEMA", "TwoTimeScaleUpdate")},
                 "optimizers": [o.state_dict() for o in trainer.optimizers],
                 "global_step": trainer.global_step, "world_size": trainer.world_size}
        torch.save(state, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, args = sys.argv[1], sys.argv[2:]
    ckpt_path = None
    if args[:1] == ["--ckpt_path"]:
        ckpt_path, args = args[1], args[2:]
    os.makedirs(out_dir, exist_ok=True)
    cli = main(args, run=False)
    cli.trainer.callbacks.append(DumpState(out_dir))
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
