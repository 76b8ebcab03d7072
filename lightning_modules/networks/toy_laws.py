"""The named Gaussian mixtures of the toy suite (the benchmark's ground truth).

* ``ring8``       8 equal modes on a circle of radius 1 (isotropic std 0.08)
* ``grid25``      a 5 x 5 grid on [-1, 1]^2 (isotropic std 0.06)
* ``aniso``       4 anisotropic, rotated modes of weights 0.5 / 0.3 / 0.15 / 0.05 (the light mode tests mode covering)
* ``digits64``    a 64-D class-conditional mixture fitted to scikit-learn's 8x8 digits (3 full-covariance components
                  per digit, pixels scaled to [-1, 1]); rendered as 8x8 images
Every component is a class, except in ``digits64`` where a class is a digit.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import torch

from .mixture_law import GaussianMixture, mixture_from_spec


def _rotation(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def ring8(radius: float = 1.0, std: float = 0.08) -> GaussianMixture:
    angles = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.full((8,), 1 / 8), means, std ** 2 * torch.eye(2).repeat(8, 1, 1), name="ring8")


def grid25(spacing: float = 0.5, std: float = 0.06) -> GaussianMixture:
    axis = (torch.arange(5, dtype=torch.float64) - 2) * spacing
    means = torch.cartesian_prod(axis, axis)
    return GaussianMixture(torch.full((25,), 1 / 25), means, std ** 2 * torch.eye(2).repeat(25, 1, 1), name="grid25")


def aniso() -> GaussianMixture:
    means = torch.tensor([[-0.6, -0.4], [0.7, 0.5], [-0.5, 0.8], [0.9, -0.7]], dtype=torch.float64)
    stds = [(0.30, 0.06), (0.20, 0.05), (0.12, 0.04), (0.06, 0.06)]
    angles = [0.5, -0.9, 1.8, 0.0]
    covariances = torch.stack([_rotation(a) @ torch.diag(torch.tensor(s, dtype=torch.float64) ** 2) @ _rotation(a).T
                               for s, a in zip(stds, angles)])
    return GaussianMixture([0.5, 0.3, 0.15, 0.05], means, covariances, name="aniso")


@functools.lru_cache(maxsize=None)
def digits64(components_per_class: int = 3, regularization: float = 0.01) -> GaussianMixture:
    from sklearn.datasets import load_digits
    from sklearn.mixture import GaussianMixture as SklearnMixture

    digits = load_digits()
    pixels = digits.data / 16.0 * 2.0 - 1.0
    weights, means, covariances, classes = [], [], [], []
    for label in range(10):
        subset = pixels[digits.target == label]
        fit = SklearnMixture(components_per_class, covariance_type="full", reg_covar=regularization,
                             random_state=label).fit(subset)
        weights.append(torch.as_tensor(fit.weights_) * len(subset) / len(pixels))
        means.append(torch.as_tensor(fit.means_))
        covariances.append(torch.as_tensor(fit.covariances_))
        classes += [label] * components_per_class
    return GaussianMixture(torch.cat(weights), torch.cat(means), torch.cat(covariances), classes, name="digits64")


TOY_LAWS = {"ring8": ring8, "grid25": grid25, "aniso": aniso, "digits64": digits64}


def get_toy_law(name: str) -> GaussianMixture:
    if name not in TOY_LAWS:
        raise ValueError(f"unknown toy law {name!r}; expected one of {sorted(TOY_LAWS)} or a mapping with weights / "
                         "means / covariances (see lightning_modules.networks.mixture_law.mixture_from_spec)")
    return TOY_LAWS[name]()


def resolve_law(law: str | Mapping[str, Any] | GaussianMixture) -> GaussianMixture:
    """A registered name, a mapping (a YAML ``law:`` block, see ``mixture_from_spec``) or a law, as a law."""
    if isinstance(law, GaussianMixture):
        return law
    if isinstance(law, str):
        return get_toy_law(law)
    if isinstance(law, Mapping):
        return mixture_from_spec(law)
    raise TypeError(f"a law is a registered name, a mapping or a GaussianMixture, got {type(law).__name__}: {law!r}")
