"""The conditional-restoration regime: degradations (exact), deterministic LQ -> HQ pairs, the ImageCondition kind's
dispatch, the image-conditioned UNet, PSNR / SSIM against hand formulas, and the shipped MNIST SR teacher."""
from __future__ import annotations

import math
import os

import pytest
import torch

from datamodules.restoration import (DegradationPipeline, RestorationDataModule, add_noise, collate_pairs, downsample,
                                     gaussian_blur, gaussian_kernel, jpeg, upsample)
from lightning_modules.conditioning.condition import (ImageCondition, TextCondition, concat_conditions,
                                                      drop_conditions, select_conditions, unconditional)
from lightning_modules.diffusion import EDMSchedule
from lightning_modules.evaluation.restoration_metrics import psnr_per_image, restoration_metrics, ssim_per_image
from lightning_modules.networks.restoration_unet import ImageConditionedUNetDenoiser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "assets", "mnist-sr-teacher")


@pytest.fixture(scope="module")
def mnist():
    """One MNIST source for every datamodule of this file (the pickle is read once)."""
    from datamodules.images import MNISTDataModule

    return MNISTDataModule(conditional=False)


def small_unet(scales=(2, 4)):
    config = dict(sample_size=28, in_channels=2, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                  down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2,
                  num_class_embeds=len(scales) + 1 if scales else None, norm_num_groups=8)
    return ImageConditionedUNetDenoiser(config=config, scales=list(scales) if scales else None,
                                        schedule=EDMSchedule())


