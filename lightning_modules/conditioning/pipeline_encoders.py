"""The frozen text encoders of real latent teachers, loaded from a local diffusers pipeline folder.

Each class reproduces its pipeline's ``encode_prompt`` in diffusers 0.42 (the equality is tested on tiny components):

* ``CLIPTextEncoder`` -- Stable Diffusion 1.x / 2.x (Rombach et al. 2022): CLIP's last hidden state, or with
  ``clip_skip = k`` the state ``k`` layers earlier passed through the final layer norm (``StableDiffusionPipeline``);
  ``pooled`` = pooler output (or ``text_embeds`` of a projection model). The UNet takes no mask.
* ``SDXLTextEncoder`` -- SDXL (Podell et al. 2023): the penultimate hidden states of CLIP ViT-L and OpenCLIP ViT-bigG
  concatenated along channels, ``pooled`` = bigG's projected ``text_embeds``; with ``force_zeros_for_empty_prompt``
  (the pipeline's config, True for SDXL base) the unconditional branch is all zeros rather than the empty prompt's
  embedding.
* ``T5TextEncoder`` -- PixArt-alpha / -Sigma (Chen et al. 2023 / 2024): T5 encoder states with the attention mask,
  which the transformer uses (``use_mask``); prompts are lower-cased and stripped as the pipeline does without
  ``clean_caption`` (bs4 absent it falls back to exactly that).
* ``SD3TextEncoder`` -- SD3 (Esser et al. 2024, Sec. 5.2): the two CLIP penultimate states concatenated along
  channels, zero-padded to T5's width and concatenated with T5's states along tokens; ``pooled`` = both CLIP
  ``text_embeds``. Without ``text_encoder_3`` T5's part is zeros (the pipeline's T5-free mode).
* ``FluxTextEncoder`` -- FLUX.1: CLIP-L's pooler output as ``pooled`` and T5's states (no mask) as ``embeds``.
* ``SanaTextEncoder`` -- SANA (Xie et al. 2024): Gemma-2 states behind the complex human instruction, keeping the
  first token and the last ``max_length - 1`` (the pipeline's ``select_index``), with the mask.

``text_encoder_from_pipeline(folder)`` picks the class from ``model_index.json``'s ``_class_name``. Embeddings are
returned in float32 whatever the weights' dtype. Prompts longer than a tokenizer's limit are truncated, and the
base class's ``warn_truncated`` logs how many (``last_truncated`` keeps the count of the last call).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import torch
from torch import Tensor

from .condition import TextCondition
from .text_encoders import EncodedText, TextEncoder, _as_list

#: the prompt length (T5 / Gemma tokens) each pipeline's ``__call__`` uses by default
DEFAULT_MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300, "StableDiffusion3Pipeline": 256,
                               "FluxPipeline": 512, "SanaPipeline": 300}


def read_model_index(folder: str) -> dict:
    """``folder/model_index.json`` as a dict ({} when the folder has none); FileNotFoundError if ``folder`` is absent."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"pipeline folder {folder!r} does not exist (or is not a directory)")
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def _subfolder(folder: str, subfolder: str | None, what: str) -> str:
    path = os.path.join(folder, subfolder) if subfolder else folder
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder {path!r} does not exist; expected a {what} saved with save_pretrained "
                                f"(a diffusers pipeline folder has {subfolder or 'it'}/ beside model_index.json)")
    return path


def _present(folder: str, index: dict, name: str) -> bool:
    """Whether the pipeline has component ``name``: model_index.json lists it non-null (SDXL refiner: text_encoder is
    [null, null]), or, without an index entry, its subfolder exists."""
    if name in index:
        entry = index[name]
        return entry is not None and not (isinstance(entry, (list, tuple)) and entry[0] is None)
    return os.path.isdir(os.path.join(folder, name))


def _load_tokenizer(folder: str, subfolder: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_subfolder(folder, subfolder, "tokenizer"), local_files_only=True)


def _load_model(folder: str, subfolder: str | None, default: str, dtype: torch.dtype | None):
    import transformers

    path = _subfolder(folder, subfolder, "text encoder")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"text encoder folder {path!r} has no config.json")
    with open(config_path) as handle:
        architectures = json.load(handle).get("architectures") or [default]
    name = architectures[0] if hasattr(transformers, architectures[0]) else default
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = getattr(transformers, name).from_pretrained(path, local_files_only=True, **kwargs)
    return model.requires_grad_(False).eval()


