"""Each method's generator gradient against an independent closed-form computation on the exact teacher.

Setup: the teacher is the exact Gaussian-mixture denoiser; the student is an affine generator x = m + A z, whose law
N(m, A A^T) is known, so the critic can be replaced by that law's exact denoiser. The independent side computes the
denoisers by Tweedie's formula with scores from autograd of torch.distributions densities, then applies the paper's
gradient formula by hand.
"""
import math

import pytest
import torch

from lightning_modules import ConsistencyDistillation, DMD2, SiD
from lightning_modules.diffusion import EDMSchedule, VPDiscreteSchedule, KarrasRampTime
from lightning_modules.networks import GaussianMixtureTeacher, ToyMLPDenoiser, get_toy_law
from tests.helpers import AffineGenerator, fix_randomness, independent_x0

B = 64


def _affine_setup(method_cls, law_name="aniso", schedule=None, **kwargs):
    torch.manual_seed(0)
    schedule = schedule or EDMSchedule()
    teacher = GaussianMixtureTeacher(law_name, schedule)
    student = AffineGenerator([0.1, -0.2], [[0.5, 0.1], [-0.2, 0.4]])
    critic = GaussianMixtureTeacher(student.law(), schedule)
    module = method_cls(teacher=teacher, student=student, critic=critic, **kwargs)
    noise = torch.randn(B, 2, dtype=torch.float64)
    return module, teacher.law, student, noise


def _alpha_sigma(schedule, t):
    return schedule.alpha_sigma(t)


@pytest.mark.parametrize("schedule", [EDMSchedule(), VPDiscreteSchedule()], ids=["edm", "vp-discrete"])
def test_dmd2_generator_gradient_matches_normalised_score_difference(schedule):
    module, law, student, noise = _affine_setup(DMD2, schedule=schedule)
    t = KarrasRampTime(0.02, 0.98)(B, schedule, torch.Generator().manual_seed(1))
    eps = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fix_randomness(module, [t], [eps])
    loss = module.generator_loss({"noise": noise})["loss"]
    loss.backward()

    # independent: x_g, x_t, both denoisers by Tweedie, DMD2 Eq. 2 gradient, chain rule through x = m + A z
    z = noise
    with torch.no_grad():
        x_g = student.mean + z @ student.matrix.T
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x_g + sigma[:, None] * eps
    real = independent_x0(law, x_t, alpha, sigma)
    fake = independent_x0(student.law(), x_t, alpha, sigma)
    g = (fake - real) / (x_g - real).abs().mean(1, keepdim=True)
    dloss_dx = g / (B * 2)                                  # d/dx of mean_b mean_d 1/2 (x - sg(x - g))^2
    expected_mean = dloss_dx.sum(0)
    expected_matrix = dloss_dx.T @ z
    assert torch.allclose(student.mean.grad, expected_mean, rtol=1e-6, atol=1e-10)
    assert torch.allclose(student.matrix.grad, expected_matrix, rtol=1e-6, atol=1e-10)
    # the gradient is informative: it is not ~0 for a student far from the data law
    assert expected_mean.norm() > 1e-3


def test_dmd2_gradient_vanishes_when_student_law_equals_data_law():
    """If p_student = p_data the critic equals the teacher and the DMD gradient is exactly zero."""
    schedule = EDMSchedule()
    gaussian = AffineGenerator([0.3, -0.1], [[0.4, 0.0], [0.1, 0.2]], schedule)
    teacher = GaussianMixtureTeacher(gaussian.law(), schedule)
    module = DMD2(teacher=teacher, student=gaussian, critic=GaussianMixtureTeacher(gaussian.law(), schedule))
    module.generator_loss({"noise": torch.randn(B, 2, dtype=torch.float64)})["loss"].backward()
    assert gaussian.mean.grad.abs().max() < 1e-12 and gaussian.matrix.grad.abs().max() < 1e-12


