"""AGD -- adapter guidance distillation (Jensen & Sadat, "Efficient Distillation of Classifier-Free Guidance using
Adapters", TMLR 2025, arXiv:2503.07274).

Classifier-free guidance (Ho & Salimans 2022) costs two network evaluations per sampling step,
    D_w(x_t, t, c) = D(x_t, t, 0) + w (D(x_t, t, c) - D(x_t, t, 0))          (this framework's convention: w = 1 off).
AGD keeps the base denoiser D frozen and trains only small guidance adapters psi (``networks.GuidanceAdapterDenoiser``,
residual, zero-initialised, conditioned on w) so that ONE adapted pass D_psi(x_t, t, c, w) reproduces D_w. Training
(the paper's "training on CFG-guided trajectories"):
  1  c ~ batch labels, z ~ N(0, I), w ~ U[w_min, w_max]                         per sample
  2  run the base's CFG sampler: x_{t_0} = sigma(t_0) z,
     x_{t_{i+1}} = DDIM(x_{t_i}, D_w(x_{t_i}, t_i, c); t_i -> t_{i+1})
     on an N-level grid (``trajectory_steps``), recording every state and the guided x0 it evaluated there
  3  pick one level i ~ U{0..N-1} per trajectory:  (x_{t_i}, t_i, c, w, target D_w(x_{t_i}, t_i, c))
  4  L(psi) = lambda(t_i) ||D_psi(x_{t_i}, t_i, c, w) - D_w(x_{t_i}, t_i, c)||^2  (x0 space; lambda = max(SNR, 1) by
     default, ``progressive.loss_weight``; AGD's epsilon-MSE is lambda = SNR, ``weighting: snr``)
The states are those the guided sampler visits, not forward-noised data: guided trajectories leave the data marginals
p_t, and a student fit on p_t (Meng et al. 2023, ``progressive.GuidanceDistillation``) is queried off its training
distribution at inference -- the mismatch AGD removes. The paper samples trajectories once to disk; here each
generator step samples fresh ones (the toy teacher is exact and cheap, MNIST's smoke run is short), which is the same
distribution of training states.
Sampling: the adapted model's deterministic DDIM sampler at ``sample_guidance_scale``, one evaluation per step
(CFG would spend two). The target is the teacher's CFG: with a network teacher the base IS the teacher (``student``
unset: adapters on the shared frozen teacher); with the exact mixture teacher of the toy suite, which has no layers,
the base is a network warm-started on it (``student``: the base network, owned and frozen after the warm start) and
the target is the exact CFG of the mixture; the framework's warm start fits that owned base (adapters off) and
freezes it again (``DistillationModule.setup``). ``trainable_fraction`` (logged) is adapter / (adapter + base)
parameters.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..base import DistillationModule
from ..diffusion.samplers import ddim_step, euler_sample, prior_sample, sampler_times
from ..networks.denoiser import Denoiser
from ..networks.guidance_adapters import GuidanceAdapterDenoiser
from .progressive import WEIGHTINGS, loss_weight

AGD_WEIGHTINGS = (*WEIGHTINGS, "snr")


class AdapterGuidanceDistillation(DistillationModule):
    uses_critic = False

    def __init__(self, teacher: Denoiser, student: Denoiser | None = None, *args,
                 adapter_modules: list[str] | None = None, adapter_bottleneck: int = 32,
                 guidance_range: tuple[float, float] = (1.0, 4.0),
                 sample_guidance_scale: float = 2.0, trajectory_steps: int = 16, weighting: str = "truncated_snr",
                 **kwargs):
        low, high = (float(v) for v in guidance_range)
        if not 0 <= low <= high:
            raise ValueError(f"guidance_range must be 0 <= w_min <= w_max, got {guidance_range}")
        if trajectory_steps < 1:
            raise ValueError(f"trajectory_steps must be >= 1, got {trajectory_steps}")
        if weighting not in AGD_WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {AGD_WEIGHTINGS}")
        if kwargs.get("student_lora") is not None:
            raise ValueError("AGD trains guidance adapters on a frozen base; student_lora is a different student")
        super().__init__(teacher, self._adapted_student(teacher, student, adapter_modules, adapter_bottleneck),
                         *args, **kwargs)
        self.guidance_range, self.sample_guidance_scale = (low, high), float(sample_guidance_scale)
        self.trajectory_steps, self.weighting = trajectory_steps, weighting

    @staticmethod
    def _adapted_student(teacher, student, adapter_modules, bottleneck) -> GuidanceAdapterDenoiser:
        """Adapters on the shared frozen teacher (student unset), on a given base network (owned), or as given."""
        if isinstance(student, GuidanceAdapterDenoiser):
            return student
        if student is None:
            if not any(True for _ in teacher.parameters()):
                raise ValueError(f"AGD adapts a frozen base network; the teacher {type(teacher).__name__} has no "
                                 "layers, so give student: the base network (warm-started on the teacher)")
            return GuidanceAdapterDenoiser(teacher, adapter_modules, bottleneck, own_base=False)
        return GuidanceAdapterDenoiser(student, adapter_modules, bottleneck, own_base=True)

    # ------------------------------------------------------------------ steps 1-3: CFG trajectories
    def draw_guidance(self, n: int, device) -> Tensor:
        low, high = self.guidance_range
        return low + (high - low) * torch.rand(n, dtype=torch.float64, device=device)

    def trajectory_times(self) -> Tensor:
        return sampler_times(self.schedule, self.trajectory_steps, "euler")

    @torch.no_grad()
    def guided_trajectory(self, noise: Tensor, cond: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's CFG DDIM sampler from ``noise`` at per-sample scales ``w``: (states, guided x0), each
        (N, B, *shape) -- state i is x_{t_i}, the input of the sampler's i-th evaluation."""
        times = self.trajectory_times().to(noise.device)
        x = prior_sample(noise, times[0], self.schedule)
        states, targets = [], []
        for i, t in enumerate(times):
            t_vec = torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)
            x0 = self.teacher_x0(x, t_vec, cond, guidance_scale=w.to(x.dtype))
            states.append(x)
            targets.append(x0)
            if i + 1 < len(times):
                x = ddim_step(x, x0, t_vec, torch.full_like(t_vec, float(times[i + 1])), self.schedule)
        return torch.stack(states), torch.stack(targets)

    def trajectory_batch(self, noise: Tensor, cond: Tensor) -> dict:
        """Step 3: one state per guided trajectory at a uniform level (x_t, t, w, target)."""
        n = noise.shape[0]
        w = self.draw_guidance(n, noise.device)
        states, targets = self.guided_trajectory(noise, cond, w)
        level = torch.randint(0, states.shape[0], (n,), device=noise.device)
        rows = torch.arange(n, device=noise.device)
        t = self.trajectory_times().to(noise.device)[level]
        return {"x_t": states[level, rows], "t": t, "w": w, "target": targets[level, rows], "level": level}

    # ------------------------------------------------------------------ step 4
    def weight(self, t: Tensor) -> Tensor:
        edm_sigma = self.schedule.edm_sigma(t)
        if self.weighting == "snr":
            return edm_sigma.double() ** -2
        return loss_weight(edm_sigma, self.weighting)

    def generator_loss(self, batch):
        cond = batch.get("cond")
        if cond is None:
            raise ValueError("AGD distils classifier-free guidance and needs class labels in the batch "
                             "(cond); set the datamodule's conditional: true")
        states = self.trajectory_batch(batch["noise"], cond)
        prediction = self.student(states["x_t"], states["t"], cond, guidance=states["w"])
        per_sample = ((prediction - states["target"].detach()) ** 2).flatten(1).mean(1)
        weight = self.weight(states["t"]).to(per_sample)
        return {"loss": (weight * per_sample).mean(), "distance": per_sample.mean().detach(),
                "trainable_fraction": torch.tensor(self.trainable_parameter_fraction())}

    # ------------------------------------------------------------------ the single-pass guided sampler
    def evaluation_times(self, nfe):
        return sampler_times(self.schedule, self.trajectory_steps if nfe is None else nfe, "euler")

    def generate(self, noise, cond=None, nfe=None, network=None, generator=None, guidance=None):
        """Deterministic DDIM with the adapted model at w (``sample_guidance_scale``): one evaluation per step."""
        network = self.student if network is None else network
        w = self.sample_guidance_scale if guidance is None else guidance
        times = self.evaluation_times(nfe)
        return euler_sample(lambda x, t: network(x, t, cond, guidance=None if cond is None else w),
                            prior_sample(noise, times[0], self.schedule), times, self.schedule)

    def sample_guided_teacher(self, noise, cond, nfe=None, guidance=None) -> Tensor:
        """The two-pass CFG sampler AGD replaces (same grid and scale): the reference the adapted sampler matches."""
        w = self.sample_guidance_scale if guidance is None else guidance
        times = self.evaluation_times(nfe)
        return euler_sample(lambda x, t: self.teacher_x0(x, t, cond, guidance_scale=w),
                            prior_sample(noise, times[0], self.schedule), times, self.schedule)