# ---------------------------------------------------------------------------------------------- degradations
def test_downsample_is_the_block_average():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert downsample(image, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # e.g. (0 + 1 + 4 + 5) / 4
    mnist = torch.rand(3, 1, 28, 28)
    by_four = downsample(mnist, 4)
    assert by_four.shape == (3, 1, 7, 7)
    torch.testing.assert_close(by_four, mnist.reshape(3, 1, 7, 4, 7, 4).mean(dim=(3, 5)))
    assert downsample(mnist, 2).shape == (3, 1, 14, 14)


def test_gaussian_kernel_sums_to_one_and_blur_keeps_constants():
    for sigma in (0.5, 1.0, 2.0):
        kernel = gaussian_kernel(sigma)
        assert kernel.shape == (2 * math.ceil(3 * sigma) + 1,) * 2
        assert abs(float(kernel.sum()) - 1.0) < 1e-12
        torch.testing.assert_close(kernel, kernel.T)
        centre = kernel.shape[0] // 2
        # separable Gaussian: the ratio of neighbouring entries is exp(-1 / (2 sigma^2)) at the centre
        assert float(kernel[centre, centre + 1] / kernel[centre, centre]) == pytest.approx(math.exp(-0.5 / sigma ** 2))
    constant = torch.full((2, 1, 28, 28), 0.3)
    torch.testing.assert_close(gaussian_blur(constant, 1.5), constant)
    impulse = torch.zeros(1, 1, 28, 28)
    impulse[0, 0, 14, 14] = 1.0
    blurred = gaussian_blur(impulse, 1.0)
    torch.testing.assert_close(blurred[0, 0, 11:18, 11:18], gaussian_kernel(1.0).float())  # the kernel itself


def test_jpeg_error_falls_with_quality_and_noise_has_its_std(mnist):
    images = mnist.split("test")[0][:8]
    errors = [float((jpeg(images, q) - images).pow(2).mean()) for q in (5, 25, 50, 90)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 4, errors
    assert jpeg(images, 90).shape == images.shape and float(jpeg(images, 90).abs().max()) <= 1.0
    noisy = add_noise(torch.zeros(1, 1, 256, 256), 0.1, torch.Generator().manual_seed(0))
    assert float(noisy.std()) == pytest.approx(0.1, rel=0.02)


def test_upsample_of_a_constant_image_and_bad_mode():
    lq = torch.full((1, 1, 7, 7), -0.25)
    torch.testing.assert_close(upsample(lq, (28, 28), "bicubic"), torch.full((1, 1, 28, 28), -0.25))
    assert upsample(lq, (28, 28), "nearest").shape == (1, 1, 28, 28)
    with pytest.raises(ValueError, match="upsample must be one of"):
        upsample(lq, (28, 28), "lanczos")


@pytest.mark.parametrize("stages, message", [
    ([{"name": "sharpen", "amount": 1}], "unknown degradation 'sharpen'"),
    ([{"name": "blur", "sigma": -1.0}], "blur sigma must be a number >= 0, got -1.0"),
    ([{"name": "downsample", "factor": 0}], "downsample factor must be an integer >= 1, got 0"),
    ([{"name": "downsample", "factor": 2.5}], "downsample factor must be an integer >= 1, got 2.5"),
    ([{"name": "jpeg", "quality": 0}], r"jpeg quality must be an integer in \[1, 95\], got 0"),
    ([{"name": "noise", "std": {"low": 0.2, "high": 0.1}}], "noise std range must be"),
    ([{"name": "noise", "sigma": 0.1}], "takes exactly the parameter 'std'"),
    ([{"name": "downsample", "factor": 2}, {"name": "downsample", "factor": 2}], "at most one downsample"),
    (["blur"], "must be a mapping with a 'name'"),
])
def test_bad_degradations_are_named(stages, message):
    with pytest.raises(ValueError, match=message):
        DegradationPipeline(stages)


def test_bad_datamodule_arguments_and_factor_not_dividing(mnist):
    with pytest.raises(ValueError, match="upsample must be one of"):
        RestorationDataModule(upsample="area")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        RestorationDataModule(batch_size=0)
    with pytest.raises(ValueError, match="downsample factor 3 does not divide the image size 28x28"):
        RestorationDataModule(degradations=[{"name": "downsample", "factor": 3}], source=mnist).evaluation_pairs(2)


# ---------------------------------------------------------------------------------------------- pairs
def test_pairs_are_deterministic_and_follow_the_pipeline(mnist):
    stages = [{"name": "blur", "sigma": {"low": 0.5, "high": 1.0}}, {"name": "downsample", "factor": [2, 4]},
              {"name": "noise", "std": 0.02}, {"name": "jpeg", "quality": [60, 90]}]
    first = RestorationDataModule(degradations=stages, batch_size=8, max_val_images=16, source=mnist)
    again = RestorationDataModule(degradations=stages, batch_size=8, max_val_images=16, source=mnist)
    a, b = next(iter(first.val_dataloader())), next(iter(again.val_dataloader()))
    torch.testing.assert_close(a["cond"].image, b["cond"].image)
    torch.testing.assert_close(a["noise"], b["noise"])
    assert isinstance(a["cond"], ImageCondition) and a["real_cond"] is a["cond"]
    assert a["cond"].image.shape == a["real"].shape == (8, 1, 28, 28)
    assert set(a["cond"].scale.tolist()) <= {2, 4} and len(set(a["cond"].scale.tolist())) == 2
    assert first.factors == [2, 4]
    # the same pairs from evaluation_pairs, and another seed gives other degradation noise
    torch.testing.assert_close(first.evaluation_pairs(4, "val")["cond"].image, a["cond"].image[:4])
    other = RestorationDataModule(degradations=stages, seed=1, source=mnist).evaluation_pairs(4, "val")
    assert not torch.equal(other["cond"].image, a["cond"].image[:4])


def test_a_pure_x4_pair_is_the_bicubic_upsampled_block_average(mnist):
    data = RestorationDataModule(degradations=[{"name": "downsample", "factor": 4}], source=mnist)
    pairs = data.evaluation_pairs(3)
    hq = data.split("test")[0][:3]
    torch.testing.assert_close(pairs["real"], hq)
    torch.testing.assert_close(pairs["lq"], hq.reshape(3, 1, 7, 4, 7, 4).mean(dim=(3, 5)))
    torch.testing.assert_close(pairs["cond"].image, upsample(pairs["lq"], (28, 28), "bicubic"))
    assert pairs["cond"].scale.tolist() == [4, 4, 4]
    assert pairs["labels"].tolist() == data.split("test")[1][:3].tolist()


def test_collate_leaves_out_lq_when_scales_differ():
    items = [{"real": torch.zeros(1, 4, 4), "noise": torch.zeros(1, 4, 4), "lq": torch.zeros(1, s, s),
              "lq_up": torch.zeros(1, 4, 4), "scale": 4 // s, "labels": torch.tensor(0)} for s in (1, 2)]
    batch = collate_pairs(items)
    assert "lq" not in batch and batch["cond"].scale.tolist() == [4, 2]


# ---------------------------------------------------------------------------------------------- the condition kind
def test_image_condition_dispatch():
    image = torch.randn(4, 1, 28, 28)
    cond = ImageCondition(image, scale=torch.tensor([2, 4, 2, 4]), labels=torch.tensor([7, 1, 3, 0]))
    null = unconditional(cond)
    assert float(null.image.abs().sum()) == 0.0 and null.dropped.all() and null.scale.tolist() == [2, 4, 2, 4]
    dropped = drop_conditions(cond, torch.tensor([True, False, False, True]))
    assert dropped.dropped.tolist() == [True, False, False, True]
    assert float(dropped.image[[0, 3]].abs().sum()) == 0.0 and torch.equal(dropped.image[[1, 2]], image[[1, 2]])
    assert drop_conditions(cond, torch.zeros(4, dtype=torch.bool)) is cond
    both = concat_conditions(cond, null)  # the two branches of CFG in one call
    assert len(both) == 8 and both.dropped.tolist() == [False] * 4 + [True] * 4
    assert torch.equal(both.image[:4], image)
    picked = select_conditions(both, torch.tensor([1, 6]))
    assert picked.scale.tolist() == [4, 2] and picked.dropped.tolist() == [False, True]
    assert picked.labels.tolist() == [1, 3]
    assert cond.to(torch.float64).image.dtype == torch.float64 and cond.to(torch.float64).scale.dtype == torch.long
    with pytest.raises(TypeError, match="ImageCondition and Tensor"):
        concat_conditions(cond, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="ImageCondition and TextCondition"):
        concat_conditions(cond, TextCondition(torch.zeros(4, 3, 8)))
    with pytest.raises(ValueError, match=r"must be \(batch, channels, height, width\)"):
        ImageCondition(torch.zeros(4, 28, 28))
    with pytest.raises(ValueError, match=r"ImageCondition.scale must be \(4,\)"):
        ImageCondition(image, scale=torch.tensor([2, 4]))


# ---------------------------------------------------------------------------------------------- the network
def test_conditional_unet_reads_the_image_and_the_scale():
    torch.manual_seed(0)
    net = small_unet().eval()
    x, t = torch.randn(2, 1, 28, 28), torch.full((2,), 2.0, dtype=torch.float64)
    image = torch.randn(1, 1, 28, 28).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = net(x, t, ImageCondition(image, scale=torch.tensor([2, 4])))
        other_image = net(x, t, ImageCondition(-image, scale=torch.tensor([2, 4])))
        none = net(x, t, None)
        blank = net(x, t, unconditional(ImageCondition(image, scale=torch.tensor([2, 4]))))
    assert out.shape == (2, 1, 28, 28) and net.data_shape == (1, 28, 28) and net.num_classes == 0
    assert float((out - other_image).abs().max()) > 1e-4  # the condition image changes the prediction
    torch.testing.assert_close(none, blank)  # None is the unconditional condition
    assert net.scale_index(ImageCondition(image, scale=torch.tensor([4, 2]))).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"downsampling factor\(s\) \[3\] unknown to this network"):
        net(x, t, ImageCondition(image, scale=torch.tensor([3, 2])))
    with pytest.raises(ValueError, match="condition image"):
        net(x, t, ImageCondition(torch.zeros(2, 1, 14, 14), scale=torch.tensor([2, 2])))
    with pytest.raises(ValueError, match="is conditioned on an ImageCondition"):
        net(x, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"need num_class_embeds = 3"):
        ImageConditionedUNetDenoiser(config=dict(sample_size=28, in_channels=2, out_channels=1,
                                                 block_out_channels=[8, 16], down_block_types=["DownBlock2D"] * 2,
                                                 up_block_types=["UpBlock2D"] * 2, norm_num_groups=8), scales=[2, 4])
    with pytest.raises(ValueError, match=r"condition_channels must be in \[1, in_channels - 1\] = \[1, 1\], got 2"):
        small_unet().__class__(config=dict(sample_size=28, in_channels=2, out_channels=1, block_out_channels=[8, 16],
                                           down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2,
                                           num_class_embeds=3, norm_num_groups=8), condition_channels=2, scales=[2, 4])


def test_teacher_training_drops_image_conditions(mnist):
    from lightning_modules.teacher_training import DenoisingScoreMatching

    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x_t, t, cond):
            seen.append(cond)
            return torch.zeros_like(x_t)

    net = small_unet()
    net.unet.forward = None  # not called: the recording backbone replaces the UNet call
    net._call_unet = lambda x, time_input, cond: Recording()(x, time_input, cond)
    module = DenoisingScoreMatching(net, label_dropout=0.5)
    batch = RestorationDataModule(source=mnist).evaluation_pairs(64)
    torch.manual_seed(0)
    module._loss(batch)
    dropped = seen[0].dropped
    assert 16 < int(dropped.sum()) < 48  # ~half of 64 at p = 0.5
    assert float(seen[0].image[dropped].abs().sum()) == 0.0
    torch.testing.assert_close(seen[0].image[~dropped], batch["cond"].image[~dropped])


# ---------------------------------------------------------------------------------------------- metrics
def test_psnr_and_ssim_match_hand_formulas():
    reference = torch.full((2, 1, 16, 16), -0.5)  # 0.25 in [0, 1]
    restored = reference + torch.tensor([0.1, 0.4]).reshape(2, 1, 1, 1)  # errors 0.05 and 0.2 in [0, 1]
    torch.testing.assert_close(psnr_per_image(restored, reference).double(),
                               torch.tensor([10 * math.log10(1 / 0.05 ** 2), 10 * math.log10(1 / 0.2 ** 2)],
                                            dtype=torch.float64))
    # constant images a, b: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (the contrast-structure term is C2 / C2 = 1)
    a, c1 = 0.25, 0.01 ** 2
    expected = [(2 * a * b + c1) / (a * a + b * b + c1) for b in (0.3, 0.45)]
    torch.testing.assert_close(ssim_per_image(restored, reference).double(),
                               torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    assert ssim_per_image(images, images).tolist() == pytest.approx([1.0] * 3)
    report = restoration_metrics(restored, reference)
    assert report["psnr"] == pytest.approx((26.0206 + 13.9794) / 2, abs=1e-3) and "fid" not in report
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_per_image(restored, reference[:1])
    with pytest.raises(ValueError, match="non-finite"):
        psnr_per_image(restored * float("nan"), reference)
    with pytest.raises(ValueError, match="FID needs reference_key"):
        restoration_metrics(restored, reference, ["mnist-classifier"])


# ---------------------------------------------------------------------------------------------- the shipped teacher
@pytest.mark.skipif(not os.path.isfile(os.path.join(TEACHER, "teacher.json")),
                    reason="the MNIST SR teacher is not exported (python scripts/make_sr_teacher.py)")
def test_shipped_sr_teacher_loads_and_restores_better_than_bicubic(mnist):
    """The exported teacher loads from its card, runs on an ImageCondition, and its 32-NFE Heun x4 restorations of 32
    test images beat the bicubic-upsampled LQ images they are conditioned on (PSNR by > 1 dB, and SSIM); its one-step
    output (the denoiser at sigma_max: about E[x | LQ], the MMSE estimate) has the higher PSNR and the lower SSIM.
    Measured (step-1000 teacher): bicubic 14.82 dB / SSIM 0.559; 32 NFE 16.57 dB / 0.802; 1 NFE 17.79 dB / 0.639."""
    import json

    from lightning_modules.evaluation.restoration_metrics import load_restoration_teacher, teacher_restorer

    with open(os.path.join(TEACHER, "teacher.json")) as handle:
        card = json.load(handle)
    assert card["scales"] == [2, 4] and card["condition_channels"] == 1 and card["size_bytes"] < 5e6
    teacher = load_restoration_teacher(TEACHER)
    assert teacher.data_shape == (1, 28, 28) and teacher.scales == [2, 4]
    pairs = RestorationDataModule(degradations=[{"name": "downsample", "factor": 4}], source=mnist).evaluation_pairs(32)
    noise = torch.randn(pairs["real"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampled = restoration_metrics(teacher_restorer(teacher, 32)(noise, pairs["cond"]).clamp(-1, 1), pairs["real"])
        one_step = restoration_metrics(teacher_restorer(teacher, 1)(noise, pairs["cond"]).clamp(-1, 1), pairs["real"])
    bicubic = restoration_metrics(pairs["cond"].image, pairs["real"])
    print(f"x4, 32 images: bicubic {bicubic['psnr']:.2f} dB / {bicubic['ssim']:.3f}; teacher 32 NFE "
          f"{sampled['psnr']:.2f} / {sampled['ssim']:.3f}; 1 NFE {one_step['psnr']:.2f} / {one_step['ssim']:.3f}")
    assert sampled["psnr"] > bicubic["psnr"] + TEACHER_PSNR_MARGIN and sampled["ssim"] > bicubic["ssim"] + 0.1
    assert one_step["psnr"] > sampled["psnr"] and one_step["ssim"] < sampled["ssim"]


TEACHER_PSNR_MARGIN = 1.0
