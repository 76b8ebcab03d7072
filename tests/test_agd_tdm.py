"""Exact tests for AGD (adapter guidance distillation) and TDM (trajectory distribution matching) on the exact
Gaussian-mixture teacher: AGD's targets and trajectory states against the closed-form CFG of the mixture, written
out independently (autograd Tweedie means, DDIM by hand); TDM's generator gradient against the closed-form score
difference of a Gaussian student's segment marginal and the data law, and its fake-score target against the exact
denoiser of that marginal."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from lightning_modules.diffusion import EDMSchedule
from lightning_modules.diffusion.samplers import sampler_times
from lightning_modules.methods.agd import AdapterGuidanceDistillation
from lightning_modules.methods.tdm import TrajectoryDistributionMatching
from lightning_modules.networks.gaussian_mixture import GaussianMixture, GaussianMixtureTeacher
from lightning_modules.networks.guidance_adapters import GuidanceAdapterDenoiser
from lightning_modules.networks.guidance_embedded import GuidanceEmbeddedDenoiser
from lightning_modules.networks.mlp import ToyMLPDenoiser
from lightning_modules.networks.toy_laws import get_toy_law
from tests.helpers import AffineGenerator, independent_noisy_log_prob, independent_x0


def _agd(trajectory_steps=6, **kwargs):
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    base = ToyMLPDenoiser(2, hidden=16, depth=2, num_classes=8)
    return AdapterGuidanceDistillation(teacher=teacher, student=base, trajectory_steps=trajectory_steps,
                                       adapter_bottleneck=4, **kwargs), schedule


def _closed_form_cfg(law, x, sigma, labels, w):
    """x_u + w (x_c - x_u) from autograd Tweedie means of the whole law and of each sample's class alone (EDM)."""
    ones = torch.ones_like(sigma)
    uncond = independent_x0(law, x, ones, sigma)
    cond = torch.stack([independent_x0(GaussianMixture(torch.ones(1), law.means[k:k + 1], law.covariances[k:k + 1]),
                                       x[b:b + 1], ones[b:b + 1], sigma[b:b + 1])[0] for b, k in enumerate(labels)])
    return uncond + w[:, None] * (cond - uncond)


def test_agd_trajectory_states_and_targets_are_the_exact_cfg_sampler():
    module, schedule = _agd()
    law = get_toy_law("ring8")
    n = 6
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 5, 7, 3])
    w = torch.tensor([1.0, 1.5, 2.0, 3.0, 4.0, 2.5], dtype=torch.float64)
    states, targets = module.guided_trajectory(z, labels, w)
    # independent: the CFG sampler written out -- x = sigma_0 z, then DDIM x <- D + (sigma'/sigma)(x - D) (EDM)
    sigmas = schedule.edm_sigma(sampler_times(schedule, 6, "euler"))
    assert sigmas[0] == pytest.approx(80.0) and len(states) == 6
    x = sigmas[0] * z
    for i, sigma in enumerate(sigmas):
        assert torch.allclose(states[i].double(), x, atol=1e-8), i
        guided = _closed_form_cfg(law, x, sigma.expand(n), labels, w)
        assert torch.allclose(targets[i].double(), guided, atol=1e-8), (i, (targets[i] - guided).abs().max())
        if i + 1 < len(sigmas):
            x = guided + sigmas[i + 1] / sigma * (x - guided)
    # guidance matters: at a middle level the w = 4 target is not the unguided conditional mean
    conditional = _closed_form_cfg(law, states[2].double(), sigmas[2].expand(n), labels, torch.ones(n).double())
    assert (targets[2][4].double() - conditional[4]).abs().max() > 1e-2
    # step 3: each training state is the trajectory state at its drawn level, with its guided target
    torch.manual_seed(3)
    batch = module.trajectory_batch(z, labels)
    torch.manual_seed(3)
    w_drawn = module.draw_guidance(n, "cpu")
    states, targets = module.guided_trajectory(z, labels, w_drawn)
    rows = torch.arange(n)
    assert torch.equal(batch["w"], w_drawn)
    assert torch.equal(batch["x_t"], states[batch["level"], rows])
    assert torch.equal(batch["target"], targets[batch["level"], rows])
    assert torch.equal(batch["t"], sampler_times(schedule, 6, "euler")[batch["level"]])


