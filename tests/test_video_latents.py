"""Video latents (docs/video.md): a 5-D batch (B, C, T, H, W) passes through DMD2 unchanged -- generator and critic
losses, the per-sample DMD2 normaliser over C x T x H x W, backward into student and critic, and a two-batch fit --
with a tiny 3-D convolutional denoiser (EDM-preconditioned) as teacher; and a frame-flattened per-frame denoiser
gives the same DMD2 direction as running it frame by frame."""
from __future__ import annotations

import lightning
import pytest
import torch
from torch import nn

from lightning_modules.diffusion import EDMSchedule
from lightning_modules.losses import dmd_gradient
from lightning_modules.methods.dmd2 import DMD2
from lightning_modules.networks.denoiser import Denoiser
from lightning_modules.networks.preconditioning import edm_precondition

SHAPE = (3, 4, 8, 8)   # C, T (frames), H, W


class TinyVideoDenoiser(Denoiser):
    """x0 prediction with EDM preconditioning around two 3-D convolutions (space-time kernels 3x3x3) and a noise-level
    embedding added per channel: the smallest network that mixes frames."""

    def __init__(self, channels: int = 3, hidden: int = 8, schedule=None):
        super().__init__(schedule, prediction_type="x0")
        self.channels = channels
        self.inp = nn.Conv3d(channels, hidden, 3, padding=1)
        self.noise = nn.Linear(1, hidden)
        self.out = nn.Conv3d(hidden, channels, 3, padding=1)

    @property
    def data_shape(self):
        return SHAPE

    def backbone(self, x, c_noise, cond):
        h = self.inp(x) + self.noise(c_noise[:, None].to(x.dtype))[:, :, None, None, None]
        return self.out(torch.nn.functional.silu(h))

    def predict(self, x_t, t, cond):
        return edm_precondition(self.backbone, x_t, t, cond, self.schedule, 0.5)


def _dmd2():
    torch.manual_seed(0)
    return DMD2(teacher=TinyVideoDenoiser(schedule=EDMSchedule()))


def test_dmd2_losses_on_a_5d_batch():
    module = _dmd2()
    batch = {"noise": torch.randn(2, *SHAPE), "cond": None}
    x_g = module.generator_training_sample(batch)
    assert x_g.shape == (2, *SHAPE)
    generator = module.generator_loss(batch)
    critic = module.critic_loss(batch)
    for losses in (generator, critic):
        assert losses["loss"].dim() == 0 and torch.isfinite(losses["loss"])
    # student and critic start as copies of the teacher: fake score = real score, so the direction is exactly zero
    student_grads = torch.autograd.grad(generator["loss"], module.generator_parameters())
    assert sum(float(g.abs().sum()) for g in student_grads) == 0.0
    critic_grads = torch.autograd.grad(critic["loss"], module.critic_parameters())
    assert sum(float(g.abs().sum()) for g in critic_grads) > 0
    with torch.no_grad():   # a critic that has moved (as after its first update): the student now gets a direction
        for p in module.critic_parameters():
            p.add_(0.05 * torch.randn_like(p))
    student_grads = torch.autograd.grad(module.generator_loss(batch)["loss"], module.generator_parameters())
    assert sum(float(g.abs().sum()) for g in student_grads) > 0


def test_dmd2_normaliser_runs_over_channels_frames_and_pixels():
    g = torch.Generator().manual_seed(1)
    x, real, fake = (torch.randn(2, *SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    ours = dmd_gradient(x, real, fake)
    for i in range(2):   # (p_real - p_fake) / mean over C, T, H, W of |p_real|, per sample
        expected = ((x[i] - real[i]) - (x[i] - fake[i])) / (x[i] - real[i]).abs().mean()
        assert torch.allclose(ours[i], expected, atol=1e-12)


def test_frame_flattened_denoiser_equals_frame_by_frame():
    """A per-frame image denoiser on video: fold T into the batch, run, unfold -- the same x0 as each frame alone."""
    image = nn.Conv2d(3, 3, 3, padding=1).double()

    def per_frame(video):
        b, c, t, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        return image(frames).reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)

    video = torch.randn(2, *SHAPE, dtype=torch.float64)
    folded = per_frame(video)
    for frame in range(SHAPE[1]):
        assert torch.allclose(folded[:, :, frame], image(video[:, :, frame]), atol=1e-12)


def test_a_two_batch_fit_on_video_noise(tmp_path):
    from datamodules import NoiseDataModule

    module = _dmd2()
    trainer = lightning.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=str(tmp_path))
    before = [p.detach().clone() for p in module.generator_parameters()]
    trainer.fit(module, NoiseDataModule(shape=list(SHAPE), batch_size=2))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, module.generator_parameters()))
    samples = module.sample(torch.randn(2, *SHAPE))
    assert samples.shape == (2, *SHAPE) and torch.isfinite(samples).all()


def test_wrong_video_shape_is_named():
    module = _dmd2()
    with pytest.raises(ValueError, match=r"noise shape \(3, 5, 8, 8\) does not match the teacher's data shape"):
        module._check_batch({"noise": torch.randn(1, 3, 5, 8, 8)})
