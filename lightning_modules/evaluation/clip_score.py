"""CLIP score of generated images against their prompts, on open_clip with a local checkpoint.

CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", Eq. 1) with
w = 100, as torchmetrics' ``CLIPScore``: ``score(I, c) = 100 * max(cos(E_I(I), E_T(c)), 0)``, one value per
(image, prompt) pair; report the mean over a prompt set.

No pretrained CLIP weights exist offline, so the model is always built from an architecture and loaded from a local
file (nothing is downloaded):

* ``model_name``: an open_clip architecture known to ``open_clip.list_models()`` (e.g. ``"ViT-B-32"``), for a user's
  own downloaded checkpoint of it; or
* ``model_config``: a tiny / custom architecture, as a dict or a JSON file -- either a bare open_clip model config
  (``embed_dim``, ``vision_cfg``, ``text_cfg``) or open_clip's ``open_clip_config.json`` layout
  (``{"model_cfg": {...}, "preprocess_cfg": {...}}``); it is registered with ``open_clip.add_model_config`` under
  a content-hashed name, so two different files called ``model_config.json`` never collide;
* ``checkpoint``: a state dict file, ``.safetensors`` or a torch pickle (``.pt`` / ``.bin``, read with
  ``weights_only=True``; a ``{"state_dict": ...}`` wrapper and DDP's ``module.`` prefix are accepted). Keys and shapes
  must match the architecture exactly; otherwise a ``ValueError`` names the file and the differing keys.

The shipped MNIST text-to-image CLIP is loaded as
``CLIPScorer(model_config="assets/mnist-t2i/clip/model_config.json",
checkpoint="assets/mnist-t2i/clip/open_clip.safetensors")``.

Images in [-1, 1] (B, C, H, W) are mapped to [0, 1], grayscale repeated to 3 channels, resized with the model's own
preprocessing config (``model.visual.preprocess_cfg``: size, interpolation, resize mode -- shortest side + centre
crop, longest side + pad, or squash) and normalized with its mean / std; prompts go through
``open_clip.get_tokenizer`` of the same architecture (the BPE vocabulary ships with open_clip).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .feature_extractors import SHIPPED_ASSETS, file_sha256

CLIP_SCORE_WEIGHT = 100.0  # Hessel et al.'s w; torchmetrics' CLIPScore uses the same 100
#: the MNIST text-to-image CLIP shipped in the repository (relative to its root)
SHIPPED_MNIST_CLIP_CONFIG = os.path.join("assets", "mnist-t2i", "clip", "model_config.json")
SHIPPED_MNIST_CLIP_CHECKPOINT = os.path.join("assets", "mnist-t2i", "clip", "open_clip.safetensors")


def resolve_path(path: str | os.PathLike) -> str:
    """An absolute path; a relative one that does not exist from the working directory is tried from the
    repository root (so ``assets/...`` works from anywhere in a source checkout)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isabs(path) and not os.path.exists(path):
        candidate = os.path.join(os.path.dirname(SHIPPED_ASSETS), path)
        if os.path.exists(candidate):
            return candidate
    return os.path.abspath(path)


def _read_config(model_config: str | os.PathLike | dict) -> tuple[dict, dict]:
    """(open_clip model config, preprocess overrides) from a dict or a JSON file in either supported layout."""
    if isinstance(model_config, (str, os.PathLike)):
        path = resolve_path(model_config)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "open_clip_config.json")):
            path = os.path.join(path, "open_clip_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"open_clip model config not found: {path}")
        try:
            with open(path) as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"could not read the open_clip model config {path}: {error}") from error
        where = path
    elif isinstance(model_config, dict):
        data, where = copy.deepcopy(model_config), "model_config dict"
    else:
        raise TypeError(f"model_config must be a JSON path or a dict, got {type(model_config).__name__}")
    preprocess = dict(data.get("preprocess_cfg") or {})
    config = copy.deepcopy(data["model_cfg"]) if "model_cfg" in data else {k: v for k, v in data.items()
                                                                            if k != "preprocess_cfg"}
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ValueError(f"{where} is not an open_clip model config: missing {missing} "
                         "(expected embed_dim, vision_cfg, text_cfg, or {'model_cfg': ..., 'preprocess_cfg': ...})")
    return config, preprocess


def register_model_config(config: dict) -> str:
    """Register an open_clip model config (``open_clip.add_model_config``) under a name hashed from its content."""
    import open_clip

    canonical = json.dumps(config, sort_keys=True)
    name = "distill-clip-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]
    if name not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as tmp:  # the registry keeps the parsed config, not the file
            path = os.path.join(tmp, name + ".json")
            with open(path, "w") as handle:
                handle.write(canonical)
            open_clip.add_model_config(path)
    return name


