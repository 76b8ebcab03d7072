"""Latent consistency models, LCM (Luo et al. 2023, arXiv:2310.04378, Alg. 1 / Eqs. 8-12) and LCM-LoRA (Luo et al.
2023, arXiv:2311.05556), on the family's mechanism (``consistency_family.ConsistencyTraining``).

  grid        the teacher's time grid (all timesteps of a discrete schedule, a Karras grid of
              ``num_teacher_steps`` points otherwise), descending; the student trains on every k-th point
              (``skip_interval`` k, "skipping-step", Sec. 4.3: k = 20 on SD's 1000 timesteps -> 50 times);
  (t, r)      adjacent points of that sub-grid: t = t_{n+k}, r = t_n;
  w           ~ U[w_min, w_max] per sample (Alg. 1); CFG convention of this framework D_w = D_u + w (D_c - D_u)
              (w = 1: conditional; the paper's omega is w - 1);
  x^_r        one step of the teacher solver Psi (``solver``: ddim, euler or heun) from x_t to r with the guided
              teacher D_w (Eq. 9's augmented PF-ODE solver: x^_r = x_t + (1 + omega) Psi(x_t, t, r, c) - omega Psi(.., 0),
              which for DDIM / Euler equals one step with the guided x0);
  f_theta     the student conditioned on w (``guidance_embedding``: TextCondition.guidance for diffusers UNets with
              time_cond_proj_dim, ``networks.guidance_mlp`` for toy students), with the boundary condition from the
              student's own preconditioning or LCM's c_skip(t) = sd^2 / ((10 t)^2 + sd^2), c_out = 10 t /
              sqrt((10 t)^2 + sd^2) on the x0 prediction (``boundary_scalings: lcm``; sd = 0.5, timestep scaling 10);
  theta-      EMA of theta, mu = 0.95 (Alg. 1); d: pseudo-Huber, c = 0.001 (the paper's Huber) or L2.
LCM-LoRA: the same with ``student_lora`` (peft adapters on the frozen teacher); its UNet keeps the teacher's
architecture, so no w embedding: use w_min = w_max (a fixed guidance scale baked in).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..diffusion.samplers import ddim_step, heun_step, student_sample
from ..diffusion.schedules import broadcast_to_data
from ..diffusion.time_samplers import KarrasIndexTime
from ..networks.guidance_mlp import split_guidance, with_guidance
from .consistency_family import ConsistencyTraining

SOLVERS = ("ddim", "euler", "heun")


def euler_step(denoise, x_t: Tensor, t: Tensor, s: Tensor, schedule) -> Tensor:
    """One Euler step in native time of the PF-ODE dx/dt = (a'/a) x + (s' - a' s / a) eps^ (eps^ from D)."""
    alpha, sigma = (broadcast_to_data(c, x_t) for c in schedule.alpha_sigma(t))
    d_alpha, d_sigma = (broadcast_to_data(c, x_t) for c in schedule.alpha_sigma_derivative(t))
    x = x_t.double()
    epsilon = (x - alpha * denoise(x_t, t).double()) / sigma
    slope = d_alpha / alpha * x + (d_sigma - d_alpha * sigma / alpha) * epsilon
    return (x + broadcast_to_data((s - t).double(), x_t) * slope).to(x_t.dtype)


def solver_step(solver: str, denoise, x_t: Tensor, t: Tensor, s: Tensor, schedule) -> Tensor:
    if solver == "ddim":
        return ddim_step(x_t, denoise(x_t, t), t, s, schedule)
    if solver == "euler":
        return euler_step(denoise, x_t, t, s, schedule)
    if solver == "heun":
        return heun_step(denoise, x_t, t, s, schedule)
    raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")


class LatentConsistencyModel(ConsistencyTraining):
    needs_real_data = True
    real_data_reason = "its pairs start from noised real (latent) samples"
    #: True where the consistency function satisfies f(x, edge) = x whatever the network (multistep CD's DDIM map)
    boundary_by_construction = False

    def __init__(self, *args, skip_interval: int = 20, num_teacher_steps: int = 1001, solver: str = "ddim",
                 guidance_range: list[float] | None = None, eval_guidance_scale: float | None = None,
                 guidance_embedding: bool | None = None, boundary_scalings: str = "auto",
                 timestep_scaling: float = 10.0, target_ema_decay: float = 0.95,
                 distance_metric: str = "pseudo_huber", huber_c: float | None = 0.001, **kwargs):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
        if skip_interval < 1:
            raise ValueError(f"skip_interval must be >= 1, got {skip_interval}")
        if boundary_scalings not in ("auto", "lcm", "none"):
            raise ValueError(f"boundary_scalings must be auto, lcm or none, got {boundary_scalings!r}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().__init__(*args, target_ema_decay=target_ema_decay, distance_metric=distance_metric,
                             huber_c=huber_c, **kwargs)
        self.solver, self.skip_interval, self.num_teacher_steps = solver, skip_interval, num_teacher_steps
        self.timestep_scaling = timestep_scaling
        if boundary_scalings == "auto":
            # the student's own preconditioning keeps f(x, t_min) = x (EDM boundary_condition: true), else LCM's scalings
            boundary_scalings = "none" if getattr(self.student, "boundary_condition", False) else "lcm"
        self.boundary_scalings = boundary_scalings
        if boundary_scalings == "none" and not self.boundary_by_construction:
            for warning in caught:
                warnings.warn(warning.message, warning.category, stacklevel=2)
        scale = float(self.hparams.guidance_scale)
        low, high = (scale, scale) if guidance_range is None else (float(guidance_range[0]), float(guidance_range[1]))
        if not 0.0 <= low <= high:
            raise ValueError(f"guidance_range must be 0 <= w_min <= w_max, got {guidance_range}")
        self.w_min, self.w_max = low, high
        self.eval_guidance_scale = (low + high) / 2 if eval_guidance_scale is None else float(eval_guidance_scale)
        if guidance_embedding is None:
            guidance_embedding = high > low and self._student_takes_guidance()
        if guidance_embedding and not self._student_takes_guidance():
            raise ValueError(f"guidance_embedding needs a student that takes w: {type(self.student).__name__} does "
                             "not (use networks.guidance_mlp.GuidanceToyMLPDenoiser, networks.GuidanceEmbeddedDenoiser "
                             "around any Denoiser, or a diffusers UNet with time_cond_proj_dim); a LoRA student keeps "
                             "the teacher's architecture: w_min = w_max")
        self.guidance_embedding = bool(guidance_embedding)
        self.register_buffer("sub_grid", self._sub_grid(), persistent=False)

    def _student_takes_guidance(self) -> bool:
        if getattr(self.student, "accepts_guidance", False):
            return True
        unet = getattr(self.student, "unet", None)
        return bool(getattr(getattr(unet, "config", None), "time_cond_proj_dim", None))

    # ------------------------------------------------------------------ the skipping-step grid
    def teacher_grid(self) -> Tensor:
        if self.schedule.is_discrete:
            return torch.arange(self.schedule.t_max, self.schedule.t_min - 0.5, -1.0, dtype=torch.float64)
        return KarrasIndexTime(self.num_teacher_steps).grid(self.schedule)

    def _sub_grid(self) -> Tensor:
        grid = self.teacher_grid()
        sub = grid[::self.skip_interval]
        if sub[-1] != grid[-1]:
            sub = torch.cat([sub, grid[-1:]])
        return sub

    def time_pairs(self, n, device):
        index = torch.randint(0, len(self.sub_grid) - 1, (n,), device=self.sub_grid.device)
        return self.sub_grid[index].to(device), self.sub_grid[index + 1].to(device)

    # ------------------------------------------------------------------ guidance
    def draw_guidance(self, n: int, device) -> Tensor:
        return self.w_min + (self.w_max - self.w_min) * torch.rand(n, dtype=torch.float64, device=device)

    def student_condition(self, cond, scale: Tensor):
        return with_guidance(cond, scale) if self.guidance_embedding and cond is not None else cond

    def teacher_step(self, x_t, t, r, cond, scale):
        """x^_r: one teacher solver step with the guided teacher D_w (per-sample w)."""
        return solver_step(self.solver, lambda x, s: self.teacher_x0(x, s, cond, guidance_scale=scale),
                           x_t, t, r, self.schedule)

    def target_point(self, batch, x0, noise, x_noisy, t_noisy, t_clean, cond):
        scale = torch.full((x0.shape[0],), float(self.hparams.guidance_scale), dtype=torch.float64, device=x0.device)
        return self.teacher_step(x_noisy, t_noisy, t_clean, cond, scale)

    def consistency_pair(self, batch):
        """(x_t, t, x^_r, r, the student's condition carrying w)."""
        x0, cond = batch["real"], batch.get("real_cond")
        t_noisy, t_clean = self.time_pairs(x0.shape[0], x0.device)
        noise = self.noise_like(x0)
        x_noisy = self.schedule.add_noise(x0, noise, t_noisy)
        scale = self.draw_guidance(x0.shape[0], x0.device)
        with torch.no_grad():
            x_clean = self.teacher_step(x_noisy, t_noisy, t_clean, cond, scale)
        return x_noisy, t_noisy, x_clean, t_clean, self.student_condition(cond, scale)

    # ------------------------------------------------------------------ the consistency function
    def consistency_function(self, network, x: Tensor, t: Tensor, cond, t_online: Tensor) -> Tensor:
        x0 = network(x, t, cond)
        if self.boundary_scalings == "none":
            return x0
        scaled = (t.double() - self.schedule.t_min) * self.timestep_scaling
        c_skip = 0.25 / (scaled ** 2 + 0.25)
        c_out = scaled / (scaled ** 2 + 0.25).sqrt()
        return (broadcast_to_data(c_skip, x) * x.double() + broadcast_to_data(c_out, x) * x0.double()).to(x0.dtype)

    # ------------------------------------------------------------------ sampling (Alg. 3, multistep CM sampling)
    def generate(self, noise, cond=None, nfe=None, network=None, generator=None, guidance_scale=None):
        network = self.student if network is None else network
        scale = self.eval_guidance_scale if guidance_scale is None else guidance_scale
        if cond is not None:
            cond = self.student_condition(split_guidance(cond)[0], torch.full(
                (noise.shape[0],), float(scale), dtype=torch.float64, device=noise.device))
        times = self.evaluation_times(nfe)
        return student_sample(lambda x, t: self.consistency_function(network, x, t, cond, t), noise, times,
                              self.schedule, generator)
