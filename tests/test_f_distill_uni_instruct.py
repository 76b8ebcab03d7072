"""f-distill and Uni-Instruct: the f-divergence weights, their generator gradients against independent computations on
the exact teacher, the ratio-normalisation state in checkpoints, config validation and convergence on the ring.

Gradient setup (as in test_method_gradients.py): exact Gaussian-mixture teacher, affine student x = m + A z with known
law N(m, A A^T), critic = that law's exact denoiser, and the discriminator's logit replaced by the TRUE log density
ratio log p_data,t(x_t) - log p_student,t(x_t) from torch.distributions -- so the only thing under test is how each
method turns (teacher, critic, ratio) into a gradient.
"""
import math

import numpy as np
import pytest
import torch

from lightning_modules import DMD2
from lightning_modules.diffusion import EDMSchedule, KarrasRampTime
from lightning_modules.methods.density_ratio import DIVERGENCES, TimeBinnedRatioNormalizer, get_divergence
from lightning_modules.methods.f_distill import FDistill
from lightning_modules.methods.uni_instruct import UniInstruct, uni_instruct_generator_loss
from lightning_modules.networks import DiscriminatorHead, GaussianMixtureTeacher, ToyMLPDenoiser
from tests.helpers import (AffineGenerator, affine_denoised, fix_randomness, fixed_generator_draws,
                           independent_noisy_log_prob, independent_x0)

B = 64
NAMES = sorted(DIVERGENCES)


# ---------------------------------------------------------------------------------------------- the f-divergence table
def _derivative(y, x):
    """dy/dx elementwise by autograd (zeros where y does not depend on x), keeping the graph for higher orders."""
    if not y.requires_grad:
        return torch.zeros_like(x)
    d, = torch.autograd.grad(y.sum(), x, create_graph=True, allow_unused=True)
    return torch.zeros_like(x) if d is None else d


@pytest.mark.parametrize("name", NAMES)
def test_weight_functions_are_f_second_derivative_times_r_squared(name):
    """h(r) = scale * f''(r) r^2 with f'' from autograd of f; h' and h'' match autograd of h."""
    divergence = DIVERGENCES[name]
    r = torch.logspace(-1.5, 1.5, 41, dtype=torch.float64).requires_grad_(True)
    f_prime, = torch.autograd.grad(divergence.f(r).sum(), r, create_graph=True)
    f_second, = torch.autograd.grad(f_prime.sum(), r)
    h = divergence.h(r) * torch.ones_like(r)
    assert torch.allclose(h, divergence.scale * f_second * r.detach() ** 2, rtol=1e-10)
    h_prime = _derivative(h, r)
    h_second = _derivative(h_prime, r)
    assert torch.allclose(divergence.h_prime(r.detach()) * torch.ones_like(h_prime), h_prime, rtol=1e-10, atol=1e-14)
    assert torch.allclose(divergence.h_second(r.detach()) * torch.ones_like(h_second), h_second, rtol=1e-10,
                          atol=1e-14)
    # f is a proper f-divergence generator: convex with f(1) = 0
    one = torch.ones(1, dtype=torch.float64)
    assert abs(divergence.f(one).item()) < 1e-12 and (f_second > 0).all()


def test_weight_functions_follow_the_paper_table():
    r = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)
    expected = {"reverse_kl": torch.ones(3), "kl": r, "js": 1 - 1 / (1 + r), "squared_hellinger": r.sqrt(),
                "jeffreys": 1 + r, "neyman": 1 / r}
    assert set(expected) == set(DIVERGENCES)
    for name, h in expected.items():
        assert torch.allclose(DIVERGENCES[name].h(r) * torch.ones(3, dtype=torch.float64), h.double())


def test_unknown_divergence_is_named():
    with pytest.raises(ValueError, match="'forward-kl'"):
        get_divergence("forward-kl")


# ---------------------------------------------------------------------------------------------- shared setup
def _true_log_ratio(data_law, student_law, x_t, t, schedule):
    alpha, sigma = schedule.alpha_sigma(t)
    return (independent_noisy_log_prob(data_law, x_t, alpha, sigma)
            - independent_noisy_log_prob(student_law, x_t, alpha, sigma))


def _affine_module(method_cls, **kwargs):
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("aniso", schedule)
    student = AffineGenerator([0.1, -0.2], [[0.5, 0.1], [-0.2, 0.4]])
    critic = GaussianMixtureTeacher(student.law(), schedule)
    module = method_cls(teacher=teacher, student=student, critic=critic, discriminator=DiscriminatorHead(4),
                        **kwargs)
    noise = torch.randn(B, 2, dtype=torch.float64)
    return module, teacher.law, student, noise


