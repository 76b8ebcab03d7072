"""The exact teacher of a Gaussian-mixture law: the posterior mean E[x0 | x_t, class] in closed form (see
``mixture_law`` for the formulas), a perfect score model and the oracle the tests check every method against.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..diffusion.schedules import NoiseSchedule
from .denoiser import Denoiser
from .mixture_law import GaussianMixture  # noqa: F401  (re-exported: the law class's historical home)
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
