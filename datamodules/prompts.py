"""Prompt-only regime: batches of noise and encoded prompts, no images (SwiftBrush / DMD2-SD / SiD-text distill so).

    PromptDataModule(prompt_file="prompts.txt", shape=[4, 64, 64], text_encoder=..., batch_size=...)

Prompt files: ``.txt`` (one prompt per line), ``.csv`` / ``.jsonl`` / ``.parquet`` (the ``column`` named; an optional
``label_column`` gives each prompt a class / concept id, see ``TextCondition.labels``). Bad files fail at construction
with the file and line named: a missing or empty file, bytes that are not UTF-8, a missing column (the available ones
are listed), a non-string prompt. Blank lines are skipped and counted in a warning (``blank_lines="error"`` makes them
an error instead). Prompts longer than the encoder's token limit are truncated; the warning (how many) is given once,
when the file is first encoded.

Batches: ``{"noise": (B, *shape), "cond": TextCondition, "prompts": list[str]}``. Item ``i`` of the training set is a
whole batch: its noise comes from generator seed (seed, i), its prompts are positions i*B .. (i+1)*B - 1 of a stream
that runs through successive permutations of the prompt list, permutation k drawn from seed (seed, k) -- so every run,
a resumed run (``ResumableDataLoader``: mid-epoch resume at the exact batch) and every DDP rank (Lightning's
distributed sampler shards the batch indices) see the same batches without coordination, and each pass over the
prompts is a fresh shuffle.

Embedding cache (``cache_dir``): the prompts' embeddings are computed once, at ``setup``, and stored in a safetensors
file, each entry keyed by sha256(encoder identity + "\\0" + prompt) (the unconditional / negative prompt's entry too).
Later runs only look them up, so the text encoder never needs the accelerator. The file is written atomically
(temporary file + rename); a damaged cache file is an error naming it (delete it to rebuild).
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import logging
import math
import os
from typing import Callable, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_modules.conditioning.condition import TextCondition
from lightning_modules.conditioning.text_encoders import EncodedText, TextEncoder

from .resumable import ResumableDataLoader

log = logging.getLogger(__name__)

PROMPT_FORMATS = (".txt", ".csv", ".jsonl", ".parquet")
BLANK_LINE_POLICIES = ("skip", "error")


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file (and line)."""


# ---------------------------------------------------------------------------------------------------- reading
def _decoded_lines(path: str) -> list[str]:
    with open(path, "rb") as handle:
        raw = handle.read()
    lines = raw.split(b"\n")
    decoded = []
    for number, line in enumerate(lines, start=1):
        try:
            decoded.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as error:
            raise PromptFileError(f"{path}, line {number}: not UTF-8 ({error.reason} at byte {error.start}: "
                                  f"{line[max(0, error.start - 10):error.start + 10]!r})") from None
    if decoded and decoded[-1] == "":
        decoded.pop()  # the newline that ends the file
    return decoded


def _rows(path: str, column: str, label_column: str | None) -> list[tuple[int, object, object]]:
    """(line number, prompt value, label value) per record of a csv / jsonl / parquet file."""
    suffix = os.path.splitext(path)[1].lower()
    wanted = [column] + ([label_column] if label_column else [])
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several types for damaged files
            raise PromptFileError(f"{path}: not a readable parquet file ({error})") from None
        for name in wanted:
            if name not in table.column_names:
                raise PromptFileError(f"{path}: no column {name!r}; columns are {table.column_names}")
        prompts = table.column(column).to_pylist()
        labels = table.column(label_column).to_pylist() if label_column else [None] * len(prompts)
        return [(i + 1, p, l) for i, (p, l) in enumerate(zip(prompts, labels))]
    text_lines = _decoded_lines(path)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO("\n".join(text_lines)))
        columns = reader.fieldnames or []
        for name in wanted:
            if name not in columns:
                raise PromptFileError(f"{path}: no column {name!r}; columns are {columns}")
        return [(reader.line_num, row[column], row.get(label_column) if label_column else None) for row in reader]
    rows = []
    for number, line in enumerate(text_lines, start=1):
        if not line.strip():
            rows.append((number, "", None))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise PromptFileError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        for name in wanted:
            if name not in record:
                raise PromptFileError(f"{path}, line {number}: no key {name!r}; keys are {sorted(record)}")
        rows.append((number, record[column], record.get(label_column) if label_column else None))
    return rows


