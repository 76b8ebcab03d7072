"""sCM: continuous-time consistency models in TrigFlow (Lu & Song 2024, "Simplifying, stabilizing and scaling
continuous-time consistency models", arXiv:2410.11081), sCT (training) and sCD (distillation), on the family's
mechanism (``consistency_family``: real data, theta- = sg(theta), one shared dropout mask, the boundary check).

TrigFlow (Sec. 3, Eq. 2):  x_t = cos(t) x0 + sin(t) z,  z ~ N(0, sigma_d^2 I),  t in [0, pi/2];
consistency function (Eq. 5):  f(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t),  f(x, 0) = x.

Loss (Eq. 8 with the tangent normalisation and warm-up of Sec. 4.2), per sample of dimension D:

  g   = -cos^2(t) (sigma_d F- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF-/dt)       (= cos(t) df-/dt at r = 1)
  g  <- g / (||g|| + c),  c = 0.1;   r = min(1, step / tangent_warmup_steps)
  L   = e^{-u(t)} / D ||F_theta - F- - g||^2 + u(t)

F- = sg F_theta, dF-/dt its total derivative along dx_t/dt (one JVP along (dx_t/dt, 1), ``diffusion.tangents``),
u(t) = -w_phi(t) a learned log-variance (the paper writes e^{w}/D ||.||^2 - w; the same objective with u = -w:
at the optimum e^{u(t)} = E||.||^2 / D, the loss level at t, which the weighting divides out). Its gradient in theta
is -2 e^{-u}/D (dF_theta)^T g: the continuous-time CM gradient E[w(t) f_theta^T df-/dt] (Eq. 6) rewritten in F.
  sCT: dx_t/dt = cos(t) z - sin(t) x0 from the data and its noise (Eq. 6, consistency training);
  sCD: dx_t/dt = (cos(t) x_t - x^0(x_t, t)) / sin(t) = sigma_d F_pretrain, the teacher's PF-ODE velocity, with the
       teacher's CFG (``guidance_scale``) when configured.
Proposal (Sec. 4.2): tan(t) = e^tau / sigma_d, tau ~ N(P_mean, P_std^2); P_mean = -1.0, P_std = 1.4 (CIFAR-10).

Change of variables onto the framework's student. The student is a denoiser D(x, s) on the teacher's schedule (EDM
noise level s = sigma/alpha). A TrigFlow time is the noise level s = sigma_d tan t, and x_t / cos t = x0 + s eps =
x / alpha, so the student's consistency function in TrigFlow coordinates is

  f(x_t, t) = D(alpha(tau) x_t / cos t, tau),  tau = schedule.time_from_edm_sigma(sigma_d tan t),
  F(x_t, t) = (cos(t) x_t - f(x_t, t)) / (sigma_d sin t).

For an EDM-preconditioned student this *is* TrigFlow's parameterisation: c_skip = sigma_d^2/(s^2 + sigma_d^2) =
cos^2 t, c_out = s sigma_d/sqrt(s^2 + sigma_d^2) = sigma_d sin t, c_in = cos t / sigma_d, so D(x / alpha) = cos(t) x_t
+ sigma_d sin(t) F_net(x_t / sigma_d, c_noise) and F = -F_net; f(x, 0) = x holds exactly (c_out = 0 at s = 0), and
with ``boundary_condition: true`` (CM Appendix C) at t_min as the family checks. On a TrigFlowSchedule with the same
sigma_d the map is the identity. The whole map, time conversions included, is inside the JVP (float64 times).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..diffusion.schedules import TrigFlowSchedule, broadcast_to_data
from ..diffusion.tangents import jvp
from ..networks.mlp import FourierFeatures
from .consistency_family import ConsistencyTraining


class TimeLogVariance(nn.Module):
    """u(t) = -w_phi(t): a small MLP over Fourier features of the TrigFlow time (Sec. 4.2's adaptive weighting); its
    last layer starts at zero, so the weighting starts uniform (u = 0)."""

    def __init__(self, num_features: int = 64, hidden: int = 128, scale: float = 1.0):
        super().__init__()
        self.embedding = FourierFeatures(num_features, scale)
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t: Tensor) -> Tensor:
        return self.net(self.embedding(t.float())).squeeze(-1)


class ContinuousConsistencyTraining(ConsistencyTraining):
    """sCT (``tangent_source="data"``); ``ContinuousConsistencyDistillation`` is sCD."""

    needs_real_data = True
    real_data_reason = "sCM's x_t are noised real samples (and sCT's tangent their conditional velocity)"
    #: where dx_t/dt comes from: "data" (sCT) or "teacher" (sCD)
    tangent_source = "data"

    def __init__(self, *args, sigma_data: float | None = None, p_mean: float = -1.0, p_std: float = 1.4,
                 tangent_warmup_steps: int = 10000, tangent_norm_c: float = 0.1, adaptive_weighting: bool = True,
                 jvp_method: str = "auto", **kwargs):
        super().__init__(*args, target_ema_decay=None, **kwargs)
        if self.schedule.is_discrete:
            raise ValueError(f"{type(self).__name__} needs a continuous-time schedule (its tangent is a time "
                             f"derivative); the teacher's {type(self.schedule).__name__} is discrete")
        if p_std <= 0 or tangent_warmup_steps < 0 or tangent_norm_c < 0:
            raise ValueError(f"need p_std > 0, tangent_warmup_steps >= 0, tangent_norm_c >= 0; got {p_std}, "
                             f"{tangent_warmup_steps}, {tangent_norm_c}")
        if isinstance(self.schedule, TrigFlowSchedule):
            if sigma_data is not None and sigma_data != self.schedule.sigma_data:
                raise ValueError(f"sigma_data {sigma_data} differs from the TrigFlow schedule's "
                                 f"{self.schedule.sigma_data}")
            sigma_data = self.schedule.sigma_data
        self.sigma_d = float(sigma_data if sigma_data is not None else getattr(self.student, "sigma_data", 0.5))
        self.p_mean, self.p_std = p_mean, p_std
        self.tangent_warmup_steps, self.tangent_norm_c = tangent_warmup_steps, tangent_norm_c
        self.jvp_method = jvp_method
        self.log_variance = TimeLogVariance() if adaptive_weighting else None
        #: generator updates so far: the tangent warm-up's clock (a buffer, so the checkpoint carries it)
        self.register_buffer("tangent_step", torch.tensor(0, dtype=torch.long), persistent=True)

    # ------------------------------------------------------------------ TrigFlow coordinates
    def trig_range(self) -> tuple[float, float]:
        lo, hi = (self.schedule.edm_sigma(torch.tensor(v, dtype=torch.float64)).item()
                  for v in (self.schedule.t_min, self.schedule.t_max))
        return math.atan(lo / self.sigma_d), math.atan(hi / self.sigma_d)

    def native_time(self, t: Tensor) -> Tensor:
        return self.schedule.time_from_edm_sigma(self.sigma_d * torch.tan(t.double()))

    def to_native(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_native, tau): the schedule's point and time of TrigFlow's (x_t, t)."""
        tau = self.native_time(t)
        alpha, _ = self.schedule.alpha_sigma(tau)
        scale = broadcast_to_data(alpha / torch.cos(t.double()), x)
        return (scale * x.double()).to(x.dtype), tau

    def consistency_function(self, network, x: Tensor, t: Tensor, cond) -> Tensor:
        """f(x_t, t) in TrigFlow coordinates (module docstring)."""
        x_native, tau = self.to_native(x, t)
        return network(x_native, tau, cond)

    def trig_F(self, network, x: Tensor, t: Tensor, cond) -> Tensor:
        """F(x_t, t) = (cos t x_t - f) / (sigma_d sin t)."""
        f = self.consistency_function(network, x, t, cond)
        cos, sin = (broadcast_to_data(c(t.double()), x) for c in (torch.cos, torch.sin))
        return ((cos * x.double() - f.double()) / (self.sigma_d * sin)).to(x.dtype)

    def sample_trig_times(self, n: int, device) -> Tensor:
        """tan t = e^tau / sigma_d, tau ~ N(P_mean, P_std^2), kept inside the schedule's range."""
        tau = self.p_mean + self.p_std * torch.randn(n, dtype=torch.float64)
        lo, hi = self.trig_range()
        return torch.atan(tau.exp() / self.sigma_d).clamp(lo, hi).to(device)

    # ------------------------------------------------------------------ the tangent
    def warmup_ratio(self) -> float:
        """r = min(1, step / tangent_warmup_steps) (Sec. 4.2, tangent warm-up); 1 without warm-up."""
        if self.tangent_warmup_steps == 0:
            return 1.0
        return min(1.0, float(self.tangent_step) / self.tangent_warmup_steps)

    def velocity(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """dx_t/dt: sCT's cos t z - sin t x0 (z = sigma_d eps); sCD's teacher PF-ODE velocity."""
        cos, sin = (broadcast_to_data(c(t.double()), x_t) for c in (torch.cos, torch.sin))
        if self.tangent_source == "data":
            return (cos * z.double() - sin * x0.double()).to(x_t.dtype)
        x_native, tau = self.to_native(x_t, t)
        with torch.no_grad():
            denoised = self.teacher_x0(x_native, tau, cond)
        return ((cos * x_t.double() - denoised.double()) / sin).to(x_t.dtype)

    def tangent(self, F_minus: Tensor, dF_dt: Tensor, x_t: Tensor, dx_dt: Tensor, t: Tensor,
                ratio: float | None = None, normalise: bool = True) -> Tensor:
        """g = -cos^2 t (sigma_d F- - dx/dt) - r cos t sin t (x_t + sigma_d dF-/dt), then g / (||g|| + c)."""
        r = self.warmup_ratio() if ratio is None else ratio
        cos, sin = (broadcast_to_data(c(t.double()), x_t) for c in (torch.cos, torch.sin))
        g = (-cos ** 2 * (self.sigma_d * F_minus.double() - dx_dt.double())
             - r * cos * sin * (x_t.double() + self.sigma_d * dF_dt.double()))
        if normalise:
            norm = g.flatten(1).norm(dim=1)
            g = g / broadcast_to_data(norm + self.tangent_norm_c, g)
        return g.to(x_t.dtype)

    def trig_point(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, z): x_t = cos t x0 + sin t z, z = sigma_d eps."""
        z = self.sigma_d * self.noise_like(x0)
        cos, sin = (broadcast_to_data(c(t.double()), x0) for c in (torch.cos, torch.sin))
        return (cos * x0.double() + sin * z.double()).to(x0.dtype), z

    def target_tangent(self, x_t: Tensor, t: Tensor, dx_dt: Tensor, cond) -> tuple[Tensor, Tensor]:
        """(F-, dF-/dt): F of the target network and its JVP along (dx_t/dt, 1), without gradient."""
        network = self.target_network
        with torch.no_grad():
            return jvp(lambda x, s: self.trig_F(network, x, s, cond), (x_t, t.double()),
                       (dx_dt, torch.ones_like(t, dtype=torch.float64)), method=self.jvp_method)

    # ------------------------------------------------------------------ the family's hooks (the limit r -> t)
    def time_pairs(self, n, device):
        t = self.native_time(self.sample_trig_times(n, device))
        return t, t

    def target_point(self, batch, x0, noise, x_noisy, t_noisy, t_clean, cond):
        return x_noisy

    # ------------------------------------------------------------------ the loss
    def generator_loss(self, batch):
        x0, cond = batch["real"], batch.get("real_cond")
        t = self.sample_trig_times(x0.shape[0], x0.device)
        x_t, z = self.trig_point(x0, t)
        dx_dt = self.velocity(x0, z, x_t, t, cond)
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
        devices = [x_t.device] if x_t.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            F_minus, dF_dt = self.target_tangent(x_t, t, dx_dt, cond)
        g = self.tangent(F_minus, dF_dt, x_t, dx_dt, t)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            F_theta = self.trig_F(self.student, x_t, t, cond)
        dim = x_t[0].numel()
        squared = (F_theta.float() - F_minus.float() - g.float()).flatten(1).pow(2).sum(1) / dim
        if self.log_variance is None:
            return {"loss": squared.mean(), "tangent_ratio": torch.tensor(self.warmup_ratio())}
        u = self.log_variance(t)
        loss = (torch.exp(-u) * squared + u).mean()
        return {"loss": loss, "distance": squared.mean().detach(), "log_variance": u.mean().detach(),
                "tangent_ratio": torch.tensor(self.warmup_ratio())}

    def generator_parameters(self):
        params = super().generator_parameters()
        if self.log_variance is not None:
            params += [p for p in self.log_variance.parameters() if p.requires_grad]
        return params

    def on_generator_step_end(self):
        super().on_generator_step_end()
        self.tangent_step += 1


class ContinuousConsistencyDistillation(ContinuousConsistencyTraining):
    """sCD: the tangent dx_t/dt is the teacher's PF-ODE velocity sigma_d F_pretrain (Sec. 4, Eq. 7 with a teacher),
    with the teacher's classifier-free guidance when ``guidance_scale`` != 1."""

    tangent_source = "teacher"
    real_data_reason = "sCD's x_t are noised real samples on which the teacher's velocity is taken"
