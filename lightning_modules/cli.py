"""The ``distill`` command: Lightning's CLI over every method, datamodule and callback.

    distill fit -c experiments/toy/ring8/dmd2.yaml [--model.init_args.guidance_scale 2 ...]
    distill validate -c experiments/toy/ring8/dmd2.yaml --ckpt_path PATH
    distill fit -c CONFIG --print_config
    distill export -c CONFIG --ckpt_path PATH --export_dir DIR [--use_ema true] [--overwrite false]
    distill sweep SWEEP.yaml [--dry-run | --wait | --cluster local]      (Slurm job array, see experiments/slurm)
    distill pairs -c CONFIG --num-pairs N [--nfe 32 --sampler heun --seed 0 --output PATH]   (teacher ODE pairs)

``export`` builds the model from the config (later ``--model...`` style overrides pass through), loads the checkpoint
(with the StudentEMA average when it holds one) and writes a diffusers folder (see ``lightning_modules.export``).
Configs are parsed in OmegaConf mode, so ``${...}`` interpolation works inside YAML files.
"""
from __future__ import annotations

import argparse
import os
import sys

from lightning_modules.lightning_cli import DistillCLI, build_cli


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def export(args: list[str]) -> DistillCLI:
    """``distill export``: config + Lightning checkpoint -> diffusers folder."""
    from lightning_modules.export import export_student, load_checkpoint_for_export

    parser = argparse.ArgumentParser(
        prog="distill export", description="Write a trained student as a diffusers folder (unet/ + scheduler/ + "
        "distillation.json + README.md). Other arguments (e.g. --model.init_args...) override the config.")
    parser.add_argument("-c", "--config", action="append", required=True, help="the training config (repeatable)")
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint of the trained module")
    parser.add_argument("--export_dir", required=True, help="folder to write; must not exist or be empty")
    parser.add_argument("--use_ema", type=_flag, default=True, help="export the StudentEMA average if the "
                        "checkpoint holds one (default true)")
    parser.add_argument("--overwrite", type=_flag, default=False, help="replace a non-empty export_dir")
    parser.add_argument("--pipeline", type=_flag, default=False, help="write a full text-to-image diffusers pipeline "
                        "(text encoder, tokenizer, VAE, student UNet, scheduler) that DiffusionPipeline.from_pretrained "
                        "runs (see lightning_modules.export_pipeline)")
    parser.add_argument("--text_encoder", default=None, help="with --pipeline: a pipeline or transformers folder "
                        "holding the prompt encoder (default: the model's text encoder, else the embedded MiniLM)")
    parser.add_argument("--vae", default=None, help="with --pipeline: an AutoencoderKL folder (default: the model's "
                        "autoencoder)")
    parser.add_argument("--nfe", type=int, default=None, help="with --pipeline: the steps the scheduler is set up for "
                        "(default: the student's)")
    known, overrides = parser.parse_known_args(args)
    if not known.pipeline and (known.text_encoder or known.vae or known.nfe is not None):
        parser.error("--text_encoder, --vae and --nfe apply to --pipeline true only")
    cli = build_cli([arg for path in known.config for arg in ("-c", path)] + overrides, run=False)
    load_checkpoint_for_export(cli.model, known.ckpt_path, use_ema=known.use_ema)
    from lightning_modules.networks.routing import ConditionRoutedStudents
    if known.pipeline:
        from lightning_modules.export_pipeline import export_text_to_image_pipeline
        folder = export_text_to_image_pipeline(cli.model, known.export_dir, text_encoder=known.text_encoder,
                                               vae=known.vae, use_ema=known.use_ema, overwrite=known.overwrite,
                                               nfe=known.nfe)
    elif isinstance(cli.model.student, ConditionRoutedStudents):  # MSD: one diffusers folder per student + routing
        from lightning_modules.methods.msd import export_msd_students
        folder = export_msd_students(cli.model, known.export_dir, use_ema=known.use_ema, overwrite=known.overwrite)
    else:
        folder = export_student(cli.model, known.export_dir, use_ema=known.use_ema, overwrite=known.overwrite)
    print(f"exported {type(cli.model).__name__} student to {folder}")
    return cli


def main(args: list[str] | None = None, run: bool = True) -> DistillCLI | None:
    """Returns the CLI object when called with ``args``; as the console script (no args) returns None, so that
    ``sys.exit(main())`` exits with status 0 after a successful run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["sweep"]:
        from lightning_modules.sweep import main as sweep_main
        sweep_main(argv[1:])
        return None
    if argv[:1] == ["pairs"]:
        from lightning_modules.pairs_command import main as pairs_main
        pairs_main(argv[1:])
        return None
    cli = export(argv[1:]) if argv[:1] == ["export"] else build_cli(args, run)
    return None if args is None else cli


if __name__ == "__main__":
    main(sys.argv[1:])
