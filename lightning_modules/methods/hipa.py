"""HiPA -- High-frequency-Promoting Adaptation (Zhang & Hooi 2023, "HiPA: Enabling One-Step Text-to-Image Diffusion
Models via High-Frequency-Promoting Adaptation", arXiv:2311.18158).

One-step low-rank adaptors on the frozen teacher, trained so that the adapted model's single step reproduces the
teacher's multi-step sample from the same noise (Sec. 4):

    z ~ N(0, I);  x* = ODE_T(z, c)                          (the multi-step teacher, no gradient)
    x^ = G_{theta + dtheta}(z, c)                           (one step of the teacher with LoRA adaptors dtheta)
    L(dtheta) = L_spatial(x^, x*) + lambda_hf L_hf(x^, x*)  (the adaptation loss, Sec. 4.2)

The paper's insight (Sec. 3) is that one-step outputs lack high frequencies, so L_hf compares the high-frequency
content of the two images. As we read the paper, it takes it from the Fourier components and from edge information;
here both, each an L1 on the difference d = x^ - x* (both operators are linear, so H(x^) - H(x*) = H(d)):

    L_hf = mean | F^-1[ M_r . F[d] ] |          (Fourier high-pass: M_r keeps frequencies with radius > r Nyquist)
         + mean | Laplacian(d) |                (edges: the 5-point Laplacian, circular boundary)

L_spatial: the paper's spatial term is a perceptual loss (LPIPS); no LPIPS weights are available offline, so it is
``losses.distance`` (l2, or pseudo-Huber) as in CD's card. Only the adaptors train (the trainable-parameter fraction,
``trainable_parameter_fraction``, is logged as ``train/generator/trainable_fraction``; the paper adapts SD with 3.3M
parameters, 0.04%). The teacher's samples x* come from the KD mechanism (``knowledge_distillation.py``: cached
``pairs``, ``on_the_fly`` ODE solves or a ``streaming`` buffer) -- HiPA is KD's regression with LoRA and L_hf.

Images only: L_hf needs a spatial layout. ``image_shape`` (C, H, W) reshapes flat data (the toy suite's ``digits64``
is 8x8 images: [1, 8, 8]); without one the data's own shape is used when it has >= 2 spatial axes. On vector data
(the 2-D toy laws) "high frequency" has no meaning: set ``high_frequency_weight: 0`` and HiPA reduces to one-step
LoRA regression onto the teacher's ODE samples (KD with LoRA adaptors); a positive weight there is refused.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import distance
from .knowledge_distillation import KnowledgeDistillation


def fourier_high_pass(images: Tensor, radius: float) -> Tensor:
    """The part of each (..., H, W) image with spatial frequency radius > ``radius`` x Nyquist (0 < radius < 1)."""
    height, width = images.shape[-2:]
    fy = torch.fft.fftfreq(height, device=images.device, dtype=torch.float64)[:, None] * 2  # in units of Nyquist
    fx = torch.fft.fftfreq(width, device=images.device, dtype=torch.float64)[None, :] * 2
    mask = ((fy ** 2 + fx ** 2).sqrt() > radius).to(images.dtype)
    return torch.fft.ifft2(torch.fft.fft2(images) * mask).real


def laplacian(images: Tensor) -> Tensor:
    """The 5-point Laplacian of each (B, C, H, W) image with circular boundary (every pixel has four neighbours)."""
    padded = F.pad(images, (1, 1, 1, 1), mode="circular")
    return (padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:]
            - 4 * images)


def high_frequency_loss(difference: Tensor, radius: float, fourier_weight: float = 1.0,
                        edge_weight: float = 1.0) -> Tensor:
    """Per-sample L_hf of a (B, C, H, W) difference image (module docstring)."""
    fourier = fourier_high_pass(difference, radius).abs().flatten(1).mean(1)
    edges = laplacian(difference).abs().flatten(1).mean(1)
    return fourier_weight * fourier + edge_weight * edges


class HiPA(KnowledgeDistillation):
    def __init__(self, *args, high_frequency_weight: float = 1.0, high_pass_radius: float = 0.5,
                 fourier_weight: float = 1.0, edge_weight: float = 1.0, image_shape: Sequence[int] | None = None,
                 mode: str = "on_the_fly", **kwargs):
        if kwargs.get("student_lora") is None:
            raise ValueError("HiPA trains one-step low-rank adaptors: set student_lora (e.g. {rank: 4}); on the exact "
                             "toy teacher also give a student network as their base")
        for name, value in [("high_frequency_weight", high_frequency_weight), ("fourier_weight", fourier_weight),
                            ("edge_weight", edge_weight)]:
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 < high_pass_radius < 1:
            raise ValueError(f"high_pass_radius must be in (0, 1) (a fraction of the Nyquist frequency), got "
                             f"{high_pass_radius}")
        super().__init__(*args, mode=mode, **kwargs)
        self.high_frequency_weight, self.high_pass_radius = float(high_frequency_weight), float(high_pass_radius)
        self.fourier_weight, self.edge_weight = float(fourier_weight), float(edge_weight)
        self.image_shape = self._resolve_image_shape(image_shape)

    def _resolve_image_shape(self, image_shape) -> tuple[int, ...] | None:
        data_shape = tuple(self.teacher.data_shape or ())
        if image_shape is not None:
            image_shape = tuple(int(s) for s in image_shape)
            if len(image_shape) != 3 or (data_shape and math.prod(image_shape) != math.prod(data_shape)):
                raise ValueError(f"image_shape {list(image_shape)} must be (C, H, W) with as many values as the data "
                                 f"shape {list(data_shape)}")
            return image_shape
        if len(data_shape) == 3:
            return data_shape
        if self.high_frequency_weight > 0:
            raise ValueError(f"high_frequency_weight {self.high_frequency_weight} > 0 needs images, but the data shape "
                             f"is {list(data_shape)}: give image_shape (C, H, W) for flat images, or set "
                             "high_frequency_weight: 0 (one-step LoRA regression, the term has no meaning on vectors)")
        return None

    def as_images(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.image_shape)

    def adaptation_loss(self, one_step: Tensor, multi_step: Tensor) -> dict[str, Tensor]:
        """L_spatial + lambda_hf L_hf per sample, and each term (module docstring)."""
        spatial = distance(one_step, multi_step, self.distance_metric, self.huber_c)
        terms = {"spatial": spatial, "loss": spatial}
        if self.high_frequency_weight > 0:
            difference = self.as_images(one_step - multi_step)
            high = high_frequency_loss(difference, self.high_pass_radius, self.fourier_weight, self.edge_weight)
            terms["high_frequency"] = high
            terms["loss"] = spatial + self.high_frequency_weight * high
        return terms

    def generator_loss(self, batch):
        noise, cond, multi_step = self.kd_pairs(batch)
        one_step = self.generate(noise, cond)
        terms = self.adaptation_loss(one_step, multi_step.to(one_step.dtype))
        losses = {key: value.mean() for key, value in terms.items()}
        losses["trainable_fraction"] = torch.tensor(self.trainable_parameter_fraction())
        return losses
