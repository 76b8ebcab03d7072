"""DMD and Diff-Instruct: generator gradients against independent closed forms on the exact teacher, teacher-pair
generation and the pairs datamodules, and a short convergence run of each method on the 8-mode ring.

Gradient setup as in test_method_gradients.py: exact Gaussian-mixture teacher, affine student x = m + A z with known
law N(m, A A^T), critic replaced by that law's exact denoiser. The independent side never calls the method's code:
Tweedie denoisers and scores come from autograd of torch.distributions densities, the papers' formulas are written
out by hand and the chain rule through x = m + A z is applied by hand.
"""
import copy
import json
import os

import pytest
import torch
import yaml

from datamodules import ToyMixtureDataModule
from datamodules.pairs import MNISTPairsDataModule, ToyMixturePairsDataModule
from lightning_modules.diffusion import EDMSchedule, KarrasRampTime, LogNormalTime, VPDiscreteSchedule
from lightning_modules.methods.diff_instruct import DiffInstruct
from lightning_modules.methods.dmd import DMD
from lightning_modules.networks import GaussianMixtureTeacher, ToyMLPDenoiser
from lightning_modules.pairs_command import main as pairs_main
from lightning_modules.trajectory_pairs import (FORMAT, _write_atomically, check_same_teacher, generate_pairs,
                                                load_pairs)
from tests.helpers import AffineGenerator, fix_randomness, independent_noisy_log_prob, independent_x0

B, P = 64, 48
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _affine_module(method_cls, schedule=None, law="aniso", **kwargs):
    torch.manual_seed(0)
    schedule = schedule or EDMSchedule()
    teacher = GaussianMixtureTeacher(law, schedule)
    student = AffineGenerator([0.1, -0.2], [[0.5, 0.1], [-0.2, 0.4]])
    critic = GaussianMixtureTeacher(student.law(), schedule)
    module = method_cls(teacher=teacher, student=student, critic=critic, **kwargs)
    noise = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    return module, teacher.law, student, noise


def _independent_score(law, x_t, alpha, sigma):
    x = x_t.detach().double().requires_grad_(True)
    score, = torch.autograd.grad(independent_noisy_log_prob(law, x, alpha, sigma).sum(), x)
    return score


