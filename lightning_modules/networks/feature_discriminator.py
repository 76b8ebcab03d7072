"""A multi-head discriminator on the features of a FROZEN network at noised inputs (LADD, Sauer et al. 2024, "Fast
high-resolution image synthesis with latent adversarial diffusion distillation", arXiv:2403.12015, Sec. 3.1-3.2:
"generative features" of the teacher, read at several depths, each by a small trainable head conditioned on the
noise level).

Two pieces, kept apart so that the frozen network is held once (by the distillation module) and never becomes a
submodule of the discriminator:
  * ``frozen_features(network, x_t, t, cond, layers)`` -- the list of feature maps of one forward call: the outputs of
    the named submodules (``layers``, e.g. ``["unet.down_blocks.1", "unet.mid_block"]``; default the network's
    bottleneck ``feature_module()``), or, for a network without layers, its own ``generative_features`` (the exact
    Gaussian-mixture teacher's posterior mean and component responsibilities). Gradients flow to ``x_t``.
  * ``TeacherFeatureDiscriminator`` -- the trainable heads, one per feature map; ``forward(network, x_t, t, cond)``
    returns (B, heads) logits (a head's per-location logits averaged, as LADD's heads score every token).
Each head is a per-location MLP (1x1 convolutions) whose hidden state is shifted by an embedding of the EDM noise
level ln(sigma) / 4 and scored by a projection term (Miyato & Koyama 2018, "cGANs with projection discriminator"):
<embed(c), h> for class labels (``num_classes``), <W p(c), h> for prompts (``prompt_dim``), p(c) the pooled prompt
embedding -- the TextCondition's ``pooled`` where the text encoder gives one, else the mean of its token states over
the real tokens -- as LADD conditions its heads on the noise level and the pooled text embedding (Sec. 3.2).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..conditioning.condition import TextCondition
from .mlp import FourierFeatures


class _FeatureTaps:
    """Capture the outputs of several submodules during one forward call (tuple outputs: their first element)."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules, self.features, self._handles = list(modules), [None] * len(modules), []

    def __enter__(self):
        for index, module in enumerate(self.modules):
            def hook(_module, _inputs, output, index=index):
                self.features[index] = output[0] if isinstance(output, tuple) else output
            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False


def frozen_features(network: nn.Module, x_t: Tensor, t: Tensor, cond, layers: Sequence[str] | None = None) -> list[Tensor]:
    """Feature maps of ``network`` at (x_t, t, cond), (B, C) or (B, C, H, W) each (module docstring)."""
    if not layers and hasattr(network, "generative_features"):
        return list(network.generative_features(x_t, t, cond))
    if layers:
        modules = []
        for name in layers:
            try:
                modules.append(network.get_submodule(name))
            except AttributeError as error:
                raise ValueError(f"feature layer {name!r} is not a submodule of {type(network).__name__}") from error
    else:
        module = network.feature_module() if hasattr(network, "feature_module") else None
        if module is None:
            raise ValueError(f"{type(network).__name__} has no feature_module() and no generative_features(); name "
                             "the feature layers (feature_layers)")
        modules = [module]
    with _FeatureTaps(modules) as taps:
        network(x_t, t, cond)
    return taps.features


class FeatureHead(nn.Module):
    """One head: features (B, C[, H, W]) + noise-level embedding (B, E) [+ labels] -> per-location logits (B, N)."""

    def __init__(self, in_channels: int, hidden: int, embedding_dim: int, num_classes: int = 0, prompt_dim: int = 0):
        super().__init__()
        self.input = nn.Conv2d(in_channels, hidden, 1)
        self.noise_shift = nn.Linear(embedding_dim, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU())
        self.output = nn.Conv2d(hidden, 1, 1)
        self.class_projection = nn.Embedding(num_classes, hidden) if num_classes > 0 else None
        self.prompt_projection = nn.Linear(prompt_dim, hidden, bias=False) if prompt_dim > 0 else None

    def forward(self, features: Tensor, noise_embedding: Tensor, labels: Tensor | None = None,
                prompt: Tensor | None = None) -> Tensor:
        x = features.float()
        x = x[:, :, None, None] if x.ndim == 2 else x
        h = self.body(self.input(x) + self.noise_shift(noise_embedding)[:, :, None, None])
        logits = self.output(h).flatten(1)
        if self.class_projection is not None and labels is not None:
            # the null label (CFG's "unconditional", >= num_classes) gets no projection term
            known = (labels < self.class_projection.num_embeddings).to(h.dtype)
            embedded = self.class_projection(labels.clamp(0, self.class_projection.num_embeddings - 1)) * known[:, None]
            logits = logits + (embedded[:, :, None, None] * h).sum(1).flatten(1)
        if self.prompt_projection is not None and prompt is not None:
            embedded = self.prompt_projection(prompt.to(h.dtype))
            logits = logits + (embedded[:, :, None, None] * h).sum(1).flatten(1)
        return logits


