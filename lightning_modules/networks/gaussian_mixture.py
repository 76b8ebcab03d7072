"""The exact teacher of a Gaussian-mixture law: the posterior mean E[x0 | x_t, class] in closed form (see
``mixture_law`` for the formulas), a perfect score model and the oracle the tests check every method against.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..diffusion.schedules import NoiseSchedule
from .denoiser import Denoiser
from .mixture_law import GaussianMixture, law_sigma_data  # noqa: F401  (GaussianMixture re-exported: its historical home)
from .toy_laws import resolve_law


class GaussianMixtureTeacher(Denoiser):
    """The exact teacher: D(x_t, t, class) = E[x0 | x_t, class] of a known mixture (a perfect score model).

    ``law``: a registered name (``toy_laws.TOY_LAWS``), a mapping (``mixture_law.mixture_from_spec``, e.g. a YAML
    block) or a ``GaussianMixture``."""

    def __init__(self, law: str | Mapping[str, Any] | GaussianMixture, schedule: NoiseSchedule | None = None):
        super().__init__(schedule, prediction_type="x0")
        self.law = resolve_law(law)
        self.num_classes = self.law.num_classes

    @property
    def data_shape(self):
        return (self.law.dim,)

    def predict(self, x_t, t, cond):
        alpha, sigma = self.schedule.alpha_sigma(t.double())
        return self.law.posterior_mean(x_t, alpha, sigma, cond).to(x_t.dtype)

    def generative_features(self, x_t, t, cond=None):
        """The exact teacher's stand-in for a network's intermediate features (what LADD's discriminator heads read,
        ``feature_discriminator``): [c_in x_t (B, D), E[x0 | x_t] (B, D), p(component | x_t) (B, K)] -- the input as
        an EDM-preconditioned network's first layer sees it (c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2), Karras
        et al. 2022, Table 1, sigma_data the law's), the posterior mean and the mode responsibilities, all
        differentiable in x_t. The input is needed: at moderate noise the posterior mean and responsibilities of a
        sharp mixture saturate (to the nearest mean, one-hot), so without it a sample far off a mode looks real."""
        alpha, sigma = self.schedule.alpha_sigma(t.double())
        log_joint, posterior = self.law.noisy_component_terms(x_t, alpha, sigma, cond)
        responsibilities = torch.softmax(log_joint, dim=1)
        mean = torch.einsum("bk,bkd->bd", responsibilities, posterior)
        c_in = 1.0 / (alpha ** 2 * law_sigma_data(self.law) ** 2 + sigma ** 2).sqrt()
        scaled_input = c_in.to(x_t.device)[:, None] * x_t.double()
        return [scaled_input.to(x_t.dtype), mean.to(x_t.dtype), responsibilities.to(x_t.dtype)]
