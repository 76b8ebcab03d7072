"""Text-to-image metrics: CLIP score against an independent formula on a tiny random open_clip model loaded from a
local file, prompt adherence with the shipped MNIST classifier, and the TextToImageMetrics callback under
``trainer.validate`` and ``trainer.fit`` with its logged numbers checked against direct computations."""
from __future__ import annotations

import json
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from callbacks.text_metrics import TextToImageMetrics, load_image_folder, match_images
from lightning_modules.conditioning.condition import TextCondition
from lightning_modules.evaluation import feature_extractors as fx
from lightning_modules.evaluation.clip_score import CLIPScorer, register_model_config
from lightning_modules.evaluation.image_metrics import image_metrics
from lightning_modules.evaluation.prompt_adherence import prompt_adherence

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "patch_size": 7, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
N = 200  # prompts in the callback tests: more than the classifier's 128 features, so FID's covariances are full rank


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(fx.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "text-metrics-cache"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny open_clip model, its config JSON and its state dict saved as safetensors."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip")
    config_path = root / "model_config.json"
    config_path.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model = open_clip.create_model(register_model_config(TINY_CLIP), pretrained=None).eval()
    with torch.no_grad():  # a visible image / text similarity structure instead of near-zero init projections
        model.text_projection.normal_(0, 0.5)
    checkpoint = root / "open_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    return model, str(config_path), str(checkpoint)


@pytest.fixture(scope="module")
def mnist_test():
    from datamodules.images import MNISTDataModule

    images, labels = MNISTDataModule().split("test")
    return images[:N], labels[:N]


def independent_clip_score(model, images01, prompts):
    """Hessel et al. 2021 with w = 100 from open_clip's own encoders: 100 * max(cos, 0)."""
    cfg = model.visual.preprocess_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        image = model.encode_image((images01 - mean) / std)
        text = model.encode_text(open_clip.tokenize(prompts, context_length=TINY_CLIP["text_cfg"]["context_length"]))
    cosine = (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)
    return torch.clamp(100.0 * cosine, min=0.0)


