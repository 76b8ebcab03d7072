"""Discriminator heads that read a critic's bottleneck features (DMD2 Sec. 4.3: a GAN classifier on the fake-score
network's encoder, trained on re-noised real and generated samples)."""
from __future__ import annotations

from torch import Tensor, nn


class DiscriminatorHead(nn.Module):
    """Logit per sample from features shaped (B, C) or (B, C, H, W) (global-average-pooled first)."""

    def __init__(self, in_features: int, hidden: int = 256):
        super().__init__()
        if in_features < 1:
            raise ValueError(f"DiscriminatorHead in_features must be >= 1, got {in_features}")
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim > 2:
            features = features.flatten(2).mean(2)
        return self.net(features.float()).squeeze(1)
