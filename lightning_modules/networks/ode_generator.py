"""A teacher's probability-flow ODE map as a one-step generator: the network a perfect distillation would produce.

``TeacherODEGenerator(teacher, nfe)`` is a ``Denoiser`` whose prediction at the student's input time t is the teacher's
deterministic ``nfe``-evaluation sampler solved from (x_t, t) down to data -- exactly what a distilled one-step student
G(z) = ODE_T(sigma_max z) approximates. It is differentiable in x_t (every solver step is plain tensor algebra, and the
exact Gaussian-mixture teacher is closed form), so methods that adapt an already distilled generator through its input
(NCT's noise-space control adapter) can use the exact teacher's map as that generator on the toy suite and be scored
against ground truth, without first distilling one. It holds the teacher by reference and trains nothing.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion.samplers import ddim_step, heun_step, sampler_times
from .denoiser import Denoiser


class TeacherODEGenerator(Denoiser):
    def __init__(self, teacher: Denoiser, nfe: int = 16, method: str = "heun"):
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        if method not in ("heun", "euler"):
            raise ValueError(f"unknown sampler {method!r}; expected 'heun' or 'euler'")
        if teacher.schedule is None:
            raise ValueError("TeacherODEGenerator needs a teacher with a noise schedule")
        super().__init__(teacher.schedule, prediction_type="x0")
        teacher.requires_grad_(False).eval()
        self.__dict__["_teacher"] = teacher   # by reference: no second copy of the teacher's weights
        self.nfe, self.method = nfe, method

    @property
    def teacher(self) -> Denoiser:
        return self.__dict__["_teacher"]

    @property
    def data_shape(self):
        return self.teacher.data_shape

    @property
    def num_classes(self) -> int:
        return getattr(self.teacher, "num_classes", 0)

    def predict(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        if not torch.allclose(t, t[:1].expand_as(t)):
            raise ValueError("TeacherODEGenerator solves one ODE per batch: all samples need the same start time")
        start = float(self.schedule.edm_sigma(t[:1].double()))
        times = sampler_times(self.schedule, self.nfe, self.method, edm_sigma_max=start).to(x_t.device)
        denoise = lambda x, s: self.teacher(x, s, cond)  # noqa: E731
        # samplers.heun_sample / euler_sample run under no_grad; the same steps here keep the graph to x_t
        x = x_t
        for i, level in enumerate(times):
            now = torch.full_like(t, float(level))
            if i == len(times) - 1:
                return denoise(x, now)          # the final step denoises to sigma = 0, as the samplers do
            following = torch.full_like(t, float(times[i + 1]))
            if self.method == "heun":
                x = heun_step(denoise, x, now, following, self.schedule)
            else:
                x = ddim_step(x, denoise(x, now), now, following, self.schedule)
        return x
