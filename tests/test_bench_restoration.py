"""benchmarks/restoration.py (make bench-sr): the teacher rows come from the SR teacher's card when its protocol matches,
and each student's PSNR gap is its 1-step PSNR minus the card's 32-step PSNR at the same scale."""
import argparse
import json
import os

import pytest

from benchmarks import restoration

CARD = os.path.join(restoration.TEACHER, "teacher.json")


def _args(**overrides):
    values = dict(num_images=1000, seed_eval=1234, scales=[2, 4], nfe=[1], generator_updates=60)
    values.update(overrides)
    return argparse.Namespace(**values)


def _student_row(psnr, ssim, fid):
    return {"psnr": psnr, "ssim": ssim, "fid": {restoration.EXTRACTOR: {"fid": fid}}}


def test_teacher_rows_are_read_from_the_card_for_its_protocol():
    with open(CARD) as handle:
        card = json.load(handle)["evaluation"]
    teacher, source = restoration.teacher_scores(_args())
    assert source.startswith("teacher card")
    assert teacher["scales"]["4"]["nfe"]["32"]["psnr"] == card["scales"]["4"]["nfe"]["32"]["psnr"]


def test_markdown_reports_the_psnr_gap_to_the_32_step_teacher():
    teacher, source = restoration.teacher_scores(_args())
    t32 = {s: teacher["scales"][s]["nfe"]["32"]["psnr"] for s in ("2", "4")}
    record = {"method": "tad_sr", "optimizer_steps": 120, "seconds_per_generator_update": 3.5,
              "networks": {"student": {"parameters": 1000, "trainable": 250}},
              "scores": {"scales": {"2": {"nfe": {"1": _student_row(t32["2"] - 0.25, 0.9, 0.3)}},
                                    "4": {"nfe": {"1": _student_row(t32["4"] + 0.5, 0.7, 3.0)}}}}}
    failed = {"method": "oftsr", "error": "Traceback ..."}
    protocol = {"generator_updates": 60, "num_images": 1000, "seed_eval": 1234, "scales": [2, 4], "nfe": [1],
                "teacher_source": source}
    text = restoration.markdown([record, failed], teacher, protocol)
    x2, x4 = text.split("## x4")
    assert "| tad_sr | " in x2 and "-0.25 dB" in x2 and "+0.50 dB" in x4
    assert "250 of 1,000" in x2 and "| oftsr | failed |" in x4
    assert f"| teacher (Heun), 32 NFE | {t32['4']:.2f} / " in x4


def test_every_sr_config_is_a_benchmark_row():
    assert restoration.discover_methods() == sorted(
        f[:-5] for f in os.listdir(restoration.CONFIGS) if f.endswith(".yaml") and f != "teacher.yaml")
    assert {"tad_sr", "oftsr", "yonos_sr", "instarevive"} <= set(restoration.discover_methods())


@pytest.mark.parametrize("bad", [["--generator-updates", "0"], ["--num-images", "5"]])
def test_bad_budgets_are_refused_naming_the_value(bad, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["restoration.py", *bad])
    with pytest.raises(SystemExit):
        restoration.main()
    assert bad[1] in capsys.readouterr().err


@pytest.mark.parametrize("method, full_run, stages", [
    ("yonos_sr", 500, {"scale_steps": 120, "one_step_steps": 80}),   # no critic: max_steps are generator updates
    ("instarevive", 300, {"scope_steps": 200})])                      # TTUR 1:1: 600 optimizer steps, 300 updates
def test_a_run_shortened_to_the_budget_reaches_every_stage(method, full_run, stages):
    """At 200 generator updates YONOS-SR's one-step stage (after 300 scale-distillation updates) never started before
    the benchmark shrank the stages with the run."""
    from benchmarks.budget import scale_stage_lengths
    from benchmarks.image_methods import BENCHMARK_OVERRIDES, config_generator_updates
    from lightning_modules.cli import main

    config = os.path.join(restoration.CONFIGS, f"{method}.yaml")
    cli = main(["-c", config, *BENCHMARK_OVERRIDES], run=False)
    assert config_generator_updates(config, cli.model, cli.trainer) == full_run
    scale_stage_lengths(cli.model, 200 / full_run)
    assert {name: getattr(cli.model, name) for name in stages} == stages