def read_prompts(path: str, column: str = "prompt", label_column: str | None = None,
                 blank_lines: str = "skip") -> tuple[list[str], list[int] | None]:
    """Prompts (and labels, with ``label_column``) of a prompt file; see the module docstring for the rules."""
    if blank_lines not in BLANK_LINE_POLICIES:
        raise ValueError(f"blank_lines must be one of {BLANK_LINE_POLICIES}, got {blank_lines!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in PROMPT_FORMATS:
        raise PromptFileError(f"{path}: unknown prompt file type {suffix!r}; expected one of {PROMPT_FORMATS}")
    if suffix == ".txt":
        if label_column:
            raise PromptFileError(f"{path}: a .txt prompt file has no columns; label_column needs csv/jsonl/parquet")
        rows = [(n, line, None) for n, line in enumerate(_decoded_lines(path), start=1)]
    else:
        rows = _rows(path, column, label_column)
    prompts, labels, blank = [], [], []
    for number, value, label in rows:
        if value is not None and not isinstance(value, str):
            raise PromptFileError(f"{path}, line {number}: prompt must be text, got {type(value).__name__} {value!r}")
        if value is None or not value.strip():
            blank.append(number)
            continue
        prompts.append(value.strip())
        if label_column:
            try:
                labels.append(int(label))
            except (TypeError, ValueError):
                raise PromptFileError(f"{path}, line {number}: label {label!r} in column {label_column!r} is not "
                                      "an integer") from None
    if blank:
        if blank_lines == "error":
            raise PromptFileError(f"{path}: {len(blank)} blank prompt(s), first at line {blank[0]} "
                                  "(blank_lines='error')")
        log.warning("%s: skipped %d blank prompt line(s) (first at line %d)", path, len(blank), blank[0])
    if not prompts:
        raise PromptFileError(f"{path}: no prompts (the file is empty or only blank)")
    return prompts, (labels if label_column else None)


def _import(dotted: str) -> Callable:
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"label_parser {dotted!r} is not an importable function (module.function)") from None


# ---------------------------------------------------------------------------------------------------- cache
def cache_key(identity: str, prompt: str) -> str:
    return hashlib.sha256(f"{identity}\0{prompt}".encode()).hexdigest()


class EmbeddingCache:
    """Prompt embeddings of one encoder, in ``cache_dir/text-embeddings-<identity hash>.safetensors``."""

    def __init__(self, cache_dir: str, encoder: TextEncoder):
        self.identity = encoder.identity
        digest = hashlib.sha256(self.identity.encode()).hexdigest()[:16]
        self.path = os.path.join(cache_dir, f"text-embeddings-{digest}.safetensors")
        self.entries: dict[str, torch.Tensor] = {}
        if os.path.isfile(self.path):
            from safetensors.torch import load_file
            try:
                self.entries = load_file(self.path)
            except Exception as error:
                raise ValueError(f"text-embedding cache {self.path!r} is damaged ({error}); delete it to rebuild "
                                 "it") from None

    def has(self, prompt: str) -> bool:
        return f"{cache_key(self.identity, prompt)}.embeds" in self.entries

    def add(self, prompts: Sequence[str], encoded: EncodedText) -> None:
        for i, prompt in enumerate(prompts):
            key = cache_key(self.identity, prompt)
            for field in ("embeds", "pooled", "mask"):
                value = getattr(encoded, field)
                if value is not None:
                    self.entries[f"{key}.{field}"] = value[i].detach().cpu().contiguous()

    def lookup(self, prompts: Sequence[str]) -> EncodedText:
        keys = [cache_key(self.identity, p) for p in prompts]
        missing = [p for p, k in zip(prompts, keys) if f"{k}.embeds" not in self.entries]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} is not in the embedding cache {self.path}")

        def stack(field):
            if f"{keys[0]}.{field}" not in self.entries:
                return None
            return torch.stack([self.entries[f"{k}.{field}"] for k in keys])
        return EncodedText(stack("embeds"), stack("pooled"), stack("mask"))

    def save(self) -> None:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            save_file(self.entries, tmp, metadata={"identity": self.identity})
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


