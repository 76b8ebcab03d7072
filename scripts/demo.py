"""The main job (make demo): distill the shipped MNIST teacher into a one-step DMD2 student and report how it compares.

    python scripts/demo.py [--out demo-output] [--num-samples 1000] [-- extra distill overrides]

Writes into ``--out``: report.md and report.json (FID / KID / precision-recall of the 1-step student next to the
teacher at 1..64 steps, with the fast MNIST-classifier extractor and Inception-v3, and sampling speed), samples.png
(teacher at 32 steps | student at 1 step, same noise and labels), the exported diffusers student (student/), and the
TensorBoard run under lightning_logs/mnist-dmd2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lightning_modules.cli import main as cli_main  # noqa: E402
from lightning_modules.evaluation.image_report import (fixed_inputs, score, side_by_side_grid, timed_samples,  # noqa: E402
                                                       write_json_atomic, write_text_atomic)
from lightning_modules.export import export_student  # noqa: E402

TEACHER_CARD = os.path.join(ROOT, "assets", "mnist-teacher", "teacher.json")


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "experiments", "mnist", "dmd2.yaml"))
    parser.add_argument("--out", default=os.path.join(ROOT, "demo-output"))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--teacher-nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--no-inception", action="store_true", help="skip the (slow on CPU) Inception-v3 numbers")
    parser.add_argument("--live-teacher-sweep", action="store_true",
                        help="recompute the teacher's NFE sweep instead of reading the teacher card")
    parser.add_argument("overrides", nargs="*", help="distill overrides, e.g. --trainer.max_steps=100")
    args = parser.parse_args()
    if args.num_samples < 10:
        parser.error(f"--num-samples must be >= 10, got {args.num_samples}")
    return args


def teacher_card_sweep(args, extractors):
    """The teacher's NFE sweep from its card when it was measured with this protocol, else None."""
    if args.live_teacher_sweep or not os.path.isfile(TEACHER_CARD):
        return None
    with open(TEACHER_CARD) as handle:
        card = json.load(handle)
    sweep = card.get("evaluation")
    if not sweep or sweep.get("num_samples") != args.num_samples or sweep.get("seed") != args.seed:
        return None
    if not all(str(n) in sweep["teacher"] and all(e in sweep["teacher"][str(n)] for e in extractors)
               for n in args.teacher_nfe):
        return None
    return sweep


def main():
    args = parse()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    os.makedirs(args.out, exist_ok=True)
    extractors = ["mnist-classifier"] + ([] if args.no_inception else ["inception"])
    started = time.time()

    sys.argv = sys.argv[:1]  # the CLI gets its arguments explicitly below
    cli = cli_main(["-c", args.config, *args.overrides], run=False)
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    fit_start = time.time()
    trainer.fit(module, datamodule)
    fit_seconds = time.time() - fit_start
    export_student(module, os.path.join(args.out, "student"), overwrite=True)

    score_start = time.time()
    module.eval()
    reference = datamodule.split("test")[0][:args.num_samples]
    reference_key = f"mnist-test-{reference.shape[-2]}x{reference.shape[-1]}"
    noise, labels = fixed_inputs(args.num_samples, reference.shape[1:], datamodule.num_classes, args.seed)
    student, student_speed = timed_samples(lambda z, c: module.sample(z, c, nfe=1), noise, labels)
    results = {"student": {"1": {"images_per_second": student_speed,
                                 **score(student, reference, reference_key, extractors)}}}
    score_seconds = time.time() - score_start

    # The teacher is frozen and shipped: its sweep is measured once by `make teacher` with this same protocol
    # (noise seed, labels, reference, extractors) and read from its card; without a matching card it is measured here.
    sweep = teacher_card_sweep(args, extractors)
    if sweep is not None:
        results["teacher"] = sweep["teacher"]
        results["floor_train_vs_test"] = sweep.get("floor_train_vs_test")
        teacher_source = (f"teacher card ({os.path.relpath(TEACHER_CARD, ROOT)}), same protocol; its images/s were "
                          "measured there on 1 CPU thread")
    else:
        results["teacher"] = {}
        for nfe in sorted(set(args.teacher_nfe) | {32}):
            samples, speed = timed_samples(lambda z, c, nfe=nfe: module.sample_teacher(z, c, nfe=nfe), noise, labels)
            results["teacher"][str(nfe)] = {"images_per_second": speed,
                                            **score(samples, reference, reference_key, extractors)}
        teacher_source = "measured in this run"

    grid_noise, grid_labels = noise[:100], None if labels is None else labels[:100]
    teacher_grid = module.sample_teacher(grid_noise, grid_labels, nfe=32)
    side_by_side_grid(teacher_grid, student[:100], os.path.join(args.out, "samples.png"))
    report = {"config": os.path.relpath(args.config, ROOT), "overrides": args.overrides,
              "protocol": {"num_samples": args.num_samples, "seed": args.seed, "labels": "uniform, n % 10",
                           "reference": f"first {args.num_samples} MNIST test images", "extractors": extractors,
                           "teacher_sweep_source": teacher_source, "teacher_sampler": "Heun (EDM Alg. 1)",
                           "student_sampler": "one step"},
              "training": {"seconds": fit_seconds, "optimizer_steps": trainer.global_step},
              "seconds": {"setup": fit_start - started, "training": fit_seconds, "student_scoring": score_seconds,
                          "total": time.time() - started},
              "results": results, "total_seconds": time.time() - started}
    write_json_atomic(os.path.join(args.out, "report.json"), report)
    write_text_atomic(os.path.join(args.out, "report.md"), markdown(report, extractors))
    print(markdown(report, extractors))


