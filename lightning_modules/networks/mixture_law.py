"""Gaussian-mixture data laws: p(x0) = sum_k pi_k N(mu_k, S_k), float64 throughout, with their closed-form noised
marginals and posteriors (Bishop 2006, Eq. 2.115-2.116 for the linear-Gaussian posterior):
    x_t | k        ~ N(alpha mu_k, C_k),  C_k = alpha^2 S_k + sigma^2 I
    E[x0 | x_t, k] = mu_k + alpha S_k C_k^{-1} (x_t - alpha mu_k)
    E[x0 | x_t]    = sum_k r_k(x_t) E[x0 | x_t, k],  r_k proportional to pi_k N(x_t; alpha mu_k, C_k).
Working in each component's eigenbasis S_k = U diag(lam) U^T makes C_k diagonal, so any batch of per-sample noise
levels costs one rotation. Conditioning on a class keeps only that class's components.

Besides the class: a law from a plain mapping (``mixture_from_spec``, what a YAML ``law:`` block gives), the data
standard deviation EDM's preconditioning calls sigma_data (``law_sigma_data``), and law equality (``same_law``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor


class GaussianMixture:
    """A mixture law with optional class labels per component (``component_classes``); float64 throughout."""

    def __init__(self, weights, means, covariances, component_classes=None, name: str = "mixture"):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covariances = torch.as_tensor(covariances, dtype=torch.float64)
        self.name = name
        K, D = self.means.shape
        if self.weights.shape != (K,) or self.covariances.shape != (K, D, D):
            raise ValueError(f"mixture {name!r}: shapes disagree: weights {tuple(self.weights.shape)}, means "
                             f"{tuple(self.means.shape)}, covariances {tuple(self.covariances.shape)}")
        if (self.weights < 0).any() or abs(self.weights.sum().item() - 1) > 1e-6:
            raise ValueError(f"mixture {name!r}: weights must be non-negative and sum to 1, got {self.weights.tolist()}")
        self.weights = self.weights / self.weights.sum()
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.covariances)
        if (self.eigenvalues <= 0).any():
            raise ValueError(f"mixture {name!r}: covariances must be positive definite")
        self.component_classes = (torch.arange(K) if component_classes is None
                                  else torch.as_tensor(component_classes, dtype=torch.long))
        self.num_classes = int(self.component_classes.max().item()) + 1

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def class_weights(self) -> Tensor:
        return torch.zeros(self.num_classes, dtype=torch.float64).index_add_(0, self.component_classes, self.weights)

    def sample(self, n: int, generator: torch.Generator | None = None, classes: Tensor | None = None):
        """n exact samples and their component indices; ``classes`` (n,) draws each sample within its class."""
        if classes is None:
            component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            mask = self.component_classes[None, :] == classes.cpu().long()[:, None]
            component = torch.multinomial(self.weights[None] * mask, 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scale = self.eigenvectors[component] * self.eigenvalues[component].sqrt()[:, None, :]
        return self.means[component] + torch.einsum("nde,ne->nd", scale, z), component

    def _class_mask(self, classes: Tensor | None, n: int, device) -> Tensor | None:
        if classes is None:
            return None
        classes = classes.to(device).long()
        mask = self.component_classes.to(device)[None, :] == classes[:, None]
        # the null label (>= num_classes, used for classifier-free guidance) means "unconditional"
        return mask | (classes[:, None] >= self.num_classes)

    def noisy_component_terms(self, x_t: Tensor, alpha: Tensor, sigma: Tensor, classes: Tensor | None = None):
        """Per component: log pi_k N(x_t; alpha mu_k, C_k) (B, K) and E[x0 | x_t, k] (B, K, D), in float64."""
        x = x_t.double().reshape(x_t.shape[0], -1)
        alpha = alpha.double().reshape(-1, 1, 1).to(x.device)
        sigma = sigma.double().reshape(-1, 1, 1).to(x.device)
        means, lam, U = (v.to(x.device) for v in (self.means, self.eigenvalues, self.eigenvectors))
        centred = x[:, None, :] - alpha * means[None]                       # (B, K, D)
        rotated = torch.einsum("kde,bkd->bke", U, centred)                  # U^T (x - alpha mu)
        variance = alpha ** 2 * lam[None] + sigma ** 2                      # eigenvalues of C_k, (B, K, D)
        log_normal = -0.5 * ((rotated ** 2 / variance).sum(-1) + variance.log().sum(-1) + self.dim * math.log(2 * math.pi))
        log_joint = log_normal + self.weights.to(x.device).log()[None]
        mask = self._class_mask(classes, x.shape[0], x.device)
        if mask is not None:
            log_joint = log_joint.masked_fill(~mask, -math.inf)
        posterior = means[None] + torch.einsum("kde,bke->bkd", U, alpha * lam[None] / variance * rotated)
        return log_joint, posterior

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor, classes: Tensor | None = None) -> Tensor:
        log_joint, posterior = self.noisy_component_terms(x_t, alpha, sigma, classes)
        responsibilities = torch.softmax(log_joint, dim=1)
        return torch.einsum("bk,bkd->bd", responsibilities, posterior).reshape(x_t.shape)

    def noisy_log_prob(self, x_t: Tensor, alpha: Tensor, sigma: Tensor, classes: Tensor | None = None) -> Tensor:
        """log p_t(x_t) of the noised marginal (differentiable in x_t)."""
        return torch.logsumexp(self.noisy_component_terms(x_t, alpha, sigma, classes)[0], dim=1)

    def component_log_prob(self, x: Tensor) -> Tensor:
        ones = torch.ones(x.shape[0], dtype=torch.float64)
        return self.noisy_component_terms(x, ones, 0 * ones)[0]

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_prob(x), dim=1)


SPEC_KEYS = {"name", "weights", "means", "covariances", "variances", "stds", "std", "classes"}


def mixture_from_spec(spec: Mapping[str, Any]) -> GaussianMixture:
    """A law from a mapping, e.g. the YAML block
        law: {name: two_blobs, weights: [0.7, 0.3], means: [[-1, 0], [1, 0]], std: 0.1}
    ``means`` (K, D) is required; the spread is one of ``covariances`` (K, D, D), ``variances`` or ``stds`` (K,
    isotropic, or (K, D) diagonal) or ``std`` (one isotropic value for every component); ``weights`` defaults to
    uniform, ``classes`` (K,) to one class per component."""
    unknown = set(spec) - SPEC_KEYS
    name = str(spec.get("name", "custom"))
    if unknown:
        raise ValueError(f"law {name!r}: unknown keys {sorted(unknown)}; a mixture law has {sorted(SPEC_KEYS)}")
    if "means" not in spec:
        raise ValueError(f"law {name!r}: 'means' (one row per component) is required")
    means = torch.as_tensor(spec["means"], dtype=torch.float64)
    if means.ndim != 2 or means.shape[0] < 1:
        raise ValueError(f"law {name!r}: means must be a (components, dim) list of lists, got shape {tuple(means.shape)}")
    K, D = means.shape
    spreads = [key for key in ("covariances", "variances", "stds", "std") if key in spec]
    if len(spreads) != 1:
        raise ValueError(f"law {name!r}: give exactly one of covariances / variances / stds / std, got {spreads or 'none'}")
    value = torch.as_tensor(spec[spreads[0]], dtype=torch.float64)
    if spreads[0] == "covariances":
        covariances = value
    else:
        variances = value ** 2 if spreads[0] in ("stds", "std") else value
        if spreads[0] == "std":
            if variances.ndim != 0:
                raise ValueError(f"law {name!r}: std is one number, got shape {tuple(variances.shape)}")
            variances = variances.expand(K)
        if variances.shape == (K,):
            variances = variances[:, None].expand(K, D)
        if variances.shape != (K, D):
            raise ValueError(f"law {name!r}: {spreads[0]} must have shape ({K},) or ({K}, {D}), "
                             f"got {tuple(value.shape)}")
        covariances = torch.diag_embed(variances)
    weights = spec.get("weights", [1.0 / K] * K)
    return GaussianMixture(weights, means, covariances, spec.get("classes"), name=name)


def law_sigma_data(law: GaussianMixture) -> float:
    """The data standard deviation per coordinate, sqrt(trace Cov[x0] / D) -- the scalar EDM calls sigma_data (Karras
    et al. 2022, Sec. 5: the preconditioning keeps network inputs and targets at unit variance only when it matches)."""
    mean = (law.weights[:, None] * law.means).sum(0)
    second = (law.weights[:, None, None] * (law.covariances + law.means[:, :, None] * law.means[:, None, :])).sum(0)
    covariance = second - mean[:, None] * mean[None, :]
    return float(covariance.diagonal().sum().div(law.dim).sqrt())


def same_law(a: GaussianMixture, b: GaussianMixture, tolerance: float = 1e-9) -> bool:
    """Equal weights, means, covariances and classes (component order matters, as it names the classes)."""
    if a.means.shape != b.means.shape:
        return False
    return (torch.allclose(a.weights, b.weights, atol=tolerance) and torch.allclose(a.means, b.means, atol=tolerance)
            and torch.allclose(a.covariances, b.covariances, atol=tolerance)
            and torch.equal(a.component_classes, b.component_classes))
