"""TDM -- trajectory distribution matching (Luo, Hu, Sun, Cai & Tang, "Learning Few-Step Diffusion Models by
Trajectory Distribution Matching", ICCV 2025, arXiv:2503.06674).

A K-step student G samples deterministically (DDIM with its own x0 prediction; the paper's deterministic sampler):
    x_{t_0} = sigma(t_0) z,   x_{t_{i+1}} = DDIM(x_{t_i}, G(x_{t_i}, t_i, K); t_i -> t_{i+1}),   output G(x_{t_{K-1}}).
Instead of matching only the final samples (DMD) or each ODE step instance by instance (consistency / PD), TDM
matches, for every segment [t_{i+1}, t_i] of the student's trajectory, the law of the segment's output x_{t_{i+1}}
to the teacher's marginal p_{t_{i+1}}, by data-free score distillation at noise levels inside the segment:
  1  K ~ U(step_budgets) and a segment i ~ U{0..K-1}           (the sampling-steps-aware objective, below)
  2  x_{t_i}: i student steps from z (no gradient);  x0 = G(x_{t_i}, t_i, K);  x_s = DDIM(x_{t_i}, x0; t_i -> s),
     s = t_{i+1} (the last segment ends at the data, s = 0: x_s = x0)
  3  t in the segment (s, t_i] (Karras ramp);  x_t = (alpha_t / alpha_s) x_s + beta n,
     beta^2 = sigma_t^2 - (alpha_t sigma_s / alpha_s)^2      (forward diffusion s -> t: q_t = law(x_s) * kernel)
  4  generator: g = D_F(x_t, t, K) - D_T(x_t, t) = sigma_t^2 / alpha_t (grad log q_t - grad log p_t)(x_t),
     L_G = 1/2 ||x0 - sg(x0 - g)||^2                  (the release applies g to the x0 prediction: d x_t / d x0 is
     a positive per-sample scalar (alpha_t / alpha_s)(alpha_s - sigma_s alpha_{t_i} / sigma_{t_i}), so this is the
     gradient of KL(q_t || p_t) up to a per-sample weight; ``normalize_gradient`` adds DMD's 1 / mean|x0 - D_T|)
  5  fake score F: unbiased denoising score matching on q_t. With Y = (alpha_t / alpha_s) x_s, E[Y | x_t] gives
     grad log q_t = (E[Y | x_t] - x_t) / beta^2, so an x0-space denoiser D_F with grad log q_t = (alpha_t D_F - x_t)
     / sigma_t^2 is the regression of  T = (x_t + (sigma_t^2 / beta^2)(Y - x_t)) / alpha_t   (T = x_0 at s = 0: DMD's
     DSM), weighted by lambda(t) (beta^2 / sigma_t^2)^2 so the target's noise stays bounded as t -> s.
Sampling-steps-aware objective (the paper's second contribution): one model serves several step counts. The budget K
is drawn per batch and fed to student and fake score (as the scalar of ``networks.GuidanceEmbeddedDenoiser``, the
zero-initialised scalar embedding Meng et al.'s w-student uses), and the matching target of a segment depends on K
through its end point s: for the same (x, t) a 1-step student must reach the data while a 4-step one only p_{t_1}.
Budget grids are the framework's student grids (``evaluation_times(K)``); ``generate(nfe=K)`` samples with budget K.
Deviation: the authors' release (github.com/Luo-Yihong/TDM, ``train_tdm_demo.py``) regresses, in its fake-score
loss, the x0 prediction under a heuristic importance weight; step 5's target is the exact one for the marginal q_t
being matched (tests check it on a Gaussian student). Step 4's direction on the x0 prediction follows that release.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion.samplers import ddim_step, prior_sample
from ..diffusion.schedules import broadcast_to_data
from ..losses import denoising_score_matching, dmd_gradient, dsm_weight, surrogate_for_gradient
from ..networks.guidance_embedded import GuidanceEmbeddedDenoiser
from .dmd2 import DMD2

#: Karras-ramp fractions of a segment: the generator stays off the end points (DMD2's [0.02, 0.98]), the fake score
#: sees the whole segment (DMD2's critic sees the whole schedule)
GENERATOR_RAMP, CRITIC_RAMP = (0.02, 0.98), (0.0, 1.0)


class TrajectoryDistributionMatching(DMD2):
    def __init__(self, *args, step_budgets: list[int] = (4,), normalize_gradient: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        budgets = sorted({int(k) for k in step_budgets})
        if not budgets or budgets[0] < 1:
            raise ValueError(f"step_budgets needs positive step counts, got {list(step_budgets)}")
        if len(budgets) > 1 and not isinstance(self.student, GuidanceEmbeddedDenoiser):
            raise ValueError(f"several step budgets {budgets} need a budget-aware student: wrap it in "
                             "networks.guidance_embedded.GuidanceEmbeddedDenoiser (the budget is its scalar input)")
        if self.gan_generator_weight > 0 or self.gan_critic_weight > 0:
            raise ValueError("TDM is data-free score distillation; it has no GAN term (set the gan weights to 0)")
        self.step_budgets, self.normalize_gradient = budgets, normalize_gradient

    # ------------------------------------------------------------------ the budget-aware student trajectory
    @staticmethod
    def budgeted(network, x: Tensor, t: Tensor, cond, budget: int) -> Tensor:
        """network(x, t, cond) told the step budget when it takes one (a GuidanceEmbeddedDenoiser)."""
        if isinstance(network, GuidanceEmbeddedDenoiser):
            return network(x, t, cond, guidance=float(budget))
        return network(x, t, cond)

    def budget_times(self, budget: int) -> Tensor:
        return self.evaluation_times(budget)

    def draw_segment(self, device) -> tuple[int, int]:
        """(K, i): a budget and one of its segments, drawn on rank 0 and shared (the simulation runs batched)."""
        budget = self.step_budgets[int(torch.randint(0, len(self.step_budgets), (1,)).item())]
        level = int(torch.randint(0, budget, (1,)).item())
        if self._trainer is not None and self.trainer.world_size > 1:
            budget, level = self.trainer.strategy.broadcast((budget, level), src=0)
        return budget, level

    @torch.no_grad()
    def trajectory_state(self, noise: Tensor, cond, budget: int, level: int, network=None) -> Tensor:
        """x_{t_level} of the student's deterministic K-step trajectory from ``noise``."""
        network = self.student if network is None else network
        times = self.budget_times(budget)
        x = prior_sample(noise, times[0], self.schedule)
        for i in range(level):
            t = torch.full((x.shape[0],), float(times[i]), dtype=torch.float64, device=x.device)
            x0 = self.budgeted(network, x, t, cond, budget)
            x = ddim_step(x, x0, t, torch.full_like(t, float(times[i + 1])), self.schedule)
        return x

    def segment_output(self, noise: Tensor, cond, budget: int, level: int) -> dict:
        """Step 2: x0 = G(x_{t_i}) (with gradient when enabled) and the segment's end point x_s = DDIM(t_i -> s)."""
        times = self.budget_times(budget)
        x_i = self.trajectory_state(noise, cond, budget, level)
        t_i = torch.full((noise.shape[0],), float(times[level]), dtype=torch.float64, device=noise.device)
        x0 = self.budgeted(self.student, x_i, t_i, cond, budget)
        if level + 1 == budget:
            return {"x0": x0, "x_s": x0, "t_i": t_i, "s": None}
        s = torch.full_like(t_i, float(times[level + 1]))
        return {"x0": x0, "x_s": ddim_step(x_i, x0, t_i, s, self.schedule), "t_i": t_i, "s": s}

    # ------------------------------------------------------------------ step 3: inside the segment
    def segment_times(self, t_i: Tensor, s: Tensor | None, ramp: tuple[float, float]) -> Tensor:
        """t in (s, t_i] on a Karras ramp between the segment's noise levels (s = None: down to sigma_min)."""
        rho = 7.0
        hi = self.schedule.edm_sigma(t_i)
        lo = (self.schedule.edm_sigma(torch.full_like(t_i, self.schedule.t_min)) if s is None
              else self.schedule.edm_sigma(s))
        u = ramp[0] + (ramp[1] - ramp[0]) * torch.rand(t_i.shape, dtype=torch.float64, device=t_i.device)
        sigma = (hi ** (1 / rho) + u * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        return self.schedule.time_from_edm_sigma(sigma).clamp(self.schedule.t_min, self.schedule.t_max)

    def diffuse_segment(self, x_s: Tensor, s: Tensor | None, t: Tensor) -> dict:
        """x_t = (alpha_t / alpha_s) x_s + beta n, the DSM target T of step 5 and its weight factor (beta/sigma_t)^4."""
        alpha_t, sigma_t = (broadcast_to_data(c, x_s) for c in self.schedule.alpha_sigma(t))
        if s is None:
            ratio, beta = alpha_t, sigma_t
        else:
            alpha_s, sigma_s = (broadcast_to_data(c, x_s) for c in self.schedule.alpha_sigma(s))
            ratio = alpha_t / alpha_s
            beta = (sigma_t ** 2 - (ratio * sigma_s) ** 2).clamp_min(1e-12).sqrt()
        y = ratio * x_s.double()
        x_t = y + beta * self.noise_like(x_s).double()
        target = (x_t + (sigma_t ** 2 / beta ** 2) * (y - x_t)) / alpha_t
        factor = ((beta / sigma_t) ** 4).flatten(1)[:, 0]
        return {"x_t": x_t.to(x_s.dtype), "t": t, "target": target.to(x_s.dtype), "factor": factor}

    # ------------------------------------------------------------------ steps 4 and 5
    def generator_loss(self, batch):
        cond = batch.get("cond")
        budget, level = self.draw_segment(batch["noise"].device)
        out = self.segment_output(batch["noise"], cond, budget, level)
        t = self.segment_times(out["t_i"], out["s"], GENERATOR_RAMP)
        noised = self.diffuse_segment(out["x_s"].detach(), out["s"], t)
        with torch.no_grad():
            x0_real = self.teacher_x0(noised["x_t"], t, cond)
            x0_fake = self.budgeted(self.critic, noised["x_t"], t, cond, budget)
        gradient = dmd_gradient(out["x0"].detach(), x0_real, x0_fake, normalize=self.normalize_gradient)
        loss = surrogate_for_gradient(out["x0"], gradient).mean()
        return {"loss": loss, "distribution_matching": loss.detach(),
                "budget": torch.tensor(float(budget)), "segment": torch.tensor(float(level))}

    def critic_loss(self, batch):
        cond = batch.get("cond")
        budget, level = self.draw_segment(batch["noise"].device)
        with torch.no_grad():
            out = self.segment_output(batch["noise"], cond, budget, level)
        t = self.segment_times(out["t_i"], out["s"], CRITIC_RAMP)
        noised = self.diffuse_segment(out["x_s"], out["s"], t)
        weight = dsm_weight(self.schedule, t, self.critic_weighting) * noised["factor"]
        prediction = self.budgeted(self.critic, noised["x_t"], t, cond, budget)
        return {"loss": denoising_score_matching(prediction, noised["target"], weight).mean()}

    # ------------------------------------------------------------------ sampling
    def generate(self, noise, cond=None, nfe=None, network=None, generator=None):
        """The student's deterministic K-step sampler, K = nfe (default: the largest trained budget)."""
        network = self.student if network is None else network
        budget = self.step_budgets[-1] if nfe is None else int(nfe)
        x = self.trajectory_state(noise, cond, budget, budget - 1, network)
        t = torch.full((noise.shape[0],), float(self.budget_times(budget)[-1]), dtype=torch.float64,
                       device=noise.device)
        return self.budgeted(network, x, t, cond, budget)
