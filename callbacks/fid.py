"""FID / KID / precision-recall of the student's samples at validation, against a split of the datamodule's images.

Every ``every_n_validations``-th validation (not the sanity check; also under ``trainer.validate``), on rank zero:
a fixed set of noise from ``seed`` (shaped like ``pl_module.teacher.data_shape``, else like the reference images)
and, for a class-conditional student, labels drawn uniformly over its classes, is sampled at each requested NFE
with ``pl_module.sample(noise, cond, nfe)`` and scored with ``lightning_modules.evaluation.image_metrics`` against
``num_reference`` (default ``num_samples``) images of ``trainer.datamodule.split(reference_split)`` (a seeded
subset, the same every time; reference features cached on disk under a key
``{datamodule}-{split}-{H}x{W}-{extractor}``). Logged as ``val/nfe{K}/fid``, ``.../kid_mean``, ``.../kid_std``,
``.../precision``, ``.../recall``; one line is printed per NFE with the protocol (extractor and weights hash,
numbers of samples, reference key, seed); ``last_metrics[nfe]`` keeps the values and the protocol dict.

The default extractor is the fast MNIST classifier (in-loop use); ``extractor="inception"`` gives the standard
Inception-v3 FID (about 8 images/s on one CPU thread at 28/32 -> 299 pixels: for final reports or a GPU).
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback

from lightning_modules.evaluation.image_metrics import EXTRACTORS, format_protocol, image_metrics

LOGGED = ("fid", "kid_mean", "kid_std", "precision", "recall")


class FIDCallback(Callback):
    def __init__(self, num_samples: int = 1000, nfe: list[int] | None = None, extractor: str = "mnist-classifier",
                 reference_split: str = "test", num_reference: int | None = None, every_n_validations: int = 1,
                 seed: int = 2024, cache_dir: str | None = None, weights_path: str | None = None,
                 kid: bool = True, prc: bool = True, sample_batch_size: int = 250, metric_batch_size: int = 250,
                 verbose: bool = True):
        if num_samples < 10:
            raise ValueError(f"num_samples must be >= 10, got {num_samples}")
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be >= 1, got {every_n_validations}")
        if extractor not in EXTRACTORS:
            raise ValueError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")
        self.num_samples, self.nfe, self.extractor, self.reference_split = num_samples, nfe, extractor, reference_split
        self.num_reference, self.every_n_validations, self.seed = num_reference, every_n_validations, seed
        self.cache_dir, self.weights_path = cache_dir, weights_path
        self.kid, self.prc, self.verbose = kid, prc, verbose
        self.sample_batch_size, self.metric_batch_size = sample_batch_size, metric_batch_size
        self.validations = 0
        self.last_metrics: dict[int, dict[str, Any]] = {}
        self._reference: tuple[tuple, torch.Tensor, str] | None = None

    # state: the validation counter resumes with the checkpoint ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    # pieces -----------------------------------------------------------------------------------------------------
    def reference(self, datamodule) -> tuple[torch.Tensor, str]:
        """(reference images in [-1, 1], reference key) from the datamodule's split; a seeded subset, kept."""
        if datamodule is None or not hasattr(datamodule, "split"):
            raise ValueError("FIDCallback needs a datamodule with split(name) -> (images, labels), "
                             "e.g. MNISTDataModule")
        count = self.num_reference or self.num_samples
        token = (id(datamodule), self.reference_split, count)
        if self._reference is None or self._reference[0] != token:
            images = datamodule.split(self.reference_split)[0]
            if count < len(images):
                order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed + 1))
                images = images[order[:count].sort().values]
            height, width = images.shape[-2:]
            key = f"{type(datamodule).__name__}-{self.reference_split}-{height}x{width}-{self.extractor}"
            self._reference = (token, images, key)
        return self._reference[1], self._reference[2]

    def draw_inputs(self, pl_module, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fixed noise (N, *shape) and labels (uniform over the student's classes, or None) of every evaluation."""
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.num_samples, *shape), generator=generator)
        num_classes = int(getattr(getattr(pl_module, "student", None), "num_classes", 0) or 0)
        cond = torch.randint(0, num_classes, (self.num_samples,), generator=generator) if num_classes > 0 else None
        return noise, cond

    def generate(self, pl_module, noise: torch.Tensor, cond: torch.Tensor | None, nfe: int | None) -> torch.Tensor:
        chunks = []
        for start in range(0, len(noise), self.sample_batch_size):
            part = noise[start:start + self.sample_batch_size].to(pl_module.device)
            labels = None if cond is None else cond[start:start + self.sample_batch_size].to(pl_module.device)
            chunks.append(pl_module.sample(part, labels, nfe).detach().float().cpu())
        return torch.cat(chunks)

    def nfe_list(self, pl_module) -> list[int | None]:
        if self.nfe is not None:
            return list(self.nfe)
        eval_nfe = getattr(getattr(pl_module, "hparams", None), "eval_nfe", None)
        return list(eval_nfe) if eval_nfe is not None else [None]

    def evaluate(self, pl_module, datamodule) -> dict[int, dict[str, Any]]:
        reference, key = self.reference(datamodule)
        shape = getattr(getattr(pl_module, "teacher", None), "data_shape", None) or tuple(reference.shape[1:])
        noise, cond = self.draw_inputs(pl_module, tuple(shape))
        results = {}
        for nfe in self.nfe_list(pl_module):
            samples = self.generate(pl_module, noise, cond, nfe)
            if not torch.isfinite(samples).all():  # a diverged student: report NaN rather than stop the run
                results[nfe] = {name: float("nan") for name in LOGGED}
                results[nfe]["protocol"] = {"extractor": self.extractor, "num_samples": self.num_samples,
                                            "reference_key": key, "seed": self.seed, "nfe": nfe,
                                            "non_finite_samples": int((~torch.isfinite(samples)).sum())}
                continue
            metrics = image_metrics(samples, key, reference, extractor=self.extractor, kid=self.kid, prc=self.prc,
                                    cache_dir=self.cache_dir, batch_size=self.metric_batch_size,
                                    weights_path=self.weights_path)
            metrics["protocol"].update(seed=self.seed, nfe=nfe, conditional=cond is not None,
                                       reference_split=self.reference_split)
            results[nfe] = metrics
        return results

    # hook -------------------------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.validations += 1
        if (self.validations - 1) % self.every_n_validations != 0 or not trainer.is_global_zero:
            return
        self.last_metrics = self.evaluate(pl_module, trainer.datamodule)
        for nfe, metrics in self.last_metrics.items():
            tag = f"val/nfe{nfe}" if nfe is not None else "val/nfe_default"
            for name in LOGGED:
                if name in metrics:
                    pl_module.log(f"{tag}/{name}", float(metrics[name]), rank_zero_only=True)
            if self.verbose and "non_finite_samples" in metrics["protocol"]:
                print(f"[step {trainer.global_step}] NFE {nfe}: {metrics['protocol']['non_finite_samples']} "
                      f"non-finite sample values, FID not computed (logged as NaN)", flush=True)
            elif self.verbose:
                extra = "".join(f", {label} {metrics[name]:.3f}" for name, label in
                                [("precision", "precision"), ("recall", "recall")] if name in metrics)
                kid = f", KID {metrics['kid_mean']:.4g}" if "kid_mean" in metrics else ""
                print(f"[step {trainer.global_step}] NFE {nfe}: FID {metrics['fid']:.4g}{kid}{extra} "
                      f"[{format_protocol(metrics['protocol'])}]", flush=True)
