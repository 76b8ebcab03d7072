"""The condition a batch carries, and the few operations every method needs on it, whatever its kind.

Three kinds exist:
  * class labels: a (B,) long tensor; the unconditional label is the teacher's ``num_classes`` (the label dropped to
    during teacher training);
  * encoded prompts: a ``TextCondition``, which carries its own unconditional counterpart -- the embedding of the
    empty prompt, or of the negative prompt when one is given -- so classifier-free guidance (Ho & Salimans 2022,
    Eq. 6) and label dropout need no knowledge of the encoder that made it;
  * a low-quality image to restore: an ``ImageCondition`` (the degraded image brought back to the output grid, its
    downsampling factor, and which rows are dropped to the unconditional condition); its unconditional counterpart
    is a blank image with every row marked dropped, so it too carries its own null (SR3, Saharia et al. 2022, feed
    the upsampled low-resolution image to the denoiser as extra input channels; see networks/restoration_unet.py).

Methods never branch on the kind: they call ``unconditional``, ``concat_conditions``, ``drop_conditions`` and
``select_conditions``, which dispatch here. This keeps the conditioning layer below the methods.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor


@dataclass
class TextCondition:
    """Encoded prompts for one batch.

    ``embeds``: (B, L, C) per-token states (UNet ``encoder_hidden_states``; T5 / CLIP last hidden states);
    ``pooled``: (B, P) pooled embedding where the backbone takes one (SDXL ``text_embeds``, SD3 ``pooled_projections``);
    ``mask``: (B, L) attention mask of the tokens (1 = real token), where the backbone uses one (PixArt / SANA / T5);
    ``null_embeds`` / ``null_pooled`` / ``null_mask``: the same for the unconditional branch of CFG (the empty
    prompt, or the negative prompt), one row per sample;
    ``guidance``: (B,) guidance scale fed to guidance-embedded students (LCM, Flux-dev); None for others;
    ``labels``: (B,) class / concept id of each prompt where the prompt set defines one (e.g. the digit an MNIST
    caption asks for); methods defined over a partition of the conditions use it (MSD routes by it, SFD forgets by it).
    """

    embeds: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None
    null_embeds: Tensor | None = None
    null_pooled: Tensor | None = None
    null_mask: Tensor | None = None
    guidance: Tensor | None = None
    labels: Tensor | None = None

    def __post_init__(self):
        if self.embeds.ndim != 3:
            raise ValueError(f"TextCondition.embeds must be (batch, tokens, channels), got {tuple(self.embeds.shape)}")
        batch = self.embeds.shape[0]
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and field.name != "embeds" and value.shape[0] != batch:
                raise ValueError(f"TextCondition.{field.name} has batch {value.shape[0]}, embeds has {batch}")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def map(self, fn) -> "TextCondition":
        """Apply ``fn`` to every tensor field (None stays None)."""
        return TextCondition(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in dataclasses.fields(self)})

    def to(self, *args, **kwargs) -> "TextCondition":
        return self.map(lambda tensor: tensor.to(*args, **kwargs))

    def unconditional(self) -> "TextCondition":
        """The condition of CFG's unconditional branch (its own null stays its null)."""
        if self.null_embeds is None:
            raise ValueError("this TextCondition has no unconditional embedding (null_embeds); encode it with a "
                             "TextEncoder.condition(...) call, which adds the empty or negative prompt's embedding")
        return TextCondition(self.null_embeds, self.null_pooled, self.null_mask, self.null_embeds, self.null_pooled,
                             self.null_mask, self.guidance, self.labels)

    def with_guidance(self, scale: Tensor | float) -> "TextCondition":
        """The same prompts with a guidance scale embedded (guidance-distilled students)."""
        scale = torch.as_tensor(scale, dtype=torch.float32, device=self.device).expand(len(self)).clone()
        return dataclasses.replace(self, guidance=scale)


@dataclass
class ImageCondition:
    """The degraded image(s) a restoration network is conditioned on, for one batch.

    ``image``: (B, C, H, W) the low-quality image upsampled back to the high-quality grid (H, W), in [-1, 1];
    ``scale``: (B,) long downsampling factor that made each row (1 = no downsampling), so one network can serve
    several scales (YONOS-SR's scale distillation trains across them); None when the batch does not say;
    ``dropped``: (B,) bool, True where the row is the unconditional condition (blank image) -- set by
    ``unconditional`` / ``drop_conditions``, read by the network (its null scale embedding); None = none dropped;
    ``labels``: (B,) the digit / class of the high-quality image where the dataset has one (evaluation by class).
    """

    image: Tensor
    scale: Tensor | None = None
    dropped: Tensor | None = None
    labels: Tensor | None = None

    def __post_init__(self):
        if self.image.ndim != 4:
            raise ValueError(f"ImageCondition.image must be (batch, channels, height, width), got "
                             f"{tuple(self.image.shape)}")
        batch = self.image.shape[0]
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and field.name != "image" and (value.ndim != 1 or value.shape[0] != batch):
                raise ValueError(f"ImageCondition.{field.name} must be ({batch},) like the image batch, got "
                                 f"{tuple(value.shape)}")

    def __len__(self) -> int:
        return self.image.shape[0]

    @property
    def device(self) -> torch.device:
        return self.image.device

    def map(self, fn) -> "ImageCondition":
        """Apply ``fn`` to every tensor field (None stays None)."""
        return ImageCondition(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                 for f in dataclasses.fields(self)})

    def to(self, *args, **kwargs) -> "ImageCondition":
        # only the image follows a dtype change; scale / dropped / labels stay integer / bool
        moved = self.image.to(*args, **kwargs)
        return ImageCondition(moved, *(None if v is None else v.to(moved.device) for v in
                                       (self.scale, self.dropped, self.labels)))

    def dropped_rows(self) -> Tensor:
        """(B,) bool: True where the row is unconditional."""
        if self.dropped is None:
            return torch.zeros(len(self), dtype=torch.bool, device=self.device)
        return self.dropped

    def unconditional(self) -> "ImageCondition":
        """CFG's unconditional branch: a blank (zero) image, every row marked dropped; scale and labels are kept
        (they describe the task, not the evidence)."""
        return dataclasses.replace(self, image=torch.zeros_like(self.image),
                                   dropped=torch.ones(len(self), dtype=torch.bool, device=self.device))


