"""SANA-Sprint -- hybrid sCM + LADD distillation with one step-adaptive student (Chen, Xue, Zhao, Yu, Paul, Chen, Cai,
Xie & Han 2025, "SANA-Sprint: one-step diffusion with continuous-time consistency distillation", arXiv:2503.09641).

The loss (Sec. 3.3):  L = L_sCM + lambda L_adv,  lambda = 0.5
  L_sCM  sCD's continuous-time consistency loss in TrigFlow (Lu & Song 2024; ``scm.ContinuousConsistencyDistillation``,
         unchanged: tangent from the teacher's PF-ODE velocity, normalised and warmed up, adaptive weighting);
  L_adv  LADD's hinge game on the frozen teacher's features (``adversarial.TeacherFeatureGAN``, as ``ladd.LADD``):
           x^0 = f_theta(x_t, t)  the student's one-jump output from a noised real sample x_t
           generator:      -D(alpha_s x^0 + sigma_s n, s)
           discriminator:  relu(1 - D(x_s)) + relu(1 + D(sg x^_s)) (+ gamma R1, optional),  s ~ p(s)
One model serves 1-4 steps (Sec. 3.4): the consistency function is trained at every t, and the adversarial term's
input time t is drawn where the K-step sampler puts the student -- a step budget K ~ U{1..max_inference_steps}, then
one of that sampler's K times (``DistillationModule.evaluation_times(K)``: t_max for K = 1) -- with the paper's
"max-time weighting": with probability p the time is t_max (pure noise, one-step generation), which the paper adds
to improve one- and few-step quality. Inference: ``sample(noise, nfe=K)`` for any K, the family's multistep sampler.

Deviations, kept on purpose: the paper draws the adversarial input's time from the sCM proposal plus the max-time
weighting and searches the multi-step inference times afterwards; here the time is drawn from the few-step grids
the student is sampled on (so "1-4 steps" is what training sees), and the grids are the framework's Karras ramps.
The input at the grid's first time is noised data, not pure noise (sigma_max = 80 against data of unit scale).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..adversarial import TeacherFeatureGAN
from ..diffusion.time_samplers import TimeSampler
from .ladd import check_feature_discriminator
from .scm import ContinuousConsistencyDistillation


class SANASprint(ContinuousConsistencyDistillation):
    uses_critic = True            # the critic optimizer trains LADD's discriminator heads ...
    uses_critic_network = False   # ... on the frozen teacher: no critic network
    real_data_reason = "sCD's x_t are noised real samples, and its discriminator compares real and generated ones"

    def __init__(self, *args, adversarial_weight: float = 0.5, max_time_probability: float = 0.5,
                 max_inference_steps: int = 4, gan_loss: str = "hinge",
                 discriminator_time_sampler: TimeSampler | None = None, r1_weight: float = 0.0,
                 r1_mode: str = "approximate", r1_noise_std: float = 0.01, **kwargs):
        if not adversarial_weight >= 0:
            raise ValueError(f"adversarial_weight must be >= 0, got {adversarial_weight}")
        if not 0.0 <= max_time_probability <= 1.0:
            raise ValueError(f"max_time_probability must be in [0, 1], got {max_time_probability}")
        if int(max_inference_steps) != max_inference_steps or max_inference_steps < 1:
            raise ValueError(f"max_inference_steps must be an integer >= 1, got {max_inference_steps}")
        super().__init__(*args, **kwargs)
        check_feature_discriminator(self, "SANA-Sprint")
        self.adversarial_weight, self.max_time_probability = float(adversarial_weight), float(max_time_probability)
        self.max_inference_steps = int(max_inference_steps)
        self.adversary = TeacherFeatureGAN(discriminator_time_sampler, gan_loss, r1_weight, r1_mode, r1_noise_std)

    # ------------------------------------------------------------------ the step-adaptive draw
    def step_adaptive_times(self, n: int, device) -> Tensor:
        """Native times: K ~ U{1..max_inference_steps}, then one of the K-step sampler's times uniformly; t_max
        instead with probability ``max_time_probability`` (module docstring)."""
        grids = [self.evaluation_times(k) for k in range(1, self.max_inference_steps + 1)]
        pool = torch.cat(grids)
        weights = torch.cat([torch.full((len(grid),), 1.0 / len(grid), dtype=torch.float64) for grid in grids])
        t = pool[torch.multinomial(weights, n, replacement=True)]
        at_max_time = torch.rand(n, dtype=torch.float64) < self.max_time_probability
        return torch.where(at_max_time, pool[0], t).to(device)

    def student_outputs(self, batch: dict) -> tuple[Tensor, object]:
        """x^0 = f_theta(x_t, t) from noised real samples at the step-adaptive times (with gradient), and labels."""
        x0, cond = batch["real"], batch.get("real_cond")
        t = self.step_adaptive_times(x0.shape[0], x0.device)
        return self.student(self.schedule.add_noise(x0, self.noise_like(x0), t), t, cond), cond

    # ------------------------------------------------------------------ the hybrid loss
    def generator_loss(self, batch):
        consistency = super().generator_loss(batch)
        losses = {f"scm_{key}" if key != "loss" else "scm": value for key, value in consistency.items()}
        loss = consistency["loss"]
        if self.adversarial_weight > 0:
            x_fake, cond = self.student_outputs(batch)
            adversarial = self.adversary.generator_loss(self, x_fake, cond)
            losses["adversarial"] = adversarial
            loss = loss + self.adversarial_weight * adversarial
        losses["loss"] = loss
        return losses

    def critic_loss(self, batch):
        with torch.no_grad():
            x_fake, cond = self.student_outputs(batch)
        return self.adversary.discriminator_loss(self, batch["real"], batch.get("real_cond"), x_fake, cond)
