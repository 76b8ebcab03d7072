"""Sample pictures in TensorBoard at each validation: a 2-D density image for vector data, an image grid otherwise
(64-D vectors are shown as 8x8 images). The same fixed noise every time, so successive images are comparable."""
from __future__ import annotations

import math

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger


def density_image(points: torch.Tensor, bins: int = 128, extent: float = 2.0) -> torch.Tensor:
    """(1, bins, bins) log-density picture of 2-D points on [-extent, extent]^2, y pointing up."""
    histogram, _ = torch.histogramdd(points.double().cpu(), bins=[bins, bins],
                                     range=[-extent, extent, -extent, extent])
    image = torch.log1p(histogram).T.flip(0)
    return (image / image.max().clamp_min(1e-12)).float().unsqueeze(0)


def image_grid(samples: torch.Tensor, value_range=(-1.0, 1.0)) -> torch.Tensor:
    from torchvision.utils import make_grid

    if samples.ndim == 2:
        side = int(math.isqrt(samples.shape[1]))
        if side * side != samples.shape[1]:
            raise ValueError(f"cannot render {samples.shape[1]}-D vectors as square images")
        samples = samples.reshape(-1, 1, side, side)
    low, high = value_range
    return make_grid(((samples.float().cpu() - low) / (high - low)).clamp(0, 1), nrow=int(math.sqrt(len(samples))))


def render(samples: torch.Tensor) -> torch.Tensor:
    return density_image(samples) if samples.ndim == 2 and samples.shape[1] == 2 else image_grid(samples)


class SampleImages(Callback):
    def __init__(self, num_samples: int = 4096, nfe: int | None = None, seed: int = 1234, num_images: int = 64):
        self.num_samples, self.nfe, self.seed, self.num_images = num_samples, nfe, seed, num_images

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        shape = pl_module.teacher.data_shape
        is_points = len(shape) == 1 and shape[0] == 2
        count = self.num_samples if is_points else self.num_images
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((count, *shape), generator=generator).to(pl_module.device)
        classes = int(getattr(pl_module.student, "num_classes", 0) or 0)  # class-conditional: labels n % classes
        labels = (torch.arange(count) % classes).to(pl_module.device) if classes else None
        samples = pl_module.sample(noise, labels, self.nfe)
        for logger in loggers:
            logger.experiment.add_image("samples/student", render(samples), trainer.global_step)
