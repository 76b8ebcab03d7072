"""SCott -- Stochastic Consistency Distillation (Liu, Xie et al., AAAI 2025, arXiv:2403.01505), on the consistency
family's mechanism (``consistency_family.ConsistencyTraining``; CD's Karras grid and EMA target, ``consistency.py``).

SCott keeps CD's loss and replaces the teacher's ODE step that makes the target point by a step of a STOCHASTIC
sampler of the teacher, with a controlled noise strength, optionally over several solver sub-steps, and adds an
adversarial loss on the student's outputs (the paper: a discriminator with time and text conditioning on the teacher's
backbone). Per batch:

  x ~ data; (t, r) = (t_{n+1}, t_n) adjacent on CD's Karras grid;  x_t = alpha_t x + sigma_t z
  x^_r = S_eta(x_t; t -> r)          the teacher's stochastic solver in k = ``solver_steps`` sub-steps (below)
  L_G  = d(f_theta(x_t, t), sg f_theta-(x^_r, r))                        (CD's loss, consistency_family)
       + lambda_G E_s softplus(-D(alpha_s f_theta(x_t, t) + sigma_s n, s))   (non-saturating GAN, generator side)
  L_D  = E_s [softplus(-D(alpha_s x + sigma_s n, s)) + softplus(D(alpha_s sg f_theta(x_t, t) + sigma_s n', s))]
with D the discriminator: ``DiscriminatorHead`` on the bottleneck features of the critic network (a copy of the
student, as DMD2's head on its fake-score network; ``critic`` / ``discriminator`` in the config), trained as the
module's critic with its own optimizer, and the generator:critic ratio set by ``callbacks.TwoTimeScaleUpdate``.
s ~ ``gan_time_sampler`` (default: the low-noise half of the Karras ramp, where real and generated samples differ).

The stochastic solver, in the schedule's native time (alpha(t), sigma(t); EDM sigma(t)/alpha(t) = edm_sigma), one
sub-step from a to b (a > b), with z' ~ N(0, I) fresh noise per sub-step:

* ``solver: heun`` (default) -- EDM's stochastic sampler (Karras et al. 2022, Alg. 2, lines 4-5 and 6-8, with
  S_churn / N replaced by eta): raise the noise level to s^ = min((1 + eta) s_a, s_max) by adding fresh noise,
      x^ = alpha(a^) [x_a / alpha(a) + sqrt(s^^2 - s_a^2) z'],
  then one deterministic Heun step of the PF-ODE from a^ to b. eta = 0 is exactly CD's target (one Heun step).
* ``solver: ddim`` -- DDIM with stochasticity eta (Song et al. 2021, Eqs. 12 and 16) written for any (alpha, sigma):
      x0^ = D(x_a, a),  eps^ = (x_a - alpha_a x0^) / sigma_a,
      c^2 = eta^2 sigma_b^2 (sigma_a^2 - (alpha_a / alpha_b)^2 sigma_b^2) / sigma_a^2      (eta = 1: DDPM's posterior)
      x_b = alpha_b x0^ + sqrt(sigma_b^2 - c^2) eps^ + c z'
  a first-order (Euler-Maruyama-type) step; eta = 0 is the deterministic DDIM / Euler PF-ODE step.
The k sub-steps split [b, a] on a Karras ramp (rho = 7) in EDM sigma; k = 1 is one step from t to r. Both steps are
affine in x_a and z' for a Gaussian teacher, so their mean and variance over z' have closed forms
(tests/test_scott_rglcd.py).

Deviations, kept on purpose: the paper distils SD1.5 with an LCM-style skipping-step solver, guidance and a LoRA
discriminator on the teacher's UNet; here CD's grid, EDM's stochastic Heun step (or DDIM-eta) and a head on a copy of
the student stand in, and the discriminator's condition is the class label (the critic network's own conditioning).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion.samplers import heun_step
from ..diffusion.schedules import broadcast_to_data
from ..diffusion.time_samplers import KarrasRampTime, TimeSampler
from ..losses import gan_loss_pair
from ..networks.denoiser import FeatureTap
from .consistency import ConsistencyDistillation

SOLVERS = ("heun", "ddim")


def churn_time(schedule, t: Tensor, eta: float) -> Tensor:
    """a^ with EDM sigma (1 + eta) edm_sigma(a), capped at sigma_max; a itself when eta = 0."""
    if eta == 0:
        return t
    sigma_max = float(schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=torch.float64)))
    raised = (schedule.edm_sigma(t) * (1.0 + eta)).clamp(max=sigma_max)
    return schedule.time_from_edm_sigma(raised).to(t)


def stochastic_heun_step(denoise, x_a: Tensor, a: Tensor, b: Tensor, schedule, eta: float,
                         noise: Tensor | None = None) -> Tensor:
    """EDM Alg. 2's churn (noise level s_a -> (1 + eta) s_a with fresh noise) then one Heun step to b."""
    a_hat = churn_time(schedule, a, eta)
    if eta == 0:
        return heun_step(denoise, x_a, a, b, schedule)
    noise = torch.randn_like(x_a) if noise is None else noise
    alpha_a, alpha_hat = (broadcast_to_data(schedule.alpha_sigma(v)[0], x_a) for v in (a, a_hat))
    s_a, s_hat = (broadcast_to_data(schedule.edm_sigma(v), x_a) for v in (a, a_hat))
    scaled = x_a.double() / alpha_a + (s_hat ** 2 - s_a ** 2).clamp(min=0).sqrt() * noise.double()
    return heun_step(denoise, (alpha_hat * scaled).to(x_a.dtype), a_hat, b, schedule)


