"""Truncated consistency models, TCM (Lee et al. 2024, arXiv:2410.14895), two stages on the CD mechanism
(``consistency.ConsistencyDistillation``).

  stage 1     a standard consistency model on [t_min, T] (here CD, Alg. 2 of Song et al. 2023), for
              ``stage1_steps`` generator updates (or loaded from ``stage1_checkpoint``);
  switch      the stage-1 network (its EMA target where there is one) is frozen as f_0 (``stage1_student``, a
              registered copy, so the checkpoint carries it); stage 2 starts from the same weights (TCM Sec. 4);
  stage 2     pairs only on the truncated range [t', T] (a Karras grid from the dividing time t' to T,
              ``dividing_sigma`` in EDM sigma); the target of a pair whose earlier point is t' is the frozen boundary
              model, f_0(x^_{t'}, t') -- TCM's boundary condition f_theta(x, t') = f_0(x, t') replacing f(x, t_min) = x
              -- and sg f_theta-(x^_r, r) above it; ``boundary_fraction`` of the pairs are put on the boundary pair
              (an implementation default; the paper weights its boundary term with a separate coefficient);
  sampling    one step at T as usual; multistep evaluation times stay in [t', T] in stage 2.
The stage is a persistent buffer moved by ``apply_curriculum`` (``callbacks.ConsistencyCurriculum``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..diffusion.schedules import karras_sigmas
from .consistency import ConsistencyDistillation


class _BoundaryTarget(nn.Module):
    """Target network of stage 2: the frozen stage-1 model at times <= t', the consistency target above."""

    def __init__(self, target, boundary, dividing_time: float):
        super().__init__()
        self.__dict__["_target"], self.__dict__["_boundary"] = target, boundary
        self.dividing_time = dividing_time

    def train(self, mode: bool = True):
        self.training = mode
        self._target.train(mode)
        return self

    def forward(self, x, t, cond=None):
        out = self._target(x, t, cond)
        at_boundary = t.double() <= self.dividing_time * (1 + 1e-9)
        if bool(at_boundary.any()):
            shape = (-1,) + (1,) * (x.ndim - 1)
            out = torch.where(at_boundary.reshape(shape), self._boundary(x, t, cond).to(out.dtype), out)
        return out


class TruncatedConsistencyModel(ConsistencyDistillation):
    #: attributes counted in generator updates (a benchmark that shortens the run scales them alike)
    stage_lengths = ("stage1_steps",)

    def __init__(self, *args, dividing_sigma: float = 1.0, stage1_steps: int = 0,
                 stage1_checkpoint: str | None = None, boundary_fraction: float = 0.25, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= boundary_fraction < 1.0:
            raise ValueError(f"boundary_fraction must be in [0, 1), got {boundary_fraction}")
        sigma_min = self.schedule.edm_sigma(torch.tensor(self.schedule.t_min, dtype=torch.float64)).item()
        sigma_max = self.schedule.edm_sigma(torch.tensor(self.schedule.t_max, dtype=torch.float64)).item()
        if not sigma_min < dividing_sigma < sigma_max:
            raise ValueError(f"dividing_sigma must lie in ({sigma_min}, {sigma_max}), got {dividing_sigma}")
        self.dividing_sigma, self.stage1_steps, self.boundary_fraction = dividing_sigma, stage1_steps, boundary_fraction
        self.dividing_time = float(self.schedule.time_from_edm_sigma(torch.tensor(dividing_sigma, dtype=torch.float64)))
        self.stage1_student = copy.deepcopy(self.student).requires_grad_(False).eval()
        #: 1 or 2; a buffer so the checkpoint carries it
        self.register_buffer("stage", torch.tensor(1), persistent=True)
        if stage1_checkpoint is not None:
            state = torch.load(stage1_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
            self.load_stage1({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})

    # ------------------------------------------------------------------ the two stages
    @torch.no_grad()
    def load_stage1(self, state_dict=None) -> None:
        """Freeze the stage-1 model (given weights, else the current EMA target / student) and start stage 2 from
        it."""
        if state_dict is None:
            state_dict = self.target_network.state_dict()
        self.stage1_student.load_state_dict(state_dict)
        self.student.load_state_dict(state_dict)
        if self.target_student is not None:
            self.target_student.module.load_state_dict(state_dict)
        self.warm_started.fill_(True)
        self.stage.fill_(2)

    def averaging_phase(self) -> int:
        return int(self.stage)

    def apply_curriculum(self, step, total_steps):
        if int(self.stage) == 1 and step >= self.stage1_steps:
            self.load_stage1()

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "stage1_student", None) is not None:
            self.stage1_student.eval()
        return self

    def generator_parameters(self):
        return [p for p in self.student.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ stage 2: the truncated range
    def truncated_grid(self):
        sigma_max = self.schedule.edm_sigma(torch.tensor(self.schedule.t_max, dtype=torch.float64)).item()
        sigmas = karras_sigmas(self.discretization.num_steps, self.dividing_sigma, sigma_max, self.discretization.rho)
        return self.schedule.time_from_edm_sigma(sigmas)

    def time_pairs(self, n, device):
        if int(self.stage) == 1:
            return super().time_pairs(n, device)
        grid = self.truncated_grid()
        index = torch.randint(0, len(grid) - 1, (n,))
        on_boundary = torch.rand(n) < self.boundary_fraction
        index = torch.where(on_boundary, torch.full_like(index, len(grid) - 2), index)
        return grid[index].to(device), grid[index + 1].to(device)

    @property
    def target_network(self):
        target = super().target_network
        if int(self.stage) == 1:
            return target
        return _BoundaryTarget(target, self.stage1_student, self.dividing_time)

    def evaluation_times(self, nfe):
        if int(self.stage) == 1 or nfe is None or nfe == 1:
            return super().evaluation_times(nfe)
        start = self.schedule.edm_sigma(self.student_times[:1]).item()
        sigmas = karras_sigmas(nfe, self.dividing_sigma, start, 7.0)
        return self.schedule.time_from_edm_sigma(sigmas)
