"""Image datamodules: MNIST (packaged pickle), scikit-learn digits and folders of PNG/JPEG files."""
import os

import pytest
import torch
from PIL import Image

from datamodules import DigitsDataModule, ImageFolderDataModule, MNISTDataModule
from datamodules.image_sources import seeded_split

BATCH_KEYS = {"real", "real_cond", "noise", "cond"}


def first_batch(datamodule):
    return next(iter(datamodule.train_dataloader()))


def check_batch(batch, batch_size, shape, conditional=True):
    assert set(batch) == (BATCH_KEYS if conditional else BATCH_KEYS - {"cond"})
    assert batch["real"].shape == (batch_size, *shape) and batch["real"].dtype == torch.float32
    assert batch["noise"].shape == batch["real"].shape
    assert batch["real_cond"].shape == (batch_size,) and batch["real_cond"].dtype == torch.long
    if conditional:
        assert torch.equal(batch["cond"], batch["real_cond"])


def assert_same_batches(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# MNIST -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist():
    try:
        datamodule = MNISTDataModule(batch_size=16)
        datamodule.split("train")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return datamodule


def test_mnist_splits_shapes_range_labels(mnist):
    sizes = {}
    for split in ("train", "val", "test"):
        images, labels = mnist.split(split)
        sizes[split] = len(images)
        assert images.shape[1:] == (1, 28, 28) and images.dtype == torch.float32 and len(labels) == len(images)
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert images.min() == -1.0 and images.max() > 0.9
        assert labels.dtype == torch.long and set(labels.unique().tolist()) == set(range(10))
    assert sizes == {"train": 50000, "val": 10000, "test": 10000}
    assert mnist.shape == (1, 28, 28) and mnist.num_classes == 10


def test_mnist_batches_and_determinism(mnist):
    batch = first_batch(mnist)
    check_batch(batch, 16, (1, 28, 28))
    other = MNISTDataModule(batch_size=16)
    assert torch.equal(other.split("val")[0], mnist.split("val")[0])
    assert_same_batches(first_batch(other), batch)
    assert_same_batches(first_batch(mnist), batch)  # a new epoch's loader starts from the same generator seed
    reseeded = MNISTDataModule(batch_size=16, seed=1)
    reseeded._cache = mnist._cache  # same images, skip reloading
    assert not torch.equal(first_batch(reseeded)["noise"], batch["noise"])
    val = next(iter(mnist.val_dataloader()))
    check_batch(val, 16, (1, 28, 28))
    assert torch.equal(val["real"], mnist.split("val")[0][:16])


def test_mnist_pad_and_unconditional(mnist):
    padded = MNISTDataModule(batch_size=8, pad_to=32, conditional=False)
    images, _ = padded.split("val")
    assert images.shape[1:] == (1, 32, 32)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (images[:, :, border] == -1.0).all()
    assert torch.equal(images[:, :, 2:30, 2:30], mnist.split("val")[0])
    padded._cache["train"] = padded._cache["val"]  # the batch contract is the same for any split
    check_batch(first_batch(padded), 8, (1, 32, 32), conditional=False)


@pytest.mark.parametrize("kwargs, value", [({"batch_size": 0}, "0"), ({"val_split": "bogus"}, "bogus"),
                                           ({"train_split": "nope"}, "nope"), ({"pad_to": 20}, "20")])
def test_mnist_invalid_arguments(kwargs, value):
    with pytest.raises(ValueError, match=value):
        MNISTDataModule(**kwargs)


# Digits ----------------------------------------------------------------------------------------------------------
def test_seeded_split_partitions():
    parts = seeded_split(1797, 0.1, 0.1, split_seed=3)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [1437, 180, 180]
    assert torch.equal(torch.cat(list(parts.values())).sort().values, torch.arange(1797))
    for kwargs in [dict(val_fraction=-0.1, test_fraction=0.1), dict(val_fraction=0.6, test_fraction=0.4)]:
        with pytest.raises(ValueError):
            seeded_split(10, split_seed=0, **kwargs)


def test_digits_splits_shapes_range_determinism():
    datamodule = DigitsDataModule(batch_size=32)
    splits = {s: datamodule.split(s) for s in ("train", "val", "test")}
    assert sum(len(images) for images, _ in splits.values()) == 1797
    assert len(splits["val"][0]) == len(splits["test"][0]) == 180
    for images, labels in splits.values():
        assert images.shape[1:] == (1, 8, 8) and images.min() == -1.0 and images.max() == 1.0
        assert set(labels.unique().tolist()) == set(range(10))
    # the three splits are disjoint: no image of val or test also appears in train
    train = {tuple(x.flatten().tolist()) for x in splits["train"][0]}
    assert sum(tuple(x.flatten().tolist()) in train for x in splits["test"][0]) < 10  # (digits has a few duplicates)
    # the split is fixed by split_seed, not by the training seed
    reseeded = DigitsDataModule(batch_size=32, seed=123)
    for split in ("train", "val", "test"):
        assert torch.equal(reseeded.split(split)[0], splits[split][0])
        assert torch.equal(reseeded.split(split)[1], splits[split][1])
    assert not torch.equal(DigitsDataModule(split_seed=1).split("val")[0], splits["val"][0])
    batch = first_batch(datamodule)
    check_batch(batch, 32, (1, 8, 8))
    assert_same_batches(first_batch(DigitsDataModule(batch_size=32)), batch)
    assert not torch.equal(first_batch(reseeded)["noise"], batch["noise"])
    assert datamodule.num_classes == 10 and datamodule.shape == (1, 8, 8)


def test_image_train_loader_resumes_mid_epoch_at_the_exact_batch():
    def loader():
        datamodule = DigitsDataModule(batch_size=64, seed=5)
        return datamodule.train_dataloader()

    epoch = [b["noise"] for b in loader()]
    interrupted = loader()
    iterator = iter(interrupted)
    for _ in range(4):
        next(iterator)
    state = interrupted.state_dict()
    assert state["batches_done"] == 4
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b["noise"] for b in resumed]
    assert len(rest) == len(epoch) - 4 and all(torch.equal(a, b) for a, b in zip(rest, epoch[4:]))


