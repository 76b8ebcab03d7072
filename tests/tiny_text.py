"""Tiny, randomly initialised text encoders + tokenizers that work offline, saved in diffusers pipeline-folder layout.

Building blocks (each returns the ``(model, tokenizer)`` it saved, so a test can also build a diffusers pipeline object
from them directly):

* ``tiny_clip_tokenizer(max_length=77)`` -- a real CLIP byte-level BPE (``CLIPTokenizer``) whose vocabulary is the
  first ``merges`` merges of the BPE table shipped inside open_clip (``bpe_simple_vocab_16e6.txt.gz``), built like
  CLIP's own vocabulary: 256 byte symbols, the same with ``</w>``, one token per merge, then the two special tokens.
* ``tiny_t5_tokenizer(max_length=32)`` -- a ``T5Tokenizer`` (tokenizers-backed Unigram, the T5 layout ``<pad>`` = 0,
  ``</s>`` = 1, ``<unk>`` = 2) over single characters plus a few words; no sentencepiece model is needed.
* ``save_tiny_clip_text(folder, hidden=32, with_projection=False, ...)`` -- ``CLIPTextModel`` (or
  ``CLIPTextModelWithProjection``) + tokenizer into ``folder/text_encoder`` and ``folder/tokenizer`` (subfolder names
  are arguments: SDXL's second pair is ``text_encoder_2`` / ``tokenizer_2``).
* ``save_tiny_t5(folder, hidden=32, ...)`` -- ``T5EncoderModel`` + tokenizer, same layout.
* ``add_tiny_text_encoders(folder, kind, width=16, pooled_width=8)`` -- every text component of a pipeline kind
  (``sd15``, ``sdxl``, ``sd3``, ``pixart``, ``flux``) with widths matching ``tests/tiny_pipelines.py`` (token states of
  width ``width`` = the backbone's cross-attention / joint-attention / caption width, pooled of width ``pooled_width``),
  and their entries merged into ``folder/model_index.json`` (created with the pipeline's ``_class_name`` if absent).
  E.g. ``save_tiny_sd15(d); add_tiny_text_encoders(d, "sd15")`` is a complete tiny SD1.5 folder.

All weights are seeded (``seed``), so two calls with equal arguments write equal weights.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os

import torch

PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                  "sd3": "StableDiffusion3Pipeline", "pixart": "PixArtSigmaPipeline", "flux": "FluxPipeline"}

_T5_WORDS = ("a", "an", "the", "of", "photo", "cat", "dog", "on", "in", "with", "red", "blue", "digit", "zero",
             "one", "two", "three", "handwritten", "picture", "and")


def _open_clip_merges(count: int) -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("tiny_clip_tokenizer needs open_clip_torch (it ships the CLIP BPE table)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1:count + 1]  # line 0 is the version header
    return [tuple(line.split()) for line in lines]


def tiny_clip_tokenizer(max_length: int = 77, merges: int = 500):
    """A CLIP BPE tokenizer with ``256 * 2 + merges + 2`` tokens; ``<|endoftext|>`` pads (as SD1.5's does)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    table = _open_clip_merges(merges)
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level symbols
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in table]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=table, model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 32):
    """A T5-layout Unigram tokenizer: every printable ASCII character is a piece, so no prompt maps to ``<unk>``."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -3.0) for word in _T5_WORDS]
    pieces += [(chr(code), -6.0) for code in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def save_tiny_clip_text(folder: str, hidden: int = 32, with_projection: bool = False, projection_dim: int | None = None,
                        layers: int = 3, heads: int = 2, max_length: int = 77, seed: int = 0,
                        encoder_subfolder: str = "text_encoder", tokenizer_subfolder: str = "tokenizer"):
    """Save a tiny CLIP text tower (+ ``text_projection`` of ``projection_dim`` when ``with_projection``) and its
    tokenizer under ``folder``; returns ``(model, tokenizer)``. ``layers`` >= 2 so a penultimate state exists."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer(max_length)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                            projection_dim=projection_dim or hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()
    model.save_pretrained(os.path.join(folder, encoder_subfolder))
    tokenizer.save_pretrained(os.path.join(folder, tokenizer_subfolder))
    return model, tokenizer