Condition = Union[Tensor, TextCondition, ImageCondition, None]

#: the kinds that carry their own unconditional counterpart (no null label needed)
SELF_NULL_KINDS = (TextCondition, ImageCondition)


def carries_own_null(cond: Condition) -> bool:
    """True for conditions whose unconditional counterpart they carry themselves (prompts, images)."""
    return isinstance(cond, SELF_NULL_KINDS)


def condition_batch_size(cond: Condition) -> int | None:
    return None if cond is None else len(cond)


def condition_labels(cond: Condition, what: str = "this method") -> Tensor:
    """The class / concept id of each condition: the labels themselves, or a TextCondition's ``labels``."""
    if carries_own_null(cond):
        if cond.labels is None:
            raise ValueError(f"{what} needs a class / concept id per condition ({type(cond).__name__}.labels): give "
                             "the prompt file a label column (PromptDataModule label_column), or use a restoration "
                             "datamodule over a labelled dataset")
        return cond.labels
    if cond is None:
        raise ValueError(f"{what} needs class labels or labelled prompts in the batch, got none")
    return cond


def unconditional(cond: Condition, null_label: int | None = None) -> Condition:
    """The unconditional counterpart of ``cond``: the null label for class labels, the empty / negative prompt's
    embedding for prompts."""
    if cond is None:
        return None
    if carries_own_null(cond):
        return cond.unconditional()
    if null_label is None:
        raise ValueError("class-label guidance needs a class-conditional teacher with num_classes (the null label)")
    return torch.full_like(cond, null_label)


def concat_conditions(first: Condition, second: Condition) -> Condition:
    """Row-wise concatenation (the two branches of CFG in one batched call)."""
    if first is None and second is None:
        return None
    if type(first) is not type(second) and (carries_own_null(first) or carries_own_null(second)) \
            or first is None or second is None:
        raise TypeError(f"cannot concatenate conditions of kinds {type(first).__name__} and {type(second).__name__}")
    if isinstance(first, ImageCondition):
        values = {}
        for field in dataclasses.fields(ImageCondition):
            a, b = getattr(first, field.name), getattr(second, field.name)
            if field.name == "dropped" and (a is None) != (b is None):
                a, b = first.dropped_rows(), second.dropped_rows()  # "none dropped" is a value, not a gap
            if (a is None) != (b is None):
                raise ValueError(f"cannot concatenate ImageConditions: only one has {field.name}")
            values[field.name] = None if a is None else torch.cat([a, b.to(a.device)])
        return ImageCondition(**values)
    if isinstance(first, TextCondition):
        values = {}
        for field in dataclasses.fields(TextCondition):
            a, b = getattr(first, field.name), getattr(second, field.name)
            if (a is None) != (b is None):
                raise ValueError(f"cannot concatenate TextConditions: only one has {field.name}")
            values[field.name] = None if a is None else torch.cat([a, _pad_tokens_like(b, a)])
        return TextCondition(**values)
    return torch.cat([first, second])


def _pad_tokens_like(tensor: Tensor, like: Tensor) -> Tensor:
    if tensor.ndim >= 2 and like.ndim == tensor.ndim and tensor.shape[1] != like.shape[1]:
        raise ValueError(f"cannot concatenate token sequences of lengths {tensor.shape[1]} and {like.shape[1]}; "
                         "encode both with the same max_length")
    return tensor


def select_conditions(cond: Condition, rows: Tensor) -> Condition:
    """The conditions of ``rows`` (an index or boolean mask)."""
    if cond is None:
        return None
    if carries_own_null(cond):
        return cond.map(lambda tensor: tensor[rows])
    return cond[rows]


def drop_conditions(cond: Condition, drop: Tensor, null_label: int | None = None) -> Condition:
    """Replace the rows where ``drop`` is True by the unconditional condition (label / caption dropout)."""
    if cond is None or not bool(drop.any()):
        return cond
    null = unconditional(cond, null_label)
    if isinstance(cond, TextCondition):
        def pick(kept: Tensor | None, dropped: Tensor | None) -> Tensor | None:
            if kept is None:
                return None
            mask = drop.to(kept.device).reshape(-1, *([1] * (kept.ndim - 1)))
            return torch.where(mask, dropped.to(kept.dtype), kept)
        return dataclasses.replace(cond, embeds=pick(cond.embeds, null.embeds), pooled=pick(cond.pooled, null.pooled),
                                   mask=pick(cond.mask, null.mask))
    if isinstance(cond, ImageCondition):
        drop = drop.to(cond.device).bool()
        image = torch.where(drop.reshape(-1, 1, 1, 1), null.image, cond.image)
        return dataclasses.replace(cond, image=image, dropped=cond.dropped_rows() | drop)
    return torch.where(drop.to(cond.device), null, cond)
