"""Rectified flow and its distillation descendants on the shared base: 1-RF, reflow (k-RF), InstaFlow, 2-RF++.

One mechanism (Liu et al. 2022, "Flow straight and fast", arXiv:2209.03003, Eq. 1): given a coupling (x, z) of data
x and noise z, the linear interpolation y_tau = (1 - tau) x + tau z has velocity z - x, and the rectified flow is

    v* = argmin_v  E_{tau ~ p(tau)} E_{(x, z) ~ coupling} d( v(y_tau, tau), z - x ),       d = ||.||^2

whose minimiser is v*(y, tau) = E[z - x | y_tau = y] (a posterior mean). Sampling integrates dy/dtau = v(y, tau) from
tau = 1 (y = z) down to tau = 0. What changes between the family's members is only the coupling, the time law and d:

  * 1-RF        coupling = independent (x from the data, z fresh noise), tau ~ U[0, 1], d = L2.
  * reflow/k-RF coupling = (z, ODE_{k-1}(z)): the previous flow's (here: the teacher's) deterministic sample of z
                (Liu et al. 2022, Alg. 1 "Reflow"), on the fly or from a cached pair file (``trajectory_pairs``).
  * InstaFlow   (Liu et al. 2023, arXiv:2309.06380, Sec. 3 / Alg. 1) reflow, then distillation of the 2-RF's ODE
                into a one-step model: x_hat = z - v_theta(z, 1), L = d(x_hat, ODE_{2-RF}(z)) (paper: LPIPS).
  * 2-RF++      (Lee et al. 2024, arXiv:2405.20320, Sec. 4): one reflow round from a model initialised at the
                1-RF / diffusion teacher, the U-shaped time density p(tau) ∝ exp(a tau) + exp(a (1 - tau)), a = 4,
                and the pseudo-Huber distance (their LPIPS-Huber premetric needs LPIPS weights, which are not
                available offline: pseudo-Huber alone here).

Flow coordinates on any schedule. The framework's networks are x0-denoisers D(x_t, t) on the teacher's schedule
x_t = alpha_t x0 + sigma_t eps. Every such schedule is a reparametrisation of the linear path: with
edm_sigma(t) = sigma_t / alpha_t = tau / (1 - tau), the point y_tau = (1 - tau) x_t / alpha_t follows
y_tau = (1 - tau) x0 + tau eps, so the network's flow velocity in (y, tau) is (``flow_velocity``)

    v(y, tau) = (y - D(x_t, t)) / tau,   t = time_from_edm_sigma(tau / (1 - tau)),  x_t = alpha_t y / (1 - tau).

On a ``RectifiedFlowSchedule`` this is exactly ``Denoiser.forward(..., prediction="flow")`` (u = eps - x0, checked in
the tests); on an EDM / VP teacher (the MNIST one) it is the same PF-ODE in the linear-path coordinates. Students are
ordinary x0-denoisers (EDM preconditioning), trained through this conversion, and ``generate`` samples them with the
flow's Euler ODE on a uniform tau grid (``flow_sample``), so GroundTruthMetrics / FID score the flow at ``nfe`` steps
(one Euler step from tau = 1 is x = z - v(z, 1) = D(x_T, T): the student's one-step sample).
"""
from __future__ import annotations

import copy
import math
import torch
from torch import Tensor

from ..base import DistillationModule
from ..diffusion.samplers import flow_hybrid_sample, flow_sample
from ..diffusion.schedules import NoiseSchedule, broadcast_to_data
from ..losses import distance

COUPLINGS = ("independent", "teacher", "pairs")


# ----------------------------------------------------------------------------------------------- flow coordinates
def flow_time_max(schedule: NoiseSchedule) -> float:
    """The flow time of the schedule's noise end, tau_max = s / (1 + s) with s = edm_sigma(t_max)."""
    s = schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=torch.float64)).item()
    return s / (1.0 + s)


