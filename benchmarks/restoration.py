"""The restoration benchmark: every one-step super-resolution student of ``experiments/mnist_sr/<method>.yaml`` distills
the shipped SR teacher (assets/mnist-sr-teacher, x2 and x4 in one network) for the same budget of GENERATOR updates,
then is scored at 1 step next to the teacher's card.

    python benchmarks/restoration.py --output bench-results                   (make bench-sr)
    python benchmarks/restoration.py --methods tad_sr oftsr --generator-updates 20 --num-images 200

Each method trains in its own process (one CPU thread each, ``--jobs`` at a time). Scoring is the teacher card's
protocol (``restoration_metrics.score_restoration``): the first ``--num-images`` MNIST test images, their x2 / x4
area-downsampled LQ versions upsampled bicubic, noise seed 1234, PSNR / SSIM per image (torchmetrics) averaged, FID
(MNIST-classifier features) of the restorations against the same HQ images. The teacher rows (Heun, 1 and 32 NFE) are
read from its card when it was scored with this protocol, else measured here. Issue 14's target: the one-step student
within 1 dB PSNR of the 32-step teacher. Writes ``restoration.json`` and ``restoration.md``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.image_methods import (benchmark_parser, launch_worker, network_sizes, peak_memory_mb,  # noqa: E402
                                      train_for_generator_updates)

CONFIGS = os.path.join(ROOT, "experiments", "mnist_sr")
TEACHER = os.path.join(ROOT, "assets", "mnist-sr-teacher")
EXTRACTOR = "mnist-classifier"
TEACHER_NFE = (1, 32)


def discover_methods() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".yaml") and f != "teacher.yaml")


def run_method(method: str, args) -> dict:
    import torch

    torch.set_num_threads(1)
    from lightning_modules.evaluation.restoration_metrics import score_restoration

    module, _, trainer, updates, train_seconds = train_for_generator_updates(
        os.path.join(CONFIGS, f"{method}.yaml"), args.generator_updates, args.seed)
    module.eval()

    def at(nfe: int):
        def restore(noise, cond):
            return module.sample(noise, cond, nfe)
        return restore
    scores = score_restoration(at, args.nfe, args.scales, args.num_images, args.seed_eval, [EXTRACTOR])
    return {"method": method, "generator_updates": updates, "optimizer_steps": trainer.global_step,
            "train_seconds": train_seconds, "seconds_per_generator_update": train_seconds / max(1, updates),
            "peak_memory_mb": peak_memory_mb(), "networks": network_sizes(module), "scores": scores}


def teacher_scores(args) -> tuple[dict, str]:
    """The teacher's Heun rows at TEACHER_NFE and the LQ baseline: from its card if scored with this protocol."""
    with open(os.path.join(TEACHER, "teacher.json")) as handle:
        evaluation = json.load(handle).get("evaluation") or {}
    scales = evaluation.get("scales", {})
    if (evaluation.get("num_images") == args.num_images and evaluation.get("seed") == args.seed_eval
            and all(str(s) in scales and all(str(n) in scales[str(s)]["nfe"] for n in TEACHER_NFE)
                    for s in args.scales)):
        return evaluation, f"teacher card ({os.path.relpath(TEACHER, ROOT)}/teacher.json), same protocol"
    import torch

    from lightning_modules.evaluation.restoration_metrics import (load_restoration_teacher, score_restoration,
                                                                  teacher_restorer)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    teacher = load_restoration_teacher(TEACHER)
    return (score_restoration(lambda nfe: teacher_restorer(teacher, nfe), TEACHER_NFE, args.scales, args.num_images,
                              args.seed_eval, [EXTRACTOR]), "measured in this run")


def _cell(row: dict) -> str:
    return f"{row['psnr']:.2f} / {row['ssim']:.3f} / {row['fid'][EXTRACTOR]['fid']:.2f}"


