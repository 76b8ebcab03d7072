"""BOOT -- data-free distillation of denoising diffusion models with bootstrapping (Gu et al. 2023,
arXiv:2306.05544, Sec. 3).

The student y_theta(eps, t) predicts, from the initial noise eps alone, the *signal* of the teacher's probability-flow
ODE solution at time t started from x_T = sigma_T eps (their "signal-ODE", Sec. 3.1):

    x_t = alpha_t y_t + sigma_t eps      (y_t = (x_t - sigma_t eps) / alpha_t; y_t -> x_0 as t -> 0)

No data is used: the student is trained by bootstrapping between two consecutive times t > s = t - delta (their
Eq. 8-9): from its own output at t, one teacher DDIM step gives the point at s, and the student's output at s is
regressed onto that point's signal,

    x^_t  = alpha_t sg(y_theta(eps, t)) + sigma_t eps
    x~_s  = DDIM(x^_t, D_T(x^_t, t, c), t -> s)                          (one teacher step, with CFG when guided)
    y~_s  = (x~_s - sigma_s eps) / alpha_s
    L     = lambda(t, s) || y_theta(eps, s) - sg(y~_s) ||^2,

with the boundary condition at the noise end (their Eq. 7's initial value): y_theta(eps, T) = D_T(sigma_T eps, T)
(the first DDIM step from x_T with that x0 keeps eps exactly). Times: a Karras grid of ``num_steps`` + 1 levels from
T down to t_min (delta = one grid interval); a fraction ``boundary_fraction`` of every batch trains the boundary.
lambda: ``weighting: none`` (1) or ``inverse_gap`` (1 / (sigma~_t - sigma~_s)^2 normalised to mean 1 over the grid,
the paper's rescaling of the per-step residual, Eq. 9's 1/delta^2). Sampling: one network call, x0 = y_theta(eps,
t_min) (``generate``); ``nfe`` > 1 is not meaningful for BOOT and uses the same single call.
Student input: the raw unit noise eps (``networks.SignalMLP`` for vector data; a UNet without preconditioning
predicting ``sample`` for images), never an EDM-preconditioned denoiser, whose skip connection assumes a noisy input.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..base import DistillationModule
from ..diffusion.samplers import ddim_step
from ..diffusion.schedules import broadcast_to_data


class BOOT(DistillationModule):
    uses_critic = False
    needs_real_data = False

    def __init__(self, *args, num_steps: int = 32, boundary_fraction: float = 0.125, weighting: str = "none",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 0 <= boundary_fraction <= 1:
            raise ValueError(f"boundary_fraction must be in [0, 1], got {boundary_fraction}")
        if weighting not in ("none", "inverse_gap"):
            raise ValueError(f"weighting must be 'none' or 'inverse_gap', got {weighting!r}")
        self.num_steps, self.boundary_fraction, self.weighting = num_steps, boundary_fraction, weighting
        edm_max = self.schedule.edm_sigma(torch.tensor(self.schedule.t_max, dtype=torch.float64)).item()
        edm_min = self.schedule.edm_sigma(torch.tensor(self.schedule.t_min, dtype=torch.float64)).item()
        self.register_buffer("boot_times", self.schedule.karras_times(num_steps + 1, edm_sigma_min=edm_min,
                                                                      edm_sigma_max=edm_max).double(),
                             persistent=False)

    # ------------------------------------------------------------------ the signal parameterisation
    def signal(self, network, eps: Tensor, t: Tensor, cond) -> Tensor:
        """y_theta(eps, t)."""
        return network(eps, t, cond)

    def point(self, y: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha_t y + sigma_t eps."""
        alpha, sigma = (broadcast_to_data(c, y) for c in self.schedule.alpha_sigma(t))
        return (alpha * y.double() + sigma * eps.double()).to(y.dtype)

    def to_signal(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = (broadcast_to_data(c, x) for c in self.schedule.alpha_sigma(t))
        return ((x.double() - sigma * eps.double()) / alpha).to(x.dtype)

    @torch.no_grad()
    def bootstrap_target(self, y_t: Tensor, eps: Tensor, t: Tensor, s: Tensor, cond) -> Tensor:
        """y~_s: the signal of one teacher DDIM step t -> s from x^_t = alpha_t y_t + sigma_t eps."""
        x_t = self.point(y_t, eps, t)
        x_s = ddim_step(x_t, self.teacher_x0(x_t, t, cond), t, s, self.schedule)
        return self.to_signal(x_s, eps, s)

    @torch.no_grad()
    def boundary_target(self, eps: Tensor, cond) -> Tensor:
        t = torch.full((eps.shape[0],), float(self.boot_times[0]), dtype=torch.float64, device=eps.device)
        _, sigma = self.schedule.alpha_sigma(t)
        return self.teacher_x0((broadcast_to_data(sigma, eps) * eps.double()).to(eps.dtype), t, cond)

    def pair_weight(self, t: Tensor, s: Tensor) -> Tensor:
        if self.weighting == "none":
            return torch.ones_like(t)
        gaps = self.schedule.edm_sigma(self.boot_times[:-1]) - self.schedule.edm_sigma(self.boot_times[1:])
        weight = (self.schedule.edm_sigma(t) - self.schedule.edm_sigma(s)) ** -2
        return weight / (gaps ** -2).mean()

    def generator_loss(self, batch):
        eps, cond = batch["noise"], batch.get("cond")
        n = eps.shape[0]
        boundary = torch.rand(n, device=eps.device) < self.boundary_fraction
        index = torch.randint(0, self.num_steps, (n,), device=eps.device)
        t, s = self.boot_times[index], self.boot_times[index + 1]
        with torch.no_grad():
            y_t = self.signal(self.student, eps, t, cond)
        target = self.bootstrap_target(y_t, eps, t, s, cond)
        if bool(boundary.any()):
            sub = None if cond is None else cond[boundary]
            target[boundary] = self.boundary_target(eps[boundary], sub).to(target)
        query = torch.where(boundary, self.boot_times[0].expand(n), s)
        prediction = self.signal(self.student, eps, query, cond)
        per_sample = ((prediction - target.detach()) ** 2).flatten(1).mean(1)
        weight = torch.where(boundary, torch.ones_like(t), self.pair_weight(t, s)).to(per_sample)
        return {"loss": (weight * per_sample).mean(), "distance": per_sample.mean().detach()}

    def generate(self, noise, cond=None, nfe=None, network=None, generator=None):
        network = self.student if network is None else network
        t = torch.full((noise.shape[0],), float(self.boot_times[-1]), dtype=torch.float64, device=noise.device)
        return self.signal(network, noise, t, cond)
