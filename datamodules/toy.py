"""Toy regime: a Gaussian mixture with its exact law. Batches carry noise, conditions and exact data samples
("real", for methods that need data such as consistency distillation, GAN terms or teacher training).

``law`` is a registered name (``ring8``, ``grid25``, ``aniso``, ``digits64``) or a mapping -- weights, means and
covariances in any dimension (``lightning_modules.networks.mixture_law.mixture_from_spec``) -- so a config can give
its own law once, under ``data.init_args.law``, and the teacher takes it by interpolation
(``law: ${data.init_args.law}``); DistillationModule refuses a teacher whose law differs from this one.
"""
from __future__ import annotations

from typing import Any, Mapping

from lightning_modules.networks.toy_laws import resolve_law

from .noise import NoiseDataModule


class ToyMixtureDataModule(NoiseDataModule):
    provides_real_data = True

    def __init__(self, law: str | Mapping[str, Any] = "ring8", batch_size: int = 256, batches_per_epoch: int = 1000,
                 val_batches: int = 4, conditional: bool = False, seed: int = 0, num_workers: int = 0):
        self.law = resolve_law(law)
        self.law_name = self.law.name
        self.conditional = conditional
        super().__init__(shape=[self.law.dim], batch_size=batch_size, batches_per_epoch=batches_per_epoch,
                         val_batches=val_batches, num_classes=self.law.num_classes if conditional else 0,
                         class_weights=self.law.class_weights().tolist() if conditional else None,
                         seed=seed, num_workers=num_workers)

    def _extra(self):
        law = self.law

        def real_samples(batch_size, generator):
            x0, component = law.sample(batch_size, generator)
            return {"real": x0.float(), "real_cond": law.component_classes[component]}
        return real_samples
