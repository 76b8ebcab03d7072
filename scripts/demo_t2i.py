"""make demo-t2i: prompt-only (image-free) one-step distillation of the shipped text-to-image MNIST latent teacher.

    python scripts/demo_t2i.py [--out demo-t2i-output] [--num-samples 1000] [-- extra distill overrides]

Trains ``experiments/mnist_t2i/dmd2.yaml`` (DMD2 on prompts only: the batches hold noise and encoded captions, never an
image), then writes into ``--out``:
  report.md / report.json -- for the 1-step student and the teacher at 1..64 steps with CFG: FID against MNIST test
      images (the MNIST-classifier extractor and Inception-v3), prompt adherence (the shipped MNIST classifier's accuracy
      on the prompted digit) and CLIP score (the shipped tiny MNIST open_clip model), all on the same prompts and noise;
  samples.png -- teacher at 32 steps | student at 1 step, same prompts and noise, each row labelled with its prompt;
  pipeline/ -- the student exported as a plain diffusers StableDiffusionPipeline folder.
The teacher's sweep is read from its card (assets/mnist-t2i/teacher.json) when it was measured with this protocol,
else measured here (--live-teacher-sweep forces that).
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
from lightning_modules.evaluation.image_report import write_json_atomic, write_text_atomic  # noqa: E402
from lightning_modules.evaluation.text_report import (evaluation_prompts, labelled_grid, score_text_to_image,  # noqa: E402
                                                      timed_text_samples)
from lightning_modules.export_pipeline import export_text_to_image_pipeline  # noqa: E402

ASSETS = os.path.join(ROOT, "assets", "mnist-t2i")
TEACHER_CARD = os.path.join(ASSETS, "teacher.json")


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "experiments", "mnist_t2i", "dmd2.yaml"))
    parser.add_argument("--out", default=os.path.join(ROOT, "demo-t2i-output"))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--teacher-nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--no-inception", action="store_true", help="skip the (slow on CPU) Inception-v3 numbers")
    parser.add_argument("--live-teacher-sweep", action="store_true",
                        help="measure the teacher's NFE sweep here instead of reading the teacher card")
    parser.add_argument("overrides", nargs="*", help="distill overrides, e.g. --trainer.max_steps=100")
    args = parser.parse_args()
    if args.num_samples < 10:
        parser.error(f"--num-samples must be >= 10, got {args.num_samples}")
    return args


def teacher_card_sweep(args, extractors, guidance_scale: float):
    """The teacher's sweep from its card when it was measured with this protocol, else None."""
    if args.live_teacher_sweep or not os.path.isfile(TEACHER_CARD):
        return None
    with open(TEACHER_CARD) as handle:
        sweep = json.load(handle).get("evaluation")
    if not sweep or sweep.get("num_samples") != args.num_samples or sweep.get("seed") != args.seed:
        return None
    if float(sweep.get("guidance_scale", -1)) != float(guidance_scale):
        return None
    if not all(str(n) in sweep["teacher"] and all(e in sweep["teacher"][str(n)]["fid"] for e in extractors)
               for n in args.teacher_nfe):
        return None
    return sweep