def test_agd_zero_adapters_are_the_frozen_base_and_only_adapters_train():
    module, schedule = _agd()
    student = module.student
    assert isinstance(student, GuidanceAdapterDenoiser) and student.own_base
    base = student.base_network
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    t = sampler_times(schedule, 8, "euler")
    labels = torch.arange(8)
    w = torch.linspace(1.0, 4.0, 8, dtype=torch.float64)
    assert torch.equal(student(x, t, labels, guidance=w), base(x, t, labels))  # U = 0: exactly the base
    assert torch.equal(student(x, t, labels), base(x, t, labels))              # no w: adapters off
    assert not any(p.requires_grad for p in base.parameters())
    adapter_ids = {id(p) for p in student.adapters.parameters()}
    assert {id(p) for p in module.generator_parameters()} == adapter_ids
    # the fraction: adapters / (adapters + base)
    adapters = sum(p.numel() for p in student.adapters.parameters())
    total = adapters + sum(p.numel() for p in base.parameters())
    assert module.trainable_parameter_fraction() == pytest.approx(adapters / total)
    # the loss: lambda(t) ||D_psi - D_w||^2 with lambda = max(1 / sigma^2, 1), on the drawn trajectory states
    batch = {"noise": x, "cond": labels}
    torch.manual_seed(5)
    loss = module.generator_loss(batch)["loss"]
    torch.manual_seed(5)
    states = module.trajectory_batch(x, labels)
    prediction = base(states["x_t"], states["t"], labels)
    weight = schedule.edm_sigma(states["t"]).pow(-2).clamp(min=1.0)
    expected = (weight * ((prediction - states["target"]) ** 2).mean(1)).mean()
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in base.parameters())
    assert student.adapters["input"].up.weight.grad.abs().max() > 0
    # trained adapters change the guided output, not the base (adapters off)
    with torch.no_grad():
        for adapter in student.adapters.values():
            adapter.up.weight.normal_()
    assert not torch.allclose(student(x, t, labels, guidance=w), base(x, t, labels))
    assert torch.equal(student(x, t, labels), base(x, t, labels))
    student.reset_adapters()
    assert torch.equal(student(x, t, labels, guidance=w), base(x, t, labels))


def test_agd_adapters_on_a_shared_network_teacher_and_the_single_pass_sampler():
    schedule = EDMSchedule()
    teacher = ToyMLPDenoiser(2, hidden=16, depth=2, num_classes=8, schedule=schedule)
    module = AdapterGuidanceDistillation(teacher=teacher, trajectory_steps=4, adapter_bottleneck=4)
    assert module.student.base_network is teacher and not module.student.own_base
    # the teacher's weights are held once: in the module's registry only under teacher.
    assert not any(name.startswith("student.") and "adapters" not in name for name, _ in module.named_parameters())
    ema = copy.deepcopy(module.student)
    assert ema.base_network is teacher and ema.adapters["input"] is not module.student.adapters["input"]
    # one network evaluation per sampling step (CFG spends two), at the sampling scale
    seen = []
    original = module.student.forward
    module.student.forward = lambda *a, **k: seen.append(k.get("guidance")) or original(*a, **k)
    z, labels = torch.randn(5, 2), torch.arange(5)
    module.generate(z, labels, nfe=3)
    assert seen == [2.0, 2.0, 2.0]
    # zero adapters: the single-pass sampler is the base's unguided sampler, CFG's at w = 1
    unguided = module.sample_guided_teacher(z, labels, nfe=3, guidance=1.0)
    assert torch.allclose(module.generate(z, labels, nfe=3), unguided)


def test_agd_rejects_bad_input():
    schedule = EDMSchedule()
    with pytest.raises(ValueError, match="has no layers"):
        AdapterGuidanceDistillation(teacher=GaussianMixtureTeacher("ring8", schedule))
    with pytest.raises(ValueError, match="guidance_range"):
        _agd(guidance_range=(3.0, 1.0))
    with pytest.raises(ValueError, match="trajectory_steps"):
        _agd(trajectory_steps=0)
    with pytest.raises(ValueError, match="'bogus'"):
        _agd(weighting="bogus")
    with pytest.raises(ValueError, match="'nope'"):
        GuidanceAdapterDenoiser(ToyMLPDenoiser(2, hidden=8, depth=2), adapter_modules=["nope"])
    module, _ = _agd()
    with pytest.raises(ValueError, match="conditional: true"):
        module.generator_loss({"noise": torch.randn(4, 2)})