# ------------------------------------------------------------------------------------------------ DMD gradients
@pytest.mark.parametrize("metric, huber_c", [("l2", None), ("pseudo_huber", 0.3)])
def test_dmd_gradient_is_distribution_matching_plus_weighted_regression(metric, huber_c):
    weight = 0.25
    module, law, student, noise = _affine_module(DMD, regression_weight=weight, regression_distance=metric,
                                                 huber_c=huber_c)
    schedule = module.schedule
    t = KarrasRampTime(0.02, 0.98)(B, schedule, torch.Generator().manual_seed(1))
    eps = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z_ref = torch.randn(P, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y_ref = law.sample(P, torch.Generator().manual_seed(4))[0]
    fix_randomness(module, [t], [eps])
    batch = {"noise": noise, "pair_noise": z_ref, "pair_target": y_ref}
    module._check_batch(batch)
    losses = module.generator_loss(batch)
    losses["loss"].backward()

    m, A = student.mean.detach(), student.matrix.detach()
    # distribution matching (Eq. 7-8): g = (D_fake - D_real) / mean |x - D_real|, surrogate gradient g / (B D)
    x_g = m + noise @ A.T
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x_g + sigma[:, None] * eps
    real = independent_x0(law, x_t, alpha, sigma)
    fake = independent_x0(student.law(), x_t, alpha, sigma)
    g = (fake - real) / (x_g - real).abs().mean(1, keepdim=True)
    d_matching = g / (B * 2)
    # regression (Eq. 9): one-step G(z_ref) = m + A z_ref against y_ref
    difference = (m + z_ref @ A.T) - y_ref
    if metric == "l2":
        regression = (difference ** 2).mean(1).mean()
        d_regression = 2 * difference / (P * 2)
    else:
        norm = ((difference ** 2).sum(1, keepdim=True) + huber_c ** 2).sqrt()
        regression = (norm - huber_c).mean()
        d_regression = difference / norm / P
    expected_mean = d_matching.sum(0) + weight * d_regression.sum(0)
    expected_matrix = d_matching.T @ noise + weight * d_regression.T @ z_ref
    assert torch.allclose(student.mean.grad, expected_mean, rtol=1e-6, atol=1e-12)
    assert torch.allclose(student.matrix.grad, expected_matrix, rtol=1e-6, atol=1e-12)
    assert torch.allclose(losses["regression"], regression, rtol=1e-10)
    # both terms are informative, so the check could fail if either were dropped or mis-weighted
    assert d_matching.sum(0).norm() > 1e-3 and (weight * d_regression.sum(0)).norm() > 1e-3


def test_dmd_regression_gradient_vanishes_on_pairs_it_reproduces():
    """If G(z_ref) = y_ref exactly, only the distribution-matching term remains (regression weight 1 or 0 alike)."""
    module, law, student, noise = _affine_module(DMD, regression_weight=1.0)
    z_ref = torch.randn(P, 2, dtype=torch.float64)
    with torch.no_grad():
        y_ref = student.mean + z_ref @ student.matrix.T
    assert module.regression_loss({"pair_noise": z_ref, "pair_target": y_ref}).abs().max() < 1e-14


def test_dmd_config_errors_name_the_value():
    with pytest.raises(ValueError, match="regression_weight must be >= 0, got -1"):
        _affine_module(DMD, regression_weight=-1.0)
    with pytest.raises(ValueError, match="lpips"):
        _affine_module(DMD, regression_distance="lpips")
    schedule = EDMSchedule()
    with pytest.raises(ValueError, match="one-step student"):
        DMD(teacher=GaussianMixtureTeacher("ring8", schedule), student=ToyMLPDenoiser(2, 16, 2),
            student_sigmas=[80.0, 1.0])
    module, _, _, noise = _affine_module(DMD)
    with pytest.raises(ValueError, match=r"\['pair_noise', 'pair_target'\] are missing"):
        module._check_batch({"noise": noise})
    with pytest.raises(ValueError, match=r"pair_target has sample shape \[3\]"):
        module._check_batch({"noise": noise, "pair_noise": noise, "pair_target": torch.zeros(B, 3)})


# ------------------------------------------------------------------------------------------------ Diff-Instruct
@pytest.mark.parametrize("weighting", ["sigma_squared", "unit"])
@pytest.mark.parametrize("schedule", [EDMSchedule(), VPDiscreteSchedule()], ids=["edm", "vp-discrete"])
def test_diff_instruct_gradient_is_the_weighted_unnormalised_score_difference(schedule, weighting):
    module, law, student, noise = _affine_module(DiffInstruct, schedule=schedule, time_weighting=weighting)
    t = LogNormalTime(-1.2, 1.2)(B, schedule, torch.Generator().manual_seed(5))
    eps = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    fix_randomness(module, [t], [eps])
    module.generator_loss({"noise": noise})["loss"].backward()

    # independent: IKL gradient (Theorem 3.1) w(t) (s_fake - s_real)^T dx_t/dx_g, dx_t/dx_g = alpha, with the scores
    # from autograd of the noised densities (no denoisers involved)
    x_g = student.mean.detach() + noise @ student.matrix.detach().T
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x_g + sigma[:, None] * eps
    s_real = _independent_score(law, x_t, alpha, sigma)
    s_fake = _independent_score(student.law(), x_t, alpha, sigma)
    w = (sigma / alpha) ** 2 if weighting == "sigma_squared" else torch.ones_like(sigma)
    g = w[:, None] * alpha[:, None] * (s_fake - s_real)
    d_x = g / (B * 2)
    assert torch.allclose(student.mean.grad, d_x.sum(0), rtol=1e-6, atol=1e-12)
    assert torch.allclose(student.matrix.grad, d_x.T @ noise, rtol=1e-6, atol=1e-12)
    assert d_x.sum(0).norm() > 1e-3
    # and it is NOT DMD's normalised direction (the normaliser mean |x - D_real| is absent)
    real = independent_x0(law, x_t, alpha, sigma)
    normalised = g / (x_g - real).abs().mean(1, keepdim=True)
    assert not torch.allclose(student.mean.grad, (normalised / (B * 2)).sum(0), rtol=1e-3)


def test_diff_instruct_gradient_vanishes_when_student_law_equals_data_law():
    schedule = EDMSchedule()
    gaussian = AffineGenerator([0.3, -0.1], [[0.4, 0.0], [0.1, 0.2]], schedule)
    module = DiffInstruct(teacher=GaussianMixtureTeacher(gaussian.law(), schedule), student=gaussian,
                          critic=GaussianMixtureTeacher(gaussian.law(), schedule))
    module.generator_loss({"noise": torch.randn(B, 2, dtype=torch.float64)})["loss"].backward()
    assert gaussian.mean.grad.abs().max() < 1e-12 and gaussian.matrix.grad.abs().max() < 1e-12


def test_diff_instruct_critic_with_dropout_matches_eval_teacher():
    """A critic with dropout that equals the teacher gives an exactly zero direction (the property the reference's
    shared dropout mask provides), although the critic is in training mode; a train-mode call would not."""
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = ToyMLPDenoiser(2, hidden=64, depth=3, dropout=0.5, schedule=schedule)
    module = DiffInstruct(teacher=teacher, student=ToyMLPDenoiser(2, hidden=16, depth=2),
                          critic=copy.deepcopy(teacher))
    module.train()
    assert module.critic.training and not module.teacher.training
    out = module.generator_loss({"noise": torch.randn(B, 2)})
    out["loss"].backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in module.student.parameters())
    assert module.critic.training  # restored after the generator-step call
    x, t = torch.randn(B, 2), torch.full((B,), 0.5, dtype=torch.float64)
    assert not torch.equal(module.critic(x, t), teacher(x, t))  # dropout really is active in training mode


