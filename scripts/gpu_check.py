"""GPU check (``make gpu-check``): DMD2 and consistency distillation on a CIFAR-sized diffusers UNet, bf16.

For each method it runs a short Lightning fit (one accelerator, ``--precision``, EMA on, critic and generator update
in every batch) and prints
  - iterations per second (from the median batch time after warm-up; one iteration = one batch = every update),
  - peak accelerator memory (torch.cuda.max_memory_allocated),
  - the framework's overhead ratio: the batch time divided by the sum of the network passes the method needs for
    that batch, each timed alone on the same shapes and precision (forward without gradient, forward+backward into
    parameters or into the input, as the method does them); both sides are the fastest of their repeats, which
    keeps other processes' load out of the ratio. A ratio of 1.00 means the module, Lightning, the
    optimizer steps, clipping, EMA and logging add nothing; the ratio with the optimizer steps counted as work too is
    printed beside it.
and exits non-zero if anything fails (an exception, a non-finite loss, a ratio above --max-ratio when given).

    python scripts/gpu_check.py                         # CUDA, bf16-mixed, 35.7M-parameter UNet, batch 64
    python scripts/gpu_check.py --tiny --device cpu     # a dry run on CPU (small UNet; what CI-less checks use)
    python scripts/gpu_check.py --tiny --device cpu --methods dmd2,sid --precision 32-true   # CPU overhead ratios

    python scripts/gpu_check.py --text-to-image         # the text-to-image mode (below)
    python scripts/gpu_check.py --text-to-image --device cpu --tiny   # its dry run

Text-to-image mode: DMD2 through ``experiments/mnist_t2i/dmd2.yaml`` on the shipped tiny SD-architecture latent
teacher (assets/mnist-t2i: UNet2DConditionModel with cross-attention, AutoencoderKL, MiniLM prompt embeddings cached
on the CPU), once with a full student and critic and once with LoRA student + critic, bitsandbytes 8-bit AdamW and
gradient checkpointing; ``--precision`` (bf16-mixed on CUDA), attention through xformers when it imports on CUDA,
else torch SDPA (the backend used is printed). Prints it/s, peak memory, the backend and the final losses.

Sized for well under 5 minutes on one H100 (two methods x (fit of --steps batches + timing of single passes)).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from lightning.pytorch import Callback, LightningDataModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from callbacks import StudentEMA  # noqa: E402
from lightning_modules import DMD2, ConsistencyDistillation, SiD  # noqa: E402
from lightning_modules.diffusion import EDMSchedule  # noqa: E402
from lightning_modules.diffusion.samplers import heun_step  # noqa: E402
from lightning_modules.networks import DiffusersUNetDenoiser  # noqa: E402

#: DDPM's CIFAR-10 UNet layout (Ho et al. 2020): 35.7M parameters at 32x32, attention at 16x16
CIFAR_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  dropout=0.0, norm_num_groups=32)
TINY_UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 dropout=0.0, norm_num_groups=8)


class RandomImages(Dataset):
    """Items are whole batches: noise for the student and random "real" images (consistency distillation's data)."""

    def __init__(self, shape, batch_size, num_batches, seed=0):
        self.shape, self.batch_size, self.num_batches, self.seed = tuple(shape), batch_size, num_batches, seed

    def __len__(self):
        return self.num_batches

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(self.seed * 7919 + index)
        return {"noise": torch.randn((self.batch_size, *self.shape), generator=generator),
                "real": torch.randn((self.batch_size, *self.shape), generator=generator).clamp(-1, 1)}


class Batches(LightningDataModule):
    def __init__(self, shape, batch_size, num_batches):
        super().__init__()
        self.shape, self.batch_size, self.num_batches = shape, batch_size, num_batches

    def train_dataloader(self):
        return DataLoader(RandomImages(self.shape, self.batch_size, self.num_batches), batch_size=None)


#: the clock: wall time on CUDA (synchronised); on CPU this process's CPU time, which other processes' load on the
#: machine does not inflate (the CPU check runs one thread)
CLOCK = time.perf_counter


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BatchTimer(Callback):
    def __init__(self):
        self.times, self.losses, self._start = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        synchronize(pl_module.device)
        self._start = CLOCK()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synchronize(pl_module.device)
        self.times.append(CLOCK() - self._start)
        self.losses.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("/loss")})

    def steady_times(self, warmup: int, name: str) -> list[float]:
        """Batch times after ``warmup``; an error if there are none or any logged loss is not finite."""
        for losses in self.losses:
            for key, value in losses.items():
                if not math.isfinite(value):
                    raise FloatingPointError(f"{name}: {key} = {value}")
        steady = self.times[warmup:]
        if not steady:
            raise RuntimeError("no steady-state batches timed; raise --steps")
        return steady