def native_time(tau: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Native time t of the schedule whose edm_sigma equals tau / (1 - tau), clamped to [t_min, t_max]."""
    tau = tau.double()
    t = schedule.time_from_edm_sigma(tau / (1.0 - tau))
    return t.clamp(schedule.t_min, schedule.t_max)


def flow_velocity(network, y: Tensor, tau: Tensor, cond, schedule: NoiseSchedule) -> Tensor:
    """v(y, tau) of an x0-denoiser ``network(x_t, t, cond)`` in linear-path coordinates (module docstring)."""
    t = native_time(tau, schedule)
    alpha = broadcast_to_data(schedule.alpha_sigma(t)[0], y)
    tau_b = broadcast_to_data(tau.double(), y)
    x_t = (alpha * y.double() / (1.0 - tau_b)).to(y.dtype)
    x0 = network(x_t, t, cond)
    return ((y.double() - x0.double()) / tau_b).to(y.dtype)


# ------------------------------------------------------------------------------------------------ time laws
class FlowTime:
    """A law of the flow time tau on [0, 1] (tau = 1 noise, tau = 0 data); ``density`` for the tests."""

    def __call__(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(n, generator, device) -> tau")

    def density(self, tau: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement density(tau)")


class UniformFlowTime(FlowTime):
    """tau ~ U[0, 1] (Liu et al. 2022, Eq. 1)."""

    def __call__(self, n, generator=None, device="cpu"):
        return torch.rand(n, generator=generator, dtype=torch.float64).to(device)

    def density(self, tau):
        return torch.ones_like(tau.double())


class UShapedFlowTime(FlowTime):
    """2-RF++'s U-shaped density (Lee et al. 2024, Sec. 4.1): p(tau) = a (e^{a tau} + e^{a (1 - tau)}) / (2 (e^a - 1)),
    a = 4: the mirrored exponential, heavy at both ends where reflow's loss is largest. Sampled exactly: with
    probability 1/2 tau = log(1 + U (e^a - 1)) / a (the density a e^{a tau} / (e^a - 1)), else its mirror 1 - tau."""

    def __init__(self, a: float = 4.0):
        if a <= 0:
            raise ValueError(f"UShapedFlowTime needs a > 0, got {a}")
        self.a = a

    def __call__(self, n, generator=None, device="cpu"):
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        mirror = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
        tau = torch.log1p(u * math.expm1(self.a)) / self.a
        return torch.where(mirror, 1.0 - tau, tau).to(device)

    def density(self, tau):
        tau = tau.double()
        return self.a * (torch.exp(self.a * tau) + torch.exp(self.a * (1 - tau))) / (2 * math.expm1(self.a))


class LogitNormalFlowTime(FlowTime):
    """tau = sigmoid(N(mean, std^2)) (Esser et al. 2024, Sec. 3.1)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if std <= 0:
            raise ValueError(f"LogitNormalFlowTime std must be > 0, got {std}")
        self.mean, self.std = mean, std

    def __call__(self, n, generator=None, device="cpu"):
        return torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64)).to(device)

    def density(self, tau):
        tau = tau.double()
        logit = torch.log(tau / (1 - tau))
        return torch.exp(-0.5 * ((logit - self.mean) / self.std) ** 2) / (self.std * math.sqrt(2 * math.pi) * tau * (1 - tau))


def make_flow_time(time_distribution: str | FlowTime, u_shape_a: float = 4.0, logit_mean: float = 0.0,
                   logit_std: float = 1.0) -> FlowTime:
    if isinstance(time_distribution, FlowTime):
        return time_distribution
    laws = {"uniform": lambda: UniformFlowTime(), "u_shaped": lambda: UShapedFlowTime(u_shape_a),
            "logit_normal": lambda: LogitNormalFlowTime(logit_mean, logit_std)}
    if time_distribution not in laws:
        raise ValueError(f"unknown time_distribution {time_distribution!r}; expected one of {sorted(laws)}")
    return laws[time_distribution]()


def velocity_regression(v: Tensor, x: Tensor, z: Tensor, metric: str = "l2", huber_c: float | None = None) -> Tensor:
    """Per-sample d(v, z - x) (Liu et al. 2022, Eq. 1; 2-RF++ Sec. 4.2 with d = pseudo-Huber)."""
    return distance(v, (z - x).to(v.dtype), metric, huber_c)


