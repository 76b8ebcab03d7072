"""Toy regime: a named Gaussian mixture with its exact law. Batches carry noise, conditions and exact data samples
("real", for methods that need data such as consistency distillation, GAN terms or teacher training)."""
from __future__ import annotations

from lightning_modules.networks.toy_laws import get_toy_law

from .noise import NoiseDataModule


class ToyMixtureDataModule(NoiseDataModule):
    def __init__(self, law: str = "ring8", batch_size: int = 256, batches_per_epoch: int = 1000,
                 val_batches: int = 4, conditional: bool = False, seed: int = 0, num_workers: int = 0):
        self.law_name = law
        self.law = get_toy_law(law)
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