def build_module(method: str, unet: dict, lr: float = 1e-5):
    schedule = EDMSchedule()
    teacher = DiffusersUNetDenoiser(config=dict(unet), preconditioning="edm", schedule=schedule)
    optimizer = lambda params: torch.optim.AdamW(params, lr=lr, betas=(0.0, 0.99), weight_decay=0.01)  # noqa: E731
    common = dict(teacher=teacher, generator_optimizer=optimizer, critic_optimizer=optimizer,
                  generator_clip_norm=10.0, critic_clip_norm=10.0)
    if method == "dmd2":
        return DMD2(**common)
    if method == "sid":
        return SiD(student_sigmas=[2.5], **common)
    if method == "cd":
        student = DiffusersUNetDenoiser(config=dict(unet), preconditioning="edm", boundary_condition=True,
                                        schedule=schedule)
        student.load_state_dict(teacher.state_dict())
        return ConsistencyDistillation(student=student, num_discretization_steps=18, target_ema_decay=0.95, **common)
    raise ValueError(f"unknown method {method!r}")


def best_time(fn, device, repeats: int, warmup: int = 2) -> float:
    """The fastest of ``repeats`` timed calls (the least disturbed by other processes; on an idle GPU it is within a
    few percent of the median)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        synchronize(device)
        times.append(CLOCK() - start)
    return min(times)


def network_passes(module, method: str, batch: dict, device, autocast, repeats: int) -> tuple[dict, dict]:
    """Seconds of each network pass the method's batch needs, timed alone; and of each optimizer step."""
    noise = batch["noise"].to(device)
    real = batch["real"].to(device)
    b = noise.shape[0]
    schedule = module.schedule
    t_student = torch.full((b,), float(module.student_times[0]), dtype=torch.float64, device=device)
    t = torch.full((b,), 2.0, dtype=torch.float64, device=device)
    x_prior = noise * float(schedule.edm_sigma(module.student_times[:1]).item())
    G, T, F = module.student, module.teacher, module.critic

    def fwd(network, x, time_, grad=False):
        with autocast():
            out = network(x, time_, None)
        return out

    def fwd_bwd_params(network, x, time_):
        network.zero_grad(set_to_none=True)
        with autocast():
            out = network(x, time_, None)
        out.float().square().mean().backward()

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    passes = {}
    if method in ("dmd2", "sid"):
        x_g = fwd(G, x_prior, t_student).detach()
        x_t = x_g + 2.0 * torch.randn_like(x_g)
        passes["critic: G fwd (no grad)"] = best_time(no_grad(lambda: fwd(G, x_prior, t_student)), device, repeats)
        passes["critic: F fwd+bwd"] = best_time(lambda: fwd_bwd_params(F, x_t, t), device, repeats)
        passes["generator: G fwd+bwd"] = best_time(lambda: fwd_bwd_params(G, x_prior, t_student), device, repeats)
        if method == "dmd2":
            passes["generator: T fwd (no grad)"] = best_time(no_grad(lambda: fwd(T, x_t, t)), device, repeats)
            passes["generator: F fwd (no grad)"] = best_time(no_grad(lambda: fwd(F, x_t, t)), device, repeats)
        else:
            F.requires_grad_(False)

            def teacher_critic_input_grad():
                x = x_t.detach().requires_grad_(True)
                with autocast():
                    out = T(x, t, None).float().sum() + F(x, t, None).float().sum()
                out.backward()
            passes["generator: T+F fwd+bwd to input"] = best_time(teacher_critic_input_grad, device, repeats)
            F.requires_grad_(True)
    else:  # consistency distillation
        x_noisy = real.to(device) + 2.0 * torch.randn_like(real)
        s = torch.full_like(t, 1.5)
        target = module.target_student.module
        passes["G fwd+bwd (online)"] = best_time(lambda: fwd_bwd_params(G, x_noisy, t), device, repeats)
        passes["T Heun step (2 fwd, no grad)"] = best_time(no_grad(lambda: heun_step(
            lambda x, tt: fwd(T, x, tt), x_noisy, t, s, schedule)), device, repeats)
        passes["target fwd (no grad)"] = best_time(no_grad(lambda: fwd(target, x_noisy, s)), device, repeats)
    G.zero_grad(set_to_none=True)
    if F is not None:
        F.zero_grad(set_to_none=True)
    optimizer_steps = {}
    for name, network in (("G", G), ("F", F)):
        if network is None:
            continue
        for p in network.parameters():
            p.grad = torch.zeros_like(p)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-12, betas=(0.0, 0.99), weight_decay=0.0)
        optimizer_steps[f"{name} AdamW step"] = best_time(optimizer.step, device, repeats)
        network.zero_grad(set_to_none=True)
    return passes, optimizer_steps


