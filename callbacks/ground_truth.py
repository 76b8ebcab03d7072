"""Ground-truth metrics at validation for data with an exact law (the toy suite): the student's samples at each
requested NFE are scored against the true mixture (sliced W2 against several exact reference sets, MMD, mode coverage
and weights, per-mode KL, off-manifold mass, k-NN precision/recall, with finite-sample floors and their spread).
Logged as ``val/nfe{K}/{metric}`` (the per-reference SW2 floors, kept only for reuse, are not logged); the latest
values are kept in ``last_metrics`` for benchmarks. With ``teacher_steps`` = m > 0 the samples come from diversity
distillation's hybrid sampler (the teacher's ODE for the first m steps of the student's grid, the student after;
``samplers.hybrid_sample``) and are logged as ``val/hybrid{m}/nfe{K}/{metric}``: add one instance per m next to the
plain one to read the diversity (recall, mode coverage) bought per teacher evaluation."""
from __future__ import annotations

import torch
from lightning.pytorch import Callback

from lightning_modules.evaluation.sample_metrics import PER_REFERENCE_FLOOR_PREFIX, ground_truth_metrics


class GroundTruthMetrics(Callback):
    def __init__(self, num_samples: int = 5000, nfe: list[int] | None = None, seed: int = 4321,
                 num_floor_sets: int = 3, verbose: bool = True, num_reference_sets: int = 4,
                 teacher_steps: int = 0, teacher_method: str = "heun"):
        if num_samples < 10:
            raise ValueError(f"num_samples must be >= 10, got {num_samples}")
        if teacher_steps < 0:
            raise ValueError(f"teacher_steps must be >= 0, got {teacher_steps}")
        self.teacher_steps, self.teacher_method = teacher_steps, teacher_method
        self.num_samples, self.nfe, self.seed, self.num_floor_sets = num_samples, nfe, seed, num_floor_sets
        self.num_reference_sets = num_reference_sets
        self.verbose = verbose
        self.last_metrics: dict[int, dict[str, float]] = {}

    @staticmethod
    def law_of(trainer, pl_module):
        law = getattr(trainer.datamodule, "law", None) if trainer.datamodule is not None else None
        law = law if law is not None else getattr(pl_module.teacher, "law", None)
        if law is None:
            raise ValueError("GroundTruthMetrics needs a datamodule or teacher with an exact law (toy mixtures)")
        return law

    def evaluate(self, pl_module, law) -> dict[int, dict[str, float]]:
        results = {}
        for nfe in self.nfe or list(pl_module.hparams.eval_nfe):
            generator = torch.Generator().manual_seed(self.seed)
            noise = torch.randn((self.num_samples, law.dim), generator=generator).to(pl_module.device)
            cond = None
            if getattr(pl_module.student, "num_classes", 0):
                cond = torch.multinomial(law.class_weights(), self.num_samples, replacement=True,
                                         generator=generator).to(pl_module.device)
            hybrid = {"teacher_steps": self.teacher_steps, "teacher_method": self.teacher_method} \
                if self.teacher_steps else {}  # a teacher's own sample() (teacher training) has no hybrid
            samples = pl_module.sample(noise, cond, nfe, **hybrid).double().cpu()
            results[nfe] = ground_truth_metrics(samples, law, generator=torch.Generator().manual_seed(self.seed + 1),
                                                num_floor_sets=self.num_floor_sets,
                                                num_reference_sets=self.num_reference_sets)
        return results

    @staticmethod
    def summary(metrics: dict[str, float]) -> str:
        """One line: SW2 with its floor and the ratio's spread over reference sets, mode statistics, off-manifold mass
        next to what exact samples score."""
        return (f"sliced W2 {metrics['sliced_w2']:.4f} (floor {metrics['sliced_w2_floor']:.4f}, ratio "
                f"{metrics['sliced_w2_ratio']:.2f} +- {metrics['sliced_w2_ratio_std']:.2f}), mode-weight TV "
                f"{metrics['mode_weight_tv']:.4f}, modes {metrics['modes_covered']:.0f}/{metrics['num_modes']:.0f}, "
                f"per-mode KL {metrics['per_mode_kl']:.3f}, off-manifold {100 * metrics['off_manifold']:.2f}% "
                f"(exact {100 * metrics['off_manifold_exact']:.2f}%), recall {metrics['recall']:.3f}")

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.last_metrics = self.evaluate(pl_module, self.law_of(trainer, pl_module))
        prefix = f"val/hybrid{self.teacher_steps}" if self.teacher_steps else "val"
        for nfe, metrics in self.last_metrics.items():
            for key, value in metrics.items():
                if not key.startswith(PER_REFERENCE_FLOOR_PREFIX):
                    pl_module.log(f"{prefix}/nfe{nfe}/{key}", float(value), rank_zero_only=True)
            if self.verbose and trainer.is_global_zero:
                sampler = f"hybrid ({self.teacher_steps} teacher steps) " if self.teacher_steps else ""
                print(f"[step {trainer.global_step}] {sampler}NFE {nfe}: {self.summary(metrics)}", flush=True)