@pytest.mark.parametrize("alpha_sid", [1.0, 1.2])
def test_sid_generator_gradient_matches_eq23_through_frozen_networks(alpha_sid):
    module, law, student, noise = _affine_setup(SiD, alpha=alpha_sid)
    schedule = module.schedule
    t = KarrasRampTime(0.2, 1.0)(B, schedule, torch.Generator().manual_seed(3))
    eps = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    fix_randomness(module, [t], [eps])
    module.generator_loss({"noise": noise})["loss"].backward()

    # independent: autograd through Tweedie denoisers built from torch.distributions (critic law held fixed)
    m = student.mean.detach().clone().requires_grad_(True)
    A = student.matrix.detach().clone().requires_grad_(True)
    x_g = m + noise @ A.T
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = x_g + sigma[:, None] * eps
    y_real = independent_x0(law, x_t, alpha, sigma, create_graph=True)
    y_fake = independent_x0(student.law(), x_t, alpha, sigma, create_graph=True)
    w = (x_g - y_real).detach().abs().mean(1).clamp_min(1e-5)
    loss = (((y_real - y_fake) * ((y_real - x_g) - alpha_sid * (y_real - y_fake))).sum(1) / w).mean()
    loss.backward()
    assert torch.allclose(student.mean.grad, m.grad, rtol=1e-6, atol=1e-10)
    assert torch.allclose(student.matrix.grad, A.grad, rtol=1e-6, atol=1e-10)
    assert m.grad.norm() > 1e-3


def test_sid_drops_non_finite_samples():
    module, law, student, noise = _affine_setup(SiD)
    noise[3] = float("nan")
    out = module.generator_loss({"noise": noise})
    assert torch.isfinite(out["loss"]) and out["finite_fraction"].item() == pytest.approx((B - 1) / B)


def _exact_heun(law, x, t_from, t_to):
    """EDM Heun step with the independent Tweedie denoiser (alpha = 1, sigma = t)."""
    one = torch.ones_like(t_from)
    d1 = (x - independent_x0(law, x, one, t_from)) / t_from[:, None]
    x_euler = x + (t_to - t_from)[:, None] * d1
    d2 = (x_euler - independent_x0(law, x_euler, one, t_to)) / t_to[:, None]
    return x + (t_to - t_from)[:, None] * 0.5 * (d1 + d2)


def test_consistency_distillation_gradient_matches_independent_heun_target():
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    student = ToyMLPDenoiser(2, hidden=32, depth=2, boundary_condition=True).double()
    module = ConsistencyDistillation(teacher=teacher, student=student, num_discretization_steps=18)
    law = teacher.law
    x0, _ = law.sample(B, torch.Generator().manual_seed(5))
    t_noisy, t_clean = module.discretization.pairs(B, schedule, torch.Generator().manual_seed(6))
    eps = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    module.discretization.pairs = lambda n, schedule, device=None: (t_noisy, t_clean)
    fix_randomness(module, [], [eps])
    # perturb the target so online != target (as after some EMA lag)
    with torch.no_grad():
        for p in module.target_student.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    module.generator_loss({"noise": x0, "real": x0})["loss"].backward()
    got = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    x_noisy = x0 + t_noisy[:, None] * eps
    x_clean = _exact_heun(law, x_noisy, t_noisy, t_clean).detach()
    with torch.no_grad():
        target = module.target_student.module(x_clean, t_clean)
    (((student(x_noisy, t_noisy) - target) ** 2).mean(1).mean()).backward()
    for g, p in zip(got, student.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-6, atol=1e-9)


