"""The image-text pair DataModule: images decoded to their exact [-1, 1] values and paired with their own captions,
caption-file formats and their errors, determinism, exact mid-epoch resume, DDP shards, the embedding cache, the
validation split, and a DMD2 GAN step on a tiny latent SD1.5 teacher consuming a batch's real images."""
from __future__ import annotations

import csv
import hashlib
import json
import logging

import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from datamodules import ImageTextDataModule
from datamodules.image_text import load_image, read_pairs
from datamodules.prompts import PromptFileError
from lightning_modules.conditioning import TextCondition
from lightning_modules.conditioning.text_encoders import EncodedText, TextEncoder

N = 12
CAPTIONS = [f"picture number {i}" for i in range(N)]


def colour(i: int) -> tuple[int, int, int]:
    """Pixel value of image i: its index is in every channel."""
    return (20 * i, 20 * i + 3, 250 - 20 * i)


def expected_image(i: int, size: int = 8) -> torch.Tensor:
    return (torch.tensor(colour(i), dtype=torch.float32) / 127.5 - 1.0).view(3, 1, 1).expand(3, size, size)


def index_of(caption: str) -> int:
    return int(caption.split()[-1])


class WordHashEncoder(TextEncoder):
    """Deterministic stand-in encoder: each of the first 4 words embeds to a vector seeded by its sha256."""

    max_length = 4

    def __init__(self, width: int = 3, salt: int = 0):
        super().__init__()
        self.width, self.salt, self.calls = width, salt, 0

    @property
    def identity(self):
        return f"WordHashEncoder:{self.width}:{self.salt}"

    def encode(self, prompts):
        self.calls += 1
        rows = []
        for prompt in prompts:
            words = (prompt.split() + [""] * 4)[:4]
            seeds = [int(hashlib.sha256(f"{self.salt}:{w}".encode()).hexdigest()[:8], 16) for w in words]
            rows.append(torch.stack([torch.randn(self.width, generator=torch.Generator().manual_seed(s))
                                     for s in seeds]))
        embeds = torch.stack(rows)
        return EncodedText(embeds, embeds.mean(1), torch.ones(len(prompts), 4, dtype=torch.long))


