"""Exact checks of the rectified-flow family against closed forms of Gaussian (mixture) laws.

Under the linear path y_tau = (1 - tau) x + tau z with x ~ sum_k w_k N(mu_k, S_k), z ~ N(0, I) independent, the
1-RF velocity is the posterior mean v*(y, tau) = E[z - x | y] (Liu et al. 2022, Eq. 1's minimiser): per component
y | k ~ N((1 - tau) mu_k, C_k), C_k = (1 - tau)^2 S_k + tau^2 I, E[x | y, k] = mu_k + (1 - tau) S_k C_k^-1 (y - (1 - tau) mu_k),
E[z | y, k] = tau C_k^-1 (y - (1 - tau) mu_k), weighted by the responsibilities. Written here in numpy, independently of
the framework's posterior mean.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from lightning_modules.diffusion import EDMSchedule, RectifiedFlowSchedule
from lightning_modules.evaluation.sample_metrics import sliced_wasserstein2
from lightning_modules.evaluation.straightness import curvature, straightness
from lightning_modules.methods.rectified_flow import (LogitNormalFlowTime, UniformFlowTime, UShapedFlowTime,
                                                      flow_sample, flow_velocity, velocity_regression)
from lightning_modules.networks import GaussianMixtureTeacher
from lightning_modules.networks.mixture_law import GaussianMixture


def _law(weights, means, stds):
    d = len(means[0])
    cov = [np.eye(d) * s ** 2 for s in stds]
    return GaussianMixture(torch.tensor(weights, dtype=torch.float64), torch.tensor(means, dtype=torch.float64),
                           torch.tensor(np.array(cov), dtype=torch.float64))


def closed_form_velocity(y, tau, weights, means, stds):
    """numpy E[z - x | y_tau = y] for an isotropic mixture (module docstring)."""
    y = np.asarray(y, dtype=np.float64)
    d = y.shape[1]
    logp, vel = [], []
    for w, mu, s in zip(weights, means, stds):
        var = (1 - tau) ** 2 * s ** 2 + tau ** 2  # C_k = var I
        r = y - (1 - tau) * np.asarray(mu)
        logp.append(np.log(w) - 0.5 * (r ** 2).sum(1) / var - 0.5 * d * np.log(2 * np.pi * var))
        ex = np.asarray(mu) + (1 - tau) * s ** 2 * r / var
        ez = tau * r / var
        vel.append(ez - ex)
    logp = np.stack(logp)
    resp = np.exp(logp - logp.max(0))
    resp /= resp.sum(0)
    return (resp[..., None] * np.stack(vel)).sum(0)


MIXTURES = {
    "single": ([1.0], [[0.7, -0.3]], [0.5]),
    "two_modes": ([0.3, 0.7], [[-1.5, 0.0], [1.0, 0.8]], [0.3, 0.6]),
}


def test_exact_teacher_velocity_is_the_closed_form_posterior_mean():
    gen = torch.Generator().manual_seed(0)
    for name, (w, mu, s) in MIXTURES.items():
        law = _law(w, mu, s)
        teacher = GaussianMixtureTeacher(law, schedule=RectifiedFlowSchedule()).double()
        edm_teacher = GaussianMixtureTeacher(law, schedule=EDMSchedule(sigma_min=1e-4, sigma_max=1e4)).double()
        for tau in (0.05, 0.3, 0.5, 0.8, 0.97):
            y = torch.randn(200, 2, generator=gen, dtype=torch.float64) * 1.5
            t = torch.full((200,), tau, dtype=torch.float64)
            expected = closed_form_velocity(y.numpy(), tau, w, mu, s)
            via_flow = teacher(y, t, None, prediction="flow").numpy()       # the parameterisation's conversion
            via_rf = flow_velocity(teacher, y, t, None, teacher.schedule).numpy()
            via_edm = flow_velocity(edm_teacher, y, t, None, edm_teacher.schedule).numpy()  # EDM -> linear path
            for got in (via_flow, via_rf, via_edm):
                np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-8, err_msg=f"{name} tau={tau}")


def test_flow_matching_loss_is_minimised_by_the_exact_velocity():
    """E||v - (z - x)||^2 = E||v - v*||^2 + E||v* - (z - x)||^2: a constant offset c raises the loss by |c|^2
    (up to Monte-Carlo error of the cross term), and the gradient at c = 0 vanishes."""
    w, mu, s = MIXTURES["two_modes"]
    law = _law(w, mu, s)
    teacher = GaussianMixtureTeacher(law, schedule=RectifiedFlowSchedule()).double()
    gen = torch.Generator().manual_seed(1)
    n = 400_000
    x, _ = law.sample(n, gen)
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    tau = torch.rand(n, generator=gen, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
    y = (1 - tau[:, None]) * x + tau[:, None] * z
    v_star = teacher(y, tau, None, prediction="flow")
    c = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    loss = (velocity_regression(v_star + c, x, z) * 2).mean()  # per_sample_mean over D = 2 -> sum of squares
    loss.backward()
    assert c.grad.abs().max() < 0.02, c.grad
    offset = torch.tensor([0.3, -0.4], dtype=torch.float64)
    raised = (velocity_regression(v_star + offset, x, z) * 2).mean()
    assert abs(float(raised - loss) - 0.25) < 0.01
    # the irreducible part equals E Var(z - x | y) (positive for the independent coupling)
    assert float(loss) > 0.1


def test_reflow_pairs_of_the_exact_teacher_reproduce_the_law():
    w, mu, s = MIXTURES["two_modes"]
    law = _law(w, mu, s)
    teacher = GaussianMixtureTeacher(law, schedule=RectifiedFlowSchedule(t_min=1e-6, t_max=1 - 1e-6)).double()
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    v = lambda y, tau: teacher(y, tau, None, prediction="flow")  # noqa: E731
    x = flow_sample(v, z, 200, tau_max=1 - 1e-6, method="heun")
    exact = law.sample(4000, gen)[0]
    other = law.sample(4000, gen)[0]
    sw = float(sliced_wasserstein2(x, exact, generator=torch.Generator().manual_seed(3)))
    floor = float(sliced_wasserstein2(other, exact, generator=torch.Generator().manual_seed(3)))
    assert sw < 2.0 * floor + 0.01, (sw, floor)
    # and the mode weights: the component mean closest to each sample
    mode = ((x[:, None, :] - torch.tensor(mu, dtype=torch.float64)[None]) ** 2).sum(-1).argmin(1)
    assert abs(float((mode == 1).double().mean()) - 0.7) < 0.03


def _single_gaussian_straightness(mean, s, d):
    """S = d [int_0^1 g'(tau)^2 dtau - (1 - s)^2], g = sqrt((1 - tau)^2 s^2 + tau^2): the flow of N(m, s^2 I)
    moves y_tau = (1 - tau) m + g(tau) z, so the mean term is straight and only the scale bends (test derivation)."""
    from scipy.integrate import quad

    def g_prime_sq(tau):
        v = (1 - tau) ** 2 * s ** 2 + tau ** 2
        return ((tau - (1 - tau) * s ** 2) / math.sqrt(v)) ** 2

    return d * (quad(g_prime_sq, 0, 1, epsabs=1e-12)[0] - (1 - s) ** 2)


def test_straightness_of_a_single_gaussian_flow_is_closed_form():
    w, mu, s = MIXTURES["single"]
    law = _law(w, mu, s)
    teacher = GaussianMixtureTeacher(law, schedule=RectifiedFlowSchedule(t_min=1e-6, t_max=1 - 1e-6)).double()
    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    v = lambda y, tau: teacher(y, tau, None, prediction="flow")  # noqa: E731
    measured = straightness(v, z, steps=400, method="heun", tau_max=1 - 1e-6)
    expected = _single_gaussian_straightness(mu[0], s[0], 2)
    # the z-dependence is exact per sample (E|z|^2 = d up to Monte Carlo: relative error ~ 1 / sqrt(n d));
    # measured 0.4301 against the closed form 0.4292 (N(0.7, -0.3; 0.5^2 I), 20000 trajectories, 400 Heun steps)
    assert abs(measured - expected) < 0.02 * expected + 1e-4, (measured, expected)
    assert expected > 0.05
    assert curvature(v, z, steps=100, tau_max=1 - 1e-6) > 0


def test_reflowed_exact_coupling_is_straight_and_independent_is_not():
    """The reflow coupling (z, ODE_T(z)) is deterministic: the flow fitted to it is exactly the straight velocity
    z - ODE_T(z) along its own lines, straightness 0; the 1-RF flow of the independent coupling curves (> 0)."""
    w, mu, s = MIXTURES["two_modes"]
    law = _law(w, mu, s)
    teacher = GaussianMixtureTeacher(law, schedule=RectifiedFlowSchedule(t_min=1e-6, t_max=1 - 1e-6)).double()
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v1 = lambda y, tau: teacher(y, tau, None, prediction="flow")  # noqa: E731
    s1 = straightness(v1, z, steps=200, tau_max=1 - 1e-6)
    x_pair = flow_sample(v1, z, 200, tau_max=1 - 1e-6, method="heun")
    # the 2-RF velocity of a deterministic, non-crossing coupling, evaluated on its own interpolation lines
    v2 = lambda y, tau: z - x_pair  # noqa: E731  (y on the line (1 - tau) x_pair + tau z)
    s2 = straightness(v2, z, steps=50, tau_max=1.0)
    assert s1 > 0.05, s1  # measured 0.823 for the two-mode mixture's 1-RF
    assert s2 < 1e-20, s2


def test_time_densities_integrate_to_one_and_match_their_samples():
    tau = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    for law in (UShapedFlowTime(4.0), UniformFlowTime()):
        assert abs(float(torch.trapezoid(law.density(tau), tau)) - 1.0) < 1e-8
    inner = tau[1:-1]
    assert abs(float(torch.trapezoid(LogitNormalFlowTime(0.0, 1.0).density(inner), inner)) - 1.0) < 1e-6
    u_law = UShapedFlowTime(4.0)
    draws = u_law(400_000, torch.Generator().manual_seed(6))
    hist = torch.histc(draws, bins=10, min=0, max=1) / draws.numel()
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    a = 4.0
    cdf = lambda t: (torch.expm1(a * t) - torch.expm1(a * (1 - t)) + math.expm1(a)) / (2 * math.expm1(a))  # noqa: E731
    expected = cdf(edges[1:]) - cdf(edges[:-1])
    assert (hist.double() - expected).abs().max() < 0.003
    assert hist[0] > 3 * hist[5] and hist[-1] > 3 * hist[5]  # U-shaped


def test_one_euler_step_is_the_students_one_step_sample():
    """generate(nfe=1) = z - v(z, 1) = D(x_T, T) (InstaFlow's one-step model through the flow conversion)."""
    from lightning_modules.methods.rectified_flow import RectifiedFlow
    from lightning_modules.networks import ToyMLPDenoiser

    teacher = GaussianMixtureTeacher("ring8", schedule=RectifiedFlowSchedule())
    module = RectifiedFlow(teacher=teacher, student=ToyMLPDenoiser(dim=2, hidden=32, depth=2, sigma_data=0.5))
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(7))
    t = torch.full((16,), module.schedule.t_max, dtype=torch.float64)
    one = module.generate(z, nfe=1)
    direct = module.student(module.schedule.t_max * z, t)
    torch.testing.assert_close(one, direct, rtol=1e-5, atol=1e-5)


def test_promotion_makes_the_next_round_reflow_of_the_current_flow():
    """k-RF -> (k+1)-RF: after promotion the coupling is the (frozen) current student's ODE."""
    from lightning_modules.methods.rectified_flow import RectifiedFlow
    from lightning_modules.networks import ToyMLPDenoiser

    teacher = GaussianMixtureTeacher("ring8", schedule=RectifiedFlowSchedule())
    module = RectifiedFlow(teacher=teacher, student=ToyMLPDenoiser(dim=2, hidden=32, depth=2, sigma_data=0.5),
                           pair_nfe=4, pair_sampler="euler")
    assert module.needs_real_data
    module.promote_student_to_teacher()
    assert module.coupling == "teacher" and not module.needs_real_data
    assert module.teacher is not module.student and not any(p.requires_grad for p in module.teacher.parameters())
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(8))
    x, z_out, _ = module.coupling_batch({"noise": z})
    assert z_out is z
    torch.testing.assert_close(x, module.sample_teacher(z, nfe=4, method="euler"))