def main():
    args = parse()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    os.makedirs(args.out, exist_ok=True)
    extractors = ["mnist-classifier"] + ([] if args.no_inception else ["inception"])
    started = time.time()

    sys.argv = sys.argv[:1]
    cli = cli_main(["-c", args.config, *args.overrides], run=False)
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    fit_start = time.time()
    trainer.fit(module, datamodule)
    fit_seconds = time.time() - fit_start
    export_text_to_image_pipeline(module, os.path.join(args.out, "pipeline"), text_encoder=datamodule.text_encoder,
                                  overwrite=True)

    module.eval()
    prompts, labels = evaluation_prompts(args.num_samples)
    cond = datamodule.evaluation_conditions(prompts)
    noise = datamodule.evaluation_noise(args.num_samples, args.seed)
    scale = float(module.hparams.guidance_scale)
    student, speed = timed_text_samples(lambda z, c: module.sample(z, c, nfe=1), module, noise, cond)
    results = {"student": {"1": {"images_per_second": speed,
                                 **score_text_to_image(student, prompts, labels, extractors)}}}
    sweep = teacher_card_sweep(args, extractors, scale)
    if sweep is not None:
        results["teacher"] = sweep["teacher"]
        teacher_source = f"teacher card ({os.path.relpath(TEACHER_CARD, ROOT)}), same protocol"
    else:
        results["teacher"] = {}
        for nfe in sorted(set(args.teacher_nfe) | {32}):
            samples, speed = timed_text_samples(
                lambda z, c, nfe=nfe: module.sample_teacher(z, c, nfe=nfe, method="euler"), module, noise, cond)
            results["teacher"][str(nfe)] = {"images_per_second": speed,
                                            **score_text_to_image(samples, prompts, labels, extractors)}
        teacher_source = "measured in this run"

    rows = list(range(10))  # prompt i asks for digit i % 10: one row per digit
    grid_cond = datamodule.evaluation_conditions([prompts[i] for i in rows])
    teacher_grid = module.to_images(module.sample_teacher(noise[rows], grid_cond, nfe=32, method="euler"))
    labelled_grid([prompts[i] for i in rows], teacher_grid, student[rows], os.path.join(args.out, "samples.png"))

    report = {"config": os.path.relpath(args.config, ROOT), "overrides": args.overrides,
              "protocol": {"num_samples": args.num_samples, "seed": args.seed, "guidance_scale": scale,
                           "prompts": "MNIST captions, digit n % 10 (evaluation_prompts)",
                           "reference": f"first {args.num_samples} MNIST test images", "extractors": extractors,
                           "teacher_sweep_source": teacher_source, "teacher_sampler": "Euler (DDIM), CFG",
                           "student_sampler": "one step"},
              "training": {"seconds": fit_seconds, "optimizer_steps": trainer.global_step},
              "results": results, "total_seconds": time.time() - started}
    write_json_atomic(os.path.join(args.out, "report.json"), report)
    write_text_atomic(os.path.join(args.out, "report.md"), markdown(report, extractors))
    print(markdown(report, extractors))


def markdown(report, extractors) -> str:
    results = report["results"]
    protocol = report["protocol"]
    head = ("| sampler | NFE | " + " | ".join(f"FID ({e})" for e in extractors)
            + " | prompt adherence | CLIP score | images/s |")
    lines = ["# Text-to-image MNIST distillation report (make demo-t2i)", "",
             f"DMD2 one-step student distilled from the shipped latent text-to-image teacher on prompts only, in "
             f"{report['training']['seconds']:.0f} s ({report['training']['optimizer_steps']} optimizer steps) on this "
             f"machine's CPU. Protocol: {protocol['num_samples']} prompts ({protocol['prompts']}, noise seed "
             f"{protocol['seed']}) against the {protocol['reference']}; teacher CFG scale {protocol['guidance_scale']}; "
             f"teacher sweep: {protocol['teacher_sweep_source']}.", "", head,
             "|---|---|" + "---|" * (len(extractors) + 3)]

    def row(name, nfe, entry):
        fids = " | ".join(f"{entry['fid'][e]:.2f}" for e in extractors)
        return (f"| {name} | {nfe} | {fids} | {100 * entry['prompt_adherence']:.1f}% | {entry['clip_score']:.2f} | "
                f"{entry['images_per_second']:.0f} |")
    lines.append(row("**student (DMD2)**", 1, results["student"]["1"]))
    for nfe, entry in sorted(results["teacher"].items(), key=lambda kv: int(kv[0])):
        lines.append(row(f"teacher (Euler, CFG {protocol['guidance_scale']})", nfe, entry))
    student, teacher32 = results["student"]["1"], results["teacher"]["32"]
    lines += ["", "Student / teacher-at-32-steps FID ratio: " + ", ".join(
        f"{e}: {student['fid'][e] / teacher32['fid'][e]:.2f}" for e in extractors) +
        f"; prompt adherence {100 * student['prompt_adherence']:.1f}% vs {100 * teacher32['prompt_adherence']:.1f}% "
        f"({100 * (student['prompt_adherence'] - teacher32['prompt_adherence']):+.1f} points).", "",
        "![teacher at 32 steps (left) and student at 1 step (right), same prompts and noise](samples.png)", "",
        "Exported student (plain diffusers StableDiffusionPipeline folder): `pipeline/` -- see its README.md.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