def load_clip_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``); errors name the file."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickle with non-tensor objects, wrong format
        raise ValueError(f"could not read CLIP checkpoint {path}: {type(error).__name__}: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"CLIP checkpoint {path} does not hold a state dict of tensors")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def check_state_dict(model: nn.Module, state: dict[str, Tensor], path: str) -> None:
    """Raise a ValueError naming ``path`` when keys or shapes differ from ``model``'s."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {unexpected[:4]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) {shapes[:3]}")
        raise ValueError(f"CLIP checkpoint {path} does not match the architecture: " + "; ".join(parts))


@contextlib.contextmanager
def _quiet_random_init():
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" warning: we load weights next."""
    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


class CLIPScorer(nn.Module):
    """An open_clip model from a local checkpoint that scores (image, prompt) pairs; see the module docstring."""

    def __init__(self, model_name: str | None = None, model_config: str | dict | None = None,
                 checkpoint: str | None = None):
        super().__init__()
        import open_clip

        if (model_name is None) == (model_config is None):
            raise ValueError("give exactly one of model_name (an open_clip architecture, e.g. 'ViT-B-32') and "
                             f"model_config (a JSON path or dict); got model_name={model_name!r}, "
                             f"model_config={model_config!r}")
        if checkpoint is None:
            raise ValueError("checkpoint (a local .safetensors / .pt state dict) is required: no pretrained CLIP "
                             "weights can be downloaded here, and a random CLIP scores nothing")
        preprocess: dict[str, Any] = {}
        if model_config is not None:
            config, preprocess = _read_config(model_config)
            name = register_model_config(config)
        else:
            name = model_name
            if name not in open_clip.list_models():
                raise ValueError(f"unknown open_clip architecture {model_name!r}; give model_config for a custom one")
        self.architecture = name
        path = resolve_path(checkpoint)
        state = load_clip_state_dict(path)
        with torch.random.fork_rng(devices=[]), _quiet_random_init():  # the random init is overwritten next
            model = open_clip.create_model(name, pretrained=None, force_preprocess_cfg=preprocess or None)
        check_state_dict(model, state, path)
        model.load_state_dict(state, strict=True)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.checkpoint = path
        self.checkpoint_sha256 = file_sha256(path)
        cfg = dict(model.visual.preprocess_cfg)
        size = cfg.get("size", 224)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(cfg.get("interpolation"), "bicubic")
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.fill_color = float(cfg.get("fill_color", 0)) / 255.0
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        conv = getattr(model.visual, "conv1", None)
        self.channels = int(getattr(conv, "in_channels", 3))

    @classmethod
    def shipped_mnist(cls) -> "CLIPScorer":
        """The MNIST text-to-image CLIP shipped in ``assets/mnist-t2i/clip/``."""
        return cls(model_config=SHIPPED_MNIST_CLIP_CONFIG, checkpoint=SHIPPED_MNIST_CLIP_CHECKPOINT)

    @property
    def identity(self) -> str:
        return f"open_clip {self.architecture} ({os.path.basename(self.checkpoint)} sha256:{self.checkpoint_sha256[:8]})"

    def train(self, mode: bool = True):
        return super().train(False)  # always an evaluator

    # ------------------------------------------------------------------ preprocessing
    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        antialias = self.interpolation in ("bilinear", "bicubic")
        return F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=antialias)

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images (B, 1 or 3, H, W) -> the model's normalized input (B, 3, S, S)."""
        if not torch.is_tensor(images) or images.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got {getattr(images, 'shape', type(images))}")
        x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        if x.shape[1] != self.channels:
            raise ValueError(f"CLIP {self.architecture} takes {self.channels}-channel (or grayscale) images, "
                             f"got {x.shape[1]} channels")
        out_h, out_w = self.image_size
        height, width = x.shape[-2:]
        if self.resize_mode == "squash":
            x = self._resize(x, (out_h, out_w))
        elif self.resize_mode == "longest":  # fit inside, then pad with the fill colour
            scale = min(out_h / height, out_w / width)
            x = self._resize(x, (max(1, round(height * scale)), max(1, round(width * scale))))
            pad_h, pad_w = out_h - x.shape[-2], out_w - x.shape[-1]
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=self.fill_color)
        else:  # "shortest": cover, then centre crop (CLIP's Resize + CenterCrop)
            scale = max(out_h / height, out_w / width)
            x = self._resize(x, (max(out_h, round(height * scale)), max(out_w, round(width * scale))))
            top, left = (x.shape[-2] - out_h) // 2, (x.shape[-1] - out_w) // 2
            x = x[..., top:top + out_h, left:left + out_w]
        x = x.clamp(0.0, 1.0)  # bicubic overshoot, as a uint8 round trip would clip it
        return (x - self.mean) / self.std

    # ------------------------------------------------------------------ embeddings and score
    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        """L2-normalized image embeddings (B, D)."""
        features = self.model.encode_image(self.preprocess(images.to(self.mean.device)))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalized text embeddings (B, D)."""
        tokens = self.tokenizer(list(prompts)).to(self.mean.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str] | str, batch_size: int = 64) -> Tensor:
        """CLIP score ``100 * max(cos(image, prompt), 0)`` of each pair, (B,) float32 on the CPU."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not torch.is_tensor(images) or images.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got {getattr(images, 'shape', type(images))}")
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; they pair one to one")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        if images.is_floating_point() and not torch.isfinite(images).all():
            raise ValueError(f"images contain {int((~torch.isfinite(images)).sum())} non-finite values")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        scores = []
        for start in range(0, len(images), batch_size):
            image = self.image_features(images[start:start + batch_size])
            text = self.text_features(prompts[start:start + batch_size])
            cosine = (image * text).sum(-1)
            scores.append((CLIP_SCORE_WEIGHT * cosine).clamp(min=0.0).cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.score(images, prompts)