def save_tiny_t5(folder: str, hidden: int = 32, layers: int = 2, heads: int = 2, max_length: int = 32, seed: int = 0,
                 encoder_subfolder: str = "text_encoder", tokenizer_subfolder: str = "tokenizer"):
    """Save a tiny ``T5EncoderModel`` (width ``hidden``) and its tokenizer under ``folder``; returns
    ``(model, tokenizer)``. The tokenizer's ``model_max_length`` is ``max_length``."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer(max_length)
    config = T5Config(vocab_size=len(tokenizer), d_model=hidden, d_kv=hidden // heads, d_ff=2 * hidden,
                      num_layers=layers, num_heads=heads, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    model.save_pretrained(os.path.join(folder, encoder_subfolder))
    tokenizer.save_pretrained(os.path.join(folder, tokenizer_subfolder))
    return model, tokenizer


def _merge_index(folder: str, kind: str, entries: dict[str, list[str]]):
    path = os.path.join(folder, "model_index.json")
    index = {"_class_name": PIPELINE_CLASS[kind], "_diffusers_version": "0.42.1"}
    if os.path.isfile(path):
        with open(path) as handle:
            index = json.load(handle)
    index.update(entries)
    with open(path, "w") as handle:
        json.dump(index, handle, indent=2)


def add_tiny_text_encoders(folder: str, kind: str, width: int = 16, pooled_width: int = 8,
                           t5_max_length: int = 32) -> dict:
    """Write the text encoders + tokenizers of pipeline ``kind`` into ``folder`` and register them in model_index.json.

    Widths: sd15 -- CLIP-L stand-in of width ``width``; sdxl -- two CLIPs of width ``width // 2`` (states concatenate
    to ``width``), the second with projection ``pooled_width``; sd3 -- CLIPs of width ``width // 2 - 2`` with
    projections ``pooled_width // 2`` each (so the concatenated CLIP states are zero-padded to the T5 width) + T5 of
    width ``width``; pixart -- T5 of width ``width``; flux -- CLIP of width ``pooled_width`` (its pooler output is the
    pooled vector) + T5 of width ``width``. Returns ``{component name: module or tokenizer}`` for building the
    diffusers pipeline object by hand."""
    if kind not in PIPELINE_CLASS:
        raise ValueError(f"unknown pipeline kind {kind!r}; known: {sorted(PIPELINE_CLASS)}")
    parts: dict = {}

    def clip(suffix: str, hidden: int, projection: int | None, seed: int):
        model, tokenizer = save_tiny_clip_text(folder, hidden=hidden, with_projection=projection is not None,
                                               projection_dim=projection, seed=seed,
                                               encoder_subfolder="text_encoder" + suffix,
                                               tokenizer_subfolder="tokenizer" + suffix)
        parts["text_encoder" + suffix], parts["tokenizer" + suffix] = model, tokenizer

    def t5(suffix: str):
        model, tokenizer = save_tiny_t5(folder, hidden=width, max_length=t5_max_length, seed=3,
                                        encoder_subfolder="text_encoder" + suffix,
                                        tokenizer_subfolder="tokenizer" + suffix)
        parts["text_encoder" + suffix], parts["tokenizer" + suffix] = model, tokenizer

    if kind == "sd15":
        clip("", width, None, 0)
    elif kind == "sdxl":
        clip("", width // 2, None, 0)
        clip("_2", width // 2, pooled_width, 1)
    elif kind == "sd3":
        clip("", width // 2 - 2, pooled_width // 2, 0)
        clip("_2", width // 2 - 2, pooled_width - pooled_width // 2, 1)
        t5("_3")
    elif kind == "pixart":
        t5("")
    else:  # flux
        clip("", pooled_width, None, 0)
        t5("_2")
    _merge_index(folder, kind, {name: ["transformers", type(part).__name__] for name, part in parts.items()})
    return parts
