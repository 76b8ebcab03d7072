"""OFTSR -- One-Step Flow for Image Super-Resolution with Tunable Fidelity-Realism Trade-offs (Zhu, Wang, Lu, Li, Yan
& Zhang 2024, arXiv:2412.09465).

OFTSR distills a conditional SR teacher so that ONE student evaluation, given the initial state and a time t, lands
where the teacher's ODE trajectory from that initial state is at t; the student's output read at t is then the
fidelity-realism knob: at the start of the trajectory the teacher's own one-step prediction (the posterior mean given
the LQ image -- high fidelity, blurry), at its end the ODE's restoration (realistic). In the paper's rectified flow
(x_0 = noised LQ, x_1 = HQ, x_t = x_0 + t v) the student's point at t is x_0 + t v_theta(x_0, t) and its output
x_0 + v_theta(x_0, t); the paper's losses (Sec. 3.2, "lie on the same sampling ODE trajectory") are

    distillation  the student's point at t + dt = one teacher ODE step from (sg) the student's point at t
                  (bootstrapping along the trajectory, BOOT-style; rk2 teacher step, dt = 0.05 in the release configs)
    boundary      v_theta(x_0, 0) = v_teacher(x_0, 0)                              (lambda_boundary = 0.1)
    alignment     the student's one-step output from the initial state at t = the teacher's prediction from the
                  (closer) intermediate state x_t the student reached                (lambda_align = 0.01)

Written here on the framework's teacher (any Denoiser, e.g. the EDM SR teacher whose ODE starts from x_T = sigma_T z
conditioned on the LQ image y): the initial state is x_T, the knob a native time t in [t_min, t_max] (the start is
t = t_max), and the student's output at t is x^_0(t) = G(sigma_t z, t; y) -- the base class's one-step sampler with
``student_timesteps: [t]`` (the network reads the initial noise z, rescaled to the knob's level). The student's point
on the trajectory at t is the chord from the initial state toward its output (the DDIM map, exactly the flow's
x_0 + t v):

    x^_t = P_t(x^_0(t)) = alpha_t x^_0 + sigma_t (x_T - alpha_T x^_0) / sigma_T          (samplers.ddim_step)

Per batch, with u ~ U[0, 1 - du] on the Karras ramp (u = 0 is t_max), t = ramp(u), t' = ramp(u + du) < t:
    x~_t' = ODE step of the teacher from sg(x^_t) at t to t'       (Heun, Karras et al. 2022 Alg. 1; or Euler/DDIM)
    L_distill   = || P_t'(x^_0(t')) - sg(x~_t') ||^2                  (the two points at t' coincide)
    L_boundary  = || x^_0(t_max) - sg(T(x_T, t_max; y)) ||^2           (the chord's limit at t -> t_max is T(x_T))
    L_align     = || x^_0(t) - sg(T(x^_t, t; y)) ||^2
    L = lambda_distill L_distill + lambda_boundary L_boundary + lambda_align L_align   (means over pixels and batch)

At the fixed point every x^_t lies on the teacher's trajectory, so x^_0(t_max) = T(x_T) (fidelity) and x^_0(t) ->
the ODE solution as t -> t_min (realism). Written from the paper's description (its training code is not public);
squared errors replace the release's L1, and the time grid is the EDM Karras ramp rather than the flow's uniform t.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..base import DistillationModule
from ..conditioning.condition import concat_conditions
from ..diffusion.samplers import ddim_step, heun_step, prior_sample
from ..diffusion.schedules import broadcast_to_data
from ..losses import per_sample_mean

TEACHER_SOLVERS = ("heun", "euler")


def karras_ramp_times(schedule, u: Tensor, rho: float = 7.0) -> Tensor:
    """Native times at Karras-ramp positions u in [0, 1] (0: sigma_max, 1: sigma_min; Karras et al. 2022, Eq. 5)."""
    s_min = schedule.edm_sigma(torch.tensor(schedule.t_min, dtype=torch.float64)).item()
    s_max = schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=torch.float64)).item()
    sigma = (s_max ** (1 / rho) + u.double() * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return schedule.time_from_edm_sigma(sigma).clamp(schedule.t_min, schedule.t_max)


def chord_point(x_start: Tensor, x0: Tensor, t_start: Tensor, t: Tensor, schedule) -> Tensor:
    """P_t(x0): the point at time t of the straight (DDIM) path from the initial state x_start at t_start toward x0."""
    return ddim_step(x_start, x0, t_start, t, schedule)


def chord_endpoint(x_start: Tensor, x_t: Tensor, t_start: Tensor, t: Tensor, schedule) -> Tensor:
    """The inverse of ``chord_point`` in x0: the x0 whose chord from x_start passes through x_t at time t,
    x0 = (x_t - (sigma_t / sigma_T) x_start) / (alpha_t - sigma_t alpha_T / sigma_T)  (t < t_start)."""
    alpha_s, sigma_s = (broadcast_to_data(c, x_t) for c in schedule.alpha_sigma(t_start))
    alpha_t, sigma_t = (broadcast_to_data(c, x_t) for c in schedule.alpha_sigma(t))
    ratio = sigma_t / sigma_s
    return ((x_t.double() - ratio * x_start.double()) / (alpha_t - ratio * alpha_s)).to(x_t.dtype)


class OFTSR(DistillationModule):
    """OFTSR's student (module docstring). The evaluation knob is the student's one time, ``student_timesteps`` /
    ``student_sigmas`` (default t_max: the high-fidelity end); ``knob_step`` is du, the ramp distance of one
    bootstrapping step."""

    def __init__(self, *args, distillation_weight: float = 1.0, boundary_weight: float = 0.1,
                 alignment_weight: float = 0.01, knob_step: float = 0.05, teacher_solver: str = "heun",
                 knob_rho: float = 7.0, **kwargs):
        super().__init__(*args, **kwargs)
        if len(self.student_times) != 1:
            raise ValueError(f"OFTSR trains a one-step student whose one time is the fidelity-realism knob; got "
                             f"student times {self.student_times.tolist()}")
        for name, value in [("distillation_weight", distillation_weight), ("boundary_weight", boundary_weight),
                            ("alignment_weight", alignment_weight)]:
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if distillation_weight + boundary_weight + alignment_weight == 0:
            raise ValueError("distillation_weight, boundary_weight and alignment_weight are all 0: nothing to train")
        if not 0 < knob_step < 1:
            raise ValueError(f"knob_step (the ramp distance du of one teacher step) must be in (0, 1), got {knob_step}")
        if teacher_solver not in TEACHER_SOLVERS:
            raise ValueError(f"teacher_solver must be one of {TEACHER_SOLVERS}, got {teacher_solver!r}")
        self.distillation_weight, self.boundary_weight = distillation_weight, boundary_weight
        self.alignment_weight, self.knob_step = alignment_weight, knob_step
        self.teacher_solver, self.knob_rho = teacher_solver, knob_rho

    # ------------------------------------------------------------------ the pieces of the algorithm
    def knob_pairs(self, n: int) -> tuple[Tensor, Tensor]:
        """(t, t') per sample: u ~ U[0, 1 - du], t = ramp(u), t' = ramp(u + du) -- one teacher step apart."""
        u = torch.rand(n, dtype=torch.float64) * (1.0 - self.knob_step)
        return (karras_ramp_times(self.schedule, u, self.knob_rho).to(self.device),
                karras_ramp_times(self.schedule, u + self.knob_step, self.knob_rho).to(self.device))

    def student_outputs(self, noise: Tensor, times: list[Tensor], cond) -> list[Tensor]:
        """x^_0(t) = G(sigma_t z, t; y) for each vector of times, in one batched student call."""
        inputs = torch.cat([self._knob_input(noise, t) for t in times])
        conds = cond
        for _ in times[1:]:
            conds = concat_conditions(conds, cond)
        return list(self.student(inputs, torch.cat(times), conds).chunk(len(times)))

    def _knob_input(self, noise: Tensor, t: Tensor) -> Tensor:
        """sigma_t z per sample: the initial noise at the knob's level (what the one-step sampler feeds at t)."""
        _, sigma = self.schedule.alpha_sigma(t)
        return (broadcast_to_data(sigma, noise) * noise.double()).to(noise.dtype)

    def teacher_step(self, x_t: Tensor, t: Tensor, t_next: Tensor, cond) -> tuple[Tensor, Tensor]:
        """(x~ at t_next, T(x_t, t)): one teacher ODE step and the teacher's prediction at its start."""
        x0_at_t = self.teacher_x0(x_t, t, cond)
        if self.teacher_solver == "euler":
            return ddim_step(x_t, x0_at_t, t, t_next, self.schedule), x0_at_t
        return heun_step(lambda x, s: self.teacher_x0(x, s, cond), x_t, t, t_next, self.schedule, x0_at_t), x0_at_t

    def generator_loss(self, batch):
        noise, cond = batch["noise"], batch.get("cond")
        n = noise.shape[0]
        t_max = torch.full((n,), float(self.schedule.t_max), dtype=torch.float64, device=noise.device)
        t, t_next = self.knob_pairs(n)
        x_start = prior_sample(noise, self.schedule.t_max, self.schedule)
        x0_t, x0_next, x0_start = self.student_outputs(noise, [t, t_next, t_max], cond)
        with torch.no_grad():
            point_t = chord_point(x_start, x0_t.detach(), t_max, t, self.schedule)
            target_next, teacher_at_point = self.teacher_step(point_t, t, t_next, cond)
            teacher_at_start = self.teacher_x0(x_start, t_max, cond)
        losses = {
            "distillation": per_sample_mean((chord_point(x_start, x0_next, t_max, t_next, self.schedule)
                                             - target_next) ** 2).mean(),
            "boundary": per_sample_mean((x0_start - teacher_at_start) ** 2).mean(),
            "alignment": per_sample_mean((x0_t - teacher_at_point) ** 2).mean(),
        }
        losses["loss"] = (self.distillation_weight * losses["distillation"] + self.boundary_weight * losses["boundary"]
                          + self.alignment_weight * losses["alignment"])
        return losses
