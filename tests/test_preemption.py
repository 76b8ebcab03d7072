"""Preemption safety without Slurm: a signal mid-epoch gives a checkpoint at the batch boundary from which the fit
resumes bit for bit; checkpoints are written atomically (kill -9 mid-write keeps the previous one loadable) and a
damaged one fails with a clear message; the training loader resumes at the exact batch; sweep files expand into
named points and their results into a summary table."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lightning_modules.checkpoint_io import TEMP_PREFIX, AtomicCheckpointIO, CorruptCheckpointError
from tests.helpers import own_port, state_difference

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **extra)


def _distill(out: Path, config: str, *args: str, **env) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    if any(a.startswith("--trainer.devices=") and a != "--trainer.devices=1" for a in args):
        env.setdefault("MASTER_PORT", str(own_port()))
    log = open(out / "log.txt", "a")
    # the console script (not python -c): Lightning's DDP/FSDP launcher re-runs sys.argv for the other ranks
    command = [str(Path(sys.executable).parent / "distill"), "fit", "-c", config, f"--trainer.default_root_dir={out}",
               "--trainer.callbacks+=callbacks.preemption.PreemptionCheckpoint",
               "--trainer.callbacks+=tests.slurm_probe.Probe", *args]
    return subprocess.Popen(command, cwd=ROOT, env=_env(PROBE_DIR=str(out), **env), stdout=log,
                            stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, out: Path) -> None:
    code = process.wait(timeout=900)
    assert code == 0, (out / "log.txt").read_text()[-4000:]


def test_signal_mid_epoch_checkpoints_at_the_batch_boundary_and_resumes_bit_for_bit(tmp_path):
    """DMD2 (critic, TTUR 5:1, EMA, cosine LR) stopped by SIGUSR1 and consistency distillation (target network)
    stopped by SIGTERM, both mid-epoch; resumed with --ckpt_path hpc they end exactly where uninterrupted fits end
    (every parameter, EMA, optimizer and scheduler state)."""
    _stop_resume_and_compare(tmp_path, {"dmd2": ("dmd2", "SIGUSR1", [], 13), "cd": ("cd", "SIGTERM", [], 13)})


@pytest.mark.slow  # four 2-process FSDP launches: about 80 s of the suite's budget; run by `make test-all`
def test_signal_to_rank_0_of_fsdp_checkpoints_and_resumes_bit_for_bit(tmp_path):
    """DMD2 under 2-process FSDP with only rank 0 signalled: the same stop / resume equality as the single-process
    cases."""
    fsdp = ["-c", "experiments/strategies/fsdp.yaml", "--trainer.devices=2", "--data.init_args.batch_size=64"]
    _stop_resume_and_compare(tmp_path, {"dmd2_fsdp": ("dmd2", "SIGUSR1", fsdp, 7)})


def _stop_resume_and_compare(tmp_path, cases: dict) -> None:
    """cases: name -> (method, signal, extra CLI arguments, batches done at the checkpoint)."""
    from tests.slurm_probe import write_short_toy_config

    methods = sorted({method for method, *_ in cases.values()})
    configs = {m: write_short_toy_config(str(tmp_path / f"{m}.yaml"), method=m, batches=30) for m in methods}
    first = {}
    for case, (method, name, extra, _) in cases.items():
        block_at = "5" if extra else "11"  # FSDP: 15 batches per rank
        first[case] = (_distill(tmp_path / case / "straight", configs[method], *extra),
                       _distill(tmp_path / case / "stopped", configs[method], *extra, PROBE_BLOCK_AT=block_at,
                                PROBE_SELF_SIGNAL=name, GLOO_SOCKET_IFNAME="lo"))
    for case in cases:
        for process, part in zip(first[case], ("straight", "stopped")):
            _finish(process, tmp_path / case / part)
    resumed = {c: _distill(tmp_path / c / "stopped", configs[m], *extra, "--ckpt_path", "hpc",
                           GLOO_SOCKET_IFNAME="lo") for c, (m, _, extra, _) in cases.items()}
    for case, process in resumed.items():
        _finish(process, tmp_path / case / "stopped")
    for case, (method, name, extra, done) in cases.items():
        stopped = tmp_path / case / "stopped"
        log = (stopped / "log.txt").read_text()
        assert f"[preemption] {name}: saved {stopped / 'hpc_ckpt_1.ckpt'}" in log, log[-3000:]
        assert "requeue not requested" in log  # outside Slurm: checkpoint and stop only
        info = json.loads((stopped / "rank0.json").read_text())
        assert info["ckpt_path"] == str(stopped / "hpc_ckpt_1.ckpt")
        straight = torch.load(tmp_path / case / "straight" / "final-rank0.pt", weights_only=False)
        finished = torch.load(stopped / "final-rank0.pt", weights_only=False)
        assert finished["global_step"] == straight["global_step"]
        checkpoint = torch.load(stopped / "hpc_ckpt_1.ckpt", weights_only=True)
        assert 0 < checkpoint["global_step"] < straight["global_step"]  # it really stopped mid-epoch
        # the signal came in batch N (PROBE_BLOCK_AT, 0-based), the checkpoint after the next one: N + 2 done
        assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
            {"batches_done": done, "generator_state": None}]
        for key in ("module", "callbacks", "optimizers", "schedulers"):
            assert state_difference(straight[key], finished[key], key) == 0.0, (case, key)


def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "global_step": int(value), "epoch": 0}


def test_kill_9_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), path)
    marker = tmp_path / "writing"
    child = textwrap.dedent(f"""
        import os, sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        from lightning_modules.checkpoint_io import AtomicCheckpointIO
        real_save = torch.save
        def slow_save(obj, handle, *args, **kwargs):
            import io
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            open({str(marker)!r}, "w").close()
            time.sleep(600)  # killed here, half written
        torch.save = slow_save
        AtomicCheckpointIO().save_checkpoint({{"state_dict": {{"w": torch.full((512, 512), 2.0)}},
                                               "global_step": 2, "epoch": 0}}, {str(path)!r})
    """)
    process = subprocess.Popen([sys.executable, "-c", child], env=_env())
    deadline = time.time() + 120
    while not marker.exists():
        assert process.poll() is None, "the writer exited before writing"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    leftovers = list(tmp_path.glob(TEMP_PREFIX + "*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written new checkpoint
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.full((64, 64), 1.0))
    with pytest.raises(CorruptCheckpointError):
        io.load_checkpoint(leftovers[0])
    io.save_checkpoint(_checkpoint(3.0), path)  # the next save clears the dead writer's leftover
    assert not list(tmp_path.glob(TEMP_PREFIX + "*.tmp"))
    assert io.load_checkpoint(path)["global_step"] == 3


def test_truncated_checkpoint_fails_clearly_and_the_previous_one_still_loads(tmp_path):
    io = AtomicCheckpointIO()
    good, bad = tmp_path / "hpc_ckpt_1.ckpt", tmp_path / "hpc_ckpt_2.ckpt"
    io.save_checkpoint(_checkpoint(1.0), good)
    io.save_checkpoint(_checkpoint(2.0), bad)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])  # e.g. a disk that filled up under another writer
    with pytest.raises(CorruptCheckpointError) as error:
        io.load_checkpoint(bad)
    message = str(error.value)
    assert str(bad) in message and "truncated or corrupt" in message and "hpc_ckpt_1.ckpt" in message
    assert bad.exists()  # left for inspection
    assert io.load_checkpoint(good)["global_step"] == 1
    flipped = bytearray(good.read_bytes())
    flipped[len(flipped) // 3] ^= 0xFF  # bit rot inside a tensor record
    corrupt = tmp_path / "rot.ckpt"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCheckpointError, match="CRC|corrupt"):
        io.load_checkpoint(corrupt)


def test_resuming_fit_from_a_truncated_checkpoint_names_the_problem(tmp_path):
    """The trainer's own checkpoint loading (Slurm auto-resume from hpc_ckpt_*, trainer.fit(ckpt_path=...)) goes
    through AtomicCheckpointIO, which PreemptionCheckpoint installs in setup: a clear error, not an unpickling one."""
    from lightning_modules.cli import main
    from tests.slurm_probe import write_short_toy_config

    config = write_short_toy_config(str(tmp_path / "dmd2.yaml"), batches=4, warm_start_steps=5)
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1.0), tmp_path / "hpc_ckpt_1.ckpt")
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(b"PK\x03\x04 half a checkpoint")
    cli = main(["-c", config, f"--trainer.default_root_dir={tmp_path}",
                "--trainer.callbacks+=callbacks.preemption.PreemptionCheckpoint"], run=False)
    with pytest.raises(CorruptCheckpointError) as error:
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path="hpc")  # the newest hpc_ckpt_* is the damaged one
    assert "hpc_ckpt_2.ckpt is truncated or corrupt" in str(error.value) and "hpc_ckpt_1.ckpt" in str(error.value)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_explicit_ckpt_path_to_a_damaged_file_names_it_from_the_cli(tmp_path):
    """``distill fit --ckpt_path BAD``: LightningCLI reads the file's hyperparameters before the trainer does; the
    error still names the file and the good checkpoint beside it, and nothing is written or removed."""
    from lightning_modules.cli import main
    from tests.slurm_probe import write_short_toy_config

    config = write_short_toy_config(str(tmp_path / "dmd2.yaml"), batches=4, warm_start_steps=5)
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), tmp_path / "epoch=0.ckpt")
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 half a checkpoint")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CorruptCheckpointError) as error:
        main(["fit", "-c", config, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={bad}"])
    assert f"{bad} is truncated or corrupt" in str(error.value) and "epoch=0.ckpt" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_resumable_loader_continues_at_the_batch_and_permutation():
    from torch.utils.data import TensorDataset

    from datamodules.resumable import ResumableDataLoader

    data = TensorDataset(torch.arange(40))

    def loader():
        return ResumableDataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))

    full = loader()
    first_epoch = [b[0].tolist() for b in full]
    second_epoch = [b[0].tolist() for b in full]
    assert first_epoch != second_epoch
    interrupted = loader()
    iterator = iter(interrupted)
    seen = [next(iterator)[0].tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert state["batches_done"] == 3 and seen == first_epoch[:3]
    resumed = loader()
    resumed.load_state_dict(state)
    assert [b[0].tolist() for b in resumed] == first_epoch[3:]  # same permutation, from batch 3
    assert [b[0].tolist() for b in resumed] == second_epoch  # and the next epoch as if never stopped
    rng = torch.get_rng_state()
    again = ResumableDataLoader(data, batch_size=4)
    again.load_state_dict({"batches_done": 2, "generator_state": None})
    assert [b[0].tolist() for b in again][0] == [8, 9, 10, 11]
    assert torch.equal(rng, torch.get_rng_state())  # resuming mid-epoch does not draw from the global RNG


def test_sweep_file_expands_to_named_points_and_summarizes(tmp_path):
    from lightning_modules.sweep import expand_sweep, fit_arguments, load_sweep, summarize

    sweep = load_sweep(str(ROOT / "experiments" / "slurm" / "sweeps" / "ring8_methods.yaml"))
    points = expand_sweep(sweep, base_dir=str(ROOT))
    assert len(points) == 8
    assert points[0]["name"] == "000-dmd2-lr5e-05-seed0" and points[7]["name"] == "007-sid-lr0.0001-seed1"
    args = fit_arguments(points[3], sweep["name"], str(tmp_path))
    assert args[:3] == ["fit", "-c", str(ROOT / "experiments" / "toy" / "ring8" / "dmd2.yaml")]
    assert "--model.init_args.generator_optimizer.init_args.lr=0.0001" in args and "--seed_everything=1" in args
    assert f"--trainer.default_root_dir={tmp_path / 'runs' / points[3]['name']}" in args
    manifest = {"name": sweep["name"], "points": points[:2], "metrics": ["val/nfe1/sliced_w2"]}
    (tmp_path / "sweep.json").write_text(json.dumps(manifest))
    run = tmp_path / "runs" / points[0]["name"]
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"status": "completed", "global_step": 10, "restarts": 1,
                                                 "seconds": 3.5, "metrics": {"val/nfe1/sliced_w2": 0.05}}))
    rows = summarize(str(tmp_path), quiet=True)
    assert [r["status"] for r in rows] == ["completed", "missing"]
    table = (tmp_path / "summary.md").read_text()
    assert "000-dmd2-lr5e-05-seed0" in table and "| 0.05 |" in table and "001-dmd2-lr5e-05-seed1" in table


def test_sweep_point_arguments_parse_with_the_distill_cli(tmp_path):
    from lightning_modules.cli import main
    from lightning_modules.sweep import expand_sweep, fit_arguments

    sweep = {"name": "p", "configs": [str(ROOT / "experiments/toy/ring8/dmd2.yaml")],
             "grid": {"model.init_args.guidance_scale": [1.0, 1.5]},
             "overrides": {"trainer.max_epochs": 2, "data.init_args.batches_per_epoch": 3}}
    point = expand_sweep(sweep)[1]
    cli = main(fit_arguments(point, "p", str(tmp_path))[1:], run=False)
    assert cli.model.hparams.guidance_scale == 1.5 and cli.trainer.max_epochs == 2
    assert cli.trainer.default_root_dir == str(tmp_path / "runs" / point["name"])
    assert cli.trainer.logger.version == point["name"] and cli.trainer.logger.name == "p"
    assert any(type(c).__name__ == "PreemptionCheckpoint" for c in cli.trainer.callbacks)
