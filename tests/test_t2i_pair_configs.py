"""experiments/mnist_t2i/pairs: the image-text pair regime on the shipped text-to-image teacher.

scripts/make_mnist_image_text.py writes MNIST images with the captions the teacher was trained on; every pair config
builds on that folder and the shipped teacher, its batches carry the real images encoded to the teacher's 4x8x8
latents, and a critic and a generator step run with the method's real-data term (a discriminator head on the critic)
switched on: the head gets gradient from real versus generated latents, and its output reaches the generator.
"""
from __future__ import annotations

import glob
import json
import os
import sys

import pytest
import torch

from datamodules.image_text import ImageTextDataModule
from lightning_modules.conditioning.condition import TextCondition
from tests.toy_runs import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import make_mnist_image_text as pairs_script  # noqa: E402

ASSETS = os.environ.get("MNIST_T2I_ASSETS", os.path.join(ROOT, "assets", "mnist-t2i"))
PAIR_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "mnist_t2i", "pairs", "*.yaml")))
NUM_IMAGES = 32


def _files(folder) -> dict[str, bytes]:
    out = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def _leftovers(parent) -> list[str]:
    return sorted(name for name in os.listdir(parent) if name.startswith("."))


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory):
    return pairs_script.make(str(tmp_path_factory.mktemp("pairs") / "mnist-t2i-pairs"), NUM_IMAGES)


# ---------------------------------------------------------------------------------------------------- the script
def test_script_writes_the_teachers_own_pairs_deterministically(pair_folder, tmp_path):
    from datamodules.mnist_captions import mnist_captions

    again = pairs_script.make(str(tmp_path / "again"), NUM_IMAGES)
    files = _files(pair_folder)
    assert files == _files(again), "two runs with the same arguments wrote different bytes"
    assert sum(name.startswith("images" + os.sep) for name in files) == NUM_IMAGES
    assert _leftovers(tmp_path) == [], "the staging folder was left behind"
    images, captions, labels = mnist_captions("train")           # the teacher's training pairs
    rows = [json.loads(line) for line in files["metadata.jsonl"].decode().splitlines()]
    assert [r["text"] for r in rows] == captions[:NUM_IMAGES]
    assert [r["label"] for r in rows] == labels[:NUM_IMAGES].tolist()
    info = json.loads(files["info.json"])
    assert info["num_images"] == NUM_IMAGES and sum(info["digits"].values()) == NUM_IMAGES
    # read back as the configs read them: 32x32 grayscale, the teacher's zero-padded images to within 8-bit rounding
    datamodule = ImageTextDataModule(pair_folder, "metadata.jsonl", shape=[4, 8, 8], image_size=32, channels=1)
    served = datamodule.real_images(datamodule.train_pairs, range(NUM_IMAGES))
    assert served.shape == (NUM_IMAGES, 1, 32, 32) and datamodule.prompts == captions[:NUM_IMAGES]
    assert (served - pairs_script.padded(images[:NUM_IMAGES])).abs().max() <= 1 / 255 + 1e-6