def ddim_eta_coefficients(schedule, a: Tensor, b: Tensor, eta: float):
    """(alpha_b, sqrt(sigma_b^2 - c^2), c) of the DDIM-eta step a -> b (module docstring), float64 per sample."""
    alpha_a, sigma_a = schedule.alpha_sigma(a)
    alpha_b, sigma_b = schedule.alpha_sigma(b)
    gap = (sigma_a ** 2 - (alpha_a / alpha_b) ** 2 * sigma_b ** 2).clamp(min=0)
    c = (eta * sigma_b * gap.sqrt() / sigma_a).clamp(max=sigma_b)
    return alpha_b, (sigma_b ** 2 - c ** 2).clamp(min=0).sqrt(), c


def ddim_eta_step(denoise, x_a: Tensor, a: Tensor, b: Tensor, schedule, eta: float,
                  noise: Tensor | None = None) -> Tensor:
    """DDIM with stochasticity eta (Song et al. 2021, Eqs. 12 / 16) in native (alpha, sigma) time."""
    x0 = denoise(x_a, a).double()
    alpha_a, sigma_a = (broadcast_to_data(v, x_a) for v in schedule.alpha_sigma(a))
    epsilon = (x_a.double() - alpha_a * x0) / sigma_a
    alpha_b, keep, c = (broadcast_to_data(v, x_a) for v in ddim_eta_coefficients(schedule, a, b, eta))
    out = alpha_b * x0 + keep * epsilon
    if eta != 0:
        noise = torch.randn_like(x_a) if noise is None else noise
        out = out + c * noise.double()
    return out.to(x_a.dtype)


def substep_times(schedule, t: Tensor, r: Tensor, steps: int, rho: float = 7.0) -> list[Tensor]:
    """steps + 1 per-sample times from t down to r, evenly spaced in edm_sigma^(1/rho); [t, r] for one step."""
    if steps == 1:
        return [t, r]
    s_t, s_r = schedule.edm_sigma(t) ** (1 / rho), schedule.edm_sigma(r) ** (1 / rho)
    inner = [schedule.time_from_edm_sigma((s_t + (i / steps) * (s_r - s_t)) ** rho).to(t) for i in range(1, steps)]
    return [t, *inner, r]