@pytest.mark.parametrize("size, mode", [(16, "bilinear"), (32, "nearest"), (4, "bicubic")])
def test_digits_resize(size, mode):
    datamodule = DigitsDataModule(batch_size=8, image_size=size, resize_mode=mode)
    images, labels = datamodule.split("val")
    base_images, base_labels = DigitsDataModule().split("val")
    assert images.shape == (len(base_images), 1, size, size) and torch.equal(labels, base_labels)
    assert images.min() >= -1.0 and images.max() <= 1.0
    if mode == "nearest":  # integer upscaling by nearest repeats pixels exactly
        assert torch.equal(images[:, :, ::4, ::4], base_images)
    assert torch.allclose(images.mean(dim=(2, 3)), base_images.mean(dim=(2, 3)), atol=0.1)
    check_batch(first_batch(datamodule), 8, (1, size, size))


def test_digits_invalid_arguments():
    for kwargs, value in [({"image_size": 0}, "0"), ({"resize_mode": "cubic"}, "cubic"),
                          ({"val_fraction": 1.5}, "1.5"), ({"batch_size": -1}, "-1")]:
        with pytest.raises(ValueError, match=value):
            DigitsDataModule(**kwargs)


# Folders ---------------------------------------------------------------------------------------------------------
COLOURS = {"cats": (250, 10, 10), "dogs": (10, 10, 250)}


def write_image(path, size, colour, fmt):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def make_class_folder(root):
    """6 cats (PNG) and 4 dogs (JPEG, one nested deeper, mixed-case extensions) of assorted sizes; plus noise."""
    sizes = [(20, 12), (12, 20), (16, 16), (40, 30), (9, 11), (25, 17)]
    for i, size in enumerate(sizes):
        write_image(str(root / "cats" / f"cat{i}.png"), size, COLOURS["cats"], "PNG")
    for i, (name, size) in enumerate([("a.jpg", (30, 18)), ("b.JPEG", (18, 30)), ("c.Jpg", (64, 48)),
                                      (os.path.join("deep", "d.jpeg"), (10, 10))]):
        write_image(str(root / "dogs" / name), size, COLOURS["dogs"], "JPEG")
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    write_image(str(root / ".hidden" / "x.png"), (8, 8), (0, 0, 0), "PNG")
    return root


def all_splits(datamodule):
    return {s: datamodule.split(s) for s in ("train", "val", "test")}


