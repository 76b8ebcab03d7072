"""benchmarks/budget.py (toy.py --scale, image_methods.py --generator-updates): a run shortened by --scale shortens a staged method's stages alike, so the benchmark row of
TCM / InstaFlow / PD / ... measures all its stages (before this, at --scale 0.375 TCM's stage 2 and InstaFlow's
distillation never started and their rows equalled CD's / reflow's)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    import benchmarks.budget
    return benchmarks.budget


@pytest.mark.parametrize("method, lengths", [
    ("tcm", {"stage1_steps": 2000}), ("instaflow", {"reflow_steps": 1000}),
    ("slimflow", {"reflow_steps": 1000, "anneal_steps": 500}), ("pd", {"steps_per_stage": 1000}),
    ("guidance_distill", {"steps_per_stage": 1000, "guidance_steps": 1000}), ("ect", {"stage_steps": 1000})])
def test_scale_shortens_every_stage_length_of_the_config(method, lengths):
    from lightning_modules.cli import main

    cli = main(["-c", os.path.join(ROOT, "experiments", "toy", "ring8", f"{method}.yaml"),
                "--trainer.logger=false"], run=False)
    assert {name: getattr(cli.model, name) for name in lengths} == lengths  # the shipped config's stages
    assert set(type(cli.model).stage_lengths) == set(lengths)
    _bench().scale_stage_lengths(cli.model, 0.375)
    assert {name: getattr(cli.model, name) for name in lengths} == {k: round(v * 0.375) for k, v in lengths.items()}


def test_unstaged_methods_and_disabled_stages_are_left_alone():
    class Plain:
        pass

    class Staged:
        stage_lengths = ("stage1_steps",)
        stage1_steps = 0  # TCM without a stage 1 (loads a stage-1 checkpoint instead)

    plain, staged = Plain(), Staged()
    _bench().scale_stage_lengths(plain, 0.1)
    _bench().scale_stage_lengths(staged, 0.1)
    assert vars(plain) == {} and staged.stage1_steps == 0
