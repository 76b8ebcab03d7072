"""Easy consistency tuning, ECT (Geng et al., "Consistency models made easy", arXiv:2406.14548), on the family's
mechanism (``consistency_family``): continuous-time consistency training started from a diffusion model

  t           ~ lognormal(P_mean = -1.1, P_std = 2.0) in EDM sigma (Sec. 3, following iCT);
  r           = t (1 - q^-(stage+1) n(t)), n(t) = 1 + k sigmoid(-b t), clamped at 0 (here at t_min), q = 2, k = 8,
              b = 1 (Sec. 3, the mapping function; ``ECTMappingTime``); stage = floor(i / d) for iteration i and
              stage length d (``stage_steps``), moved by ``callbacks.ConsistencyCurriculum`` -- as t - r -> 0 the
              loss approaches the continuous-time consistency condition df/dt = 0;
  target      the same network without gradient at x_r = x + r z with the same z (theta- = sg theta);
  d           ||f_theta(x_t, t) - sg f_theta(x_r, r)|| smoothed as pseudo-Huber sqrt(||.||^2 + c^2) - c
              (c = 0.00054 sqrt(dim) unless ``huber_c`` is given);
  lambda      1 / (t - r) (Sec. 3, the weighting that makes the loss a finite-difference derivative);
  init        a pretrained diffusion model: stage 0 (r ~ 0 for most t) is denoising training; for toy students the
              warm start's regression onto the exact teacher's x0 is that diffusion model.
"""
from __future__ import annotations

import torch

from ..diffusion.time_samplers import ECTMappingTime
from .consistency_family import TeacherFreeConsistency


class EasyConsistencyTuning(TeacherFreeConsistency):
    #: attributes counted in generator updates (a benchmark that shortens the run scales them alike)
    stage_lengths = ("stage_steps",)

    def __init__(self, *args, stage_steps: int = 25000, q: float = 2.0, k: float = 8.0, b: float = 1.0,
                 p_mean: float = -1.1, p_std: float = 2.0, target_ema_decay: float | None = None,
                 distance_metric: str = "pseudo_huber", huber_c: float | None = None, **kwargs):
        if stage_steps < 1:
            raise ValueError(f"stage_steps must be >= 1, got {stage_steps}")
        super().__init__(*args, target_ema_decay=target_ema_decay, distance_metric=distance_metric, huber_c=huber_c,
                         **kwargs)
        self.stage_steps = stage_steps
        self.mapping = ECTMappingTime(p_mean, p_std, q, k, b)
        #: the curriculum stage now; a buffer so the checkpoint carries it
        self.register_buffer("stage", torch.tensor(0), persistent=True)

    def apply_curriculum(self, step, total_steps):
        self.stage.fill_(step // self.stage_steps)

    def time_pairs(self, n, device):
        self.mapping.stage = int(self.stage)
        return self.mapping.pairs(n, self.schedule, device=device)

    def pair_weight(self, t_noisy, t_clean):
        """1 / (t - r); a pair with t = r = t_min has a zero distance, and its weight is kept finite."""
        return 1.0 / self.sigma_gap(t_noisy, t_clean).clamp_min(1e-12)
