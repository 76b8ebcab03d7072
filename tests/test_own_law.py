"""A user's own mixture law: from YAML or the command line, given once, feeding teacher, datamodule and metrics.

Checks: ``mixture_from_spec`` against the covariances it should build and the errors it should give; the derived
sigma_data against the empirical standard deviation of exact samples; one ``law:`` reaching the teacher through the
interpolation, also when overridden on the command line; a teacher/datamodule law mismatch and a noise-only
datamodule for a real-data method refused before the first step.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from callbacks import GroundTruthMetrics
from lightning_modules.networks.mixture_law import law_sigma_data, mixture_from_spec, same_law
from lightning_modules.networks.toy_laws import get_toy_law, resolve_law
from tests.toy_runs import build

THREE_BLOBS_3D = {"name": "three_blobs", "weights": [0.5, 0.3, 0.2],
                  "means": [[0, 0, 0], [3, 0, 0], [0, 3, 1]], "stds": [0.2, 0.3, 0.4]}


def test_spec_builds_the_covariances_it_names():
    isotropic = mixture_from_spec({"means": [[0, 0], [1, 1]], "std": 0.1})
    assert torch.allclose(isotropic.covariances, 0.01 * torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
    assert torch.allclose(isotropic.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    per_axis = mixture_from_spec({"means": [[0, 0]], "variances": [[0.04, 0.09]]})
    assert torch.allclose(per_axis.covariances[0], torch.diag(torch.tensor([0.04, 0.09], dtype=torch.float64)))
    full = [[[1.0, 0.5], [0.5, 2.0]]]
    assert torch.equal(mixture_from_spec({"means": [[1, 2]], "covariances": full}).covariances,
                       torch.tensor(full, dtype=torch.float64))
    classed = mixture_from_spec({"means": [[0.0], [1.0], [2.0]], "std": 0.1, "classes": [0, 1, 1]})
    assert classed.num_classes == 2 and classed.class_weights().tolist() == pytest.approx([1 / 3, 2 / 3])


@pytest.mark.parametrize("spec, named", [
    ({"means": [[0, 0]], "std": 0.1, "sigma": 1}, "sigma"),
    ({"std": 0.1}, "means"),
    ({"means": [[0, 0]]}, "covariances / variances / stds / std"),
    ({"means": [[0, 0]], "std": 0.1, "stds": [0.1]}, "exactly one"),
    ({"means": [[0, 0], [1, 1]], "stds": [0.1, 0.2, 0.3]}, "stds must have shape (2,) or (2, 2)"),
    ({"means": [[0, 0], [1, 1]], "std": 0.1, "weights": [0.9, 0.3]}, "sum to 1"),
    ({"means": [[0, 0]], "covariances": [[[1, 0], [0, -1]]]}, "positive definite"),
])
def test_bad_specs_are_named(spec, named):
    with pytest.raises(ValueError) as error:
        mixture_from_spec(spec)
    assert named in str(error.value)


def test_resolve_law_takes_a_name_a_mapping_or_a_law():
    ring = get_toy_law("ring8")
    assert resolve_law(ring) is ring and same_law(resolve_law("ring8"), ring)
    assert resolve_law(THREE_BLOBS_3D).dim == 3
    with pytest.raises(ValueError, match="ring9"):
        resolve_law("ring9")
    with pytest.raises(TypeError, match="3.5"):
        resolve_law(3.5)


@pytest.mark.parametrize("law", ["ring8", "aniso", THREE_BLOBS_3D])
def test_sigma_data_is_the_empirical_standard_deviation(law):
    law = resolve_law(law)
    samples, _ = law.sample(400_000, torch.Generator().manual_seed(0))
    empirical = float(samples.var(0).mean().sqrt())
    assert law_sigma_data(law) == pytest.approx(empirical, rel=5e-3)


def _own_law_config(tmp_path, method="dmd2"):
    """The shipped ring8 config with the law block replaced by a 3-D law written in the YAML itself."""
    source = open(f"experiments/toy/ring8/{method}.yaml").read()
    law_yaml = textwrap.indent("law:\n" + textwrap.indent(
        "name: three_blobs\nweights: [0.5, 0.3, 0.2]\nmeans: [[0, 0, 0], [3, 0, 0], [0, 3, 1]]\n"
        "stds: [0.2, 0.3, 0.4]\n", "  "), "    ")
    config = source.replace("    law: ring8\n", law_yaml).replace("init_args: {dim: 2,", "init_args: {dim: 3,")
    config = config.replace("sigma_data: 0.5}", "sigma_data: null}")  # the ring configs pin their tuned 0.5
    assert config != source and "dim: 3" in config
    path = tmp_path / f"{method}.yaml"
    path.write_text(config)
    return str(path)


def test_a_law_written_in_yaml_feeds_teacher_datamodule_student_and_metrics(tmp_path):
    cli = build(_own_law_config(tmp_path), "--model.init_args.warm_start_steps=20",
                "--data.init_args.batches_per_epoch=4", "--trainer.max_epochs=1", root=str(tmp_path))
    module, datamodule = cli.model, cli.datamodule
    law = resolve_law(THREE_BLOBS_3D)
    assert same_law(datamodule.law, law) and same_law(module.teacher.law, law)
    assert module.student.sigma_data == module.critic.sigma_data == pytest.approx(law_sigma_data(law))
    assert law_sigma_data(law) == pytest.approx(1.1146, abs=1e-4)  # sqrt(3.727 / 3): far from the 0.5 of images
    cli.trainer.fit(module, datamodule)
    metrics = GroundTruthMetrics(num_samples=500, nfe=[1], num_floor_sets=1, verbose=False)
    assert metrics.law_of(cli.trainer, module) is datamodule.law
    assert metrics.evaluate(module, datamodule.law)[1]["num_modes"] == 3


def test_one_command_line_override_reaches_every_interpolation(tmp_path):
    cli = build("experiments/toy/ring8/dmd2.yaml", "--data.init_args.law=grid25")
    assert cli.datamodule.law.name == cli.model.teacher.law.name == "grid25"
    inline = "--data.init_args.law={name: two, means: [[-1, 0], [1, 0]], std: 0.25}"
    cli = build("experiments/toy/ring8/dmd2.yaml", inline)
    assert cli.model.teacher.law.name == "two" and same_law(cli.model.teacher.law, cli.datamodule.law)
    assert cli.model.student.sigma_data == 0.5  # the ring config pins it (a YAML null derives it, tested above)
    assert law_sigma_data(cli.datamodule.law) == pytest.approx(((1 + 2 * 0.25 ** 2) / 2) ** 0.5)  # axes: 1 + s², s²


def test_an_explicit_sigma_data_is_kept():
    cli = build("experiments/toy/ring8/dmd2.yaml", "--model.init_args.student.init_args.sigma_data=0.3")
    assert cli.model.student.sigma_data == cli.model.critic.sigma_data == 0.3
    assert not cli.model.student.sigma_data_from_law


def test_a_teacher_law_that_differs_from_the_data_law_is_refused_before_training(tmp_path):
    cli = build("experiments/toy/ring8/dmd2.yaml", "--model.init_args.teacher.init_args.law=grid25",
                "--model.init_args.warm_start_steps=5", "--data.init_args.batches_per_epoch=2", root=str(tmp_path))
    with pytest.raises(ValueError) as error:
        cli.trainer.fit(cli.model, cli.datamodule)
    message = str(error.value)
    assert "'grid25'" in message and "'ring8'" in message and "${data.init_args.law}" in message
    assert cli.trainer.global_step == 0 and not bool(cli.model.warm_started)


@pytest.mark.parametrize("method, reason", [("cd", "teacher ODE step from noised real samples"),
                                            ("sida", "GAN term"), ("uni_instruct", "density ratio")])
def test_a_real_data_method_given_noise_only_says_so_before_training(method, reason, tmp_path):
    noise_only = ["--data=datamodules.NoiseDataModule", "--data.init_args.shape=[2]",
                  "--data.init_args.batches_per_epoch=2"]
    config = f"experiments/toy/ring8/{method}.yaml"
    cli = build(config, *noise_only, "--model.init_args.teacher.init_args.law=ring8", root=str(tmp_path))
    with pytest.raises(ValueError) as error:
        cli.trainer.fit(cli.model, cli.datamodule)
    message = str(error.value)
    assert "needs real data samples" in message and "NoiseDataModule" in message and reason in message
    assert cli.trainer.global_step == 0