@pytest.fixture
def folder(tmp_path):
    """12 constant-colour 8x8 PNGs under root/images plus root/metadata.jsonl pairing image i with caption i."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for i in range(N):
        pixels = torch.tensor(colour(i), dtype=torch.uint8).view(1, 1, 3).expand(8, 8, 3).contiguous()
        Image.fromarray(pixels.numpy()).save(root / "images" / f"{i:02d}.png")
    rows = [{"file_name": f"images/{i:02d}.png", "text": CAPTIONS[i]} for i in range(N)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return root


def _module(root, captions="metadata.jsonl", **kwargs):
    kwargs.setdefault("text_encoder", WordHashEncoder())
    kwargs.setdefault("batch_size", 5)
    kwargs.setdefault("batches_per_epoch", 12)
    return ImageTextDataModule(str(root), captions, shape=[2, 3], image_size=8, **kwargs)


def _assert_paired(batch, size=8):
    for row, caption in enumerate(batch["prompts"]):
        assert torch.equal(batch["real_images"][row], expected_image(index_of(caption), size)), (row, caption)


def test_images_round_trip_and_are_paired_with_their_own_captions(folder):
    datamodule = _module(folder)
    batch = datamodule.train_dataloader().dataset[0]
    assert set(batch) == {"noise", "cond", "prompts", "real_images", "real_cond"}
    assert batch["noise"].shape == (5, 2, 3) and batch["real_images"].shape == (5, 3, 8, 8)
    assert batch["real_images"].dtype == torch.float32 and datamodule.image_shape == (3, 8, 8)
    _assert_paired(batch)
    # image 0 is (0, 3, 250): -1, 3/127.5 - 1, 250/127.5 - 1 exactly
    zero = _module(folder).real_images(datamodule.train_pairs, [0])[0]
    assert torch.equal(zero[:, 0, 0], torch.tensor([0.0, 3.0, 250.0]) / 127.5 - 1.0) and zero[0, 0, 0] == -1.0
    expected = WordHashEncoder().condition(batch["prompts"])
    assert isinstance(batch["cond"], TextCondition) and batch["real_cond"] is batch["cond"]
    assert torch.equal(batch["cond"].embeds, expected.embeds)
    assert torch.equal(batch["cond"].null_embeds, expected.null_embeds)
    # downscaling keeps a constant image constant; grayscale is PIL's L = (299 R + 587 G + 114 B) / 1000
    small = ImageTextDataModule(str(folder), "metadata.jsonl", shape=[2, 3], image_size=4, text_encoder=WordHashEncoder(),
                                batch_size=5, batches_per_epoch=2).train_dataloader().dataset[1]
    _assert_paired(small, size=4)
    gray = _module(folder, channels=1).train_dataloader().dataset[1]
    assert gray["real_images"].shape == (5, 1, 8, 8)
    for row, caption in enumerate(gray["prompts"]):
        r, g, b = colour(index_of(caption))
        luma = (r * 299 + g * 587 + b * 114 + 500) // 1000
        assert torch.allclose(gray["real_images"][row], torch.full((1, 8, 8), luma / 127.5 - 1.0), atol=1 / 127.5)


def test_crop_and_stretch_resizing(tmp_path):
    # 16 x 24 (H x W): columns 0-3 and 20-23 black, 4-19 white; nearest keeps values exact
    pixels = torch.zeros(16, 24, dtype=torch.uint8)
    pixels[:, 4:20] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(pixels.numpy(), mode="L").save(path)
    cropped = load_image(str(path), 8, channels=1, resize="crop", interpolation="nearest")
    assert cropped.shape == (1, 8, 8) and (cropped == 255).all()          # short side 16 -> 8, centre 8 of 12 columns
    stretched = load_image(str(path), 8, channels=1, resize="stretch", interpolation="nearest")
    assert stretched.shape == (1, 8, 8)
    assert stretched[0, :, 0].eq(0).all() and stretched[0, :, -1].eq(0).all() and stretched[0, :, 2:6].eq(255).all()
    rgb = load_image(str(path), 8, channels=3, interpolation="nearest")
    assert rgb.shape == (3, 8, 8) and (rgb == 255).all()


def test_caption_formats_read_the_same_pairs(folder):
    rows = [(f"images/{i:02d}.png", CAPTIONS[i]) for i in range(N)]
    with open(folder / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    (folder / "pairs.txt").write_text("\n".join(f"{p}\t{c}" for p, c in rows) + "\n", encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"image": [p for p, _ in rows], "caption": [c for _, c in rows]}), folder / "pairs.parquet")
    reference = read_pairs(str(folder / "metadata.jsonl"), str(folder))
    assert reference.captions == CAPTIONS and reference.lines == list(range(1, N + 1))
    assert reference.files == [str(folder / "images" / f"{i:02d}.png") for i in range(N)]
    for name in ("pairs.csv", "pairs.parquet"):
        pairs = read_pairs(str(folder / name), str(folder), image_column="image", caption_column="caption")
        assert (pairs.files, pairs.captions) == (reference.files, reference.captions), name
    txt = read_pairs(str(folder / "pairs.txt"), str(folder))
    assert (txt.files, txt.captions) == (reference.files, reference.captions)
    assert read_pairs(str(folder / "pairs.csv"), str(folder), "image", "caption").lines == list(range(2, N + 2))
    # the module resolves a relative captions file under root, with its columns
    datamodule = _module(folder, "pairs.csv", image_column="image", caption_column="caption")
    _assert_paired(datamodule.train_dataloader().dataset[2])


def test_batches_are_deterministic_and_each_pass_is_a_permutation_of_the_pairs(folder):
    batches = list(_module(folder).train_dataloader())
    again = list(_module(folder).train_dataloader())
    other = list(_module(folder, seed=1).train_dataloader())
    assert len(batches) == 12
    assert [b["prompts"] for b in batches] == [b["prompts"] for b in again]
    assert all(torch.equal(a["noise"], b["noise"]) and torch.equal(a["real_images"], b["real_images"])
               for a, b in zip(batches, again))
    assert [b["prompts"] for b in batches] != [b["prompts"] for b in other]
    assert not torch.equal(batches[0]["noise"], other[0]["noise"])
    stream = [index_of(p) for b in batches for p in b["prompts"]]
    assert sorted(stream[:N]) == list(range(N)) and sorted(stream[N:2 * N]) == list(range(N))
    assert stream[:N] != list(range(N)) and stream[:N] != stream[N:2 * N]
    for batch in batches:
        _assert_paired(batch)


def test_loader_resumes_mid_epoch_at_the_exact_batch(folder):
    loader = _module(folder).train_dataloader()
    iterator = iter(loader)
    for _ in range(5):
        next(iterator)
    state = loader.state_dict()
    rest = list(iterator)
    resumed = _module(folder).train_dataloader()
    resumed.load_state_dict(state)
    again = list(resumed)
    assert state["batches_done"] == 5 and len(again) == len(rest) == 7
    assert [b["prompts"] for b in again] == [b["prompts"] for b in rest]
    assert all(torch.equal(a["noise"], b["noise"]) and torch.equal(a["real_images"], b["real_images"])
               and torch.equal(a["cond"].embeds, b["cond"].embeds) for a, b in zip(again, rest))


def test_ddp_ranks_get_disjoint_shards_of_identical_batches(folder):
    dataset = _module(folder).train_dataloader().dataset
    shards = [list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(12))
    elsewhere = _module(folder).train_dataloader().dataset[shards[1][0]]
    here = dataset[shards[1][0]]
    assert here["prompts"] == elsewhere["prompts"] and torch.equal(here["real_images"], elsewhere["real_images"])


def test_embedding_cache_is_used_when_cache_dir_is_given(folder, tmp_path):
    cache_dir = str(tmp_path / "cache")
    first = _module(folder, cache_dir=cache_dir, negative_prompt="blurry")
    first.setup("fit")
    assert first.text_encoder.calls == 1
    reloaded = _module(folder, cache_dir=cache_dir, negative_prompt="blurry")
    reloaded.setup("fit")
    assert reloaded.text_encoder.calls == 0 and reloaded.cache.path == first.cache.path
    batch = reloaded.train_dataloader().dataset[3]
    assert reloaded.text_encoder.calls == 0                       # batches are built from the cache alone
    fresh = WordHashEncoder().condition(batch["prompts"], "blurry")
    assert torch.equal(batch["cond"].embeds, fresh.embeds) and torch.equal(batch["cond"].pooled, fresh.pooled)
    assert torch.equal(batch["cond"].null_embeds, fresh.null_embeds)
    _assert_paired(batch)


def test_validation_split_and_evaluation_pairs(folder):
    datamodule = _module(folder, val_fraction=0.25, split_seed=3)
    train, val = datamodule.train_pairs, datamodule.val_pairs
    assert len(train) == 9 and len(val) == 3 and not set(train.files) & set(val.files)
    assert sorted(train.files + val.files) == sorted(read_pairs(str(folder / "metadata.jsonl"), str(folder)).files)
    assert val.lines == sorted(val.lines) and datamodule.val_prompts == val.captions
    assert datamodule.prompts == train.captions
    assert _module(folder, val_fraction=0.25, split_seed=3, seed=7).val_pairs.files == val.files  # seed-independent
    val_batch = next(iter(datamodule.val_dataloader()))
    assert set(index_of(p) for p in val_batch["prompts"]) <= set(index_of(c) for c in val.captions)
    _assert_paired(val_batch)
    images, prompts = datamodule.evaluation_pairs(5)
    assert prompts == datamodule.evaluation_prompts(5) == [val.captions[i % 3] for i in range(5)]
    assert all(torch.equal(images[j], expected_image(index_of(p))) for j, p in enumerate(prompts))
    # a separate validation captions file, same root
    (folder / "val.jsonl").write_text(json.dumps({"file_name": "images/11.png", "text": CAPTIONS[11]}) + "\n")
    separate = _module(folder, val_captions_file="val.jsonl")
    assert separate.val_prompts == [CAPTIONS[11]] and len(separate.train_pairs) == N
    with pytest.raises(ValueError, match="val_captions_file or val_fraction, not both"):
        _module(folder, val_captions_file="val.jsonl", val_fraction=0.5)
    with pytest.raises(ValueError, match="holds out no validation pair"):
        _module(folder, val_fraction=0.01)


def test_bad_captions_files_name_the_file_and_row(folder, caplog):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        _module(folder, "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="image root .*nowhere"):
        _module(folder / "nowhere")
    (folder / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PromptFileError, match="empty.jsonl: no image-caption pairs"):
        _module(folder, "empty.jsonl")
    (folder / "bytes.txt").write_bytes(b"images/00.png\tfine\nimages/01.png\tbro\xffken\n")
    with pytest.raises(PromptFileError, match=r"bytes.txt, line 2: not UTF-8"):
        _module(folder, "bytes.txt")
    (folder / "notab.txt").write_text("images/00.png\tfine\nimages/01.png a caption\n")
    with pytest.raises(PromptFileError, match=r"notab.txt, line 2: expected '<image path>\\t<caption>'"):
        _module(folder, "notab.txt")
    (folder / "cols.csv").write_text("path,text\nimages/00.png,hello\n")
    with pytest.raises(PromptFileError, match=r"cols.csv: no column 'file_name'; columns are \['path', 'text'\]"):
        _module(folder, "cols.csv")
    (folder / "keys.jsonl").write_text('{"file_name": "images/00.png", "text": "a"}\n{"file_name": "images/01.png"}\n')
    with pytest.raises(PromptFileError, match=r"keys.jsonl, line 2: no key 'text'; keys are \['file_name'\]"):
        _module(folder, "keys.jsonl")
    (folder / "types.jsonl").write_text('{"file_name": 7, "text": "a"}\n')
    with pytest.raises(PromptFileError, match="types.jsonl, line 1: image path must be text, got int"):
        _module(folder, "types.jsonl")
    lines = [json.dumps({"file_name": f"images/{i:02d}.png", "text": CAPTIONS[i]}) for i in range(4)]
    lines[2] = json.dumps({"file_name": "images/gone.png", "text": "lost"})
    lines.append(json.dumps({"file_name": "images/also-gone.png", "text": "lost too"}))
    (folder / "gone.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptFileError, match=r"gone.jsonl, line 3: image 'images/gone.png' does not exist \(looked "
                                              r"for .*images/gone.png\); 2 row\(s\) in all name missing images"):
        _module(folder, "gone.jsonl")
    blank = [json.dumps({"file_name": f"images/{i:02d}.png", "text": "  " if i in (1, 3) else CAPTIONS[i]})
             for i in range(5)]
    (folder / "blank.jsonl").write_text("\n".join(blank) + "\n")
    with caplog.at_level(logging.WARNING):
        datamodule = _module(folder, "blank.jsonl")
    assert datamodule.prompts == [CAPTIONS[0], CAPTIONS[2], CAPTIONS[4]]
    assert datamodule.train_pairs.files[1].endswith("images/02.png")     # pairs stay aligned after skipping
    assert "blank.jsonl: skipped 2 row(s) with a blank caption (first at line 2)" in caplog.text
    with pytest.raises(PromptFileError, match="blank.jsonl: 2 row.s. with a blank caption, first at line 2"):
        _module(folder, "blank.jsonl", blank_lines="error")


def test_corrupt_image_is_named_with_its_captions_line(folder):
    (folder / "images" / "07.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    datamodule = _module(folder, batch_size=N, batches_per_epoch=1)       # one batch holds every pair
    with pytest.raises(ValueError, match=r"cannot read image .*images/07.png.*metadata.jsonl, line 8"):
        datamodule.train_dataloader().dataset[0]
    with pytest.raises(ValueError, match=r"cannot read image .*images/07.png.*metadata.jsonl, line 8"):
        _module(folder, verify_images=True)


def test_dmd2_gan_step_consumes_the_real_images_on_a_latent_sd15_teacher(folder, tmp_path):
    from lightning_modules.methods import DMD2
    from lightning_modules.networks import DiscriminatorHead, LatentAutoencoder
    from lightning_modules.pipelines import LatentTeacher
    from tests.tiny_pipelines import TEXT_WIDTH, save_tiny_sd15

    torch.manual_seed(0)
    pipeline = save_tiny_sd15(str(tmp_path / "sd15"))
    datamodule = ImageTextDataModule(str(folder), "metadata.jsonl", shape=[4, 8, 8], image_size=16,
                                     text_encoder=WordHashEncoder(width=TEXT_WIDTH), batch_size=2,
                                     batches_per_epoch=1)
    batch = datamodule.train_dataloader().dataset[0]
    assert batch["real_images"].shape == (2, 3, 16, 16)
    module = DMD2(teacher=LatentTeacher(pipeline), autoencoder=LatentAutoencoder(pipeline),
                  discriminator=DiscriminatorHead(16), gan_generator_weight=3e-3, gan_critic_weight=1e-2,
                  guidance_scale=2.0)
    assert module.needs_real_data
    batch = module.prepare_batch(batch)
    module._check_batch(batch)
    with torch.no_grad():
        assert torch.equal(batch["real"], module.autoencoder.encode(batch["real_images"]))
    assert batch["real"].shape == (2, 4, 8, 8)
    losses = module.critic_loss(batch)
    assert set(losses) == {"denoising", "gan", "loss"} and torch.isfinite(losses["loss"])
    head = list(module.discriminator.parameters())
    grads = torch.autograd.grad(losses["loss"], head)
    assert all(torch.isfinite(g).all() for g in grads) and sum(float(g.norm()) for g in grads) > 0
