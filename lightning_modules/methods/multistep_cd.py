"""Multistep consistency distillation on segments of the time axis: MCD (Heek et al. 2024, arXiv:2403.06807,
Alg. 1-2), MLCM (Xie et al. 2024, arXiv:2406.05768) and Hyper-SD's trajectory-segmented CD, TSCD (Ren et al. 2024,
arXiv:2404.13686, Sec. 3.1), on the LCM mechanism (``lcm.LatentConsistencyModel``: skipping-step teacher solver,
optional CFG range and w embedding, EMA target).

  segments    the student's sub-grid is cut into K segments with edges T = s_K > ... > s_0 = t_min (grid points);
  target      a pair (t, r) lies in one segment [s, s'); the consistency function maps to the segment's LOWER EDGE,
              not to t_min:  f_theta(x_t, t) = DDIM_{t -> s}(x_t, D_theta(x_t, t))  (MCD Alg. 1: the x0 prediction
              parameterises a DDIM step to s, so f(x, s) = x holds by construction);
              L = d(f_theta(x_t, t), sg f_theta-(x^_r, r)), x^_r one teacher solver step from t to r (r = s allowed:
              then the target is x^_s itself);
  sampler     x <- DDIM_{s_k -> s_{k-1}}(x, D_theta(x, s_k)) for k = K..2, output D_theta(x, s_1) (MCD Alg. 2): K
              segments = K steps; ``generate(nfe=n)`` uses the edges of an n-segment partition, so one model serves
              several budgets (best at the trained K);
  curriculum  ``segment_schedule`` [K_1, K_2, ...] moved by ``callbacks.ConsistencyCurriculum`` in equal stages of the
              run; TSCD's progressive 8 -> 4 -> 2 -> 1 (Hyper-SD Sec. 3.1); the current K is a persistent buffer
              (``num_segments``), so the checkpoint carries the stage. MCD: one fixed K.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion.samplers import ddim_step
from .lcm import LatentConsistencyModel


class MultistepConsistencyDistillation(LatentConsistencyModel):
    boundary_by_construction = True

    def __init__(self, *args, segment_schedule: list[int] = (4,), boundary_scalings: str = "none", **kwargs):
        segment_schedule = [int(k) for k in segment_schedule]
        if not segment_schedule or min(segment_schedule) < 1:
            raise ValueError(f"segment_schedule needs positive segment counts, got {segment_schedule}")
        super().__init__(*args, boundary_scalings=boundary_scalings, **kwargs)
        if max(segment_schedule) > len(self.sub_grid) - 1:
            raise ValueError(f"{max(segment_schedule)} segments need at least as many sub-grid intervals, have "
                             f"{len(self.sub_grid) - 1}")
        self.segment_schedule = segment_schedule
        self.register_buffer("num_segments", torch.tensor(segment_schedule[0]), persistent=True)

    def apply_curriculum(self, step, total_steps):
        stage = min(step * len(self.segment_schedule) // max(total_steps, 1), len(self.segment_schedule) - 1)
        self.num_segments.fill_(self.segment_schedule[stage])

    # ------------------------------------------------------------------ segments
    def segment_edges(self, num_segments: int | None = None) -> Tensor:
        """Descending edges s_K > ... > s_0 on the student's sub-grid (K + 1 points)."""
        k = int(self.num_segments) if num_segments is None else int(num_segments)
        index = torch.linspace(0, len(self.sub_grid) - 1, k + 1, dtype=torch.float64).round().long()
        return self.sub_grid[index.to(self.sub_grid.device)]

    def lower_edge(self, t: Tensor, num_segments: int | None = None) -> Tensor:
        """s(t): the largest edge strictly below t (t itself lies in (s, s'])."""
        edges = self.segment_edges(num_segments).to(t.device)
        below = edges[None, :] < t.double()[:, None] - 1e-12
        return torch.where(below, edges[None, :], torch.full_like(below, float("-inf"), dtype=torch.float64)).amax(1)

    def consistency_function(self, network, x, t, cond, t_online):
        edge = self.lower_edge(t_online)
        x0 = network(x, t, cond)
        return ddim_step(x, x0, t, torch.minimum(edge, t.double()), self.schedule)

    # ------------------------------------------------------------------ the multistep sampler
    def evaluation_times(self, nfe):
        return self.segment_edges(int(self.num_segments) if nfe is None else nfe)[:-1]

    def generate(self, noise, cond=None, nfe=None, network=None, generator=None, guidance_scale=None):
        from ..diffusion.samplers import prior_sample
        from ..networks.guidance_mlp import split_guidance

        network = self.student if network is None else network
        scale = self.eval_guidance_scale if guidance_scale is None else guidance_scale
        if cond is not None:
            cond = self.student_condition(split_guidance(cond)[0], torch.full(
                (noise.shape[0],), float(scale), dtype=torch.float64, device=noise.device))
        edges = self.segment_edges(int(self.num_segments) if nfe is None else nfe).to(noise.device)
        x = prior_sample(noise, edges[0], self.schedule)
        for k in range(len(edges) - 1):
            t = torch.full((noise.shape[0],), float(edges[k]), dtype=torch.float64, device=noise.device)
            x0 = network(x, t, cond)
            if k == len(edges) - 2:
                return x0
            x = ddim_step(x, x0, t, torch.full_like(t, float(edges[k + 1])), self.schedule)
        return x


class MultistepConsistencyModel(MultistepConsistencyDistillation):
    """MCD / MLCM (Heek et al. 2024; Xie et al. 2024): a fixed number of segments (default 4)."""

    def __init__(self, *args, num_segments: int = 4, **kwargs):
        super().__init__(*args, segment_schedule=[num_segments], **kwargs)


class TrajectorySegmentedConsistencyDistillation(MultistepConsistencyDistillation):
    """Hyper-SD's TSCD (Ren et al. 2024, Sec. 3.1): progressive segments 8 -> 4 -> 2 -> 1 in equal stages."""

    def __init__(self, *args, segment_schedule: list[int] = (8, 4, 2, 1), **kwargs):
        super().__init__(*args, segment_schedule=segment_schedule, **kwargs)