def check(method: str, args, device: torch.device) -> dict:
    unet = TINY_UNET if args.tiny else CIFAR_UNET
    torch.manual_seed(0)
    module = build_module(method, unet)
    params = sum(p.numel() for p in module.student.parameters())
    shape = (unet["in_channels"], unet["sample_size"], unet["sample_size"])
    timer = BatchTimer()
    trainer = Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=args.precision,
                      max_steps=-1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[StudentEMA(decay=0.999), timer])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.fit(module, Batches(shape, args.batch, args.steps + args.warmup))
    fit_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    steady = timer.steady_times(args.warmup, method)
    batch_time = statistics.median(steady)
    best_batch = min(steady)
    module = module.to(device)
    module.train()
    if args.precision.startswith("bf16"):
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    elif args.precision.startswith("16"):
        autocast = lambda: torch.autocast(device.type, dtype=torch.float16)  # noqa: E731
    else:
        autocast = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731
    passes, optimizer_steps = network_passes(module, method, RandomImages(shape, args.batch, 1)[0], device,
                                             autocast, args.repeats)
    work = sum(passes.values())
    result = {"method": method, "device": str(device), "device_name": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "precision": args.precision, "batch": args.batch,
              "student_parameters": params, "batches_timed": len(steady), "iterations_per_second": 1 / batch_time,
              "batch_seconds_median": batch_time, "fit_seconds": fit_seconds,
              "peak_memory_gib": None if peak is None else peak / 2 ** 30,
              "network_passes_seconds": passes, "network_seconds": work,
              "batch_seconds_best": best_batch,
              "optimizer_seconds": optimizer_steps, "overhead_ratio": best_batch / work,
              "overhead_ratio_with_optimizer": best_batch / (work + sum(optimizer_steps.values())),
              "final_losses": timer.losses[-1] if timer.losses else {}}
    return result


T2I_VARIANTS = {
    "dmd2-t2i": [],
    "dmd2-t2i-lora-8bit-ckpt": ['--model.init_args.student_lora={"rank": 8, "alpha": 8}',
                                "--model.init_args.gradient_checkpointing=true",
                                "--model.init_args.generator_optimizer=bitsandbytes.optim.AdamW8bit",
                                "--model.init_args.critic_optimizer=bitsandbytes.optim.AdamW8bit"],
}


