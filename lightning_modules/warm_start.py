"""Warm start of a network denoiser by regression onto a teacher whose data law is known.

DMD2 and SiD initialise student and critic as copies of a trained teacher network. With an exact Gaussian-mixture
teacher there is no network to copy, so the toy suite first fits the network to the exact posterior mean
E[x0 | x_t] (zero-variance regression targets, so a few thousand steps suffice) and then copies it.
Seeded from its own generator so every rank of a distributed run computes the same weights.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .diffusion.schedules import NoiseSchedule
from .losses import dsm_weight


def log_uniform_times(n: int, schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    """Noise levels log-uniform over the whole schedule, so the network is fit where a one-step student starts."""
    lo = math.log(schedule.edm_sigma(torch.tensor(schedule.t_min)).item())
    hi = math.log(schedule.edm_sigma(torch.tensor(schedule.t_max)).item())
    log_sigma = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    t = schedule.time_from_edm_sigma(log_sigma.exp()).clamp(schedule.t_min, schedule.t_max)
    return t.round() if schedule.is_discrete else t


def law_draw(law, conditional: bool, null_label_fraction: float = 0.1):
    """``draw(n, generator) -> (x0, cond)`` of exact samples of a Gaussian-mixture law; with ``conditional``, the
    component's class label, replaced by the null label (``law.num_classes``) for a ``null_label_fraction`` of them
    so that the unconditional branch is fit too."""
    def draw(n: int, generator: torch.Generator):
        x0, component = law.sample(n, generator)
        if not conditional:
            return x0, None
        cond = law.component_classes[component].clone()
        cond[torch.rand(n, generator=generator) < null_label_fraction] = law.num_classes
        return x0, cond
    return draw


def regress_to_teacher(network, teacher_x0, draw: Callable[[int, torch.Generator], tuple[Tensor, Tensor | None]],
                       schedule: NoiseSchedule, steps: int, lr: float = 2e-3, batch_size: int = 256,
                       seed: int = 0) -> float:
    """Fit ``network`` (x0 space) to ``teacher_x0(x_t, t, cond)`` at noised samples ``draw(n, generator) -> (x0,
    cond)``: Adam with cosine decay, EDM weighting, noise levels log-uniform over the schedule. Returns the final
    weighted regression loss."""
    params = [p for p in network.parameters() if p.requires_grad]
    device, dtype = params[0].device, params[0].dtype
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    was_training = network.training
    network.train()
    loss = torch.tensor(float("nan"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            x0, cond = draw(batch_size, generator)
            cond = None if cond is None else cond.to(device)
            t = log_uniform_times(batch_size, schedule, generator)
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
            x_t = schedule.add_noise(x0.double(), noise, t).to(device=device, dtype=dtype)
            t = t.to(device)
            with torch.no_grad():
                target = teacher_x0(x_t, t, cond).to(dtype)
            weight = dsm_weight(schedule, t, "edm").to(dtype)
            loss = (weight * ((network(x_t, t, cond) - target) ** 2).flatten(1).mean(1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    network.train(was_training)
    return float(loss.detach())
