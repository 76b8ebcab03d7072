"""SlimFlow (Zhu et al. 2024, "SlimFlow: training smaller one-step diffusion models with rectified flow",
arXiv:2407.12718): a student smaller than the teacher, so it cannot start as the teacher's copy (the "initialisation
mismatch" of reflow), trained in two stages on the rectified-flow mechanism of ``rectified_flow``:

  1. Annealing reflow (Sec. 3.2). The coupling starts independent (1-RF: data x, fresh noise -- trainable from a
     random init) and is annealed into the teacher's reflow coupling (z, ODE_T(z)): at generator update k the fraction
     beta(k) = max(0, 1 - k / anneal_steps) of each batch uses independent pairs, the rest teacher pairs
     (``anneal_mode="fraction"``); ``anneal_mode="noise"`` instead pairs x = ODE_T(z) with the noise
     sqrt(1 - beta^2) z + beta eps (eps fresh), which moves from independent (beta = 1) to reflow (beta = 0) too.
  2. Flow-guided distillation (Sec. 3.3), after ``reflow_steps`` updates: the small 2-RF is frozen as ``flow`` and
     the one-step student G(z) = z - v_theta(z, 1) regresses onto the teacher pair's x, plus a guidance term that
     matches G(z) to the frozen small flow's two-step Euler sample through a random intermediate time tau ~ U(0, 1):
       L = d(G(z), x) + lambda_guide d(G(z), sg(Euler_2(flow; z; 1 -> tau -> 0))).
     (Reading of the paper's 2-Euler flow guidance; d = L2 / pseudo-Huber, its LPIPS is unavailable offline.)

``network_report`` gives parameter count and images/s of a network's sampler, for the side-by-side benchmark.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from ..diffusion.schedules import broadcast_to_data
from ..losses import distance
from .rectified_flow import InstaFlow


class SlimFlow(InstaFlow):
    stage_lengths = InstaFlow.stage_lengths + ("anneal_steps",)

    def __init__(self, *args, anneal_steps: int = 500, anneal_mode: str = "fraction", guidance_weight: float = 1.0,
                 reflow_steps: int = 1000, **kwargs):
        super().__init__(*args, reflow_steps=reflow_steps, **kwargs)
        if anneal_steps < 0 or guidance_weight < 0:
            raise ValueError(f"need anneal_steps >= 0 and guidance_weight >= 0, got {anneal_steps}, {guidance_weight}")
        if anneal_mode not in ("fraction", "noise"):
            raise ValueError(f"unknown anneal_mode {anneal_mode!r}; expected 'fraction' or 'noise'")
        self.anneal_steps, self.anneal_mode, self.guidance_weight = anneal_steps, anneal_mode, guidance_weight
        # stage 1 mixes in independent pairs, which need data samples
        self.needs_real_data = anneal_steps > 0
        self.real_data_reason = "annealing reflow starts from the independent (data, noise) coupling"

    def beta(self) -> float:
        if self.anneal_steps == 0:
            return 0.0
        return max(0.0, 1.0 - int(self.generator_updates) / self.anneal_steps)

    def annealed_coupling(self, batch: dict) -> tuple[Tensor, Tensor, object]:
        x_teacher, z_teacher, cond = super(InstaFlow, self).coupling_batch(batch)
        beta = self.beta()
        if beta == 0.0:
            return x_teacher, z_teacher, cond
        if self.anneal_mode == "noise":
            eps = self.noise_like(z_teacher)
            return x_teacher, (1 - beta ** 2) ** 0.5 * z_teacher + beta * eps, cond
        real = batch["real"][: x_teacher.shape[0]].to(x_teacher.dtype)
        independent = torch.rand(x_teacher.shape[0], device=x_teacher.device) < beta
        mask = broadcast_to_data(independent, x_teacher)
        x = torch.where(mask, real, x_teacher)
        z = torch.where(mask, self.noise_like(z_teacher), z_teacher)
        return x, z, cond

    @torch.no_grad()
    def guidance_target(self, z: Tensor, cond) -> Tensor:
        """Two Euler steps of the frozen small flow, tau_max -> tau -> 0, tau ~ U(0, tau_max) per sample."""
        tau0 = torch.full((z.shape[0],), self.tau_max, dtype=torch.float64, device=z.device)
        tau = torch.rand(z.shape[0], dtype=torch.float64, device=z.device) * self.tau_max
        y = (self.tau_max * z.double()).to(z.dtype)
        y = y + broadcast_to_data(tau - tau0, y).to(y.dtype) * self.velocity(self.flow, y, tau0, cond)
        return y - broadcast_to_data(tau, y).to(y.dtype) * self.velocity(self.flow, y, tau, cond)

    def generator_loss(self, batch):
        if not self.distilling:
            x, z, cond = self.annealed_coupling(batch)
            loss = self.flow_matching_loss(x, z, cond).mean()
            return {"loss": loss, "flow_matching": loss.detach(), "beta": torch.tensor(self.beta())}
        x, z, cond = super(InstaFlow, self).coupling_batch(batch)  # teacher pairs (z, ODE_T(z))
        prediction = self.one_step(z, cond)
        loss = distance(prediction, x.to(prediction.dtype), self.distill_distance, self.huber_c).mean()
        out = {"distillation": loss.detach()}
        if self.guidance_weight > 0:
            guide = distance(prediction, self.guidance_target(z, cond), self.distill_distance, self.huber_c).mean()
            loss = loss + self.guidance_weight * guide
            out["flow_guidance"] = guide.detach()
        out["loss"] = loss
        return out


def parameter_count(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


@torch.no_grad()
def network_report(module, network=None, nfe: int = 1, batch_size: int = 1000, repeats: int = 3, cond=None) -> dict:
    """{"parameters", "images_per_second", "nfe"} of ``module.generate`` with ``network`` (default the student):
    best of ``repeats`` timed batches after one warm-up batch."""
    network = module.student if network is None else network
    shape = module.teacher.data_shape
    noise = torch.randn((batch_size, *shape), generator=torch.Generator().manual_seed(0)).to(module.device)
    module.generate(noise, cond, nfe=nfe, network=network)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        module.generate(noise, cond, nfe=nfe, network=network)
        best = min(best, time.perf_counter() - start)
    return {"parameters": parameter_count(network), "images_per_second": batch_size / best, "nfe": nfe}