# ---------------------------------------------------------------------------------------------------- batches
class PromptBatches(Dataset):
    """Map-style dataset whose item ``i`` is a whole batch (see the module docstring)."""

    def __init__(self, owner: "PromptDataModule", prompts: list[str], labels: list[int] | None, num_batches: int,
                 seed: int):
        self.owner, self.prompts, self.labels = owner, prompts, labels
        self.num_batches, self.seed = num_batches, seed
        self._permutations: dict[int, torch.Tensor] = {}

    def __len__(self):
        return self.num_batches

    def _permutation(self, k: int) -> torch.Tensor:
        if k not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * k + 1)
            self._permutations = {k: torch.randperm(len(self.prompts), generator=generator)}
        return self._permutations[k]

    def indices(self, index: int) -> list[int]:
        size, n = self.owner.batch_size, len(self.prompts)
        positions = range(index * size, (index + 1) * size)
        return [int(self._permutation(p // n)[p % n]) for p in positions]

    def __getitem__(self, index: int) -> dict:
        rows = self.indices(index)
        prompts = [self.prompts[r] for r in rows]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        noise = torch.randn((len(rows), *self.owner.shape), generator=generator)
        labels = None if self.labels is None else torch.tensor([self.labels[r] for r in rows])
        return {"noise": noise, "cond": self.owner.conditions(prompts, labels), "prompts": prompts}


class PromptDataModule(LightningDataModule):
    """``shape``: one latent's shape (the teacher's data shape, e.g. [4, 64, 64] for SD1.5 at 512 px).
    ``text_encoder``: the teacher's own encoder (default: the embedded MiniLM). ``negative_prompt``: the unconditional
    branch of CFG (default: the empty prompt). ``val_prompt_file``: the prompts of validation and of the metric
    callbacks' ``evaluation_prompts`` (default: the training prompts). ``label_parser``: dotted path of a function
    prompt -> class id, for prompt sets whose ids are in the text (e.g. ``datamodules.mnist_captions.caption_digit``)."""
    provides_real_data = False  # prompts only (the pair regime is ImageTextDataModule)

    def __init__(self, prompt_file: str, shape: Sequence[int], text_encoder: TextEncoder | None = None,
                 column: str = "prompt", label_column: str | None = None, label_parser: str | None = None,
                 negative_prompt: str | None = None, batch_size: int = 32, batches_per_epoch: int = 1000,
                 val_prompt_file: str | None = None, val_batches: int = 4, seed: int = 0, num_workers: int = 0,
                 cache_dir: str | None = None, blank_lines: str = "skip"):
        super().__init__()
        if len(shape) == 0 or any(int(s) < 1 for s in shape):
            raise ValueError(f"shape must be a non-empty list of positive sizes, got {list(shape)}")
        for name, value in [("batch_size", batch_size), ("batches_per_epoch", batches_per_epoch),
                            ("val_batches", val_batches)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if label_column and label_parser:
            raise ValueError("give label_column or label_parser, not both")
        self.prompt_file, self.val_prompt_file = prompt_file, val_prompt_file
        self.prompts, labels, self.val_prompts, val_labels = self.read_prompt_files(
            prompt_file, val_prompt_file, column, label_column, blank_lines)
        self.label_fn = _import(label_parser) if label_parser else None
        if self.label_fn is not None:
            labels = [int(self.label_fn(p)) for p in self.prompts]
            val_labels = [int(self.label_fn(p)) for p in self.val_prompts]
        self.labels, self.val_labels = labels, val_labels
        self.shape, self.batch_size = tuple(int(s) for s in shape), batch_size
        self.batches_per_epoch, self.val_batches = batches_per_epoch, val_batches
        self.negative_prompt, self.seed, self.num_workers = negative_prompt, seed, num_workers
        self.cache_dir = cache_dir
        self._text_encoder = text_encoder
        self.cache: EmbeddingCache | None = None

    def read_prompt_files(self, prompt_file: str, val_prompt_file: str | None, column: str,
                          label_column: str | None, blank_lines: str):
        """(prompts, labels, validation prompts, validation labels); the validation set defaults to the training one.
        Subclasses reading other files (``ImageTextDataModule``: image-caption pairs) override this."""
        prompts, labels = read_prompts(prompt_file, column, label_column, blank_lines)
        if val_prompt_file is None:
            return prompts, labels, prompts, labels
        return (prompts, labels, *read_prompts(val_prompt_file, column, label_column, blank_lines))

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            from lightning_modules.conditioning.text_encoders import MiniLMTextEncoder
            self._text_encoder = MiniLMTextEncoder()
        return self._text_encoder

    # ------------------------------------------------------------------ encoding
    def setup(self, stage: str | None = None) -> None:
        if self.cache_dir is None or self.cache is not None:
            return
        cache = EmbeddingCache(self.cache_dir, self.text_encoder)
        wanted = list(dict.fromkeys([*self.prompts, *self.val_prompts, self.negative_prompt or ""]))
        missing = [p for p in wanted if not cache.has(p)]
        if missing:
            rank = getattr(getattr(self, "trainer", None), "global_rank", 0)
            for start in range(0, len(missing), 256):
                chunk = missing[start:start + 256]
                cache.add(chunk, self.text_encoder.encode(chunk))
            if rank == 0:
                cache.save()
            log.info("text-embedding cache %s: %d new prompt(s) encoded", cache.path, len(missing))
        self.cache = cache

    def encoded(self, prompts: Sequence[str]) -> EncodedText | None:
        if self.cache is None:
            return None
        return self.cache.lookup(prompts)

    def conditions(self, prompts: Sequence[str], labels: torch.Tensor | None = None) -> TextCondition:
        encoder = self.text_encoder
        if self.cache is not None:
            positive = self.cache.lookup(prompts)
            null = self.cache.lookup([self.negative_prompt or ""])
            expand = lambda t: None if t is None else t.expand(len(prompts), *t.shape[1:]).clone()  # noqa: E731
            cond = TextCondition(positive.embeds, positive.pooled, positive.mask if encoder.use_mask else None,
                                 expand(null.embeds), expand(null.pooled),
                                 expand(null.mask) if encoder.use_mask else None)
        else:
            cond = encoder.condition(list(prompts), self.negative_prompt)
        cond.labels = labels
        return cond

    # ------------------------------------------------------------------ evaluation API (metric callbacks, demo)
    def evaluation_prompts(self, n: int) -> list[str]:
        """``n`` validation prompts, cycling in file order (the same every call)."""
        return [self.val_prompts[i % len(self.val_prompts)] for i in range(n)]

    def evaluation_conditions(self, prompts: Sequence[str]) -> TextCondition:
        if self.cache is not None and not all(self.cache.has(p) for p in prompts):
            return self._uncached_conditions(prompts)
        labels = None
        if self.label_fn is not None:
            labels = torch.tensor([int(self.label_fn(p)) for p in prompts])
        elif self.val_labels is not None:
            table = dict(zip(self.val_prompts, self.val_labels))
            table.update(zip(self.prompts, self.labels or []))
            labels = torch.tensor([table[p] for p in prompts]) if all(p in table for p in prompts) else None
        return self.conditions(prompts, labels)

    def _uncached_conditions(self, prompts):
        cond = self.text_encoder.condition(list(prompts), self.negative_prompt)
        if self.label_fn is not None:
            cond.labels = torch.tensor([int(self.label_fn(p)) for p in prompts])
        return cond

    def evaluation_noise(self, n: int, seed: int = 1234) -> torch.Tensor:
        return torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed))

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset, resumable: bool):
        kwargs = {"progress_source": self} if resumable else {}
        return (ResumableDataLoader if resumable else DataLoader)(
            dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self):
        self.setup("fit")
        return self._loader(PromptBatches(self, self.prompts, self.labels, self.batches_per_epoch, self.seed), True)

    def val_dataloader(self):
        self.setup("validate")
        return self._loader(PromptBatches(self, self.val_prompts, self.val_labels, self.val_batches,
                                          10_000 + self.seed), False)

    def epoch_batches(self) -> int:
        """Batches per full pass over the training prompts."""
        return math.ceil(len(self.prompts) / self.batch_size)