# ---------------------------------------------------------------------------------------------------------- TDM
MEAN, MATRIX = [0.4, -0.3], [[0.5, 0.1], [0.1, 0.3]]  # symmetric positive definite: the segment law below is valid


def _segment_law(level, schedule):
    """The exact law of the affine student's segment output for budget 2 (EDM, alpha = 1), as an x0-space law whose
    noised marginal at sigma_t is the segment marginal q_t, and q_t's covariance as a function of sigma_t.
    level 0: x_s = x0 + r (sigma_T z - x0), x0 = m + A z, r = sigma_1 / sigma_T: N((1 - r) m, M M^T),
             M = (1 - r) A + sigma_1 I; q_t = N((1 - r) m, M M^T + (sigma_t^2 - sigma_1^2) I).
    level 1: the last segment (s = 0): x0 = m + A x_1 / sigma_1 with x_1 the level-0 output: N(mu, N N^T)."""
    m, A = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(MATRIX, dtype=torch.float64)
    sigma_T, sigma_1 = (float(v) for v in schedule.edm_sigma(sampler_times(schedule, 2, "student")))
    r = sigma_1 / sigma_T
    M = (1 - r) * A + sigma_1 * torch.eye(2, dtype=torch.float64)
    if level == 0:
        mean, cov = (1 - r) * m, M @ M.T
        eye = torch.eye(2, dtype=torch.float64)
        return mean, cov - sigma_1 ** 2 * eye, lambda s: cov + (s ** 2 - sigma_1 ** 2) * eye
    N = A @ M / sigma_1
    mean, cov = m + A @ ((1 - r) * m) / sigma_1, N @ N.T
    return mean, cov, lambda s: cov + s ** 2 * torch.eye(2, dtype=torch.float64)


def _tdm(level, teacher_law=None, **kwargs):
    schedule = EDMSchedule()
    mean, x0_cov, _ = _segment_law(level, schedule)
    critic = GaussianMixtureTeacher(GaussianMixture([1.0], mean[None], x0_cov[None]), schedule)
    teacher = GaussianMixtureTeacher(teacher_law or "ring8", schedule)
    module = TrajectoryDistributionMatching(teacher=teacher, student=AffineGenerator(MEAN, MATRIX, schedule),
                                            critic=critic, step_budgets=[2], **kwargs)
    module.draw_segment = lambda device: (2, level)
    return module, schedule


@pytest.mark.parametrize("level", [0, 1], ids=["first_segment", "last_segment"])
def test_tdm_generator_gradient_is_the_closed_form_score_difference(level):
    module, schedule = _tdm(level)
    law = get_toy_law("ring8")
    n = 16
    g = torch.Generator().manual_seed(7)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    times = sampler_times(schedule, 2, "student")
    sigma_T, sigma_1 = (float(v) for v in schedule.edm_sigma(times))
    # noise levels inside the segment (sigma_1, sigma_T] or (0, sigma_1], and the forward-diffusion noise
    span = (sigma_1, sigma_T) if level == 0 else (0.05, sigma_1)
    sigma_t = span[0] + (span[1] - span[0]) * torch.rand(n, generator=g, dtype=torch.float64).clamp(0.05, 0.95)
    t = schedule.time_from_edm_sigma(sigma_t)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    module.segment_times = lambda t_i, s, ramp: t
    module.noise_like = lambda x: noise
    module.generator_loss({"noise": z})["loss"].backward()

    # independent: the student's segment output by hand, x_t, and both scores from torch.distributions
    m = torch.tensor(MEAN, dtype=torch.float64, requires_grad=True)
    A = torch.tensor(MATRIX, dtype=torch.float64, requires_grad=True)
    x_T = sigma_T * z
    x0 = m + z @ A.T
    if level == 0:
        x_s, sigma_s = x0 + sigma_1 / sigma_T * (x_T - x0), sigma_1
    else:
        x_1 = (x0 + sigma_1 / sigma_T * (x_T - x0)).detach()
        x0 = m + (x_1 / sigma_1) @ A.T
        x_s, sigma_s = x0, 0.0
    beta = (sigma_t ** 2 - sigma_s ** 2).sqrt()
    x_t = (x_s.detach() + beta[:, None] * noise).requires_grad_(True)
    mean, _, q_cov = _segment_law(level, schedule)
    log_q = torch.stack([torch.distributions.MultivariateNormal(mean, q_cov(s)).log_prob(x)
                         for s, x in zip(sigma_t, x_t)])
    score_q, = torch.autograd.grad(log_q.sum(), x_t)
    score_p, = torch.autograd.grad(independent_noisy_log_prob(law, x_t, torch.ones(n), sigma_t).sum(), x_t)
    # D_F - D_T = sigma_t^2 / alpha_t (grad log q - grad log p), alpha_t = 1
    g_expected = sigma_t[:, None] ** 2 * (score_q - score_p)
    (0.5 * ((x0 - (x0 - g_expected).detach()) ** 2).mean(1)).mean().backward()
    student = module.student
    assert torch.allclose(student.mean.grad, m.grad, rtol=1e-6, atol=1e-10)
    assert torch.allclose(student.matrix.grad, A.grad, rtol=1e-6, atol=1e-10), (student.matrix.grad, A.grad)
    assert m.grad.norm() > 1e-3  # informative: the Gaussian student is far from the ring