def _independent_ratio(log_ratio, sigma_edm, decay, num_bins=10, bound=10.0, low=0.1, high=20.0):
    """clip(exp(clamp(log r))) divided by its bin mean after one EMA step from 1 (bins: equal slices of sigma in
    [0.002, 80], the release's default); keeps the autograd graph of log_ratio."""
    r = log_ratio.clamp(-bound, bound).exp().clamp(low, high)
    bins = ((sigma_edm - 0.002) / (80.0 - 0.002) * num_bins).floor().long().clamp(0, num_bins - 1)
    means = torch.ones(num_bins, dtype=torch.float64)
    for b in range(num_bins):
        inside = bins == b
        if inside.any():
            means[b] = decay * 1.0 + (1 - decay) * r.detach()[inside].mean()
    return r / means[bins], means


# ---------------------------------------------------------------------------------------------- f-distill
@pytest.mark.parametrize("name", NAMES)
def test_f_distill_gradient_is_dmd2_gradient_weighted_by_normalised_h(name, monkeypatch):
    module, law, student, noise = _affine_module(FDistill, divergence=name, gan_generator_weight=0.0)
    schedule = module.schedule
    t = KarrasRampTime(0.02, 0.98)(B, schedule, torch.Generator().manual_seed(1))
    eps = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fix_randomness(module, [t], [eps])
    student_law = student.law()
    monkeypatch.setattr(module, "discriminator_logits",
                        lambda x_t, t_, cond: _true_log_ratio(law, student_law, x_t, t_, schedule))
    module.generator_loss({"noise": noise})["loss"].backward()

    # independent: DMD2 Eq. 2 by Tweedie/autograd, times h(r) / mean h(r) with r from torch.distributions densities
    z = noise
    x_g = student.mean.detach() + z @ student.matrix.detach().T
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x_g + sigma[:, None] * eps
    real = independent_x0(law, x_t, alpha, sigma)
    fake = independent_x0(student_law, x_t, alpha, sigma)
    g = (fake - real) / (x_g - real).abs().mean(1, keepdim=True)
    ratio, means = _independent_ratio(_true_log_ratio(law, student_law, x_t, t, schedule).detach(), sigma / alpha,
                                      decay=0.5)
    h = DIVERGENCES[name].h(ratio) * torch.ones_like(ratio)
    weights = h / h.mean()
    dloss_dx = weights[:, None] * g / (B * 2)
    assert torch.allclose(student.mean.grad, dloss_dx.sum(0), rtol=1e-6, atol=1e-12)
    assert torch.allclose(student.matrix.grad, dloss_dx.T @ z, rtol=1e-6, atol=1e-12)
    assert dloss_dx.sum(0).norm() > 1e-3
    assert torch.allclose(module.density_ratio.normalizer.bin_mean_ratio, means)
    if name != "reverse_kl":  # the weighting is not a no-op: the ratio spreads the weights
        assert weights.max() / weights.min() > 1.5