def _limit(tokenizer, max_length: int | None, what: str) -> int:
    limit = int(max_length if max_length is not None else tokenizer.model_max_length)
    if limit > 100_000:  # transformers' "no limit" sentinel (VERY_LARGE_INTEGER)
        raise ValueError(f"{what}'s tokenizer has no model_max_length; pass max_length explicitly")
    if limit < 2:
        raise ValueError(f"max_length must be >= 2 (a token and the end token), got {limit}")
    return limit


class FolderTextEncoder(TextEncoder):
    """Shared plumbing: the folder, its pipeline class (part of ``identity``), frozen eval mode, tokenization."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = os.fspath(folder)
        self.pipeline_class = read_model_index(self.folder).get("_class_name")
        self.last_truncated = 0

    @property
    def identity(self) -> str:
        return f"{super().identity}:pipeline={self.pipeline_class}"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.modules():  # frozen: dropout stays off in every wrapped transformers model
            if module is not self and hasattr(module, "config"):
                module.eval()
        return self

    def _tokens(self, tokenizer, prompts: list[str], max_length: int) -> dict[str, Tensor]:
        tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                           return_tensors="pt")
        return {"input_ids": tokens["input_ids"].to(self.device),
                "attention_mask": tokens["attention_mask"].to(self.device)}

    def _count_truncated(self, tokenizer, prompts: list[str], limit: int) -> int:
        lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        return self.warn_truncated(lengths, limit)


class CLIPTextEncoder(FolderTextEncoder):
    """SD1.x / 2.x text encoder (``StableDiffusionPipeline.encode_prompt``).

    ``embeds``: (B, max_length, width) last hidden state, or with ``clip_skip = k > 0`` the hidden state ``k`` layers
    before the last through the final layer norm; ``pooled``: pooler output (``text_embeds`` for a projection model);
    ``mask``: the tokens' mask (returned, not used: ``use_mask`` False; passed to CLIP only where its config sets
    ``use_attention_mask``, as the pipeline does). ``max_length`` defaults to the tokenizer's ``model_max_length``."""

    use_mask = False

    def __init__(self, folder: str, subfolder_encoder: str | None = "text_encoder",
                 subfolder_tokenizer: str | None = "tokenizer", max_length: int | None = None, clip_skip: int = 0,
                 dtype: torch.dtype | None = None):
        super().__init__(folder)
        self.tokenizer = _load_tokenizer(self.folder, subfolder_tokenizer)
        self.model = _load_model(self.folder, subfolder_encoder, "CLIPTextModel", dtype)
        self.max_length = _limit(self.tokenizer, max_length, "CLIP")
        positions = int(self.model.config.max_position_embeddings)
        if self.max_length > positions:
            raise ValueError(f"max_length {self.max_length} exceeds the CLIP text model's "
                             f"max_position_embeddings {positions}")
        layers = int(self.model.config.num_hidden_layers)
        if not 0 <= int(clip_skip) < layers:
            raise ValueError(f"clip_skip must be in [0, {layers - 1}] for a {layers}-layer CLIP, got {clip_skip}")
        self.clip_skip = int(clip_skip)

    @property
    def identity(self) -> str:
        return f"{super().identity}:clip_skip={self.clip_skip}"

    def run(self, prompts: list[str], hidden_states: bool = False):
        """Tokenize (no warning) and run CLIP; returns ``(tokens, transformers output)``."""
        tokens = self._tokens(self.tokenizer, prompts, self.max_length)
        mask = tokens["attention_mask"] if getattr(self.model.config, "use_attention_mask", False) else None
        output = self.model(tokens["input_ids"], attention_mask=mask, output_hidden_states=hidden_states)
        return tokens, output

    @staticmethod
    def pooled_of(output) -> Tensor:
        return output.text_embeds if getattr(output, "text_embeds", None) is not None else output.pooler_output

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> EncodedText:
        prompts = _as_list(prompts)
        self.last_truncated = self._count_truncated(self.tokenizer, prompts, self.max_length)
        tokens, output = self.run(prompts, hidden_states=self.clip_skip > 0)
        if self.clip_skip:
            # transformers 5 flattened CLIPTextModel (no .text_model), which diffusers 0.42's clip_skip path expects
            final_norm = getattr(self.model, "text_model", self.model).final_layer_norm
            states = final_norm(output.hidden_states[-(self.clip_skip + 1)])
        else:
            states = output.last_hidden_state
        return EncodedText(states.float(), self.pooled_of(output).float(), tokens["attention_mask"])


