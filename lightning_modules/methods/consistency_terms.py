"""The consistency family's loss with the online output kept, for members that add a term on it (SCott's adversarial
term on f_theta(x_t, t), RG-LCD's reward on the one-step output).

``consistency_terms(module, batch)`` runs exactly what ``ConsistencyTraining.generator_loss`` runs -- the same pair
(``consistency_pair``), the same random draws in the same order, the shared dropout mask of the online and target
calls -- and returns its loss together with the online output, its input and its condition, so that an extra term
costs no second student call and a weight of 0 on it reproduces the base loss bit for bit.
"""
from __future__ import annotations

import torch

from ..losses import distance


def consistency_terms(module, batch) -> dict:
    """{"loss", "distance", "online" (f_theta(x_t, t), with gradient), "x_noisy", "t_noisy", "cond"}."""
    x_noisy, t_noisy, x_clean, t_clean, cond = module.consistency_pair(batch)
    dropout_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    devices = [x_noisy.device] if x_noisy.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(dropout_seed)
        online = module.student(x_noisy, t_noisy, cond)
    target_network = module.target_network
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(dropout_seed)
        was_training = target_network.training
        target_network.train(module.student.training)
        target = target_network(x_clean, t_clean, cond)
        target_network.train(was_training)
    per_sample = distance(online, target.detach(), module.distance_metric, module.huber_c)
    weight = module.pair_weight(t_noisy, t_clean)
    loss = per_sample.mean() if weight is None else (per_sample * weight.to(per_sample)).mean()
    return {"loss": loss, "distance": per_sample.mean().detach(), "online": online, "x_noisy": x_noisy,
            "t_noisy": t_noisy, "cond": cond}
