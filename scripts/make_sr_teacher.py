"""Train the image-conditioned MNIST super-resolution teacher, export its EMA weights and write its card.

    python scripts/make_sr_teacher.py                 # make teacher-sr: fit experiments/mnist_sr/teacher.yaml, export, score
    python scripts/make_sr_teacher.py --train-only    # fit and export; score later with --evaluate-only
    python scripts/make_sr_teacher.py --evaluate-only # (re)score the exported teacher and rewrite its card
    python scripts/make_sr_teacher.py --from-checkpoint lightning_logs/mnist-sr-teacher/version_0/checkpoints/last.ckpt

The exported folder (assets/mnist-sr-teacher/: unet/ safetensors + config, teacher.json, README.md) is what
experiments/mnist_sr/*.yaml load as the frozen teacher. One network serves x2 (14 -> 28) and x4 (7 -> 28): the
downsampling factor is part of its condition (class embedding). The card scores its Heun sampler at each NFE on the
first 1000 MNIST test images per scale (PSNR / SSIM, and FID against the HQ images with the MNIST classifier).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from make_teacher import ema_network, export  # noqa: E402  (the MNIST teacher's EMA loading and atomic export)

from lightning_modules.evaluation.image_report import write_json_atomic, write_text_atomic  # noqa: E402
from lightning_modules.evaluation.restoration_metrics import (  # noqa: E402
    load_restoration_teacher, restoration_card, score_restoration, teacher_restorer)


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "experiments", "mnist_sr", "teacher.yaml"))
    parser.add_argument("--out", default=os.path.join(ROOT, "assets", "mnist-sr-teacher"))
    parser.add_argument("--from-checkpoint", default=None, help="export this checkpoint instead of training")
    parser.add_argument("--train-only", action="store_true", help="fit and export, do not score")
    parser.add_argument("--evaluate-only", action="store_true", help="only (re)score the exported teacher")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--fid", nargs="*", default=["mnist-classifier"], help="FID extractors (none: no FID)")
    parser.add_argument("overrides", nargs="*", help="extra CLI overrides, e.g. --trainer.max_steps=100")
    return parser.parse_args()


def train_and_export(args) -> None:
    from lightning_modules.cli import main

    cli = main(["-c", args.config, *args.overrides], run=False)
    if args.from_checkpoint is None:
        cli.trainer.fit(cli.model, cli.datamodule)
    network = ema_network(cli, args.from_checkpoint)
    data = cli.datamodule
    steps = cli.trainer.global_step if args.from_checkpoint is None else \
        torch.load(args.from_checkpoint, map_location="cpu", weights_only=True)["global_step"]
    extra = {"trained_steps": steps,
             "checkpoint": args.from_checkpoint, "network_class": type(network).__name__,
             "condition_channels": network.condition_channels, "scales": network.scales,
             "degradations": data.pipeline.describe(), "upsample": data.upsample_mode,
             "parameters": sum(p.numel() for p in network.parameters())}
    export(network, args.config, args.out, extra)


if __name__ == "__main__":
    args = parse()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if not args.evaluate_only:
        train_and_export(args)
    if args.train_only:
        sys.exit(0)
    teacher = load_restoration_teacher(args.out)
    card_path = os.path.join(args.out, "teacher.json")
    with open(card_path) as handle:
        card = json.load(handle)
    card["evaluation"] = score_restoration(lambda nfe: teacher_restorer(teacher, nfe), args.nfe, args.scales,
                                           args.num_images, args.seed, args.fid, upsample=card["upsample"])
    write_json_atomic(card_path, card)
    write_text_atomic(os.path.join(args.out, "README.md"), restoration_card(card))
    print(f"wrote {card_path} and README.md")