def test_f_distill_reverse_kl_is_dmd2(monkeypatch):
    grads = []
    for cls, kwargs in [(DMD2, {}), (FDistill, {"divergence": "reverse_kl", "gan_generator_weight": 0.0})]:
        module, law, student, noise = _affine_module(cls, **kwargs)
        t = KarrasRampTime(0.02, 0.98)(B, module.schedule, torch.Generator().manual_seed(1))
        eps = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        fix_randomness(module, [t], [eps])
        monkeypatch.setattr(module, "discriminator_logits", lambda x_t, t_, cond: torch.randn(x_t.shape[0]))
        module.generator_loss({"noise": noise})["loss"].backward()
        grads.append(torch.cat([student.mean.grad, student.matrix.grad.flatten()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-12)


# ---------------------------------------------------------------------------------------------- Uni-Instruct
def _uni_instruct_gradients(name, diff_instruct_term, monkeypatch):
    """(module's gradient, independent gradient) for the affine student; the independent side is autograd of the
    tractable loss written out by hand, with r(x_t) from torch.distributions -- differentiated (Diff-Instruct term on)
    or detached (off)."""
    module, law, student, noise = _affine_module(UniInstruct, divergence=name, gan_generator_weight=0.0,
                                                 diff_instruct_term=diff_instruct_term)
    schedule = module.schedule
    t, eps = fixed_generator_draws(module, schedule, B)
    student_law = student.law()
    monkeypatch.setattr(module, "fake_x0_and_logits", lambda x_t, t_, cond: (
        module.critic(x_t, t_, cond), _true_log_ratio(law, student_law, x_t, t_, schedule)))
    module.generator_loss({"noise": noise})["loss"].backward()

    d = affine_denoised(law, student_law, student, noise, t, eps, schedule)
    m, A, x_g, y_real, y_fake = d.m, d.A, d.x_g, d.y_real, d.y_fake
    ratio, _ = _independent_ratio(_true_log_ratio(law, student_law, d.x_t, t, schedule), d.sigma / d.alpha,
                                  decay=0.5)
    ratio = ratio if diff_instruct_term else ratio.detach()
    divergence = DIVERGENCES[name]
    h = divergence.h(ratio) * torch.ones_like(ratio)
    a = h - ratio * divergence.h_prime(ratio)
    w = (x_g - y_real).detach().abs().mean(1).clamp_min(1e-5)
    delta, excess = y_real - y_fake, y_fake - x_g
    per_sample = (a * (delta ** 2).sum(1) + 2 * h * (delta * excess).sum(1)) / w
    (per_sample.mean() / h.detach().mean()).backward()
    return (torch.cat([student.mean.grad, student.matrix.grad.flatten()]),
            torch.cat([m.grad, A.grad.flatten()]))


@pytest.mark.parametrize("diff_instruct_term", [True, False], ids=["with-diff-instruct-term", "ratio-held-fixed"])
@pytest.mark.parametrize("name", NAMES)
def test_uni_instruct_gradient_matches_autograd_of_the_tractable_loss(name, diff_instruct_term, monkeypatch):
    """With the Diff-Instruct term, the module takes r's variation from grad log r = s_data - s_student on sg weights;
    the independent side differentiates r(x_t) itself through torch.distributions densities."""
    got, expected = _uni_instruct_gradients(name, diff_instruct_term, monkeypatch)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-12)
    assert expected.norm() > 1e-3


@pytest.mark.parametrize("name", [n for n in NAMES if n != "reverse_kl"])
def test_uni_instruct_diff_instruct_term_changes_the_gradient(name, monkeypatch):
    """The ratio's own variation is not negligible on this problem (for reverse KL h is constant and there is none)."""
    with_term, _ = _uni_instruct_gradients(name, True, monkeypatch)
    without, _ = _uni_instruct_gradients(name, False, monkeypatch)
    assert (with_term - without).norm() > 1e-3 * with_term.norm()


@pytest.mark.parametrize("name", NAMES)
def test_uni_instruct_loss_is_gradient_equivalent_to_the_expanded_divergence(name):
    """Thm. 3.2 in one dimension: data N(0, v), student x0 = mu + s z, x_t = x0 + sigma eps. The expectation over
    (z, eps) of the tractable loss (SiD normaliser undone, score units) has the gradient of
    E_{x_t ~ student}[h(r) (s_data - s_student)^2]; both expectations by Gauss-Hermite quadrature."""
    v, sigma = 1.3, 0.7
    divergence = DIVERGENCES[name]
    nodes, w = np.polynomial.hermite_e.hermegauss(150)
    nodes, w = torch.tensor(nodes), torch.tensor(w / math.sqrt(2 * math.pi))
    normal = torch.distributions.Normal

    def log_densities(x, mu, s):
        return normal(0.0, math.sqrt(v + sigma ** 2)).log_prob(x), normal(mu, (s ** 2 + sigma ** 2).sqrt()).log_prob(x)

    def expanded(mu, s):
        x = mu + (s ** 2 + sigma ** 2).sqrt() * nodes  # quadrature nodes of the student's x_t, moving with (mu, s)
        log_p, log_q = log_densities(x, mu, s)
        score_p, score_q = -x / (v + sigma ** 2), -(x - mu) / (s ** 2 + sigma ** 2)
        return (w * divergence.h((log_p - log_q).exp()) * (score_p - score_q) ** 2).sum()

    mu = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(expanded(mu, s), (mu, s))

    z, e = (g.reshape(-1, 1) for g in torch.meshgrid(nodes, nodes, indexing="ij"))
    weight = (w[:, None] * w[None, :]).reshape(-1)
    x_g = mu + s * z
    x_t = x_g + sigma * e
    mu0, s0 = mu.detach(), s.detach()
    with torch.no_grad():
        log_p, log_q = log_densities(x_t[:, 0], mu0, s0)
        ratio = (log_p - log_q).exp()
    # exact denoisers of both Gaussian laws at x_t (gradient through x_t only)
    y_real = x_t * v / (v + sigma ** 2)
    y_fake = mu0 + (x_t - mu0) * s0 ** 2 / (s0 ** 2 + sigma ** 2)
    edm_sigma = torch.full((x_t.shape[0],), sigma, dtype=torch.float64)
    per_sample = uni_instruct_generator_loss(x_g, y_real, y_fake, ratio, torch.ones_like(ratio, dtype=torch.bool),
                                             divergence, edm_sigma)
    normaliser = (x_g - y_real).detach().abs().mean(1).clamp_min(1e-5)
    tractable = (weight * per_sample * normaliser).sum() / sigma ** 4  # x0 units -> score units: (alpha / sigma^2)^2
    got = torch.autograd.grad(tractable, (mu, s))
    for g, e_ in zip(got, exact):
        assert abs(g.item() - e_.item()) < 1e-6 * max(1.0, abs(e_.item()))
    assert abs(exact[1].item()) > 1e-2


# ---------------------------------------------------------------------------------------------- state and validation
def test_ratio_bin_means_are_buffers_that_survive_a_checkpoint(tmp_path):
    from tests.toy_runs import build
    cli = build("experiments/toy/ring8/fdistill_js.yaml", "--data.init_args.batches_per_epoch=12",
                "--model.init_args.warm_start_steps=20", "--trainer.enable_checkpointing=true",
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                f"--trainer.callbacks.dirpath={tmp_path}", "--trainer.callbacks.save_last=true",
                root=str(tmp_path))
    cli.trainer.fit(cli.model, cli.datamodule)
    trained = cli.model.density_ratio.normalizer
    assert int(trained.bin_updates.sum()) > 0 and not torch.equal(trained.bin_mean_ratio,
                                                                 torch.ones_like(trained.bin_mean_ratio))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    fresh = build("experiments/toy/ring8/fdistill_js.yaml", root=str(tmp_path)).model
    assert torch.equal(fresh.density_ratio.normalizer.bin_mean_ratio, torch.ones(10, dtype=torch.float64))
    fresh.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(fresh.density_ratio.normalizer.bin_mean_ratio, trained.bin_mean_ratio)
    assert torch.equal(fresh.density_ratio.normalizer.bin_updates, trained.bin_updates)


def test_ratio_normaliser_ema_and_bins():
    # the Karras-ramp bins (bin 0 at sigma_max); the default equal-sigma bins are pinned in test_reference_fidelity.py
    normaliser = TimeBinnedRatioNormalizer(EDMSchedule(), num_bins=4, ema_decay=0.75, spacing="karras_ramp")
    sigmas = torch.tensor([80.0, 79.0, 0.002, 0.0021], dtype=torch.float64)
    bins = normaliser.bin_index(sigmas)
    assert bins.tolist() == [0, 0, 3, 3]
    normaliser.update(normaliser.batch_statistics(torch.tensor([2.0, 4.0, 0.5, 0.5], dtype=torch.float64), bins))
    assert torch.allclose(normaliser.bin_mean_ratio, torch.tensor([0.75 + 0.25 * 3, 1, 1, 0.75 + 0.25 * 0.5],
                                                                   dtype=torch.float64))
    assert normaliser.bin_updates.tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="1.0"):
        TimeBinnedRatioNormalizer(EDMSchedule(), ema_decay=1.0)