def test_script_refuses_a_non_empty_output_unless_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    out.mkdir()
    (out / "keep.txt").write_text("someone's data")
    with pytest.raises(FileExistsError, match="is not empty; pass --overwrite"):
        pairs_script.make(str(out), 4)
    with pytest.raises(SystemExit) as exit_info:
        pairs_script.main(["--out", str(out), "--num-images", "4"])
    assert exit_info.value.code == 2
    assert sorted(os.listdir(out)) == ["keep.txt"] and _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="num_images must be in"):
        pairs_script.make(str(tmp_path / "other"), 0)
    with pytest.raises(ValueError, match="num_images must be in"):
        pairs_script.make(str(tmp_path / "other"), 10_001, split="test")

    def fail(folder, *args):  # a run that dies half-way leaves the old folder as it was and no staging folder
        open(os.path.join(folder, "partial"), "w").close()
        raise RuntimeError("interrupted")
    monkeypatch.setattr(pairs_script, "write_folder", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        pairs_script.make(str(out), 4, overwrite=True)
    assert sorted(os.listdir(out)) == ["keep.txt"] and _leftovers(tmp_path) == []
    monkeypatch.undo()

    pairs_script.make(str(out), 4, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and len(os.listdir(out / "images")) == 4
    assert _leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    pairs_script.make(str(empty), 2)                                  # an empty folder is no one's data
    assert len(os.listdir(empty / "images")) == 2


# ---------------------------------------------------------------------------------------------------- the configs
def _overrides(root, tmp_path):
    return ["--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.teacher.init_args.pipeline_path={ASSETS}",
            f"--model.init_args.autoencoder.init_args.pretrained_path={ASSETS}",
            f"--data.init_args.root={root}", f"--data.init_args.cache_dir={tmp_path / 'cache'}",
            "--data.init_args.batch_size=4"]


def _gradients(loss, parameters):
    grads = torch.autograd.grad(loss, parameters, allow_unused=True, retain_graph=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    return sum(0.0 if g is None else float(g.norm()) for g in grads)


def _seeded(loss_fn, batch, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return loss_fn(batch)


def test_the_four_real_data_methods_have_pair_configs():
    names = {os.path.splitext(os.path.basename(c))[0] for c in PAIR_CONFIGS}
    assert {"dmd2_gan", "sida", "fdistill", "uni_instruct"} <= names, sorted(names)


@pytest.mark.parametrize("config", PAIR_CONFIGS, ids=lambda c: os.path.basename(c))
def test_pair_config_builds_and_steps_with_its_real_data_term(config, pair_folder, tmp_path):
    torch.manual_seed(0)
    cli = build(config, *_overrides(pair_folder, tmp_path))
    module, datamodule = cli.model, cli.datamodule
    assert isinstance(datamodule, ImageTextDataModule)
    assert tuple(module.student.data_shape) == tuple(datamodule.shape) == (4, 8, 8)
    assert datamodule.image_shape == (1, 32, 32) and module.autoencoder is not None
    assert module.needs_real_data and module.discriminator is not None
    assert module.hparams.guidance_scale > 1
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["real_images"].shape == (4, 1, 32, 32) and isinstance(batch["real_cond"], TextCondition)
    assert batch["cond"].labels is not None  # label_parser: prompt adherence can be scored
    module.setup("fit")
    module.train()
    batch = module.prepare_batch(batch)
    module._check_batch(batch)
    with torch.no_grad():
        assert torch.equal(batch["real"], module.autoencoder.encode(batch["real_images"]))
    assert batch["real"].shape == (4, 4, 8, 8) and torch.isfinite(batch["real"]).all()

    # critic: denoising + the head's real-vs-generated loss; the head gets gradient, and the real latents (re-noised
    # without a gradient path) change the loss: same noise draws, other "real" latents, another GAN loss
    losses = _seeded(module.critic_loss, batch)
    assert "gan" in losses and torch.isfinite(losses["loss"]) and torch.isfinite(losses["gan"])
    assert torch.equal(_seeded(module.critic_loss, batch)["gan"], losses["gan"])
    other = _seeded(module.critic_loss, {**batch, "real": batch["real"].flip(0) * 0.5})["gan"]
    assert not torch.allclose(other, losses["gan"]), "the real latents do not enter the critic's loss"
    head = list(module.discriminator.parameters())
    critic = module.critic_parameters()
    assert {id(p) for p in head} <= {id(p) for p in critic}  # the head trains with the critic's optimizer
    assert _gradients(losses["loss"], head) > 0
    grads = torch.autograd.grad(losses["loss"], critic, allow_unused=True)
    with torch.no_grad():  # one critic step, so the generator sees a head that has seen real data
        for p, g in zip(critic, grads):
            if g is not None:
                p -= 1e-3 * g / max(float(g.norm()), 1e-12)

    # generator: the method's loss, with the head's non-saturating term reaching the generator's weights
    losses = module.generator_loss(batch)
    assert torch.isfinite(losses["loss"]) and torch.isfinite(losses["gan"]), {k: float(v) for k, v in losses.items()}
    generator = module.generator_parameters()
    assert _gradients(losses["loss"], generator) > 0
    assert _gradients(losses["gan"], generator) > 0, "the real-data head does not reach the generator"
