"""LoRA-enhanced distillation, measured: full vs LoRA student memory for several methods, side by side in one run.

For each method (default DMD2, SiD, CD and KD on the shipped MNIST teacher, ``experiments/mnist/<method>.yaml``) two
rows, each in its own process: the method's own student (a trainable copy of the teacher), and ``student_lora`` rank
``--rank`` adapters on the shared frozen teacher (``DistillationModule``: any method; critics, consistency targets
and EMA copies made from the student inherit the adapters). Per row, as in ``benchmarks/t2i.py`` (whose counters it
reuses): trainable parameters (student + critic), exact state bytes (parameters + gradients + optimizer state of what
trains), peak bytes autograd saves for backward in one generator / critic loss, seconds per iteration (one critic
update, if the method has a critic, then one generator update; median after two warm-up iterations, one CPU
thread) and peak RSS; the LoRA row carries its ratios to the full row of the same method, measured in this run.

    python benchmarks/lora_memory.py --output bench-results             (writes lora_memory.json / .md)
    python benchmarks/lora_memory.py --methods dmd2 sid --iterations 4 --batch-size 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.training_step import run_row  # noqa: E402
METHODS = ["dmd2", "sid", "cd", "kd"]


def worker(args) -> dict:
    import torch

    from benchmarks.training_step import measure_training_iterations
    from tests.toy_runs import build

    torch.set_num_threads(1)
    torch.manual_seed(0)
    overrides = ["--trainer.callbacks=[]", f"--data.init_args.batch_size={args.batch_size}"]
    if args.method == "kd":   # no pair file needed: the teacher ODE solved per batch (few steps: memory, not quality)
        overrides += ["--data=datamodules.MNISTDataModule", f"--data.init_args.batch_size={args.batch_size}",
                      "--model.init_args.mode=on_the_fly", "--model.init_args.teacher_nfe=4"]
    if args.lora:
        overrides += [f"--model.init_args.student_lora={json.dumps({'rank': args.rank, 'alpha': args.rank})}"]
    cli = build(os.path.join(ROOT, "experiments", "mnist", f"{args.method}.yaml"), *overrides)
    module, datamodule = cli.model, cli.datamodule
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    module.setup("fit")
    module.train()
    optimizers = module.configure_optimizers()[0]
    critic_optimizer = optimizers[1] if module.uses_critic else None
    return measure_training_iterations(module, lambda: module.prepare_batch(next(batches)), optimizers[0],
                                       critic_optimizer, args.iterations)


def mib(n) -> str:
    return f"{n / 2 ** 20:.3f}"


def markdown(rows: list[dict], args) -> str:
    lines = ["# LoRA vs full students (benchmarks/lora_memory.py)", "",
             f"Shipped MNIST teacher (0.27M-parameter UNet), batch {args.batch_size}, median of {args.iterations} "
             f"iterations (critic update if any + generator update), one CPU thread, each row its own process; LoRA "
             f"rank {args.rank} on the shared frozen teacher; ratios are LoRA / full of the same method, this run.", "",
             "| method | student | trainable params | state MiB | ratio | activations MiB | ratio | s/iteration | "
             "ratio | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    full = {row["method"]: row for row in rows if not row["lora"]}
    for row in rows:
        base = full[row["method"]]
        ratio = (lambda key: f"{row[key] / base[key]:.3f}") if row["lora"] else (lambda key: "1")
        lines.append(f"| {row['method']} | {'LoRA r' + str(args.rank) if row['lora'] else 'full copy'} | "
                     f"{row['trainable_parameters']:,} | {mib(row['state_bytes_total'])} | {ratio('state_bytes_total')} | "
                     f"{mib(row['activation_bytes_peak'])} | {ratio('activation_bytes_peak')} | "
                     f"{row['seconds_per_iteration']:.3f} | {ratio('seconds_per_iteration')} | "
                     f"{mib(row['peak_rss_bytes'])} |")
    lines += ["", "State = parameters + gradients + optimizer state of the trained networks (exact tensor bytes); the "
              "frozen teacher is held once in both rows and is not in it. Activations = peak bytes saved for backward "
              "in one loss; LoRA keeps the base layers' inputs for the adapters' gradients, so it saves less only "
              "where the frozen path needs no gradient. Peak RSS includes the interpreter and the data."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(ROOT, "bench-results"))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations < 1 or args.batch_size < 1 or args.rank < 1:
        parser.error(f"--iterations, --batch-size and --rank must be >= 1, got {args.iterations}, {args.batch_size}, "
                     f"{args.rank}")
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    os.makedirs(args.output, exist_ok=True)
    rows = []
    for method in args.methods:
        for lora in (False, True):
            arguments = ["--method", method, "--iterations", str(args.iterations), "--batch-size",
                         str(args.batch_size), "--rank", str(args.rank)] + (["--lora"] if lora else [])
            result = run_row(__file__, arguments, f"{method} lora={lora}", ROOT)
            rows.append({"method": method, "lora": lora, **result})
            print(f"{method} {'lora' if lora else 'full'}: state {mib(rows[-1]['state_bytes_total'])} MiB, "
                  f"{rows[-1]['seconds_per_iteration']:.3f} s/iteration", flush=True)
    with open(os.path.join(args.output, "lora_memory.json"), "w") as handle:
        json.dump({"batch_size": args.batch_size, "iterations": args.iterations, "rank": args.rank, "rows": rows},
                  handle, indent=1)
    text = markdown(rows, args)
    with open(os.path.join(args.output, "lora_memory.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
