"""An exact *prompt*-conditional teacher: each prompt sets the mode weights of a known Gaussian mixture.

    p(x0 | prompt) = sum_k pi_k(prompt) N(mu_k, S_k),        p(x0 | "") = sum_k pi_k N(mu_k, S_k)  (the law's weights)

so the conditional and unconditional posterior means -- and with them every classifier-free-guided target
D_w = D_u + w (D_c - D_u) (Ho & Salimans 2022, Eq. 6) -- are closed form at every noise level. This is the test oracle
of the text-to-image path: prompts go through the same ``TextEncoder`` -> ``TextCondition`` -> datamodule -> method
route as a real latent teacher's, while the answer stays exact.

``MixturePromptEncoder`` "encodes" a prompt as its weight vector (``pooled``, (K,)) and a one-token state holding the
same vector (``embeds``, (1, K)), so networks can read either; the empty prompt encodes as the law's own weights.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..conditioning.condition import TextCondition
from ..conditioning.text_encoders import EncodedText, TextEncoder
from ..diffusion.schedules import NoiseSchedule
from .denoiser import Denoiser
from .mixture_law import GaussianMixture
from .toy_laws import resolve_law


def _law(law: str | Mapping | GaussianMixture) -> GaussianMixture:
    return resolve_law(law)


def validated_prompt_weights(prompt_weights: Mapping[str, Sequence[float]], num_components: int) -> dict[str, Tensor]:
    table = {}
    for prompt, weights in prompt_weights.items():
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (num_components,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"prompt {prompt!r}: weights must be {num_components} non-negative numbers with a "
                             f"positive sum, got {weights.tolist()}")
        table[prompt] = weights / weights.sum()
    return table


class MixturePromptEncoder(TextEncoder):
    """The text encoder of the exact prompted mixture: prompt -> its mode weights (unknown prompts are an error)."""

    max_length = 1

    def __init__(self, law: str | GaussianMixture, prompt_weights: Mapping[str, Sequence[float]]):
        super().__init__()
        self.law = _law(law)
        self.table = validated_prompt_weights(prompt_weights, self.law.num_components)
        self.table.setdefault("", self.law.weights.clone())

    @property
    def identity(self) -> str:
        entries = ";".join(f"{p}={[round(float(w), 12) for w in v]}" for p, v in sorted(self.table.items()))
        return f"MixturePromptEncoder:{self.law.name}:{entries}"

    def encode(self, prompts):
        unknown = [p for p in prompts if p not in self.table]
        if unknown:
            raise ValueError(f"prompt {unknown[0]!r} has no mode weights; known prompts: {sorted(self.table)}")
        weights = torch.stack([self.table[p] for p in prompts]).float()
        return EncodedText(embeds=weights[:, None, :], pooled=weights)


class PromptedMixtureTeacher(Denoiser):
    """D(x_t, t, prompt) = E[x0 | x_t] under the mixture with the prompt's mode weights (``cond.pooled``)."""

    text_conditioned = True

    def __init__(self, law: str | GaussianMixture, schedule: NoiseSchedule | None = None):
        super().__init__(schedule, prediction_type="x0")
        self.law = _law(law)
        self.num_classes = 0

    @property
    def data_shape(self):
        return (self.law.dim,)

    def mode_weights(self, cond: TextCondition | None, batch: int, device) -> Tensor:
        if cond is None:
            return self.law.weights.to(device).expand(batch, -1)
        if not isinstance(cond, TextCondition) or cond.pooled is None:
            raise ValueError(f"PromptedMixtureTeacher needs a TextCondition with mode weights in pooled, got "
                             f"{type(cond).__name__}")
        if cond.pooled.shape[-1] != self.law.num_components:
            raise ValueError(f"condition has {cond.pooled.shape[-1]} weights, the law {self.law.num_components} modes")
        return cond.pooled.double().to(device)

    def predict(self, x_t, t, cond):
        alpha, sigma = self.schedule.alpha_sigma(t.double())
        log_joint, posterior = self.law.noisy_component_terms(x_t, alpha, sigma)
        weights = self.mode_weights(cond, x_t.shape[0], log_joint.device)
        # swap the law's log-weights for the prompt's (a zero weight removes the mode)
        log_joint = log_joint - self.law.weights.to(log_joint.device).log()[None] + weights.log()
        responsibilities = torch.softmax(log_joint, dim=1)
        return torch.einsum("bk,bkd->bd", responsibilities, posterior).reshape(x_t.shape).to(x_t.dtype)

    def sample_law(self, n: int, weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples of p(x0 | prompt) for a prompt with mode ``weights``."""
        conditional = GaussianMixture(weights, self.law.means, self.law.covariances, name=f"{self.law.name}|prompt")
        return conditional.sample(n, generator)[0]
