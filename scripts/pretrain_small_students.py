"""Stage 1 of MSD (teacher score matching) once, saved for reuse: the routed students of an MSD config regress onto
the teacher's x0 estimate at noised samples of their own classes (see lightning_modules/methods/msd.py).

    python scripts/pretrain_small_students.py -c experiments/mnist/msd.yaml --output msd-students.safetensors
    distill fit -c experiments/mnist/msd.yaml --model.init_args.pretrained_students msd-students.safetensors

Writes the students' state dict (safetensors) and a JSON card beside it (steps, seconds, final training loss, the
held-out regression error of each student on test images of its classes next to that of an untrained student, and
parameter counts). Extra arguments override the config (e.g. --model.init_args.warm_start_steps=3000).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def held_out_error(module, images, labels, count: int = 512, seed: int = 0) -> dict[int, float]:
    """Per student: EDM-weighted mean squared distance to the teacher's x0 estimate on ``count`` held-out samples
    (noise levels log-uniform over the schedule, as in training)."""
    import torch

    from lightning_modules.losses import dsm_weight
    from lightning_modules.warm_start import log_uniform_times

    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(images), generator=generator)[:count]
    x0, cond = images[index], labels[index]
    t = log_uniform_times(count, module.schedule, generator)
    x_t = module.schedule.add_noise(x0, torch.randn(x0.shape, generator=generator, dtype=torch.float64), t)
    with torch.no_grad():
        error = dsm_weight(module.schedule, t).float() * (module.student(x_t, t, cond) - module.teacher_x0(
            x_t, t, cond)).pow(2).flatten(1).mean(1)
    owners = module.student.owners_of(cond)
    return {k: float(error[owners == k].mean()) for k in range(len(module.student.students))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="an MSD config (experiments/.../msd.yaml)")
    parser.add_argument("--output", required=True, help="safetensors file to write (a .json card goes beside it)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    known, overrides = parser.parse_known_args(argv)

    import torch
    from safetensors.torch import save_file

    from lightning_modules.cli import main as cli_main
    from lightning_modules.methods.msd import MSD

    torch.set_num_threads(known.threads)
    cli = cli_main(["-c", known.config, "--trainer.logger=false", *overrides], run=False)
    module, datamodule = cli.model, cli.datamodule
    if not isinstance(module, MSD):
        raise SystemExit(f"{known.config} is not an MSD config (model is {type(module).__name__})")
    if module.hparams.warm_start_steps < 1:
        raise SystemExit("warm_start_steps is 0: nothing to pretrain (set --model.init_args.warm_start_steps=N)")
    test = datamodule.split("test") if hasattr(datamodule, "split") else None
    untrained = held_out_error(module, *test) if test is not None else None
    report = module.pretrain_students(datamodule)
    state = {k: v.detach().cpu().contiguous() for k, v in module.student.state_dict().items()}
    directory = os.path.dirname(os.path.abspath(known.output))
    os.makedirs(directory, exist_ok=True)
    save_file(state, known.output)
    card = {
        "config": known.config, "overrides": overrides, "threads": known.threads, **report,
        "classes_per_student": module.student.classes_per_student,
        "teacher_parameters": sum(p.numel() for p in module.teacher.parameters()),
        "student_parameters": [sum(p.numel() for p in s.parameters()) for s in module.student.students],
        "held_out_error_untrained": untrained,
        "held_out_error": held_out_error(module, *test) if test is not None else None,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(os.path.splitext(known.output)[0] + ".json", "w") as handle:
        json.dump(card, handle, indent=2)
        handle.write("\n")
    print(json.dumps(card, indent=2))
    return card


if __name__ == "__main__":
    main()
