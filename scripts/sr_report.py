"""Score a super-resolution sampler at NFE 1..64: PSNR / SSIM (torchmetrics) and FID against the HQ MNIST test images.

    python scripts/sr_report.py                                   # the shipped teacher (assets/mnist-sr-teacher), Heun
    python scripts/sr_report.py --config experiments/mnist_sr/tad_sr.yaml \
        --checkpoint lightning_logs/mnist-sr-tad_sr/version_0/checkpoints/last.ckpt --nfe 1 2 4
    python scripts/sr_report.py --num-images 200 --nfe 1 32 --scales 4 --out /tmp/sr.json

A student is sampled as evaluation does everywhere (``module.sample``: the EMA student when the checkpoint has one, its
own K-step sampler at ``nfe`` steps); the teacher by its Heun PF-ODE solver. Same noise (``--seed``) and the same
first ``--num-images`` test pairs for every NFE and every sampler, so rows compare. With ``--with-teacher`` the
student's report also scores the teacher at ``--teacher-nfe`` for the comparison line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lightning_modules.evaluation.image_report import write_json_atomic  # noqa: E402
from lightning_modules.evaluation.restoration_metrics import (  # noqa: E402
    load_restoration_teacher, score_restoration, teacher_restorer)


def student_restorer_factory(config: str, checkpoint: str):
    """``nfe -> restore(noise, cond)`` of the module a config builds, with a checkpoint's weights (EMA if tracked)."""
    from lightning_modules.cli import main

    cli = main(["-c", config, "--trainer.logger=false"], run=False)
    module = cli.model
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"], strict=False)
    for key, callback_state in state.get("callbacks", {}).items():
        if "StudentEMA" in key and callback_state.get("average") is not None:
            import copy

            average = copy.deepcopy(module.student)
            average.load_state_dict({k[len("module."):]: v for k, v in callback_state["average"].items()
                                     if k.startswith("module.")})
            module.set_evaluation_network(average.eval())
    module.eval()

    def at(nfe: int):
        def restore(noise, cond):
            return module.sample(noise, cond, nfe)
        restore.actual_nfe = nfe
        return restore
    return at


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=os.path.join(ROOT, "assets", "mnist-sr-teacher"))
    parser.add_argument("--config", default=None, help="a student's experiments config (with --checkpoint)")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--fid", nargs="*", default=["mnist-classifier"], help="FID extractors (none: no FID)")
    parser.add_argument("--with-teacher", action="store_true", help="also score the teacher at --teacher-nfe")
    parser.add_argument("--teacher-nfe", type=int, nargs="+", default=[32])
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args()
    if (args.config is None) != (args.checkpoint is None):
        parser.error("give --config and --checkpoint together (a student), or neither (the teacher)")
    return args


if __name__ == "__main__":
    args = parse()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    report = {}
    teacher = None
    if args.config is None or args.with_teacher:
        teacher = load_restoration_teacher(args.teacher)
    if args.config is not None:
        print(f"student {args.checkpoint}", flush=True)
        report["student"] = score_restoration(student_restorer_factory(args.config, args.checkpoint), args.nfe,
                                              args.scales, args.num_images, args.seed, args.fid)
    teacher_nfes = args.nfe if args.config is None else args.teacher_nfe
    if teacher is not None:
        print(f"teacher {args.teacher} (Heun)", flush=True)
        report["teacher"] = score_restoration(lambda nfe: teacher_restorer(teacher, nfe), teacher_nfes, args.scales,
                                              args.num_images, args.seed, args.fid)
    if args.out:
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")
    else:
        print(json.dumps({who: {s: {n: {"psnr": row["psnr"], "ssim": row["ssim"]} for n, row in e["nfe"].items()}
                                for s, e in r["scales"].items()} for who, r in report.items()}, indent=1))
