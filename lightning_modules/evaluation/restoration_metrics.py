"""Restoration metrics: PSNR and SSIM (torchmetrics) of restored images against their high-quality originals, and FID
of the restorations against the originals through the project's image FID (``image_metrics``).

Protocol (reported with every number in ``protocol``): images in [-1, 1] are mapped to [0, 1] and clamped; PSNR is
10 log10(1 / MSE) per image (data range 1), averaged over images -- the super-resolution convention (SR3, Saharia et
al. 2022, Sec. 4), not the PSNR of the pooled MSE; SSIM (Wang et al., IEEE TIP 2004, Eq. 13) with an 11x11 Gaussian
window of sigma 1.5, K1 = 0.01, K2 = 0.03, over valid windows only, per image, averaged. On 28x28 MNIST the 11x11
window leaves 18x18 positions.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _unit_range(images: Tensor, name: str) -> Tensor:
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"{name} must be images (N, C, H, W), got {getattr(images, 'shape', type(images))}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} has non-finite values")
    return ((images.double() + 1.0) / 2.0).clamp(0.0, 1.0)


def _pair(restored: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    restored, reference = _unit_range(restored, "restored"), _unit_range(reference, "reference")
    if restored.shape != reference.shape:
        raise ValueError(f"restored {tuple(restored.shape)} and reference {tuple(reference.shape)} differ in shape")
    return restored, reference


def psnr_per_image(restored: Tensor, reference: Tensor) -> Tensor:
    """(N,) PSNR in dB of each restored image against its reference (both in [-1, 1])."""
    from torchmetrics.functional import peak_signal_noise_ratio

    restored, reference = _pair(restored, reference)
    return peak_signal_noise_ratio(restored, reference, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim_per_image(restored: Tensor, reference: Tensor) -> Tensor:
    """(N,) SSIM of each restored image against its reference (both in [-1, 1])."""
    from torchmetrics.functional import structural_similarity_index_measure

    restored, reference = _pair(restored, reference)
    if min(restored.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window needs images at least that large, got "
                         f"{tuple(restored.shape[-2:])}")
    return structural_similarity_index_measure(restored, reference, gaussian_kernel=True, sigma=SSIM_SIGMA,
                                               kernel_size=SSIM_WINDOW, data_range=1.0, k1=SSIM_K1, k2=SSIM_K2,
                                               reduction="none")


def restoration_metrics(restored: Tensor, reference: Tensor, fid_extractors: Sequence[str] = (),
                        reference_key: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """{"psnr", "psnr_std", "ssim", "ssim_std", "fid": {extractor: image_metrics dict}, "protocol"} of ``restored``
    against ``reference`` (N, C, H, W) in [-1, 1]. FID (one entry per extractor, e.g. "mnist-classifier",
    "inception") needs a ``reference_key`` naming the reference set (dataset, split, resolution)."""
    psnr, ssim = psnr_per_image(restored, reference), ssim_per_image(restored, reference)
    out: dict[str, Any] = {"psnr": float(psnr.mean()), "psnr_std": float(psnr.std()) if len(psnr) > 1 else 0.0,
                           "ssim": float(ssim.mean()), "ssim_std": float(ssim.std()) if len(ssim) > 1 else 0.0}
    if fid_extractors:
        from .image_metrics import image_metrics

        if not reference_key:
            raise ValueError("FID needs reference_key naming the reference set (dataset, split, resolution)")
        out["fid"] = {extractor: image_metrics(restored.float(), f"{reference_key}-{extractor}", reference.float(),
                                               extractor=extractor, cache_dir=cache_dir)
                      for extractor in fid_extractors}
    out["protocol"] = {"num_images": len(restored), "resolution": f"{restored.shape[-2]}x{restored.shape[-1]}",
                       "value_range": "[-1, 1] -> [0, 1], clamped", "psnr": "per image, data range 1, averaged",
                       "ssim": f"gaussian window {SSIM_WINDOW}, sigma {SSIM_SIGMA}, k1 {SSIM_K1}, k2 {SSIM_K2}, "
                               "valid windows, per image, averaged"}
    return out


def restore_in_batches(restore: Callable[[Tensor, Any], Tensor], noise: Tensor, cond, batch_size: int = 250) -> Tensor:
    """``restore(noise_batch, cond_batch)`` over the whole set in batches (``cond`` any condition kind; sliced with
    ``select_conditions``), clamped to [-1, 1], on the CPU."""
    from lightning_modules.conditioning.condition import select_conditions

    outputs = []
    for start in range(0, len(noise), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(noise)))
        with torch.no_grad():
            outputs.append(restore(noise[rows], select_conditions(cond, rows)).float().cpu())
    return torch.cat(outputs).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------- reports
def load_restoration_teacher(folder: str):
    """The exported SR teacher of ``folder`` (``unet/`` diffusers weights + ``teacher.json``), EDM-preconditioned."""
    import json
    import os

    from lightning_modules.diffusion.schedules import EDMSchedule
    from lightning_modules.networks.restoration_unet import ImageConditionedUNetDenoiser

    card_path = os.path.join(folder, "teacher.json")
    if not os.path.isfile(card_path):
        raise FileNotFoundError(f"{folder} has no teacher.json: not an exported restoration teacher "
                                "(python scripts/make_sr_teacher.py makes one)")
    with open(card_path) as handle:
        card = json.load(handle)
    schedule = {k: v for k, v in card["schedule"].items() if k in ("sigma_min", "sigma_max", "sigma_data", "rho")}
    network = ImageConditionedUNetDenoiser(pretrained_path=folder, subfolder="unet",
                                           condition_channels=card["condition_channels"], scales=card["scales"],
                                           schedule=EDMSchedule(**schedule))
    return network.requires_grad_(False).eval()


def teacher_restorer(network, nfe: int, method: str = "heun") -> Callable[[Tensor, Any], Tensor]:
    """``restore(noise, cond)``: the conditional PF-ODE of ``network`` solved with ``method`` in ``nfe`` evaluations."""
    from lightning_modules.diffusion.samplers import sampler_times, teacher_sample

    times = sampler_times(network.schedule, nfe, method)

    def restore(noise: Tensor, cond) -> Tensor:
        return teacher_sample(lambda x, t: network(x, t, cond), noise, times, network.schedule, method)
    restore.actual_nfe = 2 * len(times) - 1 if method == "heun" else len(times)
    return restore


def evaluation_pairs(scale: int, num_images: int, upsample: str = "bicubic", split: str = "test") -> dict:
    """The first ``num_images`` MNIST ``split`` images and their x``scale`` area-downsampled LQ versions (fixed)."""
    from datamodules.restoration import RestorationDataModule

    data = RestorationDataModule(degradations=[{"name": "downsample", "factor": scale}], upsample=upsample)
    return data.evaluation_pairs(num_images, split)


def score_restoration(restorer_at: Callable[[int], Callable], nfes: Sequence[int], scales: Sequence[int],
                      num_images: int = 1000, seed: int = 1234, fid_extractors: Sequence[str] = ("mnist-classifier",),
                      upsample: str = "bicubic", batch_size: int = 250) -> dict:
    """PSNR / SSIM / FID of ``restorer_at(nfe)`` at each NFE and scale on the first ``num_images`` MNIST test images
    (noise from ``seed``, the same for every NFE), with the upsampled LQ image itself as the baseline."""
    import time

    report: dict[str, Any] = {"num_images": num_images, "seed": seed, "split": "test", "scales": {}}
    for scale in scales:
        pairs = evaluation_pairs(scale, num_images, upsample)
        reference, cond = pairs["real"], pairs["cond"]
        key = f"mnist-test-{reference.shape[-2]}x{reference.shape[-1]}"
        noise = torch.randn(reference.shape, generator=torch.Generator().manual_seed(seed))
        entry = {"lq_upsampled": restoration_metrics(cond.image, reference, fid_extractors, key), "nfe": {}}
        for nfe in nfes:
            restore = restorer_at(nfe)
            start = time.perf_counter()
            restored = restore_in_batches(restore, noise, cond, batch_size)
            seconds = time.perf_counter() - start
            entry["nfe"][str(nfe)] = {"actual_nfe": getattr(restore, "actual_nfe", nfe),
                                      "images_per_second": num_images / seconds,
                                      **restoration_metrics(restored, reference, fid_extractors, key)}
            row = entry["nfe"][str(nfe)]
            print(f"x{scale} NFE {nfe}: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}"
                  + "".join(f", FID[{e}] {row['fid'][e]['fid']:.2f}" for e in fid_extractors), flush=True)
        report["scales"][str(scale)] = entry
    return report


def restoration_card(card: dict) -> str:
    """The README.md of an exported restoration teacher: what it is, how it was made, its scores."""
    evaluation = card["evaluation"]
    extractors = sorted(next(iter(evaluation["scales"].values()))["lq_upsampled"].get("fid", {}))
    lines = [
        "# MNIST super-resolution teacher (image-conditioned, EDM)", "",
        "An SR3-style conditional denoiser (Saharia et al. 2022, arXiv:2104.07636): a diffusers UNet2DModel "
        f"({card['parameters']:,} parameters) with EDM preconditioning (Karras et al. 2022) whose input is "
        "[c_in x_t, LQ upsampled to 28x28] and whose class embedding is the downsampling factor "
        f"({', '.join(f'x{s}' for s in card['scales'])}; the last embedding is the unconditional null). One network "
        "serves every scale.", "",
        f"- trained by `python scripts/make_sr_teacher.py` ({card['config']}), {card['trained_steps']} steps, "
        "denoising score matching on LQ -> HQ pairs made on the fly (`datamodules.restoration.RestorationDataModule`), "
        "10% condition dropout; EMA weights exported",
        f"- degradations: {card['degradations']}, LQ upsampled {card['upsample']}",
        f"- weights: `unet/diffusion_pytorch_model.safetensors` ({card['size_bytes'] / 1e6:.2f} MB, sha256 "
        f"{card['sha256'][:16]}...)",
        "- load: `lightning_modules.evaluation.restoration_metrics.load_restoration_teacher(\"assets/mnist-sr-teacher\")`"
        " or, in a config, `ImageConditionedUNetDenoiser(pretrained_path: assets/mnist-sr-teacher, subfolder: unet, "
        f"condition_channels: {card['condition_channels']}, scales: {card['scales']})`", "",
        f"## Scores: Heun sampler, first {evaluation['num_images']} MNIST test images, noise seed {evaluation['seed']}",
        "", "PSNR / SSIM per image, averaged (images mapped to [0, 1]); FID of the restorations against the HQ test "
        "images (" + (", ".join(extractors) or "none") + "). NFE = evaluation budget (Heun: 2N - 1 evaluations for N "
        "levels, so NFE 1 and 2 both spend one). FID compares the N restorations with the same N HQ images: with N "
        "in the hundreds it is a small-sample FID, for comparing rows, not other papers' numbers. NFE 1 is the "
        "denoiser at sigma_max, close to the MMSE estimate E[x | LQ]: the highest PSNR with blur (low SSIM, high "
        "FID); few-step Heun (NFE 4-8) leaves residual noise.", ""]
    for scale, entry in evaluation["scales"].items():
        header = "| NFE | actual NFE | PSNR (dB) | SSIM |" + "".join(f" FID[{e}] |" for e in extractors)
        lines += [f"### x{scale} ({28 // int(scale)} -> 28)", "", header,
                  "|" + "---|" * (4 + len(extractors))]
        base = entry["lq_upsampled"]
        lines.append(f"| LQ {card['upsample']} | 0 | {base['psnr']:.2f} | {base['ssim']:.4f} |"
                     + "".join(f" {base['fid'][e]['fid']:.2f} |" for e in extractors))
        for nfe, row in entry["nfe"].items():
            lines.append(f"| {nfe} | {row['actual_nfe']} | {row['psnr']:.2f} | {row['ssim']:.4f} |"
                         + "".join(f" {row['fid'][e]['fid']:.2f} |" for e in extractors))
        lines.append("")
    return "\n".join(lines) + "\n"