# ------------------------------------------------------------------------------------------------ the module
class RectifiedFlow(DistillationModule):
    """Velocity regression on a coupling (see the module docstring). ``coupling``:

    * ``"independent"`` (1-RF): x = batch["real"], z fresh noise.
    * ``"teacher"`` (reflow on the fly): z = batch["noise"], x = the teacher's ODE sample of z (``pair_nfe``
      evaluations of ``pair_sampler``, the framework's teacher sampler; the teacher is the previous flow, e.g. a
      1-RF network, or the exact Gaussian-mixture teacher).
    * ``"pairs"`` (reflow from a cached file): z, x = batch["pair_noise"], batch["pair_target"] of a pairs
      datamodule (``datamodules.pairs``; files from ``distill pairs``).

    ``promote_student_to_teacher`` freezes the current student as the next round's teacher (k-RF -> (k+1)-RF).
    ``default_nfe``: the Euler steps ``generate`` takes when no ``nfe`` is given."""

    def __init__(self, *args, coupling: str = "independent", time_distribution: str = "uniform",
                 u_shape_a: float = 4.0, logit_mean: float = 0.0, logit_std: float = 1.0,
                 flow_distance: str = "l2", huber_c: float | None = None, pair_nfe: int = 32,
                 pair_sampler: str = "heun", default_nfe: int = 1, sample_method: str = "euler", **kwargs):
        super().__init__(*args, **kwargs)
        if coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling {coupling!r}; expected one of {COUPLINGS}")
        if pair_nfe < 1 or default_nfe < 1:
            raise ValueError(f"pair_nfe and default_nfe must be >= 1, got {pair_nfe}, {default_nfe}")
        distance(torch.zeros(1, 1), torch.zeros(1, 1), flow_distance, huber_c)  # fail early on an unknown metric
        self.coupling, self.flow_distance, self.huber_c = coupling, flow_distance, huber_c
        self.time_law = make_flow_time(time_distribution, u_shape_a, logit_mean, logit_std)
        self.pair_nfe, self.pair_sampler = pair_nfe, pair_sampler
        self.default_nfe, self.sample_method = default_nfe, sample_method
        self.tau_max = flow_time_max(self.schedule)
        self.needs_real_data = coupling == "independent"
        self.real_data_reason = "1-RF's independent coupling pairs data samples with fresh noise"

    # ---------------------------------------------------------------- velocities and sampling
    def velocity(self, network, y: Tensor, tau: Tensor, cond) -> Tensor:
        return flow_velocity(network, y, tau, cond, self.schedule)

    def teacher_velocity(self, y: Tensor, tau: Tensor, cond) -> Tensor:
        return flow_velocity(lambda x, t, c: self.teacher_x0(x, t, c), y, tau, cond, self.schedule)

    def generate(self, noise, cond=None, nfe=None, network=None, generator=None):
        """The flow's ODE sample of ``noise`` in ``nfe`` Euler steps (the framework's evaluation path)."""
        network = self.student if network is None else network
        steps = self.default_nfe if nfe is None else nfe
        return flow_sample(lambda y, tau: self.velocity(network, y, tau, cond), noise, steps, self.tau_max,
                           self.sample_method)

    @torch.no_grad()
    def sample(self, noise, cond=None, nfe=None, generator=None, teacher_steps: int = 0, teacher_method: str = "heun"):
        """``teacher_steps`` > 0: the hybrid sampler on the flow's tau grid (``samplers.flow_hybrid_sample``)."""
        if not teacher_steps:
            return super().sample(noise, cond, nfe, generator)
        network = self.evaluation_student if self.evaluation_student is not None else self.student
        was_training = network.training
        network.eval()
        try:
            return flow_hybrid_sample(lambda y, tau: self.teacher_velocity(y, tau, cond),
                                      lambda y, tau: self.velocity(network, y, tau, cond), noise,
                                      self.default_nfe if nfe is None else nfe, self.tau_max, teacher_steps,
                                      teacher_method, self.sample_method)
        finally:
            network.train(was_training)

    # ---------------------------------------------------------------- couplings
    @torch.no_grad()
    def teacher_pairs(self, z: Tensor, cond) -> Tensor:
        """x = ODE_T(z): the teacher's deterministic sample (reflow's coupling, Liu et al. 2022 Alg. 1)."""
        return self.sample_teacher(z, cond, nfe=self.pair_nfe, method=self.pair_sampler)

    def coupling_batch(self, batch: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x, z, cond) of the configured coupling."""
        if self.coupling == "independent":
            x = batch["real"]
            cond = batch.get("real_cond") if getattr(self.student, "num_classes", 0) else batch.get("cond")
            return x, self.noise_like(x), cond
        if self.coupling == "pairs":
            missing = [k for k in ("pair_noise", "pair_target") if k not in batch]
            if missing:
                raise ValueError(f"coupling='pairs' needs {missing} in the batch: use a pairs datamodule "
                                 "(datamodules.pairs.ToyMixturePairsDataModule / MNISTPairsDataModule)")
            return batch["pair_target"], batch["pair_noise"], batch.get("pair_cond")
        z, cond = batch["noise"], batch.get("cond")
        return self.teacher_pairs(z, cond), z, cond

    # ---------------------------------------------------------------- loss
    def flow_matching_loss(self, x: Tensor, z: Tensor, cond, network=None) -> Tensor:
        """Per-sample d(v_theta(y_tau, tau), z - x), tau from the time law (clipped to the schedule's range)."""
        network = self.student if network is None else network
        tau = self.time_law(x.shape[0], device=x.device).clamp(1e-4, self.tau_max)
        tb = broadcast_to_data(tau, x)
        y = ((1 - tb) * x.double() + tb * z.double()).to(x.dtype)
        return velocity_regression(self.velocity(network, y, tau, cond), x, z, self.flow_distance, self.huber_c)

    def generator_loss(self, batch):
        x, z, cond = self.coupling_batch(batch)
        loss = self.flow_matching_loss(x, z, cond).mean()
        return {"loss": loss, "flow_matching": loss.detach()}

    # ---------------------------------------------------------------- rounds
    def promote_student_to_teacher(self) -> None:
        """k-RF -> (k+1)-RF: the trained flow becomes the frozen teacher whose ODE makes the next coupling."""
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.coupling = "teacher" if self.coupling == "independent" else self.coupling
        self.needs_real_data = False


class Reflow(RectifiedFlow):
    """k-RF: flow matching on the previous flow's ODE pairs (default on the fly from the teacher)."""

    def __init__(self, *args, coupling: str = "teacher", **kwargs):
        super().__init__(*args, coupling=coupling, **kwargs)


class RectifiedFlowPP(Reflow):
    """2-RF++ (Lee et al. 2024): one reflow round with the U-shaped time law and pseudo-Huber distance; the student
    starts from the teacher (a copy, or the toy warm start regressed onto it). LPIPS is unavailable offline."""

    def __init__(self, *args, time_distribution: str = "u_shaped", flow_distance: str = "pseudo_huber", **kwargs):
        super().__init__(*args, time_distribution=time_distribution, flow_distance=flow_distance, **kwargs)


class InstaFlow(Reflow):
    """InstaFlow (Liu et al. 2023, Alg. 1): stage 1 (the first ``reflow_steps`` generator updates) is reflow on the
    teacher's pairs -> 2-RF; stage 2 freezes that 2-RF as ``flow`` and distils its ODE into the student in one step:
    L = d(z - v_theta(z, 1), ODE_{2-RF}(z)) with ``distill_nfe`` Euler steps of the frozen 2-RF (d: L2 or
    pseudo-Huber, the paper's LPIPS is unavailable offline). The student continues from the 2-RF weights (the
    paper initialises the one-step model from 2-RF). ``reflow_steps = 0``: distil the teacher's own pairs (the coupling
    the datamodule or the teacher's ODE gives) directly."""
    #: attributes counted in generator updates (a benchmark that shortens the run scales them alike)
    stage_lengths = ("reflow_steps",)

    def __init__(self, *args, reflow_steps: int = 1000, distill_nfe: int = 8, distill_distance: str = "l2",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if reflow_steps < 0 or distill_nfe < 1:
            raise ValueError(f"need reflow_steps >= 0 and distill_nfe >= 1, got {reflow_steps}, {distill_nfe}")
        distance(torch.zeros(1, 1), torch.zeros(1, 1), distill_distance, self.huber_c)
        self.reflow_steps, self.distill_nfe, self.distill_distance = reflow_steps, distill_nfe, distill_distance
        self.flow = copy.deepcopy(self.student).requires_grad_(False).eval()  # the frozen 2-RF (checkpointed)
        self.register_buffer("generator_updates", torch.tensor(0, dtype=torch.long), persistent=True)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "flow", None) is not None:
            self.flow.eval()
        return self

    @property
    def distilling(self) -> bool:
        return int(self.generator_updates) >= self.reflow_steps

    def on_generator_step_end(self) -> None:
        self.generator_updates += 1
        if int(self.generator_updates) == self.reflow_steps and self.reflow_steps > 0:
            self.flow.load_state_dict(self.student.state_dict())  # freeze the 2-RF, the student continues from it

    @torch.no_grad()
    def distillation_target(self, z: Tensor, cond, x_pair: Tensor) -> Tensor:
        if self.reflow_steps == 0:
            return x_pair
        return flow_sample(lambda y, tau: self.velocity(self.flow, y, tau, cond), z, self.distill_nfe, self.tau_max)

    def one_step(self, z: Tensor, cond, network=None) -> Tensor:
        """x_hat = y(tau_max) - tau_max v(y, tau_max) with y = tau_max z: one Euler step of the flow."""
        return self.generate(z, cond, nfe=1, network=network)

    def generator_loss(self, batch):
        x, z, cond = self.coupling_batch(batch)
        if not self.distilling:
            loss = self.flow_matching_loss(x, z, cond).mean()
            return {"loss": loss, "flow_matching": loss.detach()}
        target = self.distillation_target(z, cond, x)
        loss = distance(self.one_step(z, cond), target.to(z.dtype), self.distill_distance, self.huber_c).mean()
        return {"loss": loss, "distillation": loss.detach()}

    def coupling_batch(self, batch):
        if self.distilling and self.reflow_steps > 0 and self.coupling == "teacher":
            # stage 2 needs only noise: its target is the frozen 2-RF's ODE, not the teacher's
            return batch["noise"], batch["noise"], batch.get("cond")
        return super().coupling_batch(batch)
