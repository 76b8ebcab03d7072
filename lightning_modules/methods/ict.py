"""Improved consistency training, iCT (Song & Dhariwal, ICLR 2024, arXiv:2310.14189), on the family's mechanism
(``consistency_family``): consistency training without a teacher (CM Eq. 10) with the paper's improvements

  target      x^_{sigma_i} = x + sigma_i z, the same z as the online point x + sigma_{i+1} z (CM Eq. 10);
  theta-      = theta under stop-gradient: no EMA target (Sec. 3.1, "EMA decay 0");
  d           pseudo-Huber sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(dim) (Sec. 3.3);
  lambda      1 / (sigma_{i+1} - sigma_i) (Sec. 3.2);
  (i, i+1)    lognormal over the Karras grid, P_mean = -1.1, P_std = 2.0 (Sec. 3.5; ``LogNormalIndexTime``);
  N(k)        min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)), s0 = 10, s1 = 1280 (Sec. 3.4),
              moved by ``callbacks.ConsistencyCurriculum``; the current N is a persistent buffer (in the checkpoint).
  L = E[ lambda(sigma_i) d(f_theta(x + sigma_{i+1} z, sigma_{i+1}), sg f_theta(x + sigma_i z, sigma_i)) ]
"""
from __future__ import annotations

import torch

from ..diffusion.time_samplers import LogNormalIndexTime, ict_discretization_steps
from .consistency_family import TeacherFreeConsistency


class ImprovedConsistencyTraining(TeacherFreeConsistency):
    def __init__(self, *args, initial_discretization_steps: int = 10, final_discretization_steps: int = 1280,
                 p_mean: float = -1.1, p_std: float = 2.0, target_ema_decay: float | None = None,
                 distance_metric: str = "pseudo_huber", huber_c: float | None = None, **kwargs):
        if not 1 <= initial_discretization_steps <= final_discretization_steps:
            raise ValueError("need 1 <= initial_discretization_steps <= final_discretization_steps, got "
                             f"{initial_discretization_steps}, {final_discretization_steps}")
        super().__init__(*args, target_ema_decay=target_ema_decay, distance_metric=distance_metric, huber_c=huber_c,
                         **kwargs)
        self.s0, self.s1 = initial_discretization_steps, final_discretization_steps
        self.discretization = LogNormalIndexTime(self.s0 + 1, p_mean, p_std)
        #: N, the number of grid points now (N(0) = s0 + 1); a buffer so the checkpoint carries the curriculum
        self.register_buffer("discretization_steps", torch.tensor(self.s0 + 1), persistent=True)

    def apply_curriculum(self, step, total_steps):
        self.discretization_steps.fill_(ict_discretization_steps(step, total_steps, self.s0, self.s1))

    def time_pairs(self, n, device):
        self.discretization.num_steps = int(self.discretization_steps)
        return self.discretization.pairs(n, self.schedule, device=device)

    def pair_weight(self, t_noisy, t_clean):
        """lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) (Sec. 3.2)."""
        return 1.0 / self.sigma_gap(t_noisy, t_clean)
