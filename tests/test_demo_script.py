"""make demo's script end to end at a tiny budget: it trains, exports, scores and writes a report whose numbers are
the ones in report.json (the ratio line recomputed here), with the wall-time breakdown."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_writes_a_consistent_report(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--out", str(out), "--num-samples", "40",
               "--no-inception", "--teacher-nfe", "1", "--", "--trainer.max_steps=6", "--trainer.val_check_interval=6",
               "--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path}",
               f"--trainer.logger.init_args.save_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["optimizer_steps"] == 6
    seconds = report["seconds"]
    assert 0 < seconds["training"] < seconds["total"] and seconds["student_scoring"] > 0
    student = report["results"]["student"]["1"]["mnist-classifier"]["fid"]
    teacher = report["results"]["teacher"]["32"]["mnist-classifier"]["fid"]
    assert report["protocol"]["teacher_sweep_source"] == "measured in this run"   # 40 samples: not the card's protocol
    text = (out / "report.md").read_text()
    assert f"Student / teacher-at-32-steps FID ratio: mnist-classifier: {student / teacher:.2f}" in text
    assert f"| **student (DMD2)** | 1 | {student:.2f} |" in text and "Wall time" in text
    assert (out / "samples.png").stat().st_size > 0 and (out / "student" / "README.md").is_file()
