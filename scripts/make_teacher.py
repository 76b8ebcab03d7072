"""Train the MNIST teacher reproducibly and export its EMA weights as a diffusers folder (safetensors).

    python scripts/make_teacher.py                    # make teacher: fit experiments/mnist/teacher.yaml, then export
    python scripts/make_teacher.py --from-checkpoint lightning_logs/mnist-teacher/version_0/checkpoints/last.ckpt

The exported folder (assets/mnist-teacher/unet) is what experiments/mnist/*.yaml load as the frozen teacher.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lightning_modules.cli import main  # noqa: E402
from lightning_modules.diffusion import sampler_times, teacher_sample  # noqa: E402
from lightning_modules.evaluation.image_report import fixed_inputs, score, timed_samples  # noqa: E402


def ema_network(cli, checkpoint_path: str | None):
    """The trained network with the StudentEMA average loaded when the checkpoint has one."""
    module = cli.model
    if checkpoint_path is None:
        ema = next((c for c in cli.trainer.callbacks if type(c).__name__ == "StudentEMA"), None)
        return ema.average.module if ema is not None and ema.average is not None else module.network
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    # checkpoints of older runs also held the EMA copy under evaluation_student.*; the EMA state below is canonical
    module.load_state_dict({k: v for k, v in checkpoint["state_dict"].items()
                            if not k.startswith("evaluation_student.")})
    for key, state in checkpoint.get("callbacks", {}).items():
        if "StudentEMA" in key and state.get("average") is not None:
            weights = {k[len("module."):]: v for k, v in state["average"].items() if k.startswith("module.")}
            module.network.load_state_dict(weights)
    return module.network


def export(network, config_path: str, out_dir: str, extra: dict) -> None:
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".teacher-", dir=parent)
    network.save_pretrained(os.path.join(staging, "unet"))
    weights = os.path.join(staging, "unet", "diffusion_pytorch_model.safetensors")
    card = {"config": os.path.relpath(config_path, ROOT), "preconditioning": network.preconditioning,
            "schedule": network.schedule.describe(), "num_classes": network.num_classes,
            "sha256": hashlib.sha256(open(weights, "rb").read()).hexdigest(),
            "size_bytes": os.path.getsize(weights), **extra}
    with open(os.path.join(staging, "teacher.json"), "w") as handle:
        json.dump(card, handle, indent=1)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    print(f"exported teacher to {out_dir} ({card['size_bytes'] / 1e6:.1f} MB)")


def evaluate(network, datamodule, nfes, num_samples: int, seed: int, extractors) -> dict:
    """FID / KID / precision-recall of the teacher's Heun sampler at each NFE, and the floor (train vs test split at
    the same sample count), against the first ``num_samples`` test images -- the protocol scripts/demo.py uses."""
    network.eval()
    reference = datamodule.split("test")[0][:num_samples]
    key = f"mnist-test-{reference.shape[-2]}x{reference.shape[-1]}"
    noise, labels = fixed_inputs(num_samples, reference.shape[1:], datamodule.num_classes, seed)
    teacher = {}
    for nfe in nfes:
        times = sampler_times(network.schedule, nfe, "heun")

        def sample(z, c, times=times):
            with torch.no_grad():
                return teacher_sample(lambda x, t: network(x, t, c), z, times, network.schedule, "heun")
        samples, speed = timed_samples(sample, noise, labels)
        teacher[str(nfe)] = {"images_per_second": speed, "actual_nfe": 2 * len(times) - 1,
                             **score(samples, reference, key, extractors)}
        print(f"teacher NFE {nfe}: " + ", ".join(f"FID[{e}] {teacher[str(nfe)][e]['fid']:.2f}" for e in extractors),
              flush=True)
    floor = score(datamodule.split("train")[0][:num_samples], reference, key, extractors)
    return {"num_samples": num_samples, "seed": seed, "teacher": teacher, "floor_train_vs_test": floor}


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "experiments", "mnist", "teacher.yaml"))
    parser.add_argument("--out", default=os.path.join(ROOT, "assets", "mnist-teacher"))
    parser.add_argument("--from-checkpoint", default=None, help="export this checkpoint instead of training")
    parser.add_argument("--evaluate-only", action="store_true", help="only (re)evaluate the exported teacher")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--no-inception", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra CLI overrides, e.g. --trainer.max_steps=100")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    extractors = ["mnist-classifier"] + ([] if args.no_inception else ["inception"])
    cli = main(["-c", args.config, *args.overrides], run=False)
    if not args.evaluate_only:
        if args.from_checkpoint is None:
            cli.trainer.fit(cli.model, cli.datamodule)
        network = ema_network(cli, args.from_checkpoint)
        steps = cli.trainer.global_step if args.from_checkpoint is None else None
        export(network, args.config, args.out, {"trained_steps": steps, "checkpoint": args.from_checkpoint})
    from lightning_modules.networks import DiffusersUNetDenoiser
    exported = DiffusersUNetDenoiser(pretrained_path=args.out, subfolder="unet", preconditioning="edm",
                                     schedule=cli.model.schedule)
    card_path = os.path.join(args.out, "teacher.json")
    with open(card_path) as handle:
        card = json.load(handle)
    card["evaluation"] = evaluate(exported, cli.datamodule, args.nfe, args.num_samples, args.seed, extractors)
    with open(card_path + ".tmp", "w") as handle:
        json.dump(card, handle, indent=1)
    os.replace(card_path + ".tmp", card_path)