def markdown(report, extractors) -> str:
    results = report["results"]
    head = "| sampler | NFE | " + " | ".join(f"FID ({e})" for e in extractors) + " | KID (classifier) | precision / recall (classifier) | images/s |"
    lines = ["# MNIST distillation report (make demo)", "",
             f"DMD2 one-step student distilled from the shipped teacher in {report['training']['seconds']:.0f} s "
             f"({report['training']['optimizer_steps']} optimizer steps) on this machine's CPU. "
             f"Protocol: {report['protocol']['num_samples']} samples (seed {report['protocol']['seed']}, labels "
             f"{report['protocol']['labels']}) against the {report['protocol']['reference']}; teacher sweep: "
             f"{report['protocol']['teacher_sweep_source']}.", "", head, "|---|---|" + "---|" * (len(extractors) + 3)]

    def row(name, nfe, entry):
        fids = " | ".join(f"{entry[e]['fid']:.2f}" for e in extractors)
        fast = entry["mnist-classifier"]
        return (f"| {name} | {nfe} | {fids} | {fast.get('kid_mean', float('nan')):.4f} | "
                f"{fast.get('precision', float('nan')):.3f} / {fast.get('recall', float('nan')):.3f} | "
                f"{entry['images_per_second']:.0f} |")
    lines.append(row("**student (DMD2)**", 1, results["student"]["1"]))
    for nfe, entry in sorted(results["teacher"].items(), key=lambda kv: int(kv[0])):
        lines.append(row("teacher (Heun)", nfe, entry))
    floor = results.get("floor_train_vs_test")
    if floor:
        lines.append(f"| floor: {report['protocol']['num_samples']} train vs test images | - | " + " | ".join(f"{floor[e]['fid']:.2f}" for e in extractors)
                     + " | - | - | - |")
    student = results["student"]["1"]
    teacher32 = results["teacher"]["32"]
    lines += ["", "Student / teacher-at-32-steps FID ratio: " + ", ".join(
        f"{e}: {student[e]['fid'] / teacher32[e]['fid']:.2f}" for e in extractors), "",
        "![teacher at 32 steps (left) and student at 1 step (right), same noise and labels](samples.png)", "",
        "Exported student (diffusers folder): `student/` -- see its README.md.", ""]
    seconds = report.get("seconds")
    if seconds:
        lines += [f"Wall time {seconds['total']:.0f} s: setup {seconds['setup']:.0f} s, training "
                  f"{seconds['training']:.0f} s, sampling and scoring the student "
                  f"{seconds['student_scoring']:.0f} s (Inception-v3 features on CPU are most of it), the rest "
                  "export, the teacher's sample grid and the report.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
