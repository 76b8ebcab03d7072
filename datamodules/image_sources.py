"""Small real-image sources on the ``ImageDataModule`` base: scikit-learn's 8x8 digits and any folder of images.

Both split deterministically by a permutation seeded with ``split_seed``, which is separate from the training
``seed``: changing the training seed changes the noise and the shuffling, never which images are held out.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from .images import ImageDataModule

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in [("val_fraction", val_fraction), ("test_fraction", test_fraction)]:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")


def seeded_split(n: int, val_fraction: float, test_fraction: float, split_seed: int) -> dict[str, torch.Tensor]:
    """Indices of train/val/test for ``n`` items: a permutation seeded by ``split_seed``, cut by rounded fractions
    (val and test first, train keeps the rest and is never empty)."""
    check_fractions(val_fraction, test_fraction)
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} items leave no training images with val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction}")
    return {"train": permutation[:n_train], "val": permutation[n_train:n_train + n_val],
            "test": permutation[n_train + n_val:]}


class DigitsDataModule(ImageDataModule):
    """scikit-learn's ``load_digits`` (1797 grayscale 8x8 images, 10 classes; pixel values 0..16 mapped to [-1, 1]).

    ``image_size`` resizes (``resize_mode`` "bilinear", "bicubic" or "nearest"; e.g. 8 -> 16 or 32). The train/val/test
    split (``val_fraction``/``test_fraction``, default 80/10/10) is a permutation seeded by ``split_seed``."""

    num_classes = 10
    RESIZE_MODES = ("bilinear", "bicubic", "nearest")

    def __init__(self, batch_size: int = 64, conditional: bool = True, image_size: int | None = None,
                 resize_mode: str = "bilinear", val_fraction: float = 0.1, test_fraction: float = 0.1,
                 split_seed: int = 0, seed: int = 0, num_workers: int = 0, train_split: str = "train",
                 val_split: str = "val", max_val_images: int | None = 1024):
        super().__init__(batch_size, conditional, seed, num_workers, train_split, val_split, max_val_images)
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if resize_mode not in self.RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {self.RESIZE_MODES}, got {resize_mode!r}")
        check_fractions(val_fraction, test_fraction)
        self.image_size, self.resize_mode = image_size, resize_mode
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed

    def load_split(self, split):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        index = seeded_split(len(images), self.val_fraction, self.test_fraction, self.split_seed)[split]
        images, labels = images[index], labels[index]
        if self.image_size is not None and self.image_size != images.shape[-1]:
            size = (self.image_size, self.image_size)
            if self.resize_mode == "nearest":
                images = F.interpolate(images, size=size, mode="nearest")
            else:
                images = F.interpolate(images, size=size, mode=self.resize_mode, align_corners=False, antialias=True)
            images = images.clamp(-1.0, 1.0)
        return images, labels


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(directory: str) -> list[str]:
    """Absolute paths of the image files under ``directory`` (recursively, hidden files and folders left out)."""
    found = []
    for current, subdirs, files in os.walk(directory):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend(os.path.join(current, name) for name in files if _is_image(name))
    return found


class ImageFolderDataModule(ImageDataModule):
    """Every PNG/JPEG image under ``root`` (recursively; extensions case-insensitive; hidden entries ignored).

    Labels: if ``root``'s first-level sub-folders hold images, each such sub-folder is a class (sorted names ->
    0..K-1, exposed as ``class_names``; everything below it, at any depth, gets its label) and images lying directly
    in ``root`` are an error; otherwise every image is label 0 and ``num_classes`` is 0. ``conditional=None`` means
    "conditional when classes were found".

    Each image is converted to ``channels`` (1 = grayscale, 3 = RGB), resized so its short side is ``image_size``
    (``interpolation``) and center-cropped to ``image_size`` x ``image_size``. The split is a permutation seeded by
    ``split_seed`` of the sorted relative paths, cut by ``val_fraction``/``test_fraction``; ``max_images`` caps each
    split. All splits are decoded into memory as uint8 the first time any split is asked for.

    Unreadable files: ``on_corrupt="error"`` raises a ValueError naming the file; ``"skip"`` leaves them out, lists
    them in ``skipped_files`` and warns once with the count."""

    INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")

    def __init__(self, root: str, image_size: int = 64, channels: int = 3, batch_size: int = 64,
                 conditional: bool | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 split_seed: int = 0, on_corrupt: str = "error", max_images: int | None = None,
                 interpolation: str = "bicubic", seed: int = 0, num_workers: int = 0, train_split: str = "train",
                 val_split: str = "val", max_val_images: int | None = 1024):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        if interpolation not in self.INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {self.INTERPOLATIONS}, got {interpolation!r}")
        check_fractions(val_fraction, test_fraction)
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.class_names, self.files, self.file_labels = self._discover(self.root)
        self.num_classes = len(self.class_names)
        if conditional is None:
            conditional = self.num_classes > 0
        elif conditional and self.num_classes == 0:
            raise ValueError(f"conditional=True but {self.root} has no class sub-folders (all images are label 0); "
                             "use conditional=False or None")
        super().__init__(batch_size, conditional, seed, num_workers, train_split, val_split, max_val_images)
        self.image_size, self.channels, self.interpolation = image_size, channels, interpolation
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.on_corrupt, self.max_images = on_corrupt, max_images
        self.split_files = {name: [self.files[i] for i in index.tolist()] for name, index in
                            seeded_split(len(self.files), val_fraction, test_fraction, split_seed).items()}
        if max_images is not None:
            self.split_files = {name: files[:max_images] for name, files in self.split_files.items()}
        self.skipped_files: list[str] = []
        self._decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def _discover(root: str) -> tuple[list[str], list[str], list[int]]:
        """(class names, sorted relative paths, labels)."""
        if not os.path.exists(root):
            raise FileNotFoundError(f"image folder {root} does not exist")
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root} is not a directory")
        entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
        top_level = [e for e in entries if os.path.isfile(os.path.join(root, e)) and _is_image(e)]
        per_class = {e: _images_under(os.path.join(root, e)) for e in entries if os.path.isdir(os.path.join(root, e))}
        class_names = [name for name in sorted(per_class) if per_class[name]]
        if class_names and top_level:
            raise ValueError(f"image folder {root} has class sub-folders {class_names} and also {len(top_level)} "
                             f"image(s) directly inside it (e.g. {top_level[0]}), whose class is ambiguous; move them "
                             "into a sub-folder or remove them")
        labelled = [(os.path.relpath(path, root), label) for label, name in enumerate(class_names)
                    for path in per_class[name]]
        if not class_names:
            labelled = [(name, 0) for name in top_level]
        if not labelled:
            raise ValueError(f"image folder {root} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                             "case-insensitive, recursively)")
        labelled.sort(key=lambda item: item[0].replace(os.sep, "/"))
        return class_names, [path for path, _ in labelled], [label for _, label in labelled]

    def _decode(self, relative: str) -> torch.Tensor | None:
        """uint8 (C, image_size, image_size), or None for an unreadable file when skipping."""
        from PIL import Image, ImageOps
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        path = os.path.join(self.root, relative)
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                image = image.convert("L" if self.channels == 1 else "RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            if self.on_corrupt == "error":
                raise ValueError(f"cannot read image {path}: {error} (pass on_corrupt='skip' to leave unreadable "
                                 "files out)") from error
            self.skipped_files.append(path)
            return None
        image = TF.resize(image, self.image_size, interpolation=InterpolationMode(self.interpolation))
        image = TF.center_crop(image, [self.image_size, self.image_size])
        return TF.pil_to_tensor(image)

    def _decode_all(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        label_of = dict(zip(self.files, self.file_labels))
        decoded = {}
        for name in ("train", "val", "test"):
            images, labels = [], []
            for relative in self.split_files[name]:
                tensor = self._decode(relative)
                if tensor is not None:
                    images.append(tensor)
                    labels.append(label_of[relative])
            shape = (0, self.channels, self.image_size, self.image_size)
            decoded[name] = (torch.stack(images) if images else torch.empty(shape, dtype=torch.uint8),
                             torch.tensor(labels, dtype=torch.long))
        if self.skipped_files:
            warnings.warn(f"skipped {len(self.skipped_files)} unreadable image file(s) under {self.root} "
                          f"(listed in skipped_files; first: {self.skipped_files[0]})", stacklevel=4)
        if len(decoded["train"][0]) == 0:
            raise ValueError(f"no readable training images under {self.root}")
        return decoded

    def load_split(self, split):
        if self._decoded is None:
            self.skipped_files = []
            self._decoded = self._decode_all()
        return self._decoded[split]