def test_instaflow_state_is_checkpointed():
    from lightning_modules.methods.rectified_flow import InstaFlow
    from lightning_modules.networks import ToyMLPDenoiser

    teacher = GaussianMixtureTeacher("ring8", schedule=RectifiedFlowSchedule())
    module = InstaFlow(teacher=teacher, student=ToyMLPDenoiser(dim=2, hidden=32, depth=2, sigma_data=0.5),
                       reflow_steps=2)
    keys = module.state_dict().keys()
    assert "generator_updates" in keys and any(k.startswith("flow.") for k in keys)
    assert not module.distilling
    for _ in range(2):
        module.on_generator_step_end()
    assert module.distilling
    torch.testing.assert_close(module.flow.state_dict(), module.student.state_dict())


MNIST_TEACHER = "assets/mnist-teacher/unet"


@pytest.mark.skipif(not os.path.isdir(MNIST_TEACHER), reason="the shipped MNIST teacher is missing")
@pytest.mark.parametrize("method", ["rf1", "slimflow"])
def test_mnist_config_runs_a_few_steps(method, tmp_path):
    """The MNIST EDM teacher through the linear-path conversion: a few updates, finite flow samples at 2 steps.
    (The pair configs run here on the fly, coupling=teacher with 2 Heun levels, to skip the pair file.)"""
    from tests.toy_runs import build

    overrides = ["--trainer.max_steps=3", "--trainer.callbacks=[]"]
    if method == "slimflow":
        overrides += ["--data=datamodules.MNISTDataModule", "--model.init_args.coupling=teacher",
                      "--model.init_args.pair_nfe=3", "--model.init_args.reflow_steps=2",
                      "--model.init_args.distill_nfe=2", "--model.init_args.anneal_steps=1"]
    overrides += ["--data.init_args.batch_size=8"]
    cli = build(f"experiments/mnist/{method}.yaml", *overrides, root=str(tmp_path))
    module = cli.model
    cli.trainer.fit(module, cli.datamodule)
    samples = module.sample(torch.randn(10, 1, 28, 28), torch.arange(10), nfe=2)
    assert samples.shape == (10, 1, 28, 28) and torch.isfinite(samples).all()
    if method == "slimflow":
        assert sum(p.numel() for p in module.student.parameters()) * 3 < sum(p.numel() for p in module.teacher.parameters())


