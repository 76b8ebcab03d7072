"""Fit a config under any strategy and dump rank 0's final state (for tests/test_strategies.py).

    python tests/scripts/strategy_fit.py OUT_DIR [--metrics N] -c CONFIG [overrides...]
Writes OUT_DIR/result.pt: the module's full state dict (gathered under FSDP), the EMA average, ground-truth metrics
of the student and of its EMA at one step (N exact-law samples, default 4000), world size, global step, seconds.
Lightning's launcher re-runs this script for the other ranks, so all work happens in the script body.
"""
import os
import sys
import time

import torch
from lightning.pytorch import Callback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from callbacks import GroundTruthMetrics, StudentEMA  # noqa: E402
from lightning_modules.cli import main  # noqa: E402
from lightning_modules.strategies import full_parameters  # noqa: E402


class Dump(Callback):
    def __init__(self, out_dir, num_samples):
        self.out_dir, self.num_samples = out_dir, num_samples

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        seconds = time.perf_counter() - self.start
        law = GroundTruthMetrics.law_of(trainer, pl_module)
        metric = GroundTruthMetrics(num_samples=self.num_samples, nfe=[1], num_floor_sets=1, verbose=False)
        ema = next((c for c in trainer.callbacks if isinstance(c, StudentEMA)), None)
        generator = torch.Generator().manual_seed(metric.seed)
        noise = torch.randn((self.num_samples, law.dim), generator=generator).to(pl_module.device)
        with full_parameters(pl_module.student) as student:  # collective under FSDP: every rank enters
            was_training = student.training
            student.eval()
            with torch.no_grad():
                samples = pl_module.generate(noise, None, 1, network=student).double().cpu()
            student.train(was_training)
        from lightning_modules.evaluation.sample_metrics import ground_truth_metrics
        student_metrics = ground_truth_metrics(samples, law, generator=torch.Generator().manual_seed(metric.seed + 1),
                                               num_floor_sets=1)
        ema_metrics = metric.evaluate(pl_module, law)[1] if ema is not None else None
        state = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            torch.save({"module": {k: v.detach().cpu().clone() for k, v in state.items()},
                        "ema": None if ema is None else {k: v.detach().cpu().clone()
                                                         for k, v in ema.average.state_dict().items()},
                        "student_metrics": student_metrics, "ema_metrics": ema_metrics,
                        "global_step": trainer.global_step, "world_size": trainer.world_size,
                        "strategy": type(trainer.strategy).__name__, "seconds": seconds},
                       os.path.join(self.out_dir, "result.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, args = sys.argv[1], sys.argv[2:]
    num_samples = 4000
    if args[:1] == ["--metrics"]:
        num_samples, args = int(args[1]), args[2:]
    os.makedirs(out_dir, exist_ok=True)
    cli = main(args, run=False)
    cli.trainer.callbacks.append(Dump(out_dir, num_samples))
    cli.trainer.fit(cli.model, cli.datamodule)
