"""Train the small MNIST classifier used as the fast in-loop FID feature network and cache it.

    python scripts/train_mnist_classifier.py [--epochs 5] [--seed 0] [--cache-dir DIR] [--force] [--threads 1]

Writes ``<cache>/mnist-classifier-v1.safetensors`` and its ``.json`` (test accuracy, seed, protocol); the cache is
``$DISTILL_CACHE`` or ``~/.cache/lightning-distill`` unless ``--cache-dir`` is given. Prints the test accuracy."""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lightning_modules.evaluation.feature_extractors import (  # noqa: E402
    load_or_train_mnist_classifier,
    mnist_classifier_path,
    train_mnist_classifier,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (results depend on it)")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached classifier exists")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = mnist_classifier_path(args.cache_dir)
    start = time.perf_counter()
    if args.force or not os.path.isfile(path):
        _, info = train_mnist_classifier(path, epochs=args.epochs, seed=args.seed)
    else:
        _, info = load_or_train_mnist_classifier(args.cache_dir)
        print(f"[mnist-classifier] using cached {path}")
    print(f"MNIST classifier: test accuracy {info['test_accuracy']:.4f} ({info.get('test_images', '?')} test images), "
          f"{info.get('epochs', '?')} epochs, seed {info.get('seed', '?')}, sha256 {info['sha256'][:12]}, "
          f"{path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