def test_tdm_gradient_vanishes_when_the_segment_marginal_is_the_teachers():
    """Teacher law = the segment output's own law: p_t = q_t on the segment, the direction is exactly zero."""
    schedule = EDMSchedule()
    mean, x0_cov, _ = _segment_law(0, schedule)
    module, _ = _tdm(0, teacher_law=GaussianMixture([1.0], mean[None], x0_cov[None]))
    module.generator_loss({"noise": torch.randn(32, 2, dtype=torch.float64)})["loss"].backward()
    assert module.student.mean.grad.abs().max() < 1e-12 and module.student.matrix.grad.abs().max() < 1e-12


def test_tdm_fake_score_target_regresses_to_the_exact_segment_denoiser():
    """Step 5: E[T | x_t] is the x0-denoiser of q_t. On the Gaussian first segment that denoiser is affine,
    D(x) = mu + C0 (C0 + sigma_t^2 I)^-1 (x - mu), so a least-squares fit of T on (1, x_t) recovers it; on the last
    segment (s = 0) T is x0 itself (DMD's DSM target)."""
    module, schedule = _tdm(0)
    n = 40000
    torch.manual_seed(11)
    z = torch.randn(n, 2, dtype=torch.float64)
    times = sampler_times(schedule, 2, "student")
    sigma_1, sigma_T = float(schedule.edm_sigma(times[1])), float(schedule.edm_sigma(times[0]))
    sigma_t = 2.0 * sigma_1
    t = schedule.time_from_edm_sigma(torch.full((n,), sigma_t, dtype=torch.float64))
    with torch.no_grad():
        out = module.segment_output(z, None, 2, 0)
        noised = module.diffuse_segment(out["x_s"], out["s"], t)
    design = torch.cat([torch.ones(n, 1, dtype=torch.float64), noised["x_t"].double()], dim=1)
    coefficients = torch.linalg.lstsq(design, noised["target"].double()).solution  # (3, 2)
    mean, c0, _ = _segment_law(0, schedule)
    gain = c0 @ torch.linalg.inv(c0 + sigma_t ** 2 * torch.eye(2, dtype=torch.float64))
    assert torch.allclose(coefficients[1:].T, gain, atol=0.03), (coefficients[1:].T, gain)
    assert torch.allclose(coefficients[0], mean - gain @ mean, atol=0.05)
    # the weight factor (beta / sigma_t)^4 and the last segment's target
    assert torch.allclose(noised["factor"], torch.full((n,), (1 - (sigma_1 / sigma_t) ** 2) ** 2, dtype=torch.float64))
    last = module.diffuse_segment(out["x_s"][:64], None, t[:64])
    assert torch.allclose(last["target"], out["x_s"][:64], atol=1e-12)
    assert torch.equal(last["factor"], torch.ones(64).double())
    assert sigma_T > sigma_t > sigma_1  # the fixed level lies inside the first segment


