"""A 2-process CPU DDP fit keeps both ranks identical; a fit stopped and resumed from its checkpoint continues with the
same state (student, critic, EMA, optimizers, TTUR phase, consistency target) as one that never stopped."""
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import own_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "fit_and_dump.py")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.limit_val_batches=0", "--model.init_args.warm_start_steps=200"]


def run(out_dir, *args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, MASTER_PORT=str(own_port()))
    result = subprocess.run([sys.executable, SCRIPT, str(out_dir), *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_same_tensors(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=atol, rtol=0), key


def fit_straight_and_resumed(tmp_path, config):
    """(uninterrupted 2-epoch fit, its state after epoch 0, a fit resumed from that state) as rank-0 state dumps.
    The uninterrupted fit keeps its end-of-epoch-0 checkpoint; resuming from it is the run "stopped after one epoch"
    (a separate 1-epoch fit would write the same checkpoint at the cost of one more process start-up)."""
    checkpoints = tmp_path / "ckpt"
    checkpoint_callback = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                           f"--trainer.callbacks.dirpath={checkpoints}", "--trainer.callbacks.save_top_k=-1"]
    run(tmp_path / "straight", *config, "--trainer.max_epochs=2", *checkpoint_callback)
    (first_epoch,) = checkpoints.glob("epoch=0-*.ckpt")
    run(tmp_path / "resumed", "--ckpt_path", str(first_epoch), *config, "--trainer.max_epochs=2",
        "--trainer.enable_checkpointing=false")
    straight = torch.load(tmp_path / "straight" / "rank0.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "rank0.pt", weights_only=False)
    first = torch.load(first_epoch, weights_only=False, map_location="cpu")
    return straight, {"global_step": first["global_step"], "module": first["state_dict"]}, resumed


def test_two_process_ddp_dmd2_keeps_ranks_identical(tmp_path):
    run(tmp_path, "-c", "experiments/toy/ring8/dmd2.yaml", *QUIET, "--trainer.enable_checkpointing=false",
        "--trainer.devices=2", "--trainer.strategy=ddp_find_unused_parameters_true",
        "--data.init_args.batches_per_epoch=24")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["world_size"] == 2
    assert_same_tensors(rank0["module"], rank1["module"])
    assert_same_tensors(rank0["callbacks"]["StudentEMA"]["average"], rank1["callbacks"]["StudentEMA"]["average"])
    # training happened: 12 batches per rank, 1 critic update each + a generator update every 5th batch
    assert rank0["global_step"] == 12 + 3
    assert rank0["callbacks"]["TwoTimeScaleUpdate"]["batches_seen"] == 12


@pytest.mark.parametrize("method", ["dmd2", "cd"])
def test_resume_from_checkpoint_matches_uninterrupted_fit(method, tmp_path):
    config = ["-c", f"experiments/toy/ring8/{method}.yaml", *QUIET, "--data.init_args.batches_per_epoch=7"]
    straight, first, resumed = fit_straight_and_resumed(tmp_path, config)
    assert resumed["global_step"] == straight["global_step"] > first["global_step"]
    assert_same_tensors(straight["module"], resumed["module"], atol=1e-6)
    assert straight["callbacks"] == {} or straight["callbacks"].keys() == resumed["callbacks"].keys()
    for name, state in straight["callbacks"].items():
        if name == "StudentEMA":
            assert_same_tensors(state["average"], resumed["callbacks"][name]["average"], atol=1e-6)
        else:
            assert state == resumed["callbacks"][name]
    # the first half really differs from the end, so the comparison above is not vacuous
    student_keys = [k for k in straight["module"] if k.startswith("student.")]
    assert any(not torch.equal(first["module"][k], straight["module"][k]) for k in student_keys)
