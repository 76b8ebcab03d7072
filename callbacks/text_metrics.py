"""Text-to-image metrics at validation: CLIP score, prompt-set FID and prompt adherence of the student's samples.

Every ``every_n_validations``-th validation (not the sanity check; also under ``trainer.validate`` / ``distill
validate``), on rank zero as ``FIDCallback``: ``num_prompts`` prompts, their conditions and a fixed noise come from the
datamodule's evaluation API (``PromptDataModule``)::

    prompts = datamodule.evaluation_prompts(n)          # list[str], the same every time
    cond = datamodule.evaluation_conditions(prompts)   # TextCondition (labels: the prompted class, if any)
    noise = datamodule.evaluation_noise(n, seed)       # (n, *teacher data shape)

For each NFE (``nfe``, else the module's ``eval_nfe``) the student samples ``pl_module.sample(noise, cond, nfe)`` in
batches of ``batch_size``, ``pl_module.to_images`` maps them to images in [-1, 1] (a latent teacher's autoencoder
decodes them), and the same images are scored by each enabled metric:

* ``val/clip_score`` -- mean CLIPScore (Hessel et al. 2021, w = 100) of (image, its prompt) with ``CLIPScorer``;
  enabled by ``clip_checkpoint`` (+ ``clip_model_config`` or ``clip_model_name``; nothing is downloaded);
* ``val/prompt_fid`` -- FID (Heusel et al. 2017) of the generated set against ``reference``: ``"mnist-test"`` (the
  first ``num_reference`` MNIST test images, zero-padded or resized to the samples' size) or a folder of images
  (sorted, the first ``num_reference``, resized); ``extractor`` as in ``FIDCallback`` (``"mnist-classifier"`` fast,
  ``"inception"`` for reports); ``reference=None`` turns it off;
* ``val/prompt_adherence`` -- the shipped MNIST classifier's accuracy on the prompted digit (``prompt_adherence``),
  when the prompts carry labels (``TextCondition.labels``, the MNIST caption parser, or ``label_fn``).

Keys: ``val/{metric}_nfe{K}`` for every requested NFE, and ``val/{metric}`` for the first one (the headline a
``ModelCheckpoint`` can monitor; the only key when the module samples with its default steps). ``last_metrics[nfe]``
keeps the values and the protocol (CLIP identity, extractor, reference, numbers, seed).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from lightning_modules.conditioning.condition import select_conditions
from lightning_modules.evaluation.feature_extractors import load_or_train_mnist_classifier
from lightning_modules.evaluation.image_metrics import EXTRACTORS, image_metrics
from lightning_modules.evaluation.prompt_adherence import (load_adherence_classifier, prompt_adherence,
                                                           prompt_labels)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
METRICS = ("clip_score", "prompt_fid", "prompt_adherence")


def match_images(images: torch.Tensor, shape: Sequence[int], pad: bool = False) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) brought to ``shape`` = (C', H', W'): channels averaged / repeated, then
    zero-padded (background -1; ``pad`` and a larger square target, as MNISTDataModule's ``pad_to``) or resized."""
    channels, height, width = (int(s) for s in shape)
    if images.shape[1] != channels:
        if channels == 1:
            images = images.mean(1, keepdim=True)
        elif images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        else:
            raise ValueError(f"cannot match {images.shape[1]}-channel reference images to {channels} channels")
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images.contiguous()
    if pad and height >= h and width >= w:
        top, left = (height - h) // 2, (width - w) // 2
        return F.pad(images, (left, width - w - left, top, height - h - top), value=-1.0)
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def load_image_folder(root: str, count: int, shape: Sequence[int]) -> torch.Tensor:
    """The first ``count`` images (sorted relative paths, recursively) of ``root`` as [-1, 1] (N, *shape)."""
    from PIL import Image

    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"reference must be 'mnist-test' or a folder of images; {root} is not a folder")
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if len(files) < count:
        raise ValueError(f"reference folder {root} holds {len(files)} images, {count} are needed")
    mode = "L" if shape[0] == 1 else "RGB"
    images = []
    for name in files[:count]:
        with Image.open(os.path.join(root, name)) as image:
            pixels = torch.frombuffer(bytearray(image.convert(mode).tobytes()), dtype=torch.uint8)
            size = image.size
        images.append(pixels.reshape(size[1], size[0], -1).permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.cat([match_images(image[None], shape) for image in images])


class TextToImageMetrics(Callback):
    def __init__(self, num_prompts: int = 500, nfe: list[int] | None = None, seed: int = 2024,
                 batch_size: int = 100, clip_checkpoint: str | None = None, clip_model_config: str | dict | None = None,
                 clip_model_name: str | None = None, reference: str | None = "mnist-test",
                 num_reference: int | None = None, extractor: str = "mnist-classifier", weights_path: str | None = None,
                 adherence: bool | str = "auto", adherence_weights: str | None = None,
                 label_fn: Callable[[Sequence[str]], Sequence[int]] | None = None, every_n_validations: int = 1,
                 cache_dir: str | None = None, metric_batch_size: int = 250, verbose: bool = True):
        if num_prompts < 10:
            raise ValueError(f"num_prompts must be >= 10, got {num_prompts}")
        if batch_size < 1 or every_n_validations < 1:
            raise ValueError(f"batch_size and every_n_validations must be >= 1, got {batch_size}, "
                             f"{every_n_validations}")
        if extractor not in EXTRACTORS:
            raise ValueError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")
        if adherence not in (True, False, "auto"):
            raise ValueError(f"adherence must be True, False or 'auto', got {adherence!r}")
        if clip_checkpoint is None and (clip_model_config is not None or clip_model_name is not None):
            raise ValueError("clip_model_config / clip_model_name need clip_checkpoint (a local state dict file)")
        if clip_checkpoint is None and reference is None and adherence is False:
            raise ValueError("TextToImageMetrics has nothing to compute: give clip_checkpoint, reference or adherence")
        self.num_prompts, self.nfe, self.seed, self.batch_size = num_prompts, nfe, seed, batch_size
        self.clip_spec = (clip_model_name, clip_model_config, clip_checkpoint)
        self.reference_name, self.num_reference = reference, num_reference
        self.extractor, self.weights_path, self.cache_dir = extractor, weights_path, cache_dir
        self.adherence, self.adherence_weights, self.label_fn = adherence, adherence_weights, label_fn
        self.every_n_validations, self.metric_batch_size, self.verbose = every_n_validations, metric_batch_size, verbose
        self.validations = 0
        self.last_metrics: dict[int | None, dict[str, Any]] = {}
        self._inputs: tuple | None = None
        self._reference: tuple | None = None
        self._scorer = None
        self._classifier = None

    # state: the validation counter resumes with the checkpoint ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    # pieces -----------------------------------------------------------------------------------------------------
    @property
    def scorer(self):
        if self._scorer is None and self.clip_spec[2] is not None:
            from lightning_modules.evaluation.clip_score import CLIPScorer

            name, config, checkpoint = self.clip_spec
            self._scorer = CLIPScorer(model_name=name, model_config=config, checkpoint=checkpoint)
        return self._scorer

    def inputs(self, datamodule) -> tuple[list[str], Any, torch.Tensor, torch.Tensor | None]:
        """(prompts, conditions, noise, prompted labels or None): fixed, built once per datamodule."""
        needed = ("evaluation_prompts", "evaluation_conditions", "evaluation_noise")
        if datamodule is None or not all(hasattr(datamodule, name) for name in needed):
            raise ValueError(f"TextToImageMetrics needs a datamodule with {', '.join(needed)} (PromptDataModule); "
                             f"got {type(datamodule).__name__}")
        token = (id(datamodule), self.num_prompts, self.seed)
        if self._inputs is None or self._inputs[0] != token:
            prompts = list(datamodule.evaluation_prompts(self.num_prompts))
            if len(prompts) != self.num_prompts:
                raise ValueError(f"evaluation_prompts({self.num_prompts}) returned {len(prompts)} prompts")
            cond = datamodule.evaluation_conditions(prompts)
            noise = datamodule.evaluation_noise(self.num_prompts, self.seed)
            rows = (len(noise), None if cond is None else len(cond))
            if rows[0] != self.num_prompts or rows[1] not in (None, self.num_prompts):
                raise ValueError(f"evaluation_noise / evaluation_conditions gave {rows[0]} / {rows[1]} rows "
                                 f"for {self.num_prompts} prompts")
            labels = None
            if self.adherence is not False:
                labels = prompt_labels(prompts, cond, self.label_fn)
                if labels is None and self.adherence is True:
                    raise ValueError("adherence=True needs the prompted digit of each prompt: a TextCondition with "
                                     "labels, datamodules.mnist_captions, or label_fn")
            self._inputs = (token, prompts, cond, noise, labels)
        return self._inputs[1:]

    def reference(self, shape: Sequence[int]) -> tuple[torch.Tensor, str]:
        """(reference images in [-1, 1] shaped like the samples, reference key), kept between validations."""
        count = self.num_reference or self.num_prompts
        token = (self.reference_name, count, tuple(shape))
        if self._reference is None or self._reference[0] != token:
            height, width = shape[-2:]
            if self.reference_name == "mnist-test":
                from datamodules.images import MNISTDataModule

                images = MNISTDataModule().split("test")[0][:count]
                images = match_images(images, shape, pad=True)
                key = f"mnist-test-first{count}-{shape[0]}x{height}x{width}-{self.extractor}"
            else:
                images = load_image_folder(self.reference_name, count, shape)
                key = f"folder-{os.path.basename(os.path.normpath(self.reference_name))}-{height}x{width}-{self.extractor}"
            self._reference = (token, images, key)
        return self._reference[1], self._reference[2]

    def fid_weights_path(self) -> str | None:
        """``weights_path``, or for the MNIST classifier the shipped one (copied into the cache): ``image_metrics``
        given a resolved cache directory would train a fresh classifier instead (inside inference mode)."""
        if self.weights_path is not None or self.extractor != "mnist-classifier":
            return self.weights_path
        return load_or_train_mnist_classifier(self.cache_dir, verbose=self.verbose)[1]["path"]

    def nfe_list(self, pl_module) -> list[int | None]:
        if self.nfe is not None:
            return list(self.nfe)
        eval_nfe = getattr(getattr(pl_module, "hparams", None), "eval_nfe", None)
        return list(eval_nfe) if eval_nfe is not None else [None]

    def generate(self, pl_module, noise: torch.Tensor, cond, nfe: int | None) -> torch.Tensor:
        """Images in [-1, 1] of the student's samples, in batches, on the CPU."""
        to_images = getattr(pl_module, "to_images", None)
        chunks = []
        for start in range(0, len(noise), self.batch_size):
            rows = slice(start, start + self.batch_size)
            part = select_conditions(cond, rows)
            part = part.to(pl_module.device) if part is not None else None
            samples = pl_module.sample(noise[rows].to(pl_module.device), part, nfe)
            images = to_images(samples) if to_images is not None else samples
            chunks.append(images.detach().float().cpu())
        return torch.cat(chunks)

    def score(self, images: torch.Tensor, prompts: list[str], labels: torch.Tensor | None,
              device: torch.device) -> dict[str, Any]:
        """The enabled metrics of one generated set, with their protocol."""
        out: dict[str, Any] = {}
        protocol: dict[str, Any] = {"num_prompts": len(prompts), "seed": self.seed}
        if not torch.isfinite(images).all():  # a diverged student: report NaN rather than stop the run
            protocol["non_finite_samples"] = int((~torch.isfinite(images)).sum())
            out.update({name: float("nan") for name in self.enabled(labels)})
            out["protocol"] = protocol
            return out
        if self.scorer is not None:
            out["clip_score"] = float(self.scorer.to(device).score(images, prompts, self.metric_batch_size).mean())
            protocol["clip"] = self.scorer.identity
        if self.reference_name is not None:
            reference, key = self.reference(tuple(images.shape[1:]))
            fid = image_metrics(images, key, reference, extractor=self.extractor, kid=False, prc=False,
                                cache_dir=self.cache_dir, batch_size=self.metric_batch_size,
                                weights_path=self.fid_weights_path())
            out["prompt_fid"] = fid["fid"]
            protocol["fid"] = fid["protocol"]
        if labels is not None:
            if self._classifier is None:
                self._classifier = load_adherence_classifier(self.adherence_weights)
            adherence = prompt_adherence(images, labels, self._classifier.to(device), self.metric_batch_size)
            out["prompt_adherence"] = adherence["accuracy"]
            out["prompt_adherence_per_digit"] = adherence["per_digit"]
        out["protocol"] = protocol
        return out

    def enabled(self, labels) -> list[str]:
        flags = (self.clip_spec[2] is not None, self.reference_name is not None, labels is not None)
        return [name for name, on in zip(METRICS, flags) if on]

    def evaluate(self, pl_module, datamodule) -> dict[int | None, dict[str, Any]]:
        prompts, cond, noise, labels = self.inputs(datamodule)
        results = {}
        for nfe in self.nfe_list(pl_module):
            images = self.generate(pl_module, noise, cond, nfe)
            results[nfe] = self.score(images, prompts, labels, pl_module.device)
            results[nfe]["protocol"]["nfe"] = nfe
        return results

    # hook -------------------------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.validations += 1
        if (self.validations - 1) % self.every_n_validations != 0 or not trainer.is_global_zero:
            return
        self.last_metrics = self.evaluate(pl_module, trainer.datamodule)
        for index, (nfe, metrics) in enumerate(self.last_metrics.items()):
            for name in METRICS:
                if name not in metrics:
                    continue
                if nfe is not None:
                    pl_module.log(f"val/{name}_nfe{nfe}", float(metrics[name]), rank_zero_only=True)
                if index == 0:
                    pl_module.log(f"val/{name}", float(metrics[name]), rank_zero_only=True)
            if self.verbose:
                values = ", ".join(f"{name} {metrics[name]:.4g}" for name in METRICS if name in metrics)
                where = [metrics["protocol"].get("clip"), self.reference_name and
                         f"FID vs {self.reference_name} ({self.extractor})"]
                print(f"[step {trainer.global_step}] NFE {nfe}: {values} [{self.num_prompts} prompts, seed "
                      f"{self.seed}{''.join(', ' + w for w in where if w)}]", flush=True)