def test_tdm_step_budget_is_fed_and_sets_the_segment_targets():
    schedule = EDMSchedule()
    student = GuidanceEmbeddedDenoiser(ToyMLPDenoiser(2, hidden=16, depth=2))
    module = TrajectoryDistributionMatching(teacher=GaussianMixtureTeacher("ring8", schedule), student=student,
                                            step_budgets=[4, 1, 2])
    assert module.step_budgets == [1, 2, 4]
    seen = []
    original = student.forward
    student.forward = lambda *a, **k: seen.append((float(a[1][0]), k.get("guidance"))) or original(*a, **k)
    z = torch.randn(6, 2)
    for budget in (1, 2, 4):
        seen.clear()
        module.sample(z, None, nfe=budget)
        grid = module.budget_times(budget)
        assert [g for _, g in seen] == [float(budget)] * budget
        assert torch.allclose(torch.tensor([t for t, _ in seen], dtype=torch.float64), grid)
    # the segment's end point depends on the budget: budget 4, segment 1 ends at t_2 of the 4-step grid, budget 2's
    # segment 1 at the data; the same first state gets a different end point under budgets 2 and 4
    out4 = module.segment_output(z, None, 4, 1)
    assert torch.allclose(out4["s"], module.budget_times(4)[2].expand(6))
    out2 = module.segment_output(z, None, 2, 1)
    assert out2["s"] is None and torch.equal(out2["x_s"], out2["x0"])
    assert not torch.allclose(module.budget_times(2)[1], module.budget_times(4)[1])
    # a trained budget embedding makes the student's prediction depend on K
    with torch.no_grad():
        student.embed.projection.weight.normal_()
    x, t = torch.randn(6, 2), module.budget_times(4)[:1].expand(6)
    assert not torch.allclose(student(x, t, None, guidance=1.0), student(x, t, None, guidance=4.0))
    # both losses run on a budget-aware student and critic
    torch.manual_seed(0)
    assert torch.isfinite(module.generator_loss({"noise": z})["loss"])
    assert torch.isfinite(module.critic_loss({"noise": z})["loss"])


def test_tdm_rejects_bad_input():
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        TrajectoryDistributionMatching(teacher=teacher, student=ToyMLPDenoiser(2, hidden=8, depth=2),
                                       step_budgets=[1, 2])
    with pytest.raises(ValueError, match=r"\[0\]"):
        TrajectoryDistributionMatching(teacher=teacher, student=ToyMLPDenoiser(2, hidden=8, depth=2), step_budgets=[0])


MNIST_TEACHER = "assets/mnist-teacher/unet"


@pytest.mark.skipif(not os.path.isdir(MNIST_TEACHER), reason="the shipped MNIST teacher is missing")
@pytest.mark.parametrize("method", ["agd", "tdm"])
def test_mnist_config_runs_a_few_steps(method, tmp_path):
    """experiments/mnist/{agd,tdm}.yaml build and train a few updates; AGD's adapters sit on the shared frozen
    teacher (a small fraction of its weights, the teacher unchanged), TDM samples at 1, 2 and 4 steps."""
    from tests.toy_runs import build

    overrides = ["--trainer.max_steps=3", "--trainer.callbacks=[]", "--data.init_args.batch_size=4"]
    if method == "agd":
        overrides += ["--model.init_args.trajectory_steps=3"]
    cli = build(f"experiments/mnist/{method}.yaml", *overrides, root=str(tmp_path))
    module = cli.model
    teacher_before = [p.detach().clone() for p in module.teacher.parameters()]
    cli.trainer.fit(module, cli.datamodule)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters()))
    noise, labels = torch.randn(4, 1, 28, 28), torch.arange(4)
    if method == "agd":
        assert module.student.base_network is module.teacher
        fraction = module.trainable_parameter_fraction()
        print(f"AGD MNIST adapter fraction {fraction:.4f}")
        assert 0 < fraction < 0.1
        assert any(p.abs().max() > 0 for a in module.student.adapters.values() for p in a.up.parameters())
        nfes = [2]
    else:
        nfes = [1, 2, 4]
    for nfe in nfes:
        samples = module.sample(noise, labels, nfe=nfe)
        assert samples.shape == (4, 1, 28, 28) and torch.isfinite(samples).all()
