"""A stand-in for an NVlabs EDM network (``EDMPrecond``'s call signature and attributes) whose denoiser is closed
form: data x0 ~ N(m_c, sigma_data^2 I) per class c (m = 0 unconditionally), so D(x; sigma) = m + sigma_data^2 (x - m)
/ (sigma^2 + sigma_data^2) exactly (Karras et al. 2022, the optimal denoiser of a Gaussian)."""
from __future__ import annotations

import torch
from torch import nn


class GaussianEDMPrecond(nn.Module):
    def __init__(self, sigma_data: float = 0.5, img_resolution: int = 4, img_channels: int = 1, label_dim: int = 0):
        super().__init__()
        self.sigma_data, self.img_resolution, self.img_channels, self.label_dim = (sigma_data, img_resolution,
                                                                                   img_channels, label_dim)
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.class_means = nn.Parameter(torch.linspace(-1, 1, label_dim) if label_dim else torch.zeros(0))
        self.gain = nn.Parameter(torch.ones(()))  # something for a student copy to train

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        mean = torch.zeros_like(x)
        if class_labels is not None and self.label_dim:
            mean = (class_labels.to(x.dtype) @ self.class_means.to(x.dtype)).reshape(-1, 1, 1, 1).expand_as(x)
        return mean + self.gain * self.sigma_data ** 2 * (x - mean) / (sigma ** 2 + self.sigma_data ** 2)
