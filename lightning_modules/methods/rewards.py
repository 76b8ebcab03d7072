"""Differentiable reward models r(x0, condition) for reward-guided distillation (RG-LCD, methods/rg_lcd.py).

Every reward is an ``nn.Module`` with ``forward(x0, cond=None, prompts=None) -> (B,)``, differentiable in x0, frozen
(no parameter is ever in an optimizer, except the latent proxy's), and says whether it reads images or the teacher's
own space (``reads_images``): a latent teacher's module decodes x0 with its VAE, with gradient, before an image reward.

* ``MixtureLogDensity`` -- the toy suite's analytic reward: log p(x0 | c) of the exact Gaussian-mixture law, the
  log-density of the requested class's components (all components when there is no label, or for the null label),
      r(x, c) = log sum_{k in c} pi_k N(x; mu_k, S_k),   grad_x r = - sum_k w_k(x) S_k^{-1} (x - mu_k)
  (w_k the responsibilities within c): closed form, so tests check the gradient.
* ``ClassifierLogProb`` -- class-conditional MNIST: log softmax of the shipped MNIST classifier
  (``evaluation.prompt_adherence``'s) at the requested digit; for text conditions, the digit their prompt asks for
  (``TextCondition.labels``).
* ``CLIPReward`` -- text-to-image: CLIP score 100 cos(E_I(x), E_T(prompt)) of the local open_clip checkpoint
  (``evaluation.clip_score.CLIPScorer``: the shipped MNIST CLIP by default), without the metric's clamp at 0 (it
  would cut the gradient of badly aligned images).
* ``LatentRewardModel`` -- RG-LCD's latent proxy reward model (LRM, Li et al. 2024, arXiv:2403.11027, Sec. 4.2): a
  small network on the teacher's latents (flattened MLP; class embedding or pooled text embedding as condition),
  trained on the critic side to match the expert reward (``lrm_loss``), then used in its place in the student's loss.
  Two losses are offered: ``regression`` -- (R_phi(x) - R_expert(x))^2 over the latents it is shown; ``preference``
  -- the paper's form as we read it: the expert's and the LRM's Bradley-Terry preference between the one-step
  generation and the real sample of the same pair, P = softmax((R(x_gen), R(x_real)) / tau), matched by
  KL(P_expert || P_phi); it determines R_phi only up to a per-condition constant.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning.condition import TextCondition


def condition_labels(cond) -> Tensor | None:
    """Class labels of a condition: the tensor itself, a TextCondition's ``labels``, or None."""
    if cond is None:
        return None
    if isinstance(cond, TextCondition):
        return cond.labels
    return cond if torch.is_tensor(cond) else None


class Reward(nn.Module):
    reads_images: bool = False

    def forward(self, x0: Tensor, cond=None, prompts: Sequence[str] | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x0, cond, prompts) -> reward (n,)")

    def train(self, mode: bool = True):
        return super().train(False)  # always an evaluator


class MixtureLogDensity(Reward):
    """log p(x0 | c) under a Gaussian-mixture law (a registered toy name, a YAML mapping or a GaussianMixture)."""

    def __init__(self, law, conditional: bool = True):
        super().__init__()
        from ..networks.toy_laws import resolve_law

        self.law = resolve_law(law)
        self.conditional = conditional

    def forward(self, x0, cond=None, prompts=None):
        labels = condition_labels(cond) if self.conditional else None
        ones = torch.ones(x0.shape[0], dtype=torch.float64, device=x0.device)
        log_joint, _ = self.law.noisy_component_terms(x0, ones, 0 * ones, labels)
        return torch.logsumexp(log_joint, dim=1).to(x0.dtype)

    def gradient(self, x0: Tensor, cond=None) -> Tensor:
        """The closed form - sum_k w_k S_k^{-1} (x - mu_k) (float64), for tests."""
        x = x0.double()
        labels = condition_labels(cond) if self.conditional else None
        ones = torch.ones(x.shape[0], dtype=torch.float64)
        log_joint, _ = self.law.noisy_component_terms(x, ones, 0 * ones, labels)
        w = torch.softmax(log_joint, dim=1)
        precision = torch.linalg.inv(self.law.covariances)
        centred = x[:, None, :] - self.law.means[None]
        return -torch.einsum("bk,kde,bke->bd", w, precision, centred)


