"""Per-sample loss pieces shared by the methods (each returns an unreduced tensor, as NVlabs EDM's losses do).

Methods compose these; nothing here knows about optimizers or Lightning, so every formula is unit-testable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .diffusion.schedules import NoiseSchedule


def per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def per_sample_sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


def dsm_weight(schedule: NoiseSchedule, t: Tensor, weighting: str = "edm", sigma_data: float = 0.5) -> Tensor:
    """Weight lambda(t) of an x0-space denoising loss lambda ||D(x_t) - x0||^2.

    ``edm``: (s^2 + sd^2) / (s sd)^2 (Karras et al. 2022, Eq. 8 / Table 1); ``epsilon``: alpha^2 / sigma^2, which makes
    it the usual epsilon-MSE of DDPM; ``x0``: 1. s is the EDM noise level sigma / alpha."""
    edm_sigma = schedule.edm_sigma(t.double())
    if weighting == "edm":
        return (edm_sigma ** 2 + sigma_data ** 2) / (edm_sigma * sigma_data) ** 2
    if weighting == "epsilon":
        return 1.0 / edm_sigma ** 2
    if weighting == "x0":
        return torch.ones_like(edm_sigma)
    raise ValueError(f"unknown DSM weighting {weighting!r}; expected 'edm', 'epsilon' or 'x0'")


def denoising_score_matching(x0_prediction: Tensor, x0: Tensor, weight: Tensor) -> Tensor:
    """Per-sample lambda(t) ||D(x_t) - x0||^2 / dim (Vincent 2011; EDM Eq. 2 with Eq. 8's weighting)."""
    return weight.to(x0.dtype) * per_sample_mean((x0_prediction - x0) ** 2)


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor, normalize: bool = True) -> Tensor:
    """The distribution-matching gradient direction (Yin et al. 2024, DMD2 Eq. 2 with DMD's Eq. 8 normaliser):
    g = (p_real - p_fake) / mean_CHW |p_real|, p = x - D(x_t), i.e. (D_fake - D_real) / mean |x - D_real|.
    Descending g moves x toward the teacher's denoised estimate and away from the critic's."""
    p_real, p_fake = x - x0_real, x - x0_fake
    gradient = p_real - p_fake
    if normalize:
        gradient = gradient / p_real.abs().flatten(1).mean(1).clamp_min(1e-8).reshape(-1, *[1] * (x.ndim - 1))
    return torch.nan_to_num(gradient)


def surrogate_for_gradient(x: Tensor, gradient: Tensor) -> Tensor:
    """Per-sample 1/2 ||x - sg(x - g)||^2 / dim, whose gradient w.r.t. x is g / dim (DMD2's loss form)."""
    return 0.5 * per_sample_mean((x - (x - gradient).detach()) ** 2)


def pseudo_huber(difference: Tensor, c: float) -> Tensor:
    """Per-sample sqrt(||d||^2 + c^2) - c (Song & Dhariwal 2023, iCT Eq. 6)."""
    return (per_sample_sum(difference ** 2) + c * c).sqrt() - c


def distance(prediction: Tensor, target: Tensor, metric: str = "l2", huber_c: float | None = None) -> Tensor:
    """Per-sample distance d(a, b) for consistency losses: ``l2`` = mean squared error, ``pseudo_huber`` with
    c = 0.00054 sqrt(dim) by default (iCT); LPIPS needs weights that are not available offline."""
    difference = prediction - target
    if metric == "l2":
        return per_sample_mean(difference ** 2)
    if metric == "pseudo_huber":
        c = 0.00054 * difference[0].numel() ** 0.5 if huber_c is None else huber_c
        return pseudo_huber(difference, c)
    raise ValueError(f"unknown distance {metric!r}; expected 'l2' or 'pseudo_huber'")


def non_saturating_gan_generator(fake_logits: Tensor) -> Tensor:
    """softplus(-D(fake)) (Goodfellow et al. 2014; DMD2 Eq. 4's generator term)."""
    return F.softplus(-fake_logits).reshape(fake_logits.shape[0], -1).mean(1)


def non_saturating_gan_discriminator(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """softplus(-D(real)) + softplus(D(fake)) per sample (DMD2 Eq. 4's discriminator term)."""
    return (F.softplus(-real_logits).reshape(real_logits.shape[0], -1).mean(1)
            + F.softplus(fake_logits).reshape(fake_logits.shape[0], -1).mean(1))


def hinge_generator(fake_logits: Tensor) -> Tensor:
    """-D(fake) per sample (Lim & Ye 2017, "Geometric GAN"; the generator side of LADD's hinge game, Sauer et al. 2024)."""
    return -fake_logits.reshape(fake_logits.shape[0], -1).mean(1)


def hinge_discriminator(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """relu(1 - D(real)) + relu(1 + D(fake)) per sample (Lim & Ye 2017; LADD's discriminator loss)."""
    return (F.relu(1.0 - real_logits).reshape(real_logits.shape[0], -1).mean(1)
            + F.relu(1.0 + fake_logits).reshape(fake_logits.shape[0], -1).mean(1))


#: the adversarial losses a method can pick by name: (generator term, discriminator term), both per sample
GAN_LOSSES = {
    "non_saturating": (non_saturating_gan_generator, non_saturating_gan_discriminator),
    "hinge": (hinge_generator, hinge_discriminator),
}


def gan_loss_pair(name: str):
    """(generator loss, discriminator loss) of ``name`` in ``GAN_LOSSES``; a clear error for an unknown one."""
    if name not in GAN_LOSSES:
        raise ValueError(f"unknown gan_loss {name!r}; expected one of {sorted(GAN_LOSSES)}")
    return GAN_LOSSES[name]


def r1_penalty(outputs: Tensor, inputs: Tensor) -> Tensor:
    """Per-sample R1 (Mescheder et al. 2018, "Which training methods for GANs do actually converge?", Eq. 9):
    sum_k ||grad_x D_k(x)||^2 over the columns of ``outputs`` (B, K) -- one scalar discriminator output per head
    (or B, a single one) -- the squared Frobenius norm of the per-sample Jacobian dD/dx. Kept differentiable
    (create_graph), so the penalty trains the discriminator; ``inputs`` must be part of the graph of ``outputs``."""
    if not inputs.requires_grad:
        raise ValueError("r1_penalty needs inputs that require grad (the real samples the discriminator saw)")
    columns = outputs.reshape(outputs.shape[0], -1)
    total = inputs.new_zeros(inputs.shape[0])
    for k in range(columns.shape[1]):
        # samples are independent, so the gradient of the batch sum is each sample's own gradient
        (gradient,) = torch.autograd.grad(columns[:, k].sum(), inputs, create_graph=True)
        total = total + per_sample_sum(gradient ** 2)
    return total


def approximate_r1_penalty(outputs: Tensor, perturbed_outputs: Tensor) -> Tensor:
    """Per-sample ||D(x) - D(x + s n)||^2, n ~ N(0, I) (approximated R1, Lin et al. 2025, "Diffusion adversarial
    post-training for one-step video generation", arXiv:2501.08316): a finite difference that needs no second
    derivative. For small s its mean over n is s^2 times ``r1_penalty`` (plus O(s^4) curvature terms)."""
    return per_sample_sum((outputs - perturbed_outputs) ** 2)