def test_diff_instruct_defaults_and_errors():
    module, _, _, _ = _affine_module(DiffInstruct)
    for sampler in (module.generator_time_sampler, module.critic_time_sampler):
        assert isinstance(sampler, LogNormalTime) and (sampler.mean, sampler.std) == (-1.2, 1.2)
    assert module.gan_generator_weight == 0 and module.gan_critic_weight == 0
    with pytest.raises(ValueError, match="unknown time_weighting 'snr'"):
        _affine_module(DiffInstruct, time_weighting="snr")


def test_diff_instruct_configs_use_adam_betas_0_0999():
    paths = [os.path.join(ROOT, "experiments", "toy", d, "diff_instruct.yaml")
             for d in ("ring8", "grid25", "aniso", "digits64")] + [os.path.join(ROOT, "experiments", "mnist",
                                                                                "diff_instruct.yaml")]
    for path in paths:
        with open(path) as handle:
            model = yaml.safe_load(handle)["model"]["init_args"]
        for name in ("generator_optimizer", "critic_optimizer"):
            assert model[name]["init_args"]["betas"] == [0.0, 0.999], (path, name)


# ------------------------------------------------------------------------------------------------ teacher pairs
def _toy_module(law="ring8"):
    return DMD(teacher=GaussianMixtureTeacher(law, EDMSchedule()), student=ToyMLPDenoiser(2 if law != "digits64"
                                                                                             else 64, 16, 2))


@pytest.mark.parametrize("law, num_classes", [("ring8", 0), ("digits64", 10)])
def test_generated_pairs_are_the_teacher_sampler_output_for_the_stored_noise(tmp_path, law, num_classes):
    module = _toy_module(law)
    path = generate_pairs(module, str(tmp_path / "pairs.safetensors"), num_pairs=40, nfe=8, sampler="heun", seed=3,
                          num_classes=num_classes, batch_size=16)
    pairs = load_pairs(path)
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(pairs.noise, torch.randn(pairs.noise.shape, generator=generator))
    assert (pairs.cond is None) == (num_classes == 0)
    expected = module.sample_teacher(pairs.noise, pairs.cond, nfe=8, method="heun")
    assert torch.allclose(pairs.target, expected.float(), atol=1e-6, rtol=0)
    assert pairs.target.std() > 0.1  # real samples, not the prior mean
    meta = pairs.metadata
    assert meta["format"] == FORMAT and meta["sampler"] == "heun" and meta["nfe"] == "8" and meta["seed"] == "3"
    assert json.loads(meta["shape"]) == list(module.teacher.data_shape) and meta["num_pairs"] == "40"
    teacher = pairs.teacher
    assert teacher["law"] == law and teacher["guidance_scale"] == 1.0 and teacher["schedule"]["class"] == "EDMSchedule"
    check_same_teacher(pairs, module)
    with pytest.raises(ValueError, match="made by a different teacher"):
        check_same_teacher(pairs, _toy_module("grid25" if law == "ring8" else "ring8"))


def test_pairs_refuse_to_overwrite_and_truncated_files_are_named(tmp_path):
    module = _toy_module()
    path = generate_pairs(module, str(tmp_path / "p.safetensors"), num_pairs=16, nfe=4, num_classes=0)
    before = open(path, "rb").read()
    with pytest.raises(FileExistsError, match="p.safetensors"):
        generate_pairs(module, path, num_pairs=16, nfe=4, seed=1, num_classes=0)
    assert open(path, "rb").read() == before
    generate_pairs(module, path, num_pairs=16, nfe=4, seed=1, num_classes=0, overwrite=True)
    assert open(path, "rb").read() != before and load_pairs(path).metadata["seed"] == "1"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []  # no temporary left behind

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors.*truncated or corrupt"):
        load_pairs(str(truncated))
    datamodule = ToyMixturePairsDataModule(str(truncated), batch_size=8)
    with pytest.raises(ValueError, match="truncated.safetensors"):
        datamodule.setup("fit")
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        ToyMixturePairsDataModule(str(tmp_path / "absent.safetensors")).setup("fit")


