"""The prompt-only DataModule: prompt files and their errors, exact mid-epoch resume, DDP shards, the embedding cache."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.utils.data import DistributedSampler

from datamodules.prompts import EmbeddingCache, PromptDataModule, PromptFileError, read_prompts
from lightning_modules.conditioning import TextCondition
from lightning_modules.conditioning.text_encoders import EncodedText, TextEncoder

PROMPTS = [f"prompt number {i}" for i in range(23)]


class HashEncoder(TextEncoder):
    """Deterministic stand-in encoder: embeddings from a hash of each word (no model to load)."""

    max_length = 4

    def __init__(self, salt: int = 0):
        super().__init__()
        self.salt = salt
        self.calls = 0

    @property
    def identity(self):
        return f"HashEncoder:{self.salt}"

    def encode(self, prompts):
        self.calls += 1
        rows = []
        for prompt in prompts:
            words = (prompt.split() + [""] * 4)[:4]
            rows.append(torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(
                (hash(w) + self.salt) % 2 ** 31)) for w in words]))
        embeds = torch.stack(rows)
        return EncodedText(embeds, embeds.mean(1), torch.ones(len(prompts), 4, dtype=torch.long))


def _txt(tmp_path, lines, name="p.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _module(path, **kwargs):
    kwargs.setdefault("text_encoder", HashEncoder())
    return PromptDataModule(path, shape=[2, 3], batch_size=5, batches_per_epoch=12, **kwargs)


def test_formats_read_the_same_prompts_and_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = list(range(len(PROMPTS)))
    (tmp_path / "p.csv").write_text("prompt,label\n" + "\n".join(f'"{p}",{l}' for p, l in zip(PROMPTS, labels)))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p, "label": l}) for p, l in zip(PROMPTS, labels)))
    pq.write_table(pa.table({"prompt": PROMPTS, "label": labels}), tmp_path / "p.parquet")
    assert read_prompts(_txt(tmp_path, PROMPTS)) == (PROMPTS, None)
    for suffix in ("csv", "jsonl", "parquet"):
        assert read_prompts(str(tmp_path / f"p.{suffix}"), label_column="label") == (PROMPTS, labels)


def test_bad_prompt_files_name_the_file_and_line(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(PromptFileError, match="empty.txt: no prompts"):
        read_prompts(str(empty))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nbro\xffken\n")
    with pytest.raises(PromptFileError, match=r"bad.txt, line 3: not UTF-8"):
        read_prompts(str(bad))
    with caplog.at_level(logging.WARNING):
        prompts, _ = read_prompts(_txt(tmp_path, ["a", "", "b", "   "], "blank.txt"))
    assert prompts == ["a", "b"] and "skipped 2 blank prompt line(s) (first at line 2)" in caplog.text
    with pytest.raises(PromptFileError, match="2 blank prompt"):
        read_prompts(str(tmp_path / "blank.txt"), blank_lines="error")
    (tmp_path / "c.csv").write_text("text,label\nhello,1\n")
    with pytest.raises(PromptFileError, match=r"no column 'prompt'; columns are \['text', 'label'\]"):
        read_prompts(str(tmp_path / "c.csv"))
    (tmp_path / "n.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(PromptFileError, match="n.jsonl, line 2: prompt must be text, got int"):
        read_prompts(str(tmp_path / "n.jsonl"))
    (tmp_path / "l.csv").write_text("prompt,label\nhello,seven\n")
    with pytest.raises(PromptFileError, match="label 'seven'"):
        read_prompts(str(tmp_path / "l.csv"), label_column="label")


def test_batches_are_deterministic_shuffled_and_cover_every_prompt(tmp_path):
    datamodule = _module(_txt(tmp_path, PROMPTS))
    batches = list(datamodule.train_dataloader())
    again = list(_module(_txt(tmp_path, PROMPTS)).train_dataloader())
    assert len(batches) == 12 and all(b["noise"].shape == (5, 2, 3) for b in batches)
    assert all(isinstance(b["cond"], TextCondition) and len(b["cond"]) == 5 for b in batches)
    assert [b["prompts"] for b in batches] == [b["prompts"] for b in again]
    assert all(torch.equal(a["noise"], b["noise"]) for a, b in zip(batches, again))
    stream = [p for b in batches for p in b["prompts"]]
    assert sorted(stream[:23]) == sorted(PROMPTS) and sorted(stream[23:46]) == sorted(PROMPTS)  # a pass = a permutation
    assert stream[:23] != PROMPTS and stream[:23] != stream[23:46]                           # shuffled, anew per pass
    first = batches[0]
    expected = HashEncoder().condition(first["prompts"])
    assert torch.equal(first["cond"].embeds, expected.embeds) and torch.equal(first["cond"].null_embeds,
                                                                              expected.null_embeds)


def test_loader_resumes_mid_epoch_at_the_exact_batch(tmp_path):
    path = _txt(tmp_path, PROMPTS)
    loader = _module(path).train_dataloader()
    iterator = iter(loader)
    for _ in range(5):
        next(iterator)
    state = loader.state_dict()
    rest = list(iterator)
    resumed = _module(path).train_dataloader()
    resumed.load_state_dict(state)
    again = list(resumed)
    assert state["batches_done"] == 5 and len(again) == len(rest) == 7
    assert [b["prompts"] for b in again] == [b["prompts"] for b in rest]
    assert all(torch.equal(a["noise"], b["noise"]) and torch.equal(a["cond"].embeds, b["cond"].embeds)
               for a, b in zip(again, rest))


def test_ddp_ranks_get_disjoint_shards_covering_the_epoch(tmp_path):
    dataset = _module(_txt(tmp_path, PROMPTS)).train_dataloader().dataset
    shards = [list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(12))
    # the same index gives the same batch on any rank: nothing to coordinate
    assert dataset[shards[1][0]]["prompts"] == _module(_txt(tmp_path, PROMPTS)).train_dataloader().dataset[
        shards[1][0]]["prompts"]


def test_text_condition_moves_to_device_inside_a_batch(tmp_path):
    from lightning.fabric.utilities.apply_func import move_data_to_device

    batch = next(iter(_module(_txt(tmp_path, PROMPTS)).train_dataloader()))
    moved = move_data_to_device(batch, torch.device("meta"))
    assert isinstance(moved["cond"], TextCondition)
    assert moved["cond"].embeds.device.type == "meta" and moved["cond"].null_pooled.device.type == "meta"
    assert moved["prompts"] == batch["prompts"]


def test_embedding_cache_equals_fresh_encoding_and_is_keyed_by_encoder(tmp_path):
    path = _txt(tmp_path, PROMPTS)
    cached = _module(path, cache_dir=str(tmp_path / "cache"), negative_prompt="blurry")
    cached.setup("fit")
    reloaded = _module(path, cache_dir=str(tmp_path / "cache"), negative_prompt="blurry")
    reloaded.setup("fit")
    assert reloaded.text_encoder.calls == 0                      # everything came from the file
    batch = reloaded.train_dataloader().dataset[3]
    fresh = HashEncoder().condition(batch["prompts"], "blurry")
    assert torch.equal(batch["cond"].embeds, fresh.embeds) and torch.equal(batch["cond"].pooled, fresh.pooled)
    assert torch.equal(batch["cond"].null_embeds, fresh.null_embeds)
    other = _module(path, cache_dir=str(tmp_path / "cache"), text_encoder=HashEncoder(salt=5))
    other.setup("fit")
    assert other.text_encoder.calls > 0 and other.cache.path != cached.cache.path  # no stale reuse
    assert not torch.equal(other.train_dataloader().dataset[3]["cond"].embeds, batch["cond"].embeds)
    with open(cached.cache.path, "wb") as handle:
        handle.write(b"not a safetensors file")
    with pytest.raises(ValueError, match="text-embedding cache .* is damaged"):
        EmbeddingCache(str(tmp_path / "cache"), HashEncoder())


def test_labels_from_a_parser_and_evaluation_api(tmp_path):
    path = _txt(tmp_path, ["a handwritten 3", "a handwritten 7"])
    datamodule = _module(path, label_parser="tests.test_prompt_datamodules.last_digit")
    batch = datamodule.train_dataloader().dataset[0]
    assert batch["cond"].labels.tolist() == [last_digit(p) for p in batch["prompts"]]
    prompts = datamodule.evaluation_prompts(5)
    assert prompts == ["a handwritten 3", "a handwritten 7"] * 2 + ["a handwritten 3"]
    assert datamodule.evaluation_conditions(prompts).labels.tolist() == [3, 7, 3, 7, 3]
    assert torch.equal(datamodule.evaluation_noise(4, 1), datamodule.evaluation_noise(4, 1))
    with pytest.raises(ValueError, match="not an importable function"):
        _module(path, label_parser="no.such.function")


def last_digit(prompt: str) -> int:
    return int(prompt.strip()[-1])