def check_text_to_image(variant: str, args, device: torch.device) -> dict:
    """One text-to-image variant (see the module docstring) as a Lightning fit through the CLI config."""
    import tempfile

    from lightning_modules.cli import main as cli_main
    from lightning_modules.networks.memory import resolve_attention

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    timer = BatchTimer()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["--trainer.callbacks=[]", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                     "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
                     f"--trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "--trainer.devices=1",
                     f"--trainer.precision={args.precision}", f"--trainer.max_steps={2 * (args.steps + args.warmup)}",
                     f"--trainer.default_root_dir={tmp}", f"--data.init_args.batch_size={args.batch}",
                     f"--data.init_args.cache_dir={os.path.join(tmp, 'cache')}",
                     "--model.init_args.attention_backend=auto", *T2I_VARIANTS[variant]]
        cli = cli_main(["-c", os.path.join(root, "experiments", "mnist_t2i", "dmd2.yaml"), *overrides], run=False)
        cli.trainer.callbacks.append(timer)
        params = sum(p.numel() for p in cli.model.generator_parameters())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, cli.datamodule)
        fit_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    steady = timer.steady_times(args.warmup, variant)  # a batch: one critic + one generator update (no TTUR)
    batch_time = statistics.median(steady)
    return {"method": variant, "device": str(device), "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu", "precision": args.precision, "batch": args.batch,
            "trainable_parameters": params, "attention": resolve_attention("auto"), "batches_timed": len(steady),
            "iterations_per_second": 1 / batch_time, "batch_seconds_median": batch_time, "fit_seconds": fit_seconds,
            "peak_memory_gib": None if peak is None else peak / 2 ** 30,
            "final_losses": timer.losses[-1] if timer.losses else {}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="dmd2,cd", help="comma list of dmd2, sid, cd (default dmd2,cd)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--precision", default=None, help="Lightning precision (default bf16-mixed on CUDA with "
                        "bf16 support, else 32-true)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64; 8 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed batches (default 60; 12 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first batches (default 10; 3 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per single-pass timing (default 20; 5)")
    parser.add_argument("--tiny", action="store_true", help="a small UNet at 16x16 (dry runs on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--max-ratio", type=float, default=None, help="fail when an overhead ratio exceeds this")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--text-to-image", action="store_true",
                        help="the text-to-image mode on the shipped tiny SD-architecture teacher (see the docstring)")
    args = parser.parse_args(argv)
    args.batch = args.batch or (8 if args.tiny else 64)
    args.steps = args.steps or (12 if args.tiny else 60)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.tiny else 10)
    args.repeats = args.repeats or (5 if args.tiny else 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    global CLOCK
    if device.type == "cpu" and torch.get_num_threads() == 1:
        CLOCK = time.process_time
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (use --device cpu --tiny for a dry run)", file=sys.stderr)
        return 2
    if args.precision is None:
        from lightning_modules.strategies import default_precision
        args.precision = default_precision("cuda" if device.type == "cuda" else "cpu") \
            if device.type == "cuda" else "32-true"
    results, failed = [], False
    methods = list(T2I_VARIANTS) if args.text_to_image else [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        try:
            result = check_text_to_image(method, args, device) if args.text_to_image else check(method, args, device)
        except Exception:  # report every method, then fail
            traceback.print_exc()
            print(f"gpu-check: {method} FAILED", file=sys.stderr)
            failed = True
            continue
        results.append(result)
        peak = "n/a (CPU)" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.2f} GiB"
        if args.text_to_image:
            print(f"{method} {result['device_name']} {result['precision']} batch {result['batch']} "
                  f"({result['trainable_parameters'] / 1e6:.2f}M trainable, attention {result['attention']}): "
                  f"{result['iterations_per_second']:.2f} it/s (one critic + one generator update each), peak memory "
                  f"{peak}, losses {result['final_losses']}", flush=True)
            continue
        clock = "CPU-time " if CLOCK is time.process_time else ""
        print(f"{method:5s} {result['device_name']} {result['precision']} batch {result['batch']} "
              f"({result['student_parameters'] / 1e6:.2f}M-parameter student): "
              f"{result['iterations_per_second']:.2f} {clock}it/s, peak memory {peak}, overhead ratio "
              f"{result['overhead_ratio']:.3f} (with optimizer steps as work: "
              f"{result['overhead_ratio_with_optimizer']:.3f})", flush=True)
        for name, seconds in {**result["network_passes_seconds"], **result["optimizer_seconds"]}.items():
            print(f"        {name:36s} {seconds * 1e3:8.2f} ms")
        print(f"        {'batch (fastest; median)':36s} {result['batch_seconds_best'] * 1e3:8.2f} ms "
              f"({result['batch_seconds_median'] * 1e3:.2f} ms)")
        if args.max_ratio is not None and result["overhead_ratio"] > args.max_ratio:
            print(f"gpu-check: {method} overhead ratio {result['overhead_ratio']:.3f} > {args.max_ratio}",
                  file=sys.stderr)
            failed = True
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    print("gpu-check: FAILED" if failed else "gpu-check: OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