def test_pairs_datamodule_batches_are_reproducible_and_checked(tmp_path):
    module = _toy_module()
    path = generate_pairs(module, str(tmp_path / "ring8.safetensors"), num_pairs=100, nfe=4, num_classes=0)
    pairs = load_pairs(path)

    def first_batch():
        datamodule = ToyMixturePairsDataModule(path, batch_size=16, pair_batch_size=8, seed=4)
        datamodule.setup("fit")
        return next(iter(datamodule.train_dataloader()))
    batch, again = first_batch(), first_batch()
    assert set(batch) == {"noise", "real", "real_cond", "pair_noise", "pair_target"}
    assert batch["pair_noise"].shape == (8, 2) and batch["noise"].shape == (16, 2)
    for key in batch:
        assert torch.equal(batch[key], again[key])
    plain = ToyMixtureDataModule(batch_size=16, seed=4)
    plain_batch = next(iter(plain.train_dataloader()))
    for key in plain_batch:  # the parent's keys are untouched by the pair draw
        assert torch.equal(batch[key], plain_batch[key])
    # every drawn pair is a stored (noise, target) pair
    index = [int(torch.nonzero((pairs.noise == z).all(1))[0]) for z in batch["pair_noise"]]
    assert torch.equal(pairs.target[index], batch["pair_target"])

    with pytest.raises(ValueError, match=r"ring8.safetensors.*shape \[2\].*\[64\]"):
        ToyMixturePairsDataModule(path, law="digits64", conditional=False).setup("fit")
    with pytest.raises(ValueError, match="unconditional, but this datamodule is conditional"):
        ToyMixturePairsDataModule(path, law="ring8", conditional=True).setup("fit")
    with pytest.raises(ValueError, match="generated with nfe=4"):
        ToyMixturePairsDataModule(path, generate={"num_pairs": 100, "nfe": 32}).setup("fit")


def test_pairs_datamodule_generates_a_missing_file_from_the_model(tmp_path):
    module = _toy_module()
    path = str(tmp_path / "made" / "ring8.safetensors")
    datamodule = ToyMixturePairsDataModule(path, generate={"num_pairs": 32, "nfe": 4, "sampler": "euler", "seed": 2})
    with pytest.raises(ValueError, match="needs the model"):
        datamodule.load_checked_pairs(None)
    pairs = datamodule.load_checked_pairs(module)
    assert len(pairs) == 32 and pairs.metadata["sampler"] == "euler" and pairs.cond is None
    with pytest.raises(ValueError, match="different teacher"):
        ToyMixturePairsDataModule(path, law="grid25").load_checked_pairs(_toy_module("grid25"))


def test_pairs_command_writes_where_the_config_says(tmp_path):
    output = str(tmp_path / "cli.safetensors")
    path = pairs_main(["-c", "experiments/toy/ring8/dmd.yaml", "--num-pairs", "24", "--nfe", "4", "--seed", "5",
                       "--output", output, "--device", "cpu", f"--data.init_args.pairs_path={output}"])
    pairs = load_pairs(path)
    assert path == output and len(pairs) == 24 and pairs.metadata["seed"] == "5" and pairs.cond is None
    with pytest.raises(FileExistsError):
        pairs_main(["-c", "experiments/toy/ring8/dmd.yaml", "--num-pairs", "24", "--output", output])


def test_mnist_pairs_datamodule_adds_one_pair_per_item(tmp_path):
    path = str(tmp_path / "mnist.safetensors")
    n = 20
    tensors = {"noise": torch.randn(n, 1, 28, 28), "target": torch.rand(n, 1, 28, 28) * 2 - 1,
               "cond": torch.arange(n) % 10}
    metadata = {"format": FORMAT, "teacher": json.dumps({}), "sampler": "heun", "nfe": "32", "seed": "0",
                "num_pairs": str(n), "shape": json.dumps([1, 28, 28])}
    _write_atomically(tensors, metadata, path)
    datamodule = MNISTPairsDataModule(path, batch_size=4)
    datamodule.setup("fit")
    item, again = datamodule.dataset("val")[3], datamodule.dataset("val")[3]
    assert item["pair_noise"].shape == (1, 28, 28) and item["pair_cond"].ndim == 0
    assert torch.equal(item["pair_target"], again["pair_target"])
    index = int(torch.nonzero((tensors["noise"] == item["pair_noise"]).flatten(1).all(1))[0])
    assert torch.equal(tensors["target"][index], item["pair_target"])
    assert int(tensors["cond"][index]) == int(item["pair_cond"])
    with pytest.raises(ValueError, match=r"mnist.safetensors.*shape \[1, 28, 28\].*\[1, 32, 32\]"):
        MNISTPairsDataModule(path, pad_to=32).setup("fit")