def test_consistency_heun_target_tracks_exact_ode_for_a_gaussian():
    """For a single Gaussian N(mu, S), x(s) = mu + sqrt((lam + s^2)/(lam + s'^2)) (x(s') - mu) in S's eigenbasis:
    the teacher Heun step CD uses is within O(h^3) of it."""
    from lightning_modules.diffusion import heun_step
    schedule = EDMSchedule()
    mean = torch.tensor([0.3, -0.5], dtype=torch.float64)
    cov = torch.tensor([[0.2, 0.05], [0.05, 0.1]], dtype=torch.float64)
    from lightning_modules.networks import GaussianMixture
    law = GaussianMixture([1.0], mean[None], cov[None])
    teacher = GaussianMixtureTeacher(law, schedule)
    lam, U = torch.linalg.eigh(cov)
    x = mean + torch.randn(16, 2, dtype=torch.float64) * 3.0
    for s_from, s_to in [(3.0, 2.5), (1.0, 0.9), (0.2, 0.18)]:
        t_from, t_to = torch.full((16,), s_from, dtype=torch.float64), torch.full((16,), s_to, dtype=torch.float64)
        got = heun_step(lambda v, t: teacher(v, t), x * s_from / 3, t_from, t_to, schedule)
        rotated = ((x * s_from / 3) - mean) @ U
        exact = mean + (rotated * ((lam + s_to ** 2) / (lam + s_from ** 2)).sqrt()) @ U.T
        assert (got - exact).abs().max() < 5e-4 * (s_from - s_to) / 0.1


def test_dmd2_gan_terms_reach_discriminator_and_generator():
    from lightning_modules.networks import DiscriminatorHead
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    student = ToyMLPDenoiser(2, hidden=32, depth=2)
    head = DiscriminatorHead(32)
    module = DMD2(teacher=teacher, student=student, discriminator=head, gan_generator_weight=0.5,
                  gan_critic_weight=0.5)
    law = teacher.law
    real, _ = law.sample(B)
    batch = {"noise": torch.randn(B, 2), "real": real.float()}
    critic_losses = module.critic_loss(batch)
    assert set(critic_losses) >= {"denoising", "gan", "loss"}
    critic_losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    module.zero_grad()
    gen = module.generator_loss(batch)
    gen["loss"].backward()
    assert gen["gan"].item() > 0
    assert math.isclose(gen["loss"].item(), (gen["distribution_matching"] + 0.5 * gen["gan"]).item(), rel_tol=1e-6)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_backward_simulation_runs_k_steps_without_gradient_then_one_with(monkeypatch):
    """DMD2 Sec. 4.5: for a K-step student, x_g is the k-th step's output on the student's own k-step trajectory."""
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    student = ToyMLPDenoiser(2, hidden=16, depth=2)
    module = DMD2(teacher=teacher, student=student, student_sigmas=[80.0, 2.0, 0.5, 0.1])
    calls = []
    original = student.forward

    def recording_forward(x_t, t, cond=None, prediction="x0"):
        calls.append((float(t[0]), torch.is_grad_enabled()))
        return original(x_t, t, cond, prediction)
    monkeypatch.setattr(student, "forward", recording_forward)
    monkeypatch.setattr(torch, "randint", lambda *a, **k: torch.tensor([2]))
    x_g = module.generator_training_sample({"noise": torch.randn(8, 2)})
    assert [round(t, 6) for t, _ in calls] == [80.0, 2.0, 0.5]
    assert [grad for _, grad in calls] == [False, False, True]
    assert x_g.requires_grad


def test_consistency_online_and_target_share_one_dropout_mask():
    """With dropout, online and target calls at the same input and weights agree exactly (shared RNG state)."""
    torch.manual_seed(0)
    schedule = EDMSchedule()
    student = ToyMLPDenoiser(2, hidden=64, depth=3, dropout=0.5, boundary_condition=True)
    module = ConsistencyDistillation(teacher=GaussianMixtureTeacher("ring8", schedule), student=student)
    module.target_student.module.load_state_dict(student.state_dict())
    x = torch.randn(32, 2)
    t = torch.full((32,), 1.0, dtype=torch.float64)
    module.consistency_pair = lambda batch: (x, t, x, t, None)
    student.train()
    assert module.generator_loss({"noise": x, "real": x})["loss"].item() == 0.0
    # and dropout is really active: two plain calls differ
    assert not torch.equal(student(x, t), student(x, t))
