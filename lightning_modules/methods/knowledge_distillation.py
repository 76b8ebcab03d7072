"""KD -- Knowledge distillation in iterative generative models (Luhman & Luhman 2021, arXiv:2101.02388).

The student G is regressed onto the teacher's deterministic ODE map (Sec. 3, Eq. 7 of the paper, there with DDIM):

    L(theta) = E_z || G_theta(z, c) - ODE_T(z, c) ||^2            (z ~ N(0, I), ODE_T the teacher's PF-ODE sampler)

G(z) = the student's sampler from sigma(t_0) z (one step for a one-step student: G(z) = student(sigma(T) z, T)).
Where the pairs (z, ODE_T(z)) come from is the ``mode``:
  * ``pairs``      cached pairs from a pair file (the paper's setting: ``lightning_modules.trajectory_pairs``, served
                   by ``datamodules.pairs.ToyMixturePairsDataModule`` / ``MNISTPairsDataModule`` as batch keys
                   ``pair_noise``, ``pair_target``, ``pair_cond``);
  * ``on_the_fly`` the teacher ODE solved on each batch's own noise (no cache; ``teacher_nfe`` evaluations per sample
                   per step -- exact but the costliest);
  * ``streaming``  a buffer of ``buffer_size`` pairs (persistent buffers: the checkpoint carries them) of which the
                   oldest ``refresh_size`` are replaced by freshly solved teacher pairs every ``refresh_every``
                   generator updates (the first fill happens on the first batch); each step draws a batch from it.
                   A middle ground: fresh pairs keep coming, at 1/``refresh_every`` of on_the_fly's teacher cost per
                   refreshed pair. Conditions for new pairs are drawn from the current batch's conditions.
d is ``losses.distance`` (l2 = the paper's squared error, or pseudo_huber).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..base import DistillationModule
from ..losses import distance

MODES = ("pairs", "on_the_fly", "streaming")


class KnowledgeDistillation(DistillationModule):
    uses_critic = False

    def __init__(self, *args, mode: str = "pairs", teacher_nfe: int = 32, teacher_sampler: str = "heun",
                 buffer_size: int = 4096, refresh_every: int = 50, refresh_size: int | None = None,
                 distance_metric: str = "l2", huber_c: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown KD mode {mode!r}; expected one of {MODES}")
        if teacher_nfe < 1 or buffer_size < 1 or refresh_every < 1:
            raise ValueError("teacher_nfe, buffer_size and refresh_every must be >= 1")
        distance(torch.zeros(1, 1), torch.zeros(1, 1), distance_metric, huber_c)  # fail early on an unknown metric
        self.mode, self.teacher_nfe, self.teacher_sampler = mode, teacher_nfe, teacher_sampler
        self.distance_metric, self.huber_c = distance_metric, huber_c
        self.buffer_size, self.refresh_every = buffer_size, refresh_every
        self.refresh_size = buffer_size if refresh_size is None else min(int(refresh_size), buffer_size)
        if mode == "streaming":
            shape = tuple(self.teacher.data_shape or ())
            if not shape:
                raise ValueError("streaming KD needs a teacher that knows its data_shape")
            self.register_buffer("buffer_noise", torch.zeros(buffer_size, *shape), persistent=True)
            self.register_buffer("buffer_target", torch.zeros(buffer_size, *shape), persistent=True)
            self.register_buffer("buffer_cond", torch.full((buffer_size,), -1, dtype=torch.long), persistent=True)
            self.register_buffer("buffer_filled", torch.tensor(0, dtype=torch.long), persistent=True)
            self.register_buffer("buffer_cursor", torch.tensor(0, dtype=torch.long), persistent=True)
            self.register_buffer("kd_step", torch.tensor(0, dtype=torch.long), persistent=True)

    # ------------------------------------------------------------------ the teacher ODE
    @torch.no_grad()
    def teacher_target(self, noise: Tensor, cond) -> Tensor:
        """ODE_T(z, c): the teacher's deterministic sampler (with the module's guidance scale)."""
        return self.sample_teacher(noise, cond, nfe=self.teacher_nfe, method=self.teacher_sampler)

    @torch.no_grad()
    def refresh_buffer(self, batch: dict, count: int) -> None:
        """Replace the ``count`` oldest buffer entries by new teacher pairs (fresh noise, the batch's conditions)."""
        noise = torch.randn((count, *self.buffer_noise.shape[1:]), device=self.buffer_noise.device)
        cond = batch.get("cond")
        if cond is not None:
            cond = cond[torch.randint(0, len(cond), (count,), device=cond.device)]
        target = self.teacher_target(noise.to(batch["noise"].dtype), cond)
        index = (self.buffer_cursor + torch.arange(count, device=noise.device)) % self.buffer_size
        self.buffer_noise[index] = noise.to(self.buffer_noise)
        self.buffer_target[index] = target.to(self.buffer_target)
        self.buffer_cond[index] = -1 if cond is None else cond.long().to(self.buffer_cond.device)
        self.buffer_cursor.fill_(int((self.buffer_cursor + count) % self.buffer_size))
        self.buffer_filled.fill_(min(self.buffer_size, int(self.buffer_filled) + count))

    def kd_pairs(self, batch: dict) -> tuple[Tensor, object, Tensor]:
        """(z, c, ODE_T(z, c)) for this step, per ``mode``."""
        if self.mode == "pairs":
            missing = [k for k in ("pair_noise", "pair_target") if k not in batch]
            if missing:
                raise ValueError(f"KD mode 'pairs' needs teacher pairs in the batch but {missing} are missing: use "
                                 "datamodules.pairs.ToyMixturePairsDataModule / MNISTPairsDataModule, or mode "
                                 "'on_the_fly' / 'streaming'")
            return batch["pair_noise"], batch.get("pair_cond"), batch["pair_target"]
        if self.mode == "on_the_fly":
            return batch["noise"], batch.get("cond"), self.teacher_target(batch["noise"], batch.get("cond"))
        if int(self.buffer_filled) == 0:
            self.refresh_buffer(batch, self.buffer_size)
        elif self.training and int(self.kd_step) % self.refresh_every == 0 and int(self.kd_step) > 0:
            self.refresh_buffer(batch, self.refresh_size)
        n = batch["noise"].shape[0]
        index = torch.randint(0, int(self.buffer_filled), (n,), device=self.buffer_noise.device)
        cond = self.buffer_cond[index]
        cond = None if batch.get("cond") is None else cond.to(batch["cond"])
        dtype = batch["noise"].dtype
        return self.buffer_noise[index].to(dtype), cond, self.buffer_target[index].to(dtype)

    def generator_loss(self, batch):
        noise, cond, target = self.kd_pairs(batch)
        prediction = self.generate(noise, cond)
        per_sample = distance(prediction, target.to(prediction.dtype), self.distance_metric, self.huber_c)
        return {"loss": per_sample.mean()}

    def on_generator_step_end(self):
        if self.mode == "streaming":
            self.kd_step += 1
