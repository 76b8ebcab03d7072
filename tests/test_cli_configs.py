"""Every experiment config instantiates through the CLI; bad config values fail with a message naming the value."""
import glob
import os
import subprocess
import sys

import pytest

from lightning_modules import METHODS
from lightning_modules.cli import main
from tests.toy_runs import QUIET, build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "**", "*.yaml"), recursive=True))
TOY_CONFIGS = [c for c in CONFIGS if os.sep + "toy" + os.sep in c]


def _has_config(folder: str, method: str) -> bool:
    """experiments/<folder>/<method>.yaml, or variants such as fdistill_js.yaml for the registry name fdistill."""
    return (os.path.isfile(os.path.join(ROOT, "experiments", folder, f"{method}.yaml"))
            or bool(glob.glob(os.path.join(ROOT, "experiments", folder, f"{method}_*.yaml"))))


# restoration students: their MNIST task is super-resolution (experiments/mnist_sr), not class-conditional generation
MNIST_FOLDER = {"tad_sr": "mnist_sr", "oftsr": "mnist_sr", "yonos_sr": "mnist_sr", "instarevive": "mnist_sr"}
NO_TOY_CONFIG = {"yonos_sr": "scale distillation needs a magnification factor, which the toy laws do not have"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_has_toy_and_mnist_configs(method):
    laws = () if method in NO_TOY_CONFIG else ("ring8", "grid25", "aniso", "digits64")
    missing = [d for d in laws if not _has_config(f"toy/{d}", method)]
    folder = MNIST_FOLDER.get(method, "mnist")
    missing += [] if _has_config(folder, method) else [folder]
    assert not missing, f"method {method!r} has no experiments config for {missing}"


@pytest.mark.parametrize("config", TOY_CONFIGS, ids=lambda c: os.path.relpath(c, ROOT))
def test_config_instantiates_and_interpolates(config):
    cli = build(config)
    assert tuple(cli.model.student.data_shape) == tuple(cli.datamodule.shape)
    if hasattr(cli.model.teacher, "law") and cli.model.teacher is not cli.model.student:  # a distillation config
        assert cli.model.teacher.law.name == cli.datamodule.law.name  # ${data.init_args.law} reached the teacher
        assert cli.model.student.schedule is cli.model.teacher.schedule


def test_fast_dev_run_through_the_cli(tmp_path):
    main(["fit", "-c", "experiments/toy/ring8/dmd2.yaml", "--trainer.fast_dev_run=2",
          "--model.init_args.warm_start_steps=5", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger=false"])


def _cli_error(*args):
    result = subprocess.run([sys.executable, "-m", "lightning_modules.cli", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    return result.stderr


def test_unknown_method_is_named():
    stderr = _cli_error("fit", "-c", "experiments/toy/ring8/dmd2.yaml", "--model.class_path=lightning_modules.DMD3")
    assert "DMD3" in stderr


@pytest.mark.parametrize("override, named", [
    ("--model.init_args.warm_start_steps=-5", "warm_start_steps"),
    ("--data.init_args.batch_size=0", "batch_size"),
    ("--model.init_args.student_sigmas=[-1.0]", "student times"),
    ("--model.init_args.eval_nfe=[0]", "eval_nfe"),
    ("--data.init_args.law=ring9", "ring9"),
])
def test_bad_values_fail_with_a_message_naming_them(override, named):
    with pytest.raises((ValueError, SystemExit)) as error:
        build("experiments/toy/ring8/dmd2.yaml", override)
    message = str(error.value)
    assert named in message


def test_student_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"student data shape \(3,\) does not match the teacher's \(2,\)"):
        build("experiments/toy/ring8/dmd2.yaml", "--model.init_args.student.init_args.dim=3")


def test_negative_ttur_ratio_is_named():
    from callbacks import StudentEMA, TwoTimeScaleUpdate
    with pytest.raises(ValueError, match="critic_steps_per_generator_step must be >= 1, got -2"):
        TwoTimeScaleUpdate(critic_steps_per_generator_step=-2)
    with pytest.raises(ValueError, match="EMA decay must be in \\[0, 1\\), got 1.5"):
        StudentEMA(decay=1.5)
