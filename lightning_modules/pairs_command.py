"""``distill pairs``: teacher ODE (noise, condition, sample) pairs from any distillation config, written once.

    distill pairs --config CONFIG.yaml --num-pairs 10000 --nfe 32 --sampler heun --seed 0 --output pairs.safetensors

The file format and the generation itself are ``lightning_modules.trajectory_pairs``; this is only the command.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .diffusion.samplers import SAMPLERS
from .lightning_cli import build_cli
from .trajectory_pairs import _condition_law, generate_pairs


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="distill pairs",
        description="Generate teacher ODE (noise, condition, sample) pairs for DMD's regression term, KD and reflow. "
                    "Other arguments (e.g. --model.init_args.guidance_scale 2) override the config.")
    parser.add_argument("-c", "--config", action="append", required=True, help="a distillation config (repeatable)")
    parser.add_argument("--num-pairs", type=int, default=None, help="default: the config's data.init_args.generate")
    parser.add_argument("--nfe", type=int, default=None, help="teacher evaluations budget (default 32)")
    parser.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="ODE sampler (default heun)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the noise and conditions (default 0)")
    parser.add_argument("--output", default=None, help="default: the config's data.init_args.pairs_path")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    known, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]  # nothing is trained or logged
    cli = build_cli([arg for path in known.config for arg in ("-c", path)] + quiet + overrides, run=False)
    module, datamodule = cli.model, cli.datamodule
    defaults = dict(getattr(datamodule, "generate", None) or {})
    output = known.output or getattr(datamodule, "pairs_path", None)
    num_pairs = known.num_pairs or defaults.get("num_pairs")
    if output is None or num_pairs is None:
        parser.error("give --output and --num-pairs (or use a config whose datamodule names pairs_path / generate)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if known.device == "auto" else known.device
    module.to(device)
    num_classes, class_weights = _condition_law(datamodule)
    path = generate_pairs(module, output, num_pairs=int(num_pairs),
                          nfe=known.nfe or int(defaults.get("nfe", 32)),
                          sampler=known.sampler or defaults.get("sampler", "heun"),
                          seed=known.seed if known.seed is not None else int(defaults.get("seed", 0)),
                          num_classes=num_classes, class_weights=class_weights,
                          batch_size=known.batch_size, overwrite=known.overwrite)
    print(f"wrote {num_pairs} teacher pairs to {path}")
    return path


if __name__ == "__main__":
    main()
