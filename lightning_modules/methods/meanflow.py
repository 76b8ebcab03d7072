"""MeanFlow (Geng et al. 2025, "Mean flows for one-step generative modeling", arXiv:2505.13447) on the family's
mechanism (``consistency_family``: real data, one shared dropout mask, the boundary check).

Linear interpolation (Sec. 3):  z_t = (1 - t) x + t e,  v = e - x (or, ``velocity_source: teacher``, the teacher's
PF-ODE velocity v(z_t, t) = (z_t - x^0(z_t, t)) / t: MeanFlow as distillation). Average velocity (Eq. 3):
u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds; the MeanFlow identity (Eq. 6) and target (Eqs. 8-10, Alg. 1):

  u_tgt = v - (t - r) (v d_z u + d_t u),   du/dt by one JVP along (v, 0, 1) for the inputs (z, r, t);
  L = sg(w) ||u_theta - sg(u_tgt)||^2,  w = 1 / (||Delta||^2 + c)^p,  c = 1e-3, p = 1 (Sec. 4.3, adaptive weighting);
  (t, r): two logit-normal(-0.4, 1.0) draws, t the larger; a fraction ``equal_time_fraction`` (0.75: 25% r != t,
  Table 1a) has r = t (plain flow matching);
  one-step sampling (Alg. 2): z_0 = z_1 - u(z_1, 0, 1).

The student (``networks.meanflow.MeanFlowStudent``) wraps any framework denoiser with a zero-initialised embedding
of the interval h = t - r added to its time embedding, parameterised so that u = (z - D_h(z, t)) / t; its ordinary
forward is the jump to r = 0, x0 = z_t - t u(z_t, 0, t), so ``generate`` (and GroundTruthMetrics) sample it as any
one-step student: the framework's prior at t_max is z_1 up to t_max < 1.
Coordinates: the teacher's schedule is read in linear-interpolation time through its EDM noise level s,
t = s / (1 + s), z = (1 - t) x / alpha (so any continuous schedule works; on a RectifiedFlowSchedule it is the identity).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion.schedules import broadcast_to_data
from ..diffusion.tangents import jvp
from ..networks.meanflow import MeanFlowStudent
from .consistency_family import ConsistencyTraining


class MeanFlow(ConsistencyTraining):
    needs_real_data = True
    real_data_reason = "MeanFlow's z_t are interpolations of real samples and noise"

    def __init__(self, *args, velocity_source: str = "data", equal_time_fraction: float = 0.75,
                 logit_mean: float = -0.4, logit_std: float = 1.0, adaptive_p: float = 1.0,
                 adaptive_c: float = 1e-3, jvp_method: str = "auto", **kwargs):
        super().__init__(*args, target_ema_decay=None, **kwargs)
        if not isinstance(self.student, MeanFlowStudent):
            raise ValueError("MeanFlow needs a two-time student: wrap the network in "
                             "lightning_modules.networks.MeanFlowStudent (network: <the denoiser>)")
        if velocity_source not in ("data", "teacher"):
            raise ValueError(f"velocity_source must be 'data' or 'teacher', got {velocity_source!r}")
        if not 0.0 <= equal_time_fraction <= 1.0 or logit_std <= 0 or adaptive_p < 0 or adaptive_c <= 0:
            raise ValueError("need 0 <= equal_time_fraction <= 1, logit_std > 0, adaptive_p >= 0, adaptive_c > 0")
        if self.schedule.is_discrete:
            raise ValueError("MeanFlow needs a continuous-time schedule")
        self.velocity_source, self.equal_time_fraction = velocity_source, equal_time_fraction
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.adaptive_p, self.adaptive_c, self.jvp_method = adaptive_p, adaptive_c, jvp_method

    def flow_range(self) -> tuple[float, float]:
        lo, hi = (self.schedule.edm_sigma(torch.tensor(v, dtype=torch.float64)).item()
                  for v in (self.schedule.t_min, self.schedule.t_max))
        return lo / (1 + lo), hi / (1 + hi)

    def sample_times(self, n: int, device) -> tuple[Tensor, Tensor]:
        """(t, r), t >= r: the larger / smaller of two logit-normal draws; r = t with prob. equal_time_fraction."""
        draws = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(2, n, dtype=torch.float64))
        lo, hi = self.flow_range()
        draws = draws.clamp(lo, hi)
        t, r = draws.max(0).values, draws.min(0).values
        equal = torch.rand(n, dtype=torch.float64) < self.equal_time_fraction
        return t.to(device), torch.where(equal, t, r).to(device)

    def velocity(self, x0: Tensor, e: Tensor, z: Tensor, t: Tensor, cond) -> Tensor:
        if self.velocity_source == "data":
            return e - x0
        x_native, tau = self.student.to_native(z, t)
        with torch.no_grad():
            denoised = self.teacher_x0(x_native, tau, cond)
        return ((z.double() - denoised.double()) / broadcast_to_data(t.double(), z)).to(z.dtype)

    def target(self, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond) -> Tensor:
        """u_tgt = v - (t - r) du/dt, du/dt by JVP along (v, 0, 1), without gradient."""
        network = self.target_network
        with torch.no_grad():
            _, du_dt = jvp(lambda a, b, c: network.average_velocity(a, b, c, cond), (z, r.double(), t.double()),
                           (v, torch.zeros_like(r, dtype=torch.float64), torch.ones_like(t, dtype=torch.float64)),
                           method=self.jvp_method)
            return (v.double() - broadcast_to_data((t - r).double(), v) * du_dt.double()).to(z.dtype)

    def time_pairs(self, n, device):
        return self.sample_times(n, device)

    def generator_loss(self, batch):
        x0, cond = batch["real"], batch.get("real_cond")
        t, r = self.sample_times(x0.shape[0], x0.device)
        e = self.noise_like(x0)
        tt = broadcast_to_data(t.double(), x0)
        z = ((1 - tt) * x0.double() + tt * e.double()).to(x0.dtype)
        v = self.velocity(x0, e, z, t, cond)
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
        devices = [z.device] if z.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u_tgt = self.target(z, r, t, v, cond)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u = self.student.average_velocity(z, r, t, cond)
        squared = (u.float() - u_tgt.float()).flatten(1).pow(2).sum(1)
        weight = 1.0 / (squared.detach() + self.adaptive_c) ** self.adaptive_p
        return {"loss": (weight * squared).mean(), "distance": squared.mean().detach()}