def pooled_prompt(cond: TextCondition) -> Tensor:
    """(B, P): the encoder's pooled embedding, else the mean token state over the real tokens (mask 1)."""
    if cond.pooled is not None:
        return cond.pooled.float()
    embeds = cond.embeds.float()
    if cond.mask is None:
        return embeds.mean(1)
    weights = cond.mask.to(embeds.dtype)[:, :, None]
    return (embeds * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class TeacherFeatureDiscriminator(nn.Module):
    """Heads on the frozen network's features (module docstring). ``feature_channels``: the channel count of each
    feature map, in the order of ``feature_layers`` (checked against the network by ``check_features``);
    ``num_classes`` > 0 adds the projection term for class labels (label >= num_classes: none), ``prompt_dim`` > 0
    the one for prompts (the width of the pooled prompt embedding, ``pooled_prompt``)."""

    def __init__(self, feature_channels: Sequence[int], hidden: int = 256, num_classes: int = 0,
                 feature_layers: Sequence[str] | None = None, embedding_dim: int = 64, prompt_dim: int = 0):
        super().__init__()
        feature_channels = [int(c) for c in feature_channels]
        if not feature_channels or any(c < 1 for c in feature_channels):
            raise ValueError(f"feature_channels must be a non-empty list of positive widths, got {feature_channels}")
        if feature_layers is not None and len(feature_layers) != len(feature_channels):
            raise ValueError(f"{len(feature_layers)} feature_layers {list(feature_layers)} for "
                             f"{len(feature_channels)} feature_channels {feature_channels}: give one width per layer")
        if hidden < 1 or num_classes < 0 or prompt_dim < 0:
            raise ValueError(f"need hidden >= 1, num_classes >= 0 and prompt_dim >= 0, got {hidden}, {num_classes}, "
                             f"{prompt_dim}")
        if num_classes > 0 and prompt_dim > 0:
            raise ValueError(f"num_classes {num_classes} and prompt_dim {prompt_dim}: the heads project either class "
                             "labels or prompts; set the other to 0")
        self.feature_channels, self.num_classes, self.prompt_dim = feature_channels, num_classes, int(prompt_dim)
        self.feature_layers = list(feature_layers) if feature_layers else None
        self.noise_embedding = nn.Sequential(FourierFeatures(embedding_dim), nn.Linear(embedding_dim, embedding_dim),
                                             nn.SiLU())
        self.heads = nn.ModuleList(FeatureHead(c, hidden, embedding_dim, num_classes, self.prompt_dim)
                                   for c in feature_channels)

    def features(self, network: nn.Module, x_t: Tensor, t: Tensor, cond) -> list[Tensor]:
        features = frozen_features(network, x_t, t, cond, self.feature_layers)
        if len(features) != len(self.heads):
            raise ValueError(f"{type(network).__name__} gives {len(features)} feature maps (widths "
                             f"{[int(f.shape[1]) for f in features]}) for {len(self.heads)} heads (feature_channels "
                             f"{self.feature_channels})")
        return features

    def check_features(self, network: nn.Module, x_t: Tensor, t: Tensor, cond=None) -> None:
        """Fail early, naming the head, when the network's feature widths differ from ``feature_channels``."""
        with torch.no_grad():
            features = self.features(network, x_t, t, cond)
        widths = [int(f.shape[1]) for f in features]
        if widths != self.feature_channels:
            raise ValueError(f"discriminator feature_channels {self.feature_channels} do not match the widths "
                             f"{widths} of {type(network).__name__}'s feature maps "
                             f"({self.feature_layers or 'its default features'})")

    def labels(self, cond) -> Tensor | None:
        if self.num_classes == 0 or cond is None:
            return None
        if isinstance(cond, TextCondition):
            raise ValueError("TeacherFeatureDiscriminator's num_classes projection takes class labels; with prompts "
                             "set num_classes: 0 and prompt_dim to the pooled prompt embedding's width")
        return cond.long()

    def prompt(self, cond) -> Tensor | None:
        if self.prompt_dim == 0:
            return None
        if not isinstance(cond, TextCondition):
            raise ValueError(f"prompt_dim {self.prompt_dim} projects prompts, but the condition is "
                             f"{type(cond).__name__}; for class labels set prompt_dim: 0 and num_classes")
        pooled = pooled_prompt(cond)
        if pooled.shape[1] != self.prompt_dim:
            raise ValueError(f"discriminator prompt_dim {self.prompt_dim} does not match the pooled prompt embedding's "
                             f"width {pooled.shape[1]}")
        return pooled

    def forward(self, network: nn.Module, x_t: Tensor, t: Tensor, cond=None, noise_level: Tensor | None = None) -> Tensor:
        """(B, heads) logits of the frozen ``network``'s features at (x_t, t, cond); ``noise_level`` (B,) defaults to
        ln(edm_sigma(t)) / 4 of the network's schedule (EDM's c_noise, Karras et al. 2022, Table 1)."""
        if noise_level is None:
            noise_level = network.schedule.edm_sigma(t.double()).log() / 4
        embedding = self.noise_embedding(noise_level.float())
        labels, prompt = self.labels(cond), self.prompt(cond)
        logits = [head(features, embedding, labels, prompt).mean(1)
                  for head, features in zip(self.heads, self.features(network, x_t, t, cond))]
        return torch.stack(logits, dim=1)