class SCott(ConsistencyDistillation):
    uses_critic = True  # the discriminator: the critic network's bottleneck + the head, with the critic optimizer
    needs_real_data = True
    real_data_reason = "its pairs are noised real samples and its discriminator compares real and generated samples"

    def __init__(self, *args, eta: float = 0.2, solver: str = "heun", solver_steps: int = 1,
                 gan_generator_weight: float = 0.1, gan_critic_weight: float = 1.0,
                 gan_time_sampler: TimeSampler | None = None, gan_loss: str = "non_saturating", **kwargs):
        if not eta >= 0:
            raise ValueError(f"eta (the solver's noise strength) must be >= 0, got {eta}")
        if solver not in SOLVERS:
            raise ValueError(f"unknown SCott solver {solver!r}; expected one of {SOLVERS}")
        if int(solver_steps) != solver_steps or solver_steps < 1:
            raise ValueError(f"solver_steps must be an integer >= 1, got {solver_steps}")
        for name, value in [("gan_generator_weight", gan_generator_weight), ("gan_critic_weight", gan_critic_weight)]:
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        super().__init__(*args, **kwargs)
        if self.discriminator is None:
            raise ValueError("SCott needs a discriminator head on the critic network (model.init_args.discriminator, "
                             "e.g. lightning_modules.networks.DiscriminatorHead with in_features = the critic's "
                             "bottleneck width)")
        self.eta, self.solver, self.solver_steps = float(eta), solver, int(solver_steps)
        self.gan_generator_weight, self.gan_critic_weight = float(gan_generator_weight), float(gan_critic_weight)
        self.gan_time_sampler = gan_time_sampler or KarrasRampTime(0.5, 1.0)
        # the paper's non-saturating game by default, or LADD's hinge pair (losses.GAN_LOSSES)
        self.gan_loss = gan_loss
        self.gan_generator_term, self.gan_discriminator_term = gan_loss_pair(gan_loss)

    # ------------------------------------------------------------------ the stochastic teacher target
    def solver_step(self, x_a: Tensor, a: Tensor, b: Tensor, cond, noise: Tensor | None = None) -> Tensor:
        """One sub-step of the teacher's stochastic solver from a to b (module docstring); ``noise`` = z'."""
        denoise = lambda x, t: self.teacher_x0(x, t, cond)  # noqa: E731
        step = stochastic_heun_step if self.solver == "heun" else ddim_eta_step
        return step(denoise, x_a, a, b, self.schedule, self.eta, noise)

    def target_point(self, batch, x0, noise, x_noisy, t_noisy, t_clean, cond):
        """x^_r: ``solver_steps`` stochastic teacher sub-steps from t to r, fresh noise in each."""
        times = substep_times(self.schedule, t_noisy, t_clean, self.solver_steps)
        x = x_noisy
        for a, b in zip(times[:-1], times[1:]):
            x = self.solver_step(x, a, b, cond, None if self.eta == 0 else self.noise_like(x))
        return x

    # ------------------------------------------------------------------ the adversarial term
    def discriminator_logits(self, x_s: Tensor, s: Tensor, cond) -> Tensor:
        """D(x_s, s): the head on the critic network's bottleneck features at (x_s, s, cond)."""
        with FeatureTap(self.critic) as tap:
            self.critic(x_s, s, cond)
        return self.discriminator(tap.features)

    def renoised(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        s = self.sample_times(self.gan_time_sampler, x0.shape[0])
        return self.schedule.add_noise(x0, self.noise_like(x0), s), s

    def adversarial_generator_loss(self, x_fake: Tensor, cond) -> Tensor:
        """E softplus(-D(alpha_s x_fake + sigma_s n, s)), the gradient reaching x_fake through the re-noising."""
        x_s, s = self.renoised(x_fake)
        return self.gan_generator_term(self.discriminator_logits(x_s, s, cond)).mean()

    def adversarial_critic_loss(self, x_real: Tensor, real_cond, x_fake: Tensor, fake_cond) -> Tensor:
        real_s, s_real = self.renoised(x_real)
        fake_s, s_fake = self.renoised(x_fake.detach())
        return self.gan_discriminator_term(self.discriminator_logits(real_s, s_real, real_cond),
                                                self.discriminator_logits(fake_s, s_fake, fake_cond)).mean()

    def generator_loss(self, batch):
        terms = self.consistency_terms(batch)
        losses = {"consistency": terms["loss"], "distance": terms["distance"]}
        loss = terms["loss"]
        if self.gan_generator_weight > 0:
            gan = self.adversarial_generator_loss(terms["online"], terms["cond"])
            losses["gan"] = gan
            loss = loss + self.gan_generator_weight * gan
        losses["loss"] = loss
        return losses

    def fake_outputs(self, batch) -> tuple[Tensor, object]:
        """sg f_theta(x_t, t) at CD's time pairs on noised real samples: what the generator's term sees."""
        x0, cond = batch["real"], batch.get("real_cond")
        t, _ = self.time_pairs(x0.shape[0], x0.device)
        with torch.no_grad():
            return self.student(self.schedule.add_noise(x0, self.noise_like(x0), t), t, cond), cond

    def critic_loss(self, batch):
        fake, cond = self.fake_outputs(batch)
        gan = self.adversarial_critic_loss(batch["real"], batch.get("real_cond"), fake, cond)
        return {"gan": gan, "loss": self.gan_critic_weight * gan}