class ClassifierLogProb(Reward):
    """log p_classifier(label | image) of the shipped MNIST classifier; images in [-1, 1]."""

    reads_images = True

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from ..evaluation.prompt_adherence import load_adherence_classifier

        self.classifier = load_adherence_classifier(weights_path).eval().requires_grad_(False)

    def forward(self, x0, cond=None, prompts=None):
        from ..evaluation.prompt_adherence import classifier_input

        labels = condition_labels(cond)
        if labels is None:
            raise ValueError("ClassifierLogProb needs class labels (class-conditional batches or labelled prompts)")
        device = next(self.classifier.parameters()).device
        logits = self.classifier(classifier_input(x0).to(device))
        labels = labels.to(device).long().clamp(max=logits.shape[1] - 1)
        return logits.log_softmax(1).gather(1, labels[:, None]).squeeze(1).to(x0.dtype)


class CLIPReward(Reward):
    """100 cos(E_I(image), E_T(prompt)) through a local open_clip checkpoint (no clamp), differentiable in the image."""

    reads_images = True

    def __init__(self, model_config: str | dict | None = None, checkpoint: str | None = None,
                 model_name: str | None = None):
        super().__init__()
        from ..evaluation.clip_score import SHIPPED_MNIST_CLIP_CHECKPOINT, SHIPPED_MNIST_CLIP_CONFIG, CLIPScorer

        if model_config is None and model_name is None:
            model_config, checkpoint = SHIPPED_MNIST_CLIP_CONFIG, checkpoint or SHIPPED_MNIST_CLIP_CHECKPOINT
        self.scorer = CLIPScorer(model_name=model_name, model_config=model_config, checkpoint=checkpoint)

    def forward(self, x0, cond=None, prompts=None):
        from ..evaluation.clip_score import CLIP_SCORE_WEIGHT

        if prompts is None or len(prompts) != x0.shape[0]:
            got = "no prompts" if prompts is None else f"{len(prompts)} prompts"
            raise ValueError(f"CLIPReward needs one prompt per sample (batch['prompts']): {x0.shape[0]} samples, {got} "
                             "(a prompt-only DataModule, e.g. datamodules.PromptDataModule, serves them)")
        image = F.normalize(self.scorer.model.encode_image(self.scorer.preprocess(x0)).float(), dim=-1)
        text = self.scorer.text_features(list(prompts)).to(image.device)
        return (CLIP_SCORE_WEIGHT * (image * text).sum(-1)).to(x0.dtype)


class LatentRewardModel(nn.Module):
    """RG-LCD's latent proxy reward R_phi(x0, c): an MLP on the flattened latent, plus a class embedding
    (``num_classes``; the null label included) or a projection of the pooled text embedding (``condition_dim``)."""

    def __init__(self, data_shape: Sequence[int], hidden: int = 256, depth: int = 2, num_classes: int = 0,
                 condition_dim: int = 0):
        super().__init__()
        self.data_shape = tuple(data_shape)
        dim = math.prod(self.data_shape)
        self.num_classes, self.condition_dim = num_classes, condition_dim
        self.label_embedding = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.text_projection = nn.Linear(condition_dim, hidden) if condition_dim else None
        self.input = nn.Linear(dim, hidden)
        layers = []
        for _ in range(max(depth - 1, 0)):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers, nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x0: Tensor, cond=None, prompts=None) -> Tensor:
        dtype = self.input.weight.dtype
        h = self.input(x0.reshape(x0.shape[0], -1).to(dtype))
        if self.label_embedding is not None:
            labels = condition_labels(cond)
            if labels is None:
                labels = torch.full((x0.shape[0],), self.num_classes, dtype=torch.long)
            h = h + self.label_embedding(labels.to(h.device).long().clamp(max=self.num_classes))
        if self.text_projection is not None and isinstance(cond, TextCondition):
            if cond.pooled is not None and cond.pooled.shape[-1] == self.condition_dim:
                pooled = cond.pooled
            else:
                mask = torch.ones(cond.embeds.shape[:2], device=cond.embeds.device) if cond.mask is None else cond.mask
                mask = mask.to(cond.embeds.dtype)[..., None]
                pooled = (cond.embeds * mask).sum(1) / mask.sum(1).clamp(min=1)
            h = h + self.text_projection(pooled.to(device=h.device, dtype=dtype))
        return self.body(h).squeeze(1).to(x0.dtype)


def lrm_regression_loss(proxy: Tensor, expert: Tensor) -> Tensor:
    return ((proxy - expert.detach()) ** 2).mean()


def lrm_preference_loss(proxy_gen: Tensor, proxy_real: Tensor, expert_gen: Tensor, expert_real: Tensor,
                        temperature: float = 1.0) -> Tensor:
    """KL(P_expert || P_phi) of the two-way preference softmax((R(gen), R(real)) / tau), averaged over pairs."""
    target = torch.softmax(torch.stack([expert_gen, expert_real], 1).detach() / temperature, dim=1)
    log_model = torch.log_softmax(torch.stack([proxy_gen, proxy_real], 1) / temperature, dim=1)
    return (target * (target.clamp(min=1e-12).log() - log_model)).sum(1).mean()
