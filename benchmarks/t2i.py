"""The text-to-image memory/speed benchmark: DMD2 training iterations on the shipped SD-layout latent teacher
(assets/mnist-t2i: UNet2DConditionModel with cross-attention, AutoencoderKL, MiniLM prompts), one row per memory
option -- full vs LoRA student, 32-bit AdamW vs bitsandbytes 8-bit AdamW, with vs without gradient checkpointing --
each in its own process, side by side in one run, with ratios to the full / 32-bit / no-checkpointing baseline.

    python benchmarks/t2i.py --output bench-results            (make bench-t2i)
    python benchmarks/t2i.py --iterations 10 --batch-size 8

One iteration = one critic update + one generator update (DMD2's two phases; TTUR ratios only repeat them).
Per row:
  s/iteration     median wall time of ``--iterations`` iterations after two warm-up ones (one CPU thread);
  trainable       trainable parameters of student + critic;
  state bytes     exact bytes of parameters + gradients + optimizer state of the trained networks after training
                  (the persistent memory the options change; counted tensor by tensor);
  activations     peak bytes of tensors autograd saves for backward during one generator and one critic loss,
                  counted with ``torch.autograd.graph.saved_tensors_hooks`` (gradient checkpointing's own hooks
                  nest inside, so only the segment inputs it keeps are counted, as on a GPU);
  peak RSS        the process's peak resident memory (includes the frozen teacher, VAE, text encoder, Python);
  CUDA peak       ``torch.cuda.max_memory_allocated`` when a GPU is present.
Writes ``t2i.json`` and ``t2i.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.training_step import run_row  # noqa: E402
CONFIG = os.path.join(ROOT, "experiments", "mnist_t2i", "dmd2.yaml")

#: (row name, student, optimizer, gradient checkpointing)
ROWS = [("full / AdamW / no ckpt", "full", "adamw", False),
        ("full / AdamW / ckpt", "full", "adamw", True),
        ("full / AdamW8bit / no ckpt", "full", "adamw8bit", False),
        ("LoRA r8 student+critic / AdamW / no ckpt", "lora", "adamw", False),
        ("LoRA r8 student+critic / AdamW8bit / ckpt", "lora", "adamw8bit", True)]
OPTIMIZERS = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit"}


def worker(args) -> dict:
    import torch

    from benchmarks.training_step import measure_training_iterations
    from tests.toy_runs import build

    torch.set_num_threads(1)
    torch.manual_seed(0)
    overrides = ["--trainer.callbacks=[]", f"--data.init_args.batch_size={args.batch_size}",
                 f"--model.init_args.generator_optimizer={OPTIMIZERS[args.optimizer]}",
                 f"--model.init_args.critic_optimizer={OPTIMIZERS[args.optimizer]}",
                 f"--model.init_args.gradient_checkpointing={str(args.checkpointing).lower()}",
                 f"--data.init_args.cache_dir={os.path.join(args.output, '.t2i-embedding-cache')}",
                 f"--model.init_args.teacher.init_args.pipeline_path={args.pipeline}",
                 f"--model.init_args.autoencoder.init_args.pretrained_path={args.pipeline}"]
    if args.student == "lora":
        overrides += [f"--model.init_args.student_lora={json.dumps({'rank': 8, 'alpha': 8})}"]
    cli = build(CONFIG, *overrides)
    module, datamodule = cli.model, cli.datamodule
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    module.setup("fit")
    module.train()
    generator_optimizer, critic_optimizer = module.configure_optimizers()[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device)

    def next_batch():
        return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in next(batches).items()}

    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    row = measure_training_iterations(module, next_batch, generator_optimizer, critic_optimizer, args.iterations,
                                      synchronize=synchronize)
    return {**row, "cuda_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            "device": device.type}


def mib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.2f}"


def markdown(rows: list[dict], args) -> str:
    base = rows[0]
    lines = ["# Text-to-image memory options (make bench-t2i)", "",
             f"DMD2 on the shipped SD-layout latent teacher (assets/mnist-t2i), batch {args.batch_size}, median of "
             f"{args.iterations} iterations (one critic + one generator update), one CPU thread per row, each row its "
             f"own process; ratios are to the first row, measured in this run.", "",
             "| option | s/iteration | ratio | trainable params | state MiB (params+grads+optim) | ratio | "
             "activations MiB (peak saved) | ratio | peak RSS MiB | CUDA peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['seconds_per_iteration']:.3f} | "
            f"{row['seconds_per_iteration'] / base['seconds_per_iteration']:.2f} | {row['trainable_parameters']:,} | "
            f"{mib(row['state_bytes_total'])} | {row['state_bytes_total'] / base['state_bytes_total']:.2f} | "
            f"{mib(row['activation_bytes_peak'])} | "
            f"{row['activation_bytes_peak'] / base['activation_bytes_peak']:.2f} | {mib(row['peak_rss_bytes'])} | "
            f"{mib(row['cuda_peak_bytes'])} |")
    lines += ["", "State bytes are exact counts; the optimizer-state column of 8-bit AdamW keeps 32-bit state for "
              "tensors under bitsandbytes' min_8bit_size (4096 elements), as the library does. Peak RSS includes the "
              "frozen teacher, VAE and text encoder and the interpreter, which no option changes."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(ROOT, "bench-results"))
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pipeline", default=os.path.join(ROOT, "assets", "mnist-t2i"),
                        help="the SD-layout pipeline folder (default: the shipped MNIST text-to-image teacher)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--student", choices=["full", "lora"], default="full", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations < 1 or args.batch_size < 1:
        parser.error(f"--iterations and --batch-size must be >= 1, got {args.iterations}, {args.batch_size}")
    os.makedirs(args.output, exist_ok=True)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    rows = []
    for name, student, optimizer, checkpointing in ROWS:
        arguments = ["--output", args.output, "--iterations", str(args.iterations), "--batch-size",
                     str(args.batch_size), "--pipeline", args.pipeline, "--student", student, "--optimizer",
                     optimizer] + (["--checkpointing"] if checkpointing else [])
        result = run_row(__file__, arguments, name, ROOT)
        rows.append({"name": name, "student": student, "optimizer": optimizer, "gradient_checkpointing": checkpointing,
                     **result})
        print(f"{name}: {rows[-1]['seconds_per_iteration']:.3f} s/iteration", flush=True)
    report = {"config": os.path.relpath(CONFIG, ROOT), "pipeline": args.pipeline, "batch_size": args.batch_size, "iterations": args.iterations,
              "rows": rows}
    tmp = os.path.join(args.output, "t2i.json.tmp")
    with open(tmp, "w") as handle:
        json.dump(report, handle, indent=1)
    os.replace(tmp, os.path.join(args.output, "t2i.json"))
    text = markdown(rows, args)
    with open(os.path.join(args.output, "t2i.md.tmp"), "w") as handle:
        handle.write(text)
    os.replace(os.path.join(args.output, "t2i.md.tmp"), os.path.join(args.output, "t2i.md"))
    print(text)


if __name__ == "__main__":
    main()
