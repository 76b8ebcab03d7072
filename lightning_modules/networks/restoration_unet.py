"""An image-conditioned UNet for restoration (super-resolution): the degraded image enters as extra input channels.

SR3 (Saharia et al., "Image Super-Resolution via Iterative Refinement", TPAMI 2022, arXiv:2104.07636, Sec. 2.4)
conditions the denoiser on the low-resolution image by upsampling it to the output grid (bicubic) and concatenating
it with x_t along the channels. Under EDM preconditioning (Karras et al. 2022, Eq. 7) only x_t is scaled by c_in;
the condition image is fed as it is, since its scale does not change with the noise level:

    D(x_t, sigma; y) = c_skip x_t + c_out F([c_in x_t, y_up], c_noise, s),

with s the downsampling factor's embedding (diffusers' class embedding: index of the factor in ``scales``, the last
index is the null embedding of unconditional rows), so one network serves several scales.

The network takes an ``ImageCondition`` (or None = unconditional: a blank image with the null scale embedding), so
every method written against the Denoiser contract runs on it unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..conditioning.condition import ImageCondition
from ..diffusion.schedules import NoiseSchedule
from .diffusers_adapter import DiffusersUNetDenoiser


class ImageConditionedUNetDenoiser(DiffusersUNetDenoiser):
    """A diffusers ``UNet2DModel`` whose ``in_channels`` = data channels + ``condition_channels``.

    ``scales``: the downsampling factors the network knows (e.g. [2, 4]); it then needs ``num_class_embeds =
    len(scales) + 1`` in its config. Without ``scales`` the factor is not embedded (the image alone tells it) and
    unconditional rows differ from conditional ones only by their blank image.
    """

    #: conditioned on an ``ImageCondition``, not on class labels or prompts
    image_conditioned: bool = True

    def __init__(self, config: dict | None = None, pretrained_path: str | None = None, subfolder: str | None = None,
                 condition_channels: int = 1, scales: Sequence[int] | None = None, sigma_data: float = 0.5,
                 schedule: NoiseSchedule | None = None):
        super().__init__(config=config, pretrained_path=pretrained_path, subfolder=subfolder,
                         unet_class="UNet2DModel", preconditioning="edm", sigma_data=sigma_data, schedule=schedule)
        in_channels = self.unet.config.in_channels
        if not 0 < condition_channels < in_channels:
            raise ValueError(f"condition_channels must be in [1, in_channels - 1] = [1, {in_channels - 1}], got "
                             f"{condition_channels}")
        self.condition_channels = int(condition_channels)
        self.scales = None if scales is None else [int(s) for s in scales]
        embeds = getattr(self.unet.config, "num_class_embeds", None)
        if self.scales is not None:
            if len(set(self.scales)) != len(self.scales) or min(self.scales) < 1:
                raise ValueError(f"scales must be distinct factors >= 1, got {self.scales}")
            if embeds != len(self.scales) + 1:
                raise ValueError(f"scales {self.scales} need num_class_embeds = {len(self.scales) + 1} (one per "
                                 f"scale and a null one) in the UNet config, got {embeds}")
        elif embeds:
            raise ValueError(f"the UNet config has num_class_embeds={embeds} but no scales were given to embed")
        self.num_classes = 0  # the condition is an image, never a class label (no class-label guidance / sampling)

    @property
    def data_shape(self):
        channels, *size = super().data_shape
        return (channels - self.condition_channels, *size)

    def scale_index(self, cond: ImageCondition) -> Tensor | None:
        """The class-embedding index of each row: its factor's position in ``scales``; len(scales) if dropped."""
        if self.scales is None:
            return None
        null = torch.full((len(cond),), len(self.scales), dtype=torch.long, device=cond.device)
        if cond.scale is None:
            if not bool(cond.dropped_rows().all()):
                raise ValueError(f"this network embeds the downsampling factor (scales {self.scales}); the "
                                 "ImageCondition has no scale")
            return null
        known = torch.tensor(self.scales, device=cond.device)
        matches = cond.scale.long()[:, None] == known[None]
        unknown = ~matches.any(dim=1) & ~cond.dropped_rows()
        if bool(unknown.any()):
            raise ValueError(f"downsampling factor(s) {sorted(set(cond.scale[unknown].tolist()))} unknown to this "
                             f"network (scales {self.scales})")
        return torch.where(cond.dropped_rows(), null, matches.long().argmax(dim=1))

    def _call_unet(self, x: Tensor, time_input: Tensor, cond) -> Tensor:
        if cond is None:
            blank = torch.zeros(x.shape[0], self.condition_channels, *x.shape[2:], dtype=x.dtype, device=x.device)
            cond = ImageCondition(blank, dropped=torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
        if not isinstance(cond, ImageCondition):
            raise ValueError(f"{type(self).__name__} is conditioned on an ImageCondition (the degraded image), got "
                             f"{type(cond).__name__}")
        if tuple(cond.image.shape[1:]) != (self.condition_channels, *x.shape[2:]):
            raise ValueError(f"condition image {tuple(cond.image.shape[1:])} does not match the network's "
                             f"({self.condition_channels}, {', '.join(map(str, x.shape[2:]))}); upsample the "
                             "low-quality image to the output grid")
        network_input = torch.cat([x, cond.image.to(x.dtype)], dim=1)
        return self.unet(network_input, time_input, class_labels=self.scale_index(cond)).sample