class T5TextEncoder(FolderTextEncoder):
    """T5 encoder states (PixArt-alpha / -Sigma ``encode_prompt``; also the T5 half of SD3 and Flux).

    ``embeds``: (B, max_length, d_model) last hidden state; ``mask``: the tokens' attention mask, used by the
    backbone (``use_mask``); ``pooled``: None. ``encoder_mask``: pass the mask to T5 itself (PixArt does; SD3 and
    Flux do not); ``lowercase``: lower-case and strip prompts first (PixArt's preprocessing)."""

    use_mask = True

    def __init__(self, folder: str, subfolder_encoder: str | None = "text_encoder",
                 subfolder_tokenizer: str | None = "tokenizer", max_length: int | None = None,
                 encoder_mask: bool = True, lowercase: bool = False, use_mask: bool = True,
                 dtype: torch.dtype | None = None):
        super().__init__(folder)
        self.tokenizer = _load_tokenizer(self.folder, subfolder_tokenizer)
        self.model = _load_model(self.folder, subfolder_encoder, "T5EncoderModel", dtype)
        self.max_length = _limit(self.tokenizer, max_length, "T5")
        self.encoder_mask, self.lowercase, self.use_mask = bool(encoder_mask), bool(lowercase), bool(use_mask)

    @property
    def identity(self) -> str:
        return f"{super().identity}:encoder_mask={self.encoder_mask}:lowercase={self.lowercase}"

    def preprocess(self, prompts: list[str]) -> list[str]:
        return [p.lower().strip() for p in prompts] if self.lowercase else prompts

    def run(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Tokenize (no warning) and run T5; returns ``(states, mask)``."""
        tokens = self._tokens(self.tokenizer, self.preprocess(prompts), self.max_length)
        mask = tokens["attention_mask"]
        states = self.model(tokens["input_ids"], attention_mask=mask if self.encoder_mask else None)[0]
        return states, mask

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> EncodedText:
        prompts = _as_list(prompts)
        self.last_truncated = self._count_truncated(self.tokenizer, self.preprocess(prompts), self.max_length)
        states, mask = self.run(prompts)
        return EncodedText(states.float(), None, mask)


class SDXLTextEncoder(FolderTextEncoder):
    """SDXL's two CLIPs (``StableDiffusionXLPipeline.encode_prompt``).

    ``embeds``: (B, 77, 768 + 1280) -- hidden state ``-(clip_skip + 2)`` (the penultimate by default) of
    ``text_encoder`` and ``text_encoder_2`` concatenated along channels (the refiner's folder, without
    ``text_encoder``, gives ``text_encoder_2``'s alone); ``pooled``: ``text_encoder_2``'s ``text_embeds``.
    ``force_zeros_for_empty_prompt`` (default: the folder's model_index.json, else True as in diffusers): with no
    negative prompt the unconditional branch is zeros, as the pipeline's classifier-free guidance uses."""

    use_mask = False

    def __init__(self, folder: str, clip_skip: int = 0, force_zeros_for_empty_prompt: bool | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(folder)
        index = read_model_index(self.folder)
        names = [suffix for suffix in ("", "_2") if _present(self.folder, index, "text_encoder" + suffix)]
        if "_2" not in names:
            raise FileNotFoundError(f"SDXL folder {self.folder!r} has no text_encoder_2 (CLIP-G with projection)")
        self.towers = torch.nn.ModuleList(
            CLIPTextEncoder(self.folder, "text_encoder" + s, "tokenizer" + s, dtype=dtype) for s in names)
        self.max_length = self.towers[0].max_length
        if any(t.max_length != self.max_length for t in self.towers):
            raise ValueError(f"SDXL tokenizers disagree on model_max_length: {[t.max_length for t in self.towers]}")
        depth = min(int(t.model.config.num_hidden_layers) for t in self.towers)
        if not 0 <= int(clip_skip) < depth - 1:
            raise ValueError(f"clip_skip must be in [0, {depth - 2}] for {depth}-layer CLIPs, got {clip_skip}")
        self.clip_skip = int(clip_skip)
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @property
    def identity(self) -> str:
        return (f"{super().identity}:clip_skip={self.clip_skip}"
                f":force_zeros_for_empty_prompt={self.force_zeros_for_empty_prompt}")

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> EncodedText:
        prompts = _as_list(prompts)
        self.last_truncated = self._count_truncated(self.towers[0].tokenizer, prompts, self.max_length)
        states, pooled, mask = [], None, None
        for tower in self.towers:
            tokens, output = tower.run(prompts, hidden_states=True)
            states.append(output.hidden_states[-(self.clip_skip + 2)])
            pooled, mask = tower.pooled_of(output), tokens["attention_mask"]
        return EncodedText(torch.cat(states, dim=-1).float(), pooled.float(), mask)

    def condition(self, prompts, negative_prompts=None, encoded: EncodedText | None = None) -> TextCondition:
        cond = super().condition(prompts, negative_prompts, encoded)
        if negative_prompts is None and self.force_zeros_for_empty_prompt:
            cond = dataclasses.replace(cond, null_embeds=torch.zeros_like(cond.null_embeds),
                                       null_pooled=torch.zeros_like(cond.null_pooled))
        return cond


class SD3TextEncoder(FolderTextEncoder):
    """SD3's CLIP-L + CLIP-G + T5 (``StableDiffusion3Pipeline.encode_prompt``).

    ``embeds``: (B, 77 + max_length, t5_width) -- the CLIPs' hidden states ``-(clip_skip + 2)`` concatenated along
    channels and zero-padded to T5's width, then T5's last hidden state (no mask) along tokens; ``pooled``: the two
    CLIP ``text_embeds`` concatenated; ``mask``: CLIP's and T5's token masks concatenated (the MMDiT takes none).
    ``max_length``: T5 tokens (the pipeline's ``max_sequence_length``, 256). Without ``text_encoder_3`` T5's part is
    zeros of the transformer's ``joint_attention_dim``, as the pipeline does."""

    use_mask = False

    def __init__(self, folder: str, max_length: int = 256, clip_skip: int = 0, dtype: torch.dtype | None = None):
        super().__init__(folder)
        index = read_model_index(self.folder)
        self.clips = torch.nn.ModuleList(
            CLIPTextEncoder(self.folder, "text_encoder" + s, "tokenizer" + s, dtype=dtype) for s in ("", "_2"))
        self.clip_length = self.clips[0].max_length
        self.t5 = None
        if _present(self.folder, index, "text_encoder_3"):
            self.t5 = T5TextEncoder(self.folder, "text_encoder_3", "tokenizer_3", max_length=max_length,
                                    encoder_mask=False, dtype=dtype)
            self.t5_width = int(self.t5.model.config.d_model)
        else:
            config = os.path.join(_subfolder(self.folder, "transformer", "transformer"), "config.json")
            with open(config) as handle:
                self.t5_width = int(json.load(handle)["joint_attention_dim"])
        self.max_length = int(max_length)
        self.clip_skip = int(clip_skip)
        depth = min(int(c.model.config.num_hidden_layers) for c in self.clips)
        if not 0 <= self.clip_skip < depth - 1:
            raise ValueError(f"clip_skip must be in [0, {depth - 2}] for {depth}-layer CLIPs, got {clip_skip}")

    @property
    def identity(self) -> str:
        return f"{super().identity}:clip_skip={self.clip_skip}:t5={self.t5 is not None}"

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> EncodedText:
        prompts = _as_list(prompts)
        cut = self._count_truncated(self.clips[0].tokenizer, prompts, self.clip_length)
        states, pooled = [], []
        for clip in self.clips:
            tokens, output = clip.run(prompts, hidden_states=True)
            states.append(output.hidden_states[-(self.clip_skip + 2)])
            pooled.append(clip.pooled_of(output))
        clip_states = torch.cat(states, dim=-1).float()
        if clip_states.shape[-1] > self.t5_width:
            raise ValueError(f"SD3: the CLIP states are {clip_states.shape[-1]} wide, wider than T5's {self.t5_width}")
        clip_states = torch.nn.functional.pad(clip_states, (0, self.t5_width - clip_states.shape[-1]))
        if self.t5 is not None:
            cut = max(cut, self._count_truncated(self.t5.tokenizer, prompts, self.max_length))
            t5_states, t5_mask = self.t5.run(prompts)
        else:
            t5_states = clip_states.new_zeros(len(prompts), self.max_length, self.t5_width)
            t5_mask = tokens["attention_mask"].new_zeros(len(prompts), self.max_length)
        self.last_truncated = cut
        embeds = torch.cat([clip_states, t5_states.float()], dim=-2)
        mask = torch.cat([tokens["attention_mask"], t5_mask], dim=-1)
        return EncodedText(embeds, torch.cat(pooled, dim=-1).float(), mask)


class FluxTextEncoder(FolderTextEncoder):
    """FLUX.1's CLIP-L + T5 (``FluxPipeline.encode_prompt``): ``pooled`` = CLIP's pooler output, ``embeds`` = T5's
    last hidden state (B, max_length, 4096), computed without a mask; ``mask`` is returned but unused."""

    use_mask = False

    def __init__(self, folder: str, max_length: int = 512, dtype: torch.dtype | None = None):
        super().__init__(folder)
        self.clip = CLIPTextEncoder(self.folder, "text_encoder", "tokenizer", dtype=dtype)
        self.t5 = T5TextEncoder(self.folder, "text_encoder_2", "tokenizer_2", max_length=max_length,
                                encoder_mask=False, use_mask=False, dtype=dtype)
        self.max_length = self.t5.max_length

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> EncodedText:
        prompts = _as_list(prompts)
        self.last_truncated = max(self._count_truncated(self.clip.tokenizer, prompts, self.clip.max_length),
                                  self._count_truncated(self.t5.tokenizer, prompts, self.max_length))
        _, output = self.clip.run(prompts)
        states, mask = self.t5.run(prompts)
        return EncodedText(states.float(), output.pooler_output.float(), mask)


PIPELINE_ENCODERS = {
    "StableDiffusionPipeline": lambda folder, max_length: CLIPTextEncoder(folder, max_length=max_length),
    "StableDiffusionXLPipeline": lambda folder, max_length: SDXLTextEncoder(folder),
    "StableDiffusion3Pipeline": lambda folder, max_length: SD3TextEncoder(folder, max_length=max_length),
    "PixArtAlphaPipeline": lambda folder, max_length: T5TextEncoder(folder, max_length=max_length, lowercase=True),
    "PixArtSigmaPipeline": lambda folder, max_length: T5TextEncoder(folder, max_length=max_length, lowercase=True),
    "FluxPipeline": lambda folder, max_length: FluxTextEncoder(folder, max_length=max_length),
}


def text_encoder_from_pipeline(folder: str, max_length: int | None = None) -> TextEncoder:
    """The text encoder of the diffusers pipeline saved in ``folder``, chosen by model_index.json's ``_class_name``.

    ``max_length``: the T5 / Gemma prompt length (default: the pipeline's ``max_sequence_length``: PixArt-alpha 120,
    PixArt-Sigma 300, SD3 256, Flux 512, SANA 300); for SD1.x / 2.x the CLIP token limit (default 77 from the
    tokenizer); ignored for SDXL."""
    index = read_model_index(folder)
    if not index:
        raise FileNotFoundError(f"{os.path.join(os.fspath(folder), 'model_index.json')!r} does not exist: "
                                "text_encoder_from_pipeline needs a diffusers pipeline folder")
    name = index.get("_class_name")
    if name not in PIPELINE_ENCODERS:
        raise ValueError(f"pipeline class {name!r} in {folder!r} has no text encoder here; supported: "
                         f"{sorted(PIPELINE_ENCODERS)}")
    if max_length is None:
        max_length = DEFAULT_MAX_SEQUENCE_LENGTH.get(name)
    return PIPELINE_ENCODERS[name](os.fspath(folder), max_length)
