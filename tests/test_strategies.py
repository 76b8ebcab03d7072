"""Strategies: 2-process CPU DDP and FSDP (gloo) fits of DMD2 against one process with the same global batch; FSDP
with the teacher sharded or replicated; bf16 autocast on CPU; the TPU (XLA) config; the GPU-check script's dry run.

Noise statement for the metric comparison: the runs differ only in their random draws (one process draws 256 noise
levels per batch from one stream; two ranks draw 128 each), so their metrics can differ by as much as two seeds of
the one-process run do. The test measures that spread (seed 0 vs seed 1, same global batch) and requires DDP's and
FSDP's sliced W2 (student and EMA, NFE 1, 4000 exact-law samples) to lie within max(3 x spread, 2 x the metric's own
finite-sample floor) of seed 0's. Where the randomness is the same (DDP and FSDP, both seeded 0 on every rank), the
parameters themselves must agree to float32 reduction-order noise.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import own_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "strategy_fit.py"
QUIET = ["--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0",
         "--model.init_args.warm_start_steps=300",
         "--trainer.callbacks=[{class_path: callbacks.TwoTimeScaleUpdate, init_args: "
         "{critic_steps_per_generator_step: 5}}, {class_path: callbacks.StudentEMA, init_args: {decay: 0.99}}]"]
BATCHES = 100  # optimizer batches per rank (global batch 256)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo",
                MASTER_ADDR="127.0.0.1", HF_HUB_OFFLINE="1", MASTER_PORT=str(own_port()))


def _start(out: Path, *args: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "w")
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), "-c", "experiments/toy/ring8/dmd2.yaml", *QUIET,
                             *args], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def strategy_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategies")
    single = [f"--data.init_args.batch_size=256", f"--data.init_args.batches_per_epoch={BATCHES}"]
    double = ["--trainer.devices=2", "--data.init_args.batch_size=128", f"--data.init_args.batches_per_epoch={2 * BATCHES}"]
    runs = {
        "single": _start(root / "single", *single),
        "single_seed1": _start(root / "single_seed1", *single, "--seed_everything=1"),
        "ddp": _start(root / "ddp", *double, "--trainer.strategy=ddp_find_unused_parameters_true"),
        "fsdp": _start(root / "fsdp", *double, "-c", "experiments/strategies/fsdp.yaml"),
    }
    results = {}
    for name, process in runs.items():
        code = process.wait(timeout=900)
        log = (root / name / "log.txt").read_text()
        assert code == 0, f"{name} failed:\n{log[-4000:]}"
        results[name] = torch.load(root / name / "result.pt", weights_only=False)
    return results


def test_fsdp_matches_ddp_parameter_for_parameter(strategy_runs):
    ddp, fsdp = strategy_runs["ddp"], strategy_runs["fsdp"]
    assert (ddp["strategy"], fsdp["strategy"]) == ("DDPStrategy", "DistillFSDP")
    assert ddp["world_size"] == fsdp["world_size"] == 2
    assert ddp["global_step"] == fsdp["global_step"] == BATCHES + BATCHES // 5
    assert ddp["module"].keys() == fsdp["module"].keys()  # FSDP's full state dict has the plain parameter names
    worst = max(float((ddp["module"][k].double() - fsdp["module"][k].double()).abs().max()) for k in ddp["module"])
    worst_ema = max(float((ddp["ema"][k].double() - fsdp["ema"][k].double()).abs().max()) for k in ddp["ema"])
    print(f"max |DDP - FSDP| after {ddp['global_step']} steps: parameters {worst:.2e}, EMA {worst_ema:.2e}")
    assert worst < 1e-4 and worst_ema < 1e-4


def test_ddp_and_fsdp_metrics_match_one_process_with_the_same_global_batch(strategy_runs):
    single, other_seed = strategy_runs["single"], strategy_runs["single_seed1"]
    assert single["global_step"] == strategy_runs["ddp"]["global_step"]
    lines = []
    for which in ("student_metrics", "ema_metrics"):
        reference = single[which]["sliced_w2"]
        spread = abs(other_seed[which]["sliced_w2"] - reference)
        floor = single[which]["sliced_w2_floor"]
        tolerance = max(3 * spread, 2 * floor)
        for name in ("ddp", "fsdp"):
            value = strategy_runs[name][which]["sliced_w2"]
            lines.append(f"{which} sliced W2: 1 process {reference:.4f} (seed 1: {other_seed[which]['sliced_w2']:.4f},"
                         f" floor {floor:.4f}); {name} {value:.4f}; |diff| {abs(value - reference):.4f} <= "
                         f"{tolerance:.4f}")
            assert abs(value - reference) <= tolerance, lines[-1]
            assert strategy_runs[name][which]["modes_covered"] == single[which]["modes_covered"] or \
                abs(strategy_runs[name][which]["mode_weight_tv"] - single[which]["mode_weight_tv"]) < 0.1
    print("\n".join(lines))


def _tiny_fit(tmp_path, *overrides, max_batches=6):
    from lightning_modules.cli import main

    args = ["-c", "experiments/toy/ring8/dmd2.yaml", *QUIET[:-2], "--model.init_args.warm_start_steps=20",
            "--trainer.callbacks=[{class_path: callbacks.StudentEMA, init_args: {decay: 0.9}}]",
            "--data.init_args.batch_size=64", f"--data.init_args.batches_per_epoch={max_batches}",
            f"--trainer.default_root_dir={tmp_path}", *overrides]
    cli = main(args, run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


@pytest.mark.parametrize("teacher", ["shard", "replicate"])
def test_fsdp_wraps_each_network_and_shards_or_replicates_a_network_teacher(teacher, tmp_path, monkeypatch):
    """One process (world size 1, gloo): a network teacher (toy MLP) is its own FSDP unit or stays whole; the
    student and critic are FSDP units; the fit gives the parameters DDP gives (both re-seed at setup)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + (os.getpid() % 1000) + (teacher == "shard")))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    network_teacher = ["--model.init_args.teacher=lightning_modules.networks.ToyMLPDenoiser",
                       "--model.init_args.teacher.init_args.dim=2", "--model.init_args.teacher.init_args.hidden=32",
                       "--model.init_args.teacher.init_args.depth=2",
                       "--model.init_args.teacher.init_args.schedule=lightning_modules.diffusion.EDMSchedule",
                       "--model.init_args.student=null", "--model.init_args.warm_start_steps=0"]
    strategy = ('--trainer.strategy={"class_path": "lightning_modules.strategies.DistillFSDP", '
                f'"init_args": {{"teacher": "{teacher}"}}}}')
    try:
        ddp = _tiny_fit(tmp_path / "ddp", *network_teacher, "--trainer.strategy=ddp_find_unused_parameters_true",
                        "--trainer.devices=1")
        sharded = _tiny_fit(tmp_path / "fsdp", *network_teacher, strategy, "--trainer.devices=1")
        module = sharded.model
        assert isinstance(module.student, FSDP) and isinstance(module.critic, FSDP)
        assert isinstance(module.teacher, FSDP) == (teacher == "shard")
        assert not any(p.requires_grad for p in module.teacher.parameters())
        full = sharded.trainer.strategy.lightning_module_state_dict()
        reference = ddp.model.state_dict()
        assert full.keys() == reference.keys()
        worst = max(float((full[k].double() - reference[k].double()).abs().max()) for k in reference)
        # float32: FSDP flattens parameters and reduces in another order than DDP; after Adam steps (which
        # normalise away the gradient scale) that rounding reaches ~1e-6 on parameters of size ~1
        assert worst < 1e-5, worst
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_fsdp_bf16_mixed_matches_ddp_bf16_mixed(tmp_path, monkeypatch):
    """FSDP gathers bf16 parameters, reduces gradients and keeps buffers in float32, leaves the float64 times alone and
    autocasts on the strategy's device: the same numbers as DDP's bf16 autocast (world size 1 here; 2 processes give
    the same, see the report)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(28500 + os.getpid() % 1000))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    strategy = '--trainer.strategy={"class_path": "lightning_modules.strategies.DistillFSDP"}'
    try:
        ddp = _tiny_fit(tmp_path / "ddp", "--trainer.strategy=ddp_find_unused_parameters_true", "--trainer.devices=1",
                        "--trainer.precision=bf16-mixed")
        fsdp = _tiny_fit(tmp_path / "fsdp", strategy, "--trainer.devices=1", "--trainer.precision=bf16-mixed")
        config = fsdp.trainer.strategy.mixed_precision_config
        assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (torch.bfloat16, torch.float32,
                                                                                  torch.float32)
        full = fsdp.trainer.strategy.lightning_module_state_dict()
        reference = ddp.model.state_dict()
        assert all(full[k].dtype == reference[k].dtype for k in reference)
        worst = max(float((full[k].double() - reference[k].double()).abs().max()) for k in reference)
        # float32: FSDP flattens parameters and reduces in another order than DDP; after Adam steps (which
        # normalise away the gradient scale) that rounding reaches ~1e-6 on parameters of size ~1
        assert worst < 1e-5, worst
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_bf16_mixed_fit_on_cpu(tmp_path):
    from lightning_modules.strategies import default_precision

    assert default_precision("cpu") == "bf16-mixed"
    cli = _tiny_fit(tmp_path, "--trainer.precision=bf16-mixed")
    assert cli.trainer.precision == "bf16-mixed"
    assert all(torch.isfinite(p).all() for p in cli.model.student.parameters())
    assert all(p.dtype == torch.float32 for p in cli.model.student.parameters())  # master weights stay float32


#: calls that exist only on CUDA; a device-agnostic code path never makes them (guards like is_available are fine)
CUDA_ONLY = re.compile(r"\.cuda\(|torch\.cuda\.(?!is_available|is_bf16_supported|device_count|get_device_name|"
                       r"synchronize|max_memory_allocated|reset_peak_memory_stats)|device=['\"]cuda|"
                       r"torch\.device\(['\"]cuda|\.to\(['\"]cuda")


def test_tpu_config_and_no_cuda_only_code_paths():
    """The XLA config parses into an XLA strategy on TPU; the library code it runs (module, methods, networks,
    callbacks, datamodules, strategies) has no CUDA-only call outside guarded spots that name the device they use."""
    import yaml

    config = yaml.safe_load((ROOT / "experiments" / "strategies" / "tpu.yaml").read_text())
    assert config["trainer"]["accelerator"] == "tpu"
    assert config["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.XLAStrategy"
    assert config["trainer"]["precision"] == "bf16-true"
    offenders = []
    for folder in ("lightning_modules", "callbacks", "datamodules"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in ("trajectory_pairs.py",):  # an offline CLI with an explicit --device choice
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if CUDA_ONLY.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "CUDA-only calls:\n" + "\n".join(offenders)


def test_tpu_overlay_builds_everything_but_the_xla_runtime(tmp_path):
    """The same config with the accelerator swapped back to CPU builds and fits (everything else is identical);
    with accelerator tpu the only thing missing here is torch_xla itself."""
    from lightning_modules.cli import main

    cli = main(["-c", "experiments/toy/ring8/dmd2.yaml", "-c", "experiments/strategies/tpu.yaml", *QUIET[:-2],
                "--trainer.accelerator=cpu", "--trainer.strategy=auto", "--trainer.devices=1",
                "--trainer.precision=bf16-mixed", "--model.init_args.warm_start_steps=10",
                "--data.init_args.batches_per_epoch=3", "--data.init_args.batch_size=32",
                "--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path}"], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step > 0


def test_gpu_check_dry_run_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, "scripts/gpu_check.py", "--tiny", "--device", "cpu", "--methods",
                             "dmd2,cd", "--steps", "2", "--warmup", "1", "--repeats", "1", "--batch", "4",
                             "--json", str(tmp_path / "gpu.json")], cwd=ROOT, env=_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu-check: OK" in result.stdout
    import json
    records = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["method"] for r in records] == ["dmd2", "cd"]
    assert all(r["iterations_per_second"] > 0 and r["overhead_ratio"] > 0 for r in records)


def test_agreed_draw_takes_rank_zeros_value_and_advances_every_stream():
    from types import SimpleNamespace

    from lightning_modules.strategies import agreed_draw

    calls = []
    strategy = SimpleNamespace(broadcast=lambda value, src: calls.append((value, src)) or 7)
    module = SimpleNamespace(_trainer=SimpleNamespace(world_size=2, strategy=strategy))
    state = torch.get_rng_state()
    assert agreed_draw(module, lambda: int(torch.randint(0, 100, (1,)))) == 7
    assert len(calls) == 1 and calls[0][1] == 0
    assert not torch.equal(state, torch.get_rng_state())  # this rank drew too
    alone = SimpleNamespace(_trainer=None)
    assert agreed_draw(alone, lambda: 3) == 3