def test_slimflow_annealing_moves_from_independent_to_reflow_pairs():
    from lightning_modules.methods.slimflow import SlimFlow
    from lightning_modules.networks import ToyMLPDenoiser

    teacher = GaussianMixtureTeacher("ring8", schedule=RectifiedFlowSchedule())
    for mode in ("fraction", "noise"):
        module = SlimFlow(teacher=teacher, student=ToyMLPDenoiser(dim=2, hidden=16, depth=2, sigma_data=0.5),
                          coupling="pairs", anneal_steps=4, anneal_mode=mode, reflow_steps=10)
        gen = torch.Generator().manual_seed(9)
        batch = {"noise": torch.randn(64, 2, generator=gen), "real": torch.randn(64, 2, generator=gen) + 5,
                 "pair_noise": torch.randn(64, 2, generator=gen), "pair_target": torch.randn(64, 2, generator=gen) - 5}
        assert module.beta() == 1.0
        x, z, _ = module.annealed_coupling(batch)
        if mode == "fraction":  # beta = 1: every pair independent (data x, fresh z)
            torch.testing.assert_close(x, batch["real"])
        else:  # beta = 1: the pair's x with noise independent of it
            torch.testing.assert_close(x, batch["pair_target"])
            assert (z - batch["pair_noise"]).abs().min() > 0
        for _ in range(4):
            module.on_generator_step_end()
        assert module.beta() == 0.0
        x, z, _ = module.annealed_coupling(batch)  # beta = 0: the teacher's reflow pairs
        torch.testing.assert_close(x, batch["pair_target"])
        torch.testing.assert_close(z, batch["pair_noise"])