def test_clip_score_matches_independent_formula(tiny_clip, tmp_path):
    from torchvision.transforms.v2 import functional as TF

    model, config_path, checkpoint = tiny_clip
    scorer = CLIPScorer(model_config=config_path, checkpoint=checkpoint)
    generator = torch.Generator().manual_seed(1)
    prompts = [f"a handwritten digit {i % 10}" for i in range(16)]
    gray = torch.rand((16, 1, 28, 28), generator=generator) * 2 - 1
    scores = scorer.score(gray, prompts, batch_size=5)  # batching must not change anything
    expected = independent_clip_score(model, ((gray + 1) / 2).repeat(1, 3, 1, 1), prompts)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert (scores > 1).all()

    # the clamp at 0: the same model with its text projection negated has cos -> -cos, so every score is 0
    from safetensors.torch import save_file

    flipped = {k: (-v if k == "text_projection" else v).contiguous() for k, v in model.state_dict().items()}
    save_file(flipped, str(tmp_path / "flipped.safetensors"))
    negative = CLIPScorer(model_config=config_path, checkpoint=str(tmp_path / "flipped.safetensors"))
    assert torch.equal(negative.score(gray, prompts), torch.zeros(16))

    # RGB 32x32 images: resized to the model's 28x28 with its bicubic interpolation (torchvision as the reference)
    rgb = torch.rand((16, 3, 32, 32), generator=generator) * 2 - 1
    resized = TF.resize((rgb + 1) / 2, [28, 28], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(scorer.score(rgb, prompts), independent_clip_score(model, resized.clamp(0, 1), prompts),
                               atol=1e-5, rtol=0)

    # the same weights as a DDP-style .pt checkpoint and the config as a dict load to the same scorer
    wrapped = tmp_path / "clip.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, wrapped)
    again = CLIPScorer(model_config=dict(TINY_CLIP), checkpoint=str(wrapped))
    torch.testing.assert_close(again.score(gray, prompts), scores, atol=1e-5, rtol=0)
    assert again.architecture == scorer.architecture and "clip.pt" in again.identity


def test_clip_checkpoint_errors_name_the_file(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    _, config_path, checkpoint = tiny_clip
    with pytest.raises(FileNotFoundError, match="no-such-clip.safetensors"):
        CLIPScorer(model_config=config_path, checkpoint=str(tmp_path / "no-such-clip.safetensors"))
    other = dict(TINY_CLIP, embed_dim=16)
    torch.manual_seed(0)
    wrong = tmp_path / "wrong-arch.safetensors"
    save_file(open_clip.create_model(register_model_config(other)).state_dict(), str(wrong))
    with pytest.raises(ValueError, match=r"wrong-arch\.safetensors.*shape mismatch"):
        CLIPScorer(model_config=config_path, checkpoint=str(wrong))
    partial = tmp_path / "partial.pt"
    torch.save({"logit_scale": torch.ones(())}, partial)
    with pytest.raises(ValueError, match=r"partial\.pt.*missing key"):
        CLIPScorer(model_config=config_path, checkpoint=str(partial))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not read CLIP checkpoint .*garbage.safetensors"):
        CLIPScorer(model_config=config_path, checkpoint=str(garbage))
    with pytest.raises(ValueError, match="exactly one of model_name"):
        CLIPScorer(model_name="ViT-B-32", model_config=config_path, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="not an open_clip model config"):
        CLIPScorer(model_config={"embed_dim": 8}, checkpoint=checkpoint)


def test_reference_images_match_the_datamodule_and_a_folder(mnist_test, tmp_path):
    from PIL import Image

    from datamodules.images import MNISTDataModule

    images, _ = mnist_test
    padded = MNISTDataModule(pad_to=32).split("test")[0][:20]
    torch.testing.assert_close(match_images(images[:20], (1, 32, 32), pad=True), padded, atol=0, rtol=0)
    for i in range(20):
        Image.fromarray(fx.to_uint8(images[i, 0]).numpy(), mode="L").save(tmp_path / f"{i:03d}.png")
    loaded = load_image_folder(str(tmp_path), 20, (1, 28, 28))
    assert torch.equal(fx.to_uint8(loaded), fx.to_uint8(images[:20]))  # exact through the uint8 PNG round trip
    assert load_image_folder(str(tmp_path), 4, (3, 14, 14)).shape == (4, 3, 14, 14)
    with pytest.raises(ValueError, match="holds 20 images, 30 are needed"):
        load_image_folder(str(tmp_path), 30, (1, 28, 28))


# ------------------------------------------------------------------------------------------- the callback end to end
class FakePrompts(LightningDataModule):
    """The evaluation API of PromptDataModule: MNIST captions of the first N test digits; the embedding carries the
    row index, so the fake student can 'draw' the matching test image."""

    def __init__(self, labels):
        super().__init__()
        self.labels = labels

    def evaluation_prompts(self, n):
        return [f"a handwritten digit {int(d)}" for d in self.labels[:n]]

    def evaluation_conditions(self, prompts):
        n = len(prompts)
        embeds = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 2, 4).clone()
        return TextCondition(embeds, null_embeds=torch.zeros(n, 2, 4), labels=self.labels[:n].clone())

    def evaluation_noise(self, n, seed):
        return torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


class FakeLatentStudent(LightningModule):
    """'Samples' latents = images / 2 (to_images decodes by doubling, as a latent teacher's VAE would): at NFE 1 the
    exact MNIST test image of each prompt, at NFE 2 a blurred, shifted one."""

    def __init__(self, images):
        super().__init__()
        self.images = images
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def sample(self, noise, cond, nfe=None):
        assert isinstance(cond, TextCondition) and noise.shape == (len(cond), 1, 28, 28)
        self.calls.append((nfe, len(cond)))
        images = self.images[cond.embeds[:, 0, 0].long()]
        if nfe == 2:
            images = (F.avg_pool2d(images, 3, 1, 1) + 0.3).clamp(-1, 1)
        return images / 2

    def to_images(self, samples):
        return samples * 2

    def training_step(self, batch, batch_idx):
        return self.weight * 0.0 + self.weight ** 2

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(callback, **kwargs):
    return Trainer(accelerator="cpu", devices=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_callback_under_validate_logs_direct_numbers(tiny_clip, mnist_test):
    model, config_path, checkpoint = tiny_clip
    images, labels = mnist_test
    callback = TextToImageMetrics(num_prompts=N, nfe=[1, 2], batch_size=64, clip_checkpoint=checkpoint,
                                  clip_model_config=config_path, reference="mnist-test", verbose=False)
    student = FakeLatentStudent(images)
    results = _trainer(callback).validate(student, datamodule=FakePrompts(labels), verbose=False)[0]
    assert sorted(student.calls) == sorted([(1, 64)] * 3 + [(1, 8)] + [(2, 64)] * 3 + [(2, 8)])  # batched

    prompts = [f"a handwritten digit {int(d)}" for d in labels]
    blurred = (F.avg_pool2d(images, 3, 1, 1) + 0.3).clamp(-1, 1)
    scorer = CLIPScorer(model_config=config_path, checkpoint=checkpoint)
    for nfe, generated in [(1, images), (2, blurred)]:
        assert results[f"val/clip_score_nfe{nfe}"] == pytest.approx(float(scorer.score(generated, prompts).mean()),
                                                                     abs=1e-5)
        direct = prompt_adherence(generated, labels)["accuracy"]
        assert results[f"val/prompt_adherence_nfe{nfe}"] == pytest.approx(direct, abs=1e-6)
    assert results["val/clip_score"] == results["val/clip_score_nfe1"]  # the headline key is the first NFE
    # NFE 1 reproduces the reference set exactly: FID ~ 0; the blurred, shifted set is far from it
    assert abs(results["val/prompt_fid_nfe1"]) < 1e-3
    fid_blurred = image_metrics(blurred, "direct-blurred", images, kid=False, prc=False, cache_reference=False)["fid"]
    assert results["val/prompt_fid_nfe2"] == pytest.approx(fid_blurred, rel=1e-4) and fid_blurred > 5.0
    assert results["val/prompt_adherence_nfe1"] > 0.97  # the shipped classifier reads true test digits
    assert callback.last_metrics[1]["protocol"]["fid"]["num_reference"] == N


def test_callback_in_fit_runs_every_n_validations(mnist_test):
    images, labels = mnist_test
    callback = TextToImageMetrics(num_prompts=N, nfe=[1], batch_size=100, reference=None, every_n_validations=2,
                                  verbose=False)  # adherence only: enabled by the conditions' labels
    student = FakeLatentStudent(images)
    trainer = _trainer(callback, max_epochs=3, limit_train_batches=1, num_sanity_val_steps=1)
    trainer.fit(student, datamodule=FakePrompts((labels + 1) % 10))  # prompts ask for the wrong digit
    assert callback.validations == 3 and [c[0] for c in student.calls] == [1, 1, 1, 1]  # validations 1 and 3
    assert trainer.callback_metrics["val/prompt_adherence_nfe1"] < 0.05
    assert "val/prompt_fid" not in trainer.callback_metrics and "val/clip_score" not in trainer.callback_metrics
    assert callback.state_dict() == {"validations": 3}
