"""Prompt adherence on MNIST prompts: does the generated image show the digit its prompt asks for?

The shipped MNIST classifier (``assets/mnist-classifier``, 99.2% test accuracy; see ``feature_extractors``) reads
each generated image; adherence is the fraction whose predicted class equals the prompted digit -- the
classifier-based "accuracy of the conditioning" used for class-conditional generators (e.g. the classification
accuracy score of Ravuri & Vinyals 2019 in its simplest, pre-trained-classifier form). It is reported beside the
per-digit accuracies, so a student that ignores one digit's prompts shows it.

The prompted digit per image comes from the caller (``labels``), from a ``TextCondition``'s ``labels`` (the prompt
set's label column), or from the MNIST caption parser of ``lightning_modules.conditioning.mnist_captions`` (``prompt_labels``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning.mnist_captions import caption_digit
from .feature_extractors import MNISTClassifier, load_mnist_classifier, load_or_train_mnist_classifier

NUM_DIGITS = 10


def load_adherence_classifier(weights_path: str | None = None) -> MNISTClassifier:
    """The shipped / cached MNIST classifier, or the one in ``weights_path`` (safetensors)."""
    return load_mnist_classifier(weights_path) if weights_path else load_or_train_mnist_classifier(verbose=False)[0]


def classifier_input(images: Tensor) -> Tensor:
    """[-1, 1] images (B, 1 or 3, H, W) -> the classifier's (B, 1, 28, 28) input, as its FID feature extractor
    prepares them (RGB averaged to gray, antialiased bilinear resize)."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W) in [-1, 1], got {getattr(images, 'shape', type(images))}")
    x = images.float().clamp(-1.0, 1.0)
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def predict_digits(images: Tensor, classifier: nn.Module | None = None, batch_size: int = 500) -> Tensor:
    """The classifier's predicted digit of each image, (B,) long on the CPU."""
    classifier = load_adherence_classifier() if classifier is None else classifier
    device = next(classifier.parameters()).device
    predictions = [classifier(classifier_input(images[start:start + batch_size]).to(device)).argmax(1).cpu()
                   for start in range(0, len(images), batch_size)]
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def prompt_adherence(images: Tensor, labels: Tensor | Sequence[int], classifier: nn.Module | None = None,
                     batch_size: int = 500) -> dict[str, Any]:
    """``{"accuracy": fraction of images classified as their prompted digit, "per_digit": [accuracy of digit d or
    NaN where no prompt asked for d], "num_samples": N}``. ``labels``: the prompted digit of each image (0..9)."""
    labels = torch.as_tensor(labels).long().cpu().reshape(-1)
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got {getattr(images, 'shape', type(images))}")
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images and {len(labels)} labels; they pair one to one")
    if len(labels) == 0:
        raise ValueError("prompt adherence needs at least one image")
    bad = labels[(labels < 0) | (labels >= NUM_DIGITS)]
    if len(bad):
        raise ValueError(f"prompted digits must be in 0..{NUM_DIGITS - 1}, got {bad[0].item()}")
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise ValueError(f"images contain {int((~torch.isfinite(images)).sum())} non-finite values")
    correct = (predict_digits(images, classifier, batch_size) == labels).float()
    per_digit = [float(correct[labels == d].mean()) if bool((labels == d).any()) else float("nan")
                 for d in range(NUM_DIGITS)]
    return {"accuracy": float(correct.mean()), "per_digit": per_digit, "num_samples": len(labels)}


def prompt_labels(prompts: Sequence[str], cond: Any = None,
                  label_fn: Callable[[Sequence[str]], Sequence[int]] | None = None) -> Tensor | None:
    """The prompted digit of each prompt: ``label_fn(prompts)`` if given, else the condition's ``labels``
    (``TextCondition.labels``), else the MNIST caption parser; None when none of these applies."""
    if label_fn is not None:
        labels = torch.as_tensor(list(label_fn(list(prompts)))).long()
    elif getattr(cond, "labels", None) is not None:
        labels = cond.labels.detach().long().cpu()
    else:
        try:
            labels = torch.as_tensor([caption_digit(prompt) for prompt in prompts]).long()
        except ValueError:  # not MNIST captions: adherence does not apply
            return None
    if len(labels) != len(prompts):
        raise ValueError(f"the label function gave {len(labels)} labels for {len(prompts)} prompts")
    return labels