@pytest.mark.parametrize("method_cls", [FDistill, UniInstruct])
def test_configuration_errors_name_the_value(method_cls):
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    student = ToyMLPDenoiser(2, hidden=16, depth=2)
    with pytest.raises(ValueError, match="'chi2'"):
        method_cls(teacher=teacher, student=student, discriminator=DiscriminatorHead(16), divergence="chi2")
    with pytest.raises(ValueError, match="discriminator"):
        method_cls(teacher=teacher, student=student)
    with pytest.raises(ValueError, match="ratio_max=0.5"):
        method_cls(teacher=teacher, student=student, discriminator=DiscriminatorHead(16), ratio_max=0.5)
    with pytest.raises(ValueError, match="gan_critic_weight"):
        method_cls(teacher=teacher, student=student, discriminator=DiscriminatorHead(16), gan_critic_weight=0.0)


@pytest.mark.parametrize("method_cls", [FDistill, UniInstruct])
def test_critic_step_trains_the_discriminator_on_real_versus_generated(method_cls):
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    student = ToyMLPDenoiser(2, hidden=32, depth=2)
    head = DiscriminatorHead(32)
    module = method_cls(teacher=teacher, student=student, discriminator=head)
    assert module.needs_real_data
    real, _ = teacher.law.sample(B)
    batch = {"noise": torch.randn(B, 2), "real": real.float()}
    losses = module.critic_loss(batch)
    assert set(losses) >= {"denoising", "gan", "loss"}
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    module.zero_grad()
    generator_losses = module.generator_loss(batch)
    generator_losses["loss"].backward()
    assert torch.isfinite(generator_losses["loss"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