def markdown(records, teacher, protocol) -> str:
    lines = ["# MNIST super-resolution benchmark", "",
             f"Each student: {protocol['generator_updates']} generator updates from the shipped SR teacher, then "
             f"scored on the first {protocol['num_images']} MNIST test images (noise seed {protocol['seed_eval']}): "
             f"PSNR (dB) / SSIM / FID ({EXTRACTOR} features, restorations vs the same HQ images). Teacher rows: "
             f"{protocol['teacher_source']}. Gap = student PSNR minus the 32-step teacher's (target: > -1 dB).", ""]
    for scale in protocol["scales"]:
        base = teacher["scales"][str(scale)]
        teacher32 = base["nfe"]["32"]
        lines += [f"## x{scale} ({28 // scale} -> 28)", "",
                  "| sampler | " + " | ".join(f"{n}-step PSNR / SSIM / FID" for n in protocol["nfe"])
                  + " | PSNR gap at 1 step | s / generator update | optimizer steps | trainable student params |",
                  "|---|" + "---|" * len(protocol["nfe"]) + "---|---|---|---|"]
        for r in records:
            if "error" in r:
                lines.append(f"| {r['method']} | failed |" + " |" * (len(protocol["nfe"]) + 3))
                continue
            rows = r["scores"]["scales"][str(scale)]["nfe"]
            student = r["networks"]["student"]
            lines.append(f"| {r['method']} | " + " | ".join(_cell(rows[str(n)]) for n in protocol["nfe"])
                         + f" | {rows['1']['psnr'] - teacher32['psnr']:+.2f} dB | "
                         f"{r['seconds_per_generator_update']:.2f} | {r['optimizer_steps']} | "
                         f"{student['trainable']:,} of {student['parameters']:,} |")
        for nfe in TEACHER_NFE:
            lines.append(f"| teacher (Heun), {nfe} NFE | {_cell(base['nfe'][str(nfe)])} |"
                         + " |" * (len(protocol["nfe"]) + 3))
        lines += [f"| LQ upsampled (bicubic) | {_cell(base['lq_upsampled'])} |" + " |" * (len(protocol["nfe"]) + 3), ""]
    return "\n".join(lines) + "\n"


def main():
    methods = discover_methods()
    parser = benchmark_parser(__doc__, methods, generator_updates=60)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4], choices=[2, 4])
    parser.add_argument("--nfe", type=int, nargs="+", default=[1], help="student steps scored (1 always)")
    args = parser.parse_args()
    args.nfe = sorted(set(args.nfe) | {1})
    if args.worker:
        record = run_method(args.method, args)
        with open(args.worker_output, "w") as handle:
            json.dump(record, handle)
        return
    if min(args.nfe) < 1 or args.generator_updates < 1 or args.num_images < 10:
        parser.error(f"need --nfe >= 1, --generator-updates >= 1 and --num-images >= 10, got {args.nfe}, "
                     f"{args.generator_updates}, {args.num_images}")
    scratch = os.path.join(args.output, "restoration-runs")
    os.makedirs(scratch, exist_ok=True)
    worker_args = ["--generator-updates", str(args.generator_updates), "--num-images", str(args.num_images),
                   "--seed", str(args.seed), "--seed-eval", str(args.seed_eval), "--nfe", *map(str, args.nfe),
                   "--scales", *map(str, args.scales)]
    print(f"SR benchmark: {len(args.methods)} methods x {args.generator_updates} generator updates, "
          f"{args.jobs} at a time", flush=True)
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda m: launch_worker(__file__, m, worker_args, scratch), args.methods))
    teacher, source = teacher_scores(args)
    protocol = {"generator_updates": args.generator_updates, "num_images": args.num_images, "scales": args.scales,
                "nfe": args.nfe, "seed": args.seed, "seed_eval": args.seed_eval, "extractor": EXTRACTOR,
                "teacher_source": source, "total_seconds": time.time() - start}
    from lightning_modules.evaluation.image_report import write_json_atomic, write_text_atomic
    write_json_atomic(os.path.join(args.output, "restoration.json"),
                      {"protocol": protocol, "teacher": teacher, "records": records})
    text = markdown(records, teacher, protocol)
    write_text_atomic(os.path.join(args.output, "restoration.md"), text)
    print(text)


if __name__ == "__main__":
    main()
