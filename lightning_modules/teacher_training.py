"""Teacher training / fine-tuning by denoising score matching (Karras et al. 2022, Eq. 2 and Table 1), with label
dropout so the teacher supports classifier-free guidance (Ho & Salimans 2022, Sec. 3.2). The condition is whatever the
batch's ``real_cond`` carries -- class labels, or an ``ImageCondition`` for a restoration teacher (SR3, Saharia et
al. 2022) -- and is dropped through the conditioning layer, never by kind here.

    x0, c ~ data;  c <- null with probability p_uncond;  t ~ p(t);  L = lambda(t) ||D(alpha_t x0 + sigma_t eps, t, c) - x0||^2
"""
from __future__ import annotations

from typing import Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from .base import EvaluationNetworkMixin
from .conditioning.condition import carries_own_null, drop_conditions
from .diffusion.samplers import sampler_times, teacher_sample
from .diffusion.schedules import NoiseSchedule
from .diffusion.time_samplers import LogNormalTime, TimeSampler
from .losses import denoising_score_matching, dsm_weight
from .networks.denoiser import Denoiser


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3)


class DenoisingScoreMatching(EvaluationNetworkMixin, LightningModule):
    def __init__(self, network: Denoiser, schedule: NoiseSchedule | None = None,
                 time_sampler: TimeSampler | None = None, weighting: str = "edm", label_dropout: float = 0.1,
                 optimizer: OptimizerCallable = _adam, lr_scheduler: LRSchedulerCallable | None = None,
                 eval_nfe: Sequence[int] = (32,), sampler: str = "heun"):
        super().__init__()
        self.save_hyperparameters(ignore=["network", "schedule", "time_sampler", "optimizer", "lr_scheduler"])
        if schedule is not None:
            network.schedule = schedule
        if network.schedule is None:
            raise ValueError("DenoisingScoreMatching needs a schedule (on the network or as schedule=)")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.network, self.schedule = network, network.schedule
        self.time_sampler = time_sampler or LogNormalTime(-1.2, 1.2)
        dsm_weight(self.schedule, torch.ones(1), weighting)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler

    def averaged_network(self) -> nn.Module:
        return self.network

    def _loss(self, batch):
        if batch.get("real") is None:
            raise ValueError("teacher training needs data samples: the batch has no 'real' entry")
        x0, cond = batch["real"], batch.get("real_cond")
        num_classes = getattr(self.network, "num_classes", 0)
        if cond is not None and (num_classes or carries_own_null(cond)):
            # labels drop to the null label; an image condition (restoration teacher) to its blank image
            drop = torch.rand(len(cond), device=x0.device) < self.hparams.label_dropout
            cond = drop_conditions(cond, drop, num_classes or None)
        else:
            cond = None  # an unconditional network ignores the labels the data carries
        t = self.time_sampler(x0.shape[0], self.schedule, device=x0.device)
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t)
        weight = dsm_weight(self.schedule, t, self.hparams.weighting)
        return denoising_score_matching(self.network(x_t, t, cond), x0, weight).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/teacher/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/teacher/loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.network.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    @torch.no_grad()
    def sample(self, noise, cond=None, nfe: int | None = None, generator=None):
        network = self.evaluation_student if self.evaluation_student is not None else self.network
        nfe = nfe or self.hparams.eval_nfe[0]
        method = self.hparams.sampler
        times = sampler_times(self.schedule, nfe, method)
        return teacher_sample(lambda x, t: network(x, t, cond), noise, times, self.schedule, method)

    @property
    def teacher(self):
        return self.network

    @property
    def student(self):
        return self.network