def test_image_folder_classes_shapes_labels(tmp_path):
    root = make_class_folder(tmp_path / "data")
    datamodule = ImageFolderDataModule(str(root), image_size=8, channels=3, batch_size=2, val_fraction=0.2,
                                       test_fraction=0.2)
    assert datamodule.class_names == ["cats", "dogs"] and datamodule.num_classes == 2
    assert ImageFolderDataModule.num_classes == 0  # an instance attribute, the class default untouched
    assert len(datamodule.files) == 10 and datamodule.conditional
    splits = all_splits(datamodule)
    assert [len(splits[s][0]) for s in ("train", "val", "test")] == [6, 2, 2]
    labels = torch.cat([splits[s][1] for s in splits])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 4
    for images, split_labels in splits.values():
        assert images.shape[1:] == (3, 8, 8) and images.min() >= -1.0 and images.max() <= 1.0
        # solid colours survive resize + crop (JPEG within a few levels): red for cats, blue for dogs
        red_minus_blue = images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))
        assert torch.equal(red_minus_blue > 1.5, split_labels == 0)
        assert torch.equal(red_minus_blue < -1.5, split_labels == 1)
    check_batch(first_batch(datamodule), 2, (3, 8, 8))
    # deterministic: a second instance with another training seed holds out the same files
    other = ImageFolderDataModule(str(root), image_size=8, batch_size=2, val_fraction=0.2, test_fraction=0.2, seed=7)
    assert other.split_files == datamodule.split_files
    for split, (images, split_labels) in all_splits(other).items():
        assert torch.equal(images, splits[split][0]) and torch.equal(split_labels, splits[split][1])
    # max_images caps each split
    capped = ImageFolderDataModule(str(root), image_size=8, max_images=3, val_fraction=0.2, test_fraction=0.2)
    assert len(capped.split("train")[0]) == 3 and capped.split_files["train"] == datamodule.split_files["train"][:3]


def test_image_folder_resize_crop_grayscale(tmp_path):
    # a 40x20 image: left half black, right half white, one column of grey in the middle of the long side
    image = Image.new("L", (40, 20), 0)
    image.paste(255, (20, 0, 40, 20))
    image.save(tmp_path / "wide.png")
    Image.new("RGB", (10, 30), (255, 255, 255)).save(tmp_path / "tall.jpg")
    datamodule = ImageFolderDataModule(str(tmp_path), image_size=10, channels=1, val_fraction=0.0,
                                       test_fraction=0.0, interpolation="nearest")
    assert datamodule.num_classes == 0 and datamodule.class_names == [] and not datamodule.conditional
    images, labels = datamodule.split("train")
    assert images.shape == (2, 1, 10, 10) and labels.tolist() == [0, 0]
    wide = images[datamodule.split_files["train"].index("wide.png"), 0]
    # short side 20 -> 10, so 40 -> 20 wide; the centre 10 columns are columns 5..14: half black, half white
    assert (wide[:, :5] == -1.0).all() and (wide[:, 5:] == 1.0).all()
    tall = images[datamodule.split_files["train"].index("tall.jpg"), 0]
    assert (tall > 0.95).all()
    check_batch(first_batch(ImageFolderDataModule(str(tmp_path), image_size=10, channels=1, batch_size=2,
                                                  val_fraction=0.0, test_fraction=0.0)), 2, (1, 10, 10), False)


def test_image_folder_corrupt_files(tmp_path):
    root = make_class_folder(tmp_path / "data")
    corrupt = root / "cats" / "x.png"
    corrupt.write_bytes(os.urandom(300))
    truncated = root / "dogs" / "t.jpg"
    truncated.write_bytes((root / "dogs" / "c.Jpg").read_bytes()[:200])
    datamodule = ImageFolderDataModule(str(root), image_size=8)
    with pytest.raises(ValueError, match=r"x\.png|t\.jpg"):
        datamodule.split("train")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        skipping = ImageFolderDataModule(str(root), image_size=8, on_corrupt="skip", val_fraction=0.2,
                                         test_fraction=0.2)
        splits = all_splits(skipping)
    assert sorted(skipping.skipped_files) == sorted([str(corrupt), str(truncated)])
    assert sum(len(images) for images, _ in splits.values()) == 10
    truncated.unlink()
    alone = ImageFolderDataModule(str(root), image_size=8, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(ValueError, match=str(corrupt).replace(".", r"\.")):
        alone.split("val")  # any split decodes them all, so a bad file surfaces at once


def test_image_folder_bad_folders_and_arguments(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataModule(str(missing))
    (tmp_path / "blank" / "sub").mkdir(parents=True)
    (tmp_path / "blank" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="blank.*no images"):
        ImageFolderDataModule(str(tmp_path / "blank"))
    mixed = make_class_folder(tmp_path / "mixed")
    write_image(str(mixed / "stray.png"), (8, 8), (0, 0, 0), "PNG")
    with pytest.raises(ValueError, match="stray.png"):
        ImageFolderDataModule(str(mixed))
    flat = tmp_path / "flat"
    write_image(str(flat / "one.png"), (8, 8), (0, 0, 0), "PNG")
    with pytest.raises(ValueError, match="conditional=True"):
        ImageFolderDataModule(str(flat), conditional=True)
    for kwargs, value in [({"channels": 2}, "2"), ({"on_corrupt": "ignore"}, "ignore"),
                          ({"test_fraction": 1.0}, "1.0"), ({"interpolation": "fancy"}, "fancy"),
                          ({"max_images": 0}, "0"), ({"val_split": "bogus"}, "bogus")]:
        with pytest.raises(ValueError, match=value):
            ImageFolderDataModule(str(flat), **kwargs)
