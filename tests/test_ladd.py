"""LADD / SANA-Sprint and the shared adversarial core against closed forms.

* hinge losses on a linear discriminator D(x) = w^T x + b: dL_D/dw = mean[-1(D(x_r) < 1) x_r + 1(D(x_f) > -1) x_f];
* R1 on quadratic heads D_k(x) = 1/2 x^T A_k x + b_k^T x: grad D_k = A_k x + b_k, so R1 = sum_k ||A_k x + b_k||^2 and
  dR1/db_k = 2 (A_k x + b_k) (A_k symmetric);
* approximated R1: D(x + e n) - D(x) = e n^T (A x + b) + e^2/2 n^T A n exactly, so
  E_n ||.||^2 = e^2 ||A x + b||^2 + e^4/4 (tr(A)^2 + 2 tr(A^2));
* the generator's gradient through the exact teacher: for one Gaussian N(mu, s^2 I) (EDM time: alpha = 1, sigma = t)
  the posterior mean is mu + s^2/(s^2 + t^2)(x_t - mu), so a head w^T E[x0 | x_t] gives the hinge generator loss
  -mean_i w^T E[x0 | x_i + t n_i] the gradient -w s^2/(s^2 + t^2) / B in each x_i.
"""
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_modules.adversarial import TeacherFeatureGAN
from lightning_modules.diffusion import EDMSchedule
from lightning_modules.diffusion.time_samplers import FlowLogitNormalTime
from lightning_modules.losses import (approximate_r1_penalty, gan_loss_pair, hinge_discriminator, hinge_generator,
                                      r1_penalty)
from lightning_modules.methods.ladd import LADD
from lightning_modules.methods.sana_sprint import SANASprint
from lightning_modules.methods.scm import ContinuousConsistencyDistillation
from lightning_modules.networks import GaussianMixture, GaussianMixtureTeacher, ToyMLPDenoiser
from lightning_modules.conditioning.condition import TextCondition
from lightning_modules.networks.feature_discriminator import (TeacherFeatureDiscriminator, frozen_features,
                                                               pooled_prompt)
from tests.helpers import independent_x0
from tests.toy_runs import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MU = torch.tensor([0.3, -0.5], dtype=torch.float64)
S = 0.4


def _gaussian_teacher():
    law = GaussianMixture([1.0], MU[None], (S ** 2 * torch.eye(2, dtype=torch.float64))[None])
    return GaussianMixtureTeacher(law, EDMSchedule())


# ------------------------------------------------------------------ hinge
def test_hinge_discriminator_gradient_on_a_linear_discriminator_matches_its_closed_form():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    real, fake = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)
    loss = hinge_discriminator(real @ w + b, fake @ w + b).mean()
    loss.backward()
    with torch.no_grad():
        d_real, d_fake = real @ w + b, fake @ w + b
        expected_loss = ((1 - d_real).clamp(min=0) + (1 + d_fake).clamp(min=0)).mean()
        active_real, active_fake = (d_real < 1).double(), (d_fake > -1).double()
        expected_w = (-(active_real[:, None] * real) + active_fake[:, None] * fake).mean(0)
        expected_b = (-active_real + active_fake).mean()
    assert 0 < active_real.mean() < 1 and 0 < active_fake.mean() < 1   # both margins cut somewhere
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(w.grad, expected_w)
    torch.testing.assert_close(b.grad, expected_b)


def test_hinge_generator_pushes_fakes_up_the_discriminator():
    w = torch.tensor([1.5, -2.0], dtype=torch.float64)
    fake = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    hinge_generator(fake @ w).mean().backward()
    torch.testing.assert_close(fake.grad, -w.expand(8, 2) / 8)   # descending it raises D(fake) = w^T x
    # per-location logits (B, N) are averaged per sample, as the heads' outputs are
    logits = torch.tensor([[1.0, 3.0], [-2.0, 0.0]])
    torch.testing.assert_close(hinge_generator(logits), torch.tensor([-2.0, 1.0]))
    torch.testing.assert_close(hinge_discriminator(logits, -logits), torch.tensor([0.0, 2.0 + 2.0]))  # margins met: 0


def test_unknown_gan_loss_and_r1_mode_are_named():
    with pytest.raises(ValueError, match="'wasserstein'"):
        gan_loss_pair("wasserstein")
    with pytest.raises(ValueError, match="'second_order'"):
        TeacherFeatureGAN(r1_mode="second_order")
    with pytest.raises(ValueError, match="r1_weight must be >= 0, got -1"):
        TeacherFeatureGAN(r1_weight=-1.0)
    with pytest.raises(ValueError, match="require grad"):
        r1_penalty(torch.zeros(2, 1), torch.zeros(2, 3))


# ------------------------------------------------------------------ R1, exact and approximated
def _quadratic_heads(seed=0, dim=3, heads=2):
    g = torch.Generator().manual_seed(seed)
    A = []
    for _ in range(heads):
        M = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        A.append((M + M.T) / 2)
    b = torch.randn(heads, dim, generator=g, dtype=torch.float64)
    return torch.stack(A), b


def _quadratic(x, A, b):
    """(B, heads): 1/2 x^T A_k x + b_k^T x."""
    return 0.5 * torch.einsum("bi,kij,bj->bk", x, A, x) + x @ b.T


def test_exact_r1_is_the_squared_gradient_norm_of_each_head_and_trains_the_discriminator():
    A, b = _quadratic_heads()
    b = b.clone().requires_grad_(True)
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    penalty = r1_penalty(_quadratic(x, A, b), x)
    gradients = torch.einsum("kij,bj->bki", A, x.detach()) + b.detach()[None]    # (B, heads, dim)
    torch.testing.assert_close(penalty, (gradients ** 2).sum((1, 2)))
    penalty.mean().backward()     # create_graph: the penalty's own gradient reaches the heads' parameters
    torch.testing.assert_close(b.grad, (2 * gradients).mean(0))


def test_approximate_r1_is_the_finite_difference_and_its_mean_is_e2_times_r1():
    A, b = _quadratic_heads(seed=2, heads=1)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eps = 0.05
    n = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    difference = eps * ((x @ A[0].T + b[0]) * n).sum(1) + 0.5 * eps ** 2 * torch.einsum("bi,ij,bj->b", n, A[0], n)
    torch.testing.assert_close(approximate_r1_penalty(_quadratic(x, A, b), _quadratic(x + eps * n, A, b)),
                               difference ** 2)
    # over many perturbations: e^2 ||A x + b||^2 + e^4/4 (tr(A)^2 + 2 tr(A^2))
    draws = 400_000
    x1 = x[:1].expand(draws, 3)
    noise = torch.randn(draws, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    monte_carlo = approximate_r1_penalty(_quadratic(x1, A, b), _quadratic(x1 + eps * noise, A, b)).mean()
    gradient = x[0] @ A[0].T + b[0]
    curvature = (torch.trace(A[0]) ** 2 + 2 * torch.trace(A[0] @ A[0])) * eps ** 4 / 4
    expected = eps ** 2 * (gradient ** 2).sum() + curvature
    assert abs(float(monte_carlo / expected) - 1) < 0.01
    x_exact = x[:1].clone().requires_grad_(True)
    exact = r1_penalty(_quadratic(x_exact, A, b), x_exact)[0]
    assert abs(float(monte_carlo / eps ** 2 / exact) - 1) < 0.02     # ~ e^2 R1 at this small e


# ------------------------------------------------------------------ the discriminator's noise levels
def test_flow_logit_normal_time_is_logit_normal_in_rectified_flow_time():
    schedule = EDMSchedule()
    t = FlowLogitNormalTime(1.0, 1.0)(100_000, schedule, torch.Generator().manual_seed(0))
    u = t / (1 + t)                                      # EDM sigma -> rectified-flow time
    inside = (t > schedule.t_min) & (t < schedule.t_max)
    logit = torch.log(u[inside] / (1 - u[inside]))
    assert abs(float(logit.mean()) - 1.0) < 0.03 and abs(float(logit.std()) - 1.0) < 0.03
    assert float(inside.double().mean()) > 0.99          # u < 80/81 is all but certain at (1, 1)
    with pytest.raises(ValueError, match="std must be > 0, got 0"):
        FlowLogitNormalTime(1.0, 0.0)


# ------------------------------------------------------------------ features of the frozen teacher
def test_exact_teacher_features_are_its_input_posterior_mean_and_responsibilities():
    teacher = GaussianMixtureTeacher("ring8", EDMSchedule())
    x_t = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.full((32,), 0.7, dtype=torch.float64)
    scaled, mean, responsibilities = frozen_features(teacher, x_t, t, None)
    alpha, sigma = torch.ones(32, dtype=torch.float64), t
    torch.testing.assert_close(mean, independent_x0(teacher.law, x_t, alpha, sigma))
    sd = float(torch.sqrt(torch.trace(torch.cov(teacher.law.sample(200_000, torch.Generator().manual_seed(1))[0].T)) / 2))
    torch.testing.assert_close(scaled, x_t / math.sqrt(sd ** 2 + 0.49), rtol=5e-3, atol=0)
    assert responsibilities.shape == (32, 8)
    torch.testing.assert_close(responsibilities.sum(1), torch.ones(32, dtype=torch.float64))


def test_named_layers_of_a_network_teacher_are_tapped_with_gradients_to_the_input():
    torch.manual_seed(0)
    network = ToyMLPDenoiser(2, hidden=24, depth=3, sigma_data=0.5, schedule=EDMSchedule()).requires_grad_(False)
    x_t = torch.randn(5, 2, requires_grad=True)
    features = frozen_features(network, x_t, torch.full((5,), 1.0, dtype=torch.float64), None, ["body.2", "body.5"])
    assert [tuple(f.shape) for f in features] == [(5, 24), (5, 24)]
    sum(f.sum() for f in features).backward()
    assert x_t.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="'body.9'"):
        frozen_features(network, x_t, torch.ones(5, dtype=torch.float64), None, ["body.9"])


def test_discriminator_checks_feature_widths_and_skips_the_projection_for_the_null_label():
    teacher = GaussianMixtureTeacher("digits64", EDMSchedule())
    K = teacher.law.num_components
    x_t, t = torch.randn(6, 64), torch.full((6,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"feature_channels \[64, 64, 3\] do not match the widths \[64, 64, "):
        TeacherFeatureDiscriminator([64, 64, 3]).check_features(teacher, x_t, t)
    torch.manual_seed(0)
    discriminator = TeacherFeatureDiscriminator([64, 64, K], hidden=16, num_classes=10)
    null = torch.full((6,), 10)
    logits = discriminator(teacher, x_t, t, null)
    assert logits.shape == (6, 3)
    # the null label (unconditional features) scores like no label at all; a real label adds the projection
    unconditional = discriminator(teacher, x_t, t, None)
    torch.testing.assert_close(logits, unconditional)
    assert (discriminator(teacher, x_t, t, torch.zeros(6, dtype=torch.long)) - unconditional).abs().max() > 1e-4


def test_pooled_prompt_is_the_encoders_pooled_state_else_the_mean_over_real_tokens():
    torch.manual_seed(0)
    embeds, mask = torch.randn(3, 5, 4), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    pooled = torch.randn(3, 4)
    torch.testing.assert_close(pooled_prompt(TextCondition(embeds, pooled=pooled)), pooled)
    expected = torch.stack([embeds[0, :2].mean(0), embeds[1].mean(0), embeds[2, 0]])
    torch.testing.assert_close(pooled_prompt(TextCondition(embeds, mask=mask)), expected)
    torch.testing.assert_close(pooled_prompt(TextCondition(embeds)), embeds.mean(1))


class _FeaturesOfTheInput(nn.Module):
    """A frozen stand-in network whose generative features are x_t and x_t^2 (the heads under test read them)."""
    schedule = EDMSchedule()

    def generative_features(self, x_t, t, cond=None):
        return [x_t, x_t ** 2]


def test_prompt_projection_adds_exactly_w_p_dot_h_per_location():
    """LADD's heads conditioned on the pooled prompt: logit(x, p) - logit(x, 0) = <W p, h(x)> with h the head's
    hidden state (one location per (B, C) feature) -- checked against the head's own hidden state."""
    torch.manual_seed(0)
    network = _FeaturesOfTheInput()
    discriminator = TeacherFeatureDiscriminator([3, 3], hidden=8, prompt_dim=6)
    x_t, t = torch.randn(4, 3), torch.full((4,), 0.7, dtype=torch.float64)
    prompts = TextCondition(torch.randn(4, 2, 6), pooled=torch.randn(4, 6))
    zero = TextCondition(torch.zeros(4, 2, 6), pooled=torch.zeros(4, 6))
    conditioned, unconditioned = discriminator(network, x_t, t, prompts), discriminator(network, x_t, t, zero)
    head = discriminator.heads[1]
    embedding = discriminator.noise_embedding((network.schedule.edm_sigma(t).log() / 4).float())
    hidden = head.body(head.input((x_t ** 2)[:, :, None, None]) + head.noise_shift(embedding)[:, :, None, None])
    expected = (head.prompt_projection(prompts.pooled) * hidden.flatten(1)).sum(1)
    torch.testing.assert_close(conditioned[:, 1] - unconditioned[:, 1], expected)
    assert (conditioned - unconditioned).abs().min() > 1e-6   # every head reads the prompt
    with pytest.raises(ValueError, match="prompt_dim 5 does not match the pooled prompt embedding's width 6"):
        TeacherFeatureDiscriminator([3, 3], prompt_dim=5)(network, x_t, t, prompts)
    with pytest.raises(ValueError, match="prompt_dim 6 projects prompts, but the condition is Tensor"):
        discriminator(network, x_t, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes 10 and prompt_dim 6"):
        TeacherFeatureDiscriminator([3], num_classes=10, prompt_dim=6)


class _LinearOnPosteriorMean(nn.Module):
    """A test discriminator: D(x_s, s) = w^T E[x0 | x_s] from the teacher's features (one head)."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, network, x_s, s, cond=None):
        return (frozen_features(network, x_s, s, cond)[1] @ self.w)[:, None]


def test_generator_gradient_through_the_exact_teacher_matches_the_closed_form():
    teacher = _gaussian_teacher()
    w = torch.tensor([0.8, -1.3], dtype=torch.float64)
    t_value = 0.6
    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    module = SimpleNamespace(teacher=teacher, discriminator=_LinearOnPosteriorMean(w), schedule=teacher.schedule,
                             sample_times=lambda sampler, n: torch.full((n,), t_value, dtype=torch.float64),
                             noise_like=lambda x: noise)
    x_fake = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    loss = TeacherFeatureGAN(gan_loss="hinge").generator_loss(module, x_fake, None)
    loss.backward()
    shrink = S ** 2 / (S ** 2 + t_value ** 2)
    torch.testing.assert_close(x_fake.grad, -(shrink * w).expand(16, 2) / 16)
    expected = -((MU + shrink * (x_fake.detach() + t_value * noise - MU)) @ w).mean()
    torch.testing.assert_close(loss, expected)


# ------------------------------------------------------------------ the methods
def _student(seed=0, boundary=False):
    torch.manual_seed(seed)
    return ToyMLPDenoiser(2, hidden=32, depth=2, sigma_data=0.5, boundary_condition=boundary)


def _ring_batch(n=64, seed=0):
    law = GaussianMixtureTeacher("ring8", EDMSchedule()).law
    g = torch.Generator().manual_seed(seed)
    return {"noise": torch.randn(n, 2, generator=g), "cond": None, "real": law.sample(n, g)[0].float(),
            "real_cond": None}


def _ladd(**kwargs):
    torch.manual_seed(1)
    return LADD(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student=_student(),
                discriminator=TeacherFeatureDiscriminator([2, 2, 8], hidden=16), **kwargs)


def test_ladd_losses_train_the_heads_and_the_student_only():
    module = _ladd(r1_weight=3.0, r1_mode="exact")
    assert module.critic is None and module.needs_real_data
    assert not any("teacher" in key for key in module.discriminator.state_dict())   # the teacher is held once
    batch = _ring_batch()
    torch.manual_seed(2)
    critic = module.critic_loss(batch)
    torch.testing.assert_close(critic["loss"], critic["gan"] + 3.0 * critic["r1"])
    assert float(critic["r1"]) > 0
    critic["loss"].backward()
    assert all(p.grad is None for p in module.student.parameters())
    assert all(p.grad is not None for p in module.discriminator.parameters())
    module.discriminator.zero_grad(set_to_none=True)
    module.generator_loss(batch)["loss"].backward()
    assert all(p.grad is not None for p in module.student.parameters())


def test_ladd_on_synthetic_data_calls_the_teachers_samples_real():
    module = _ladd(real_data="teacher", teacher_nfe=8)
    assert not module.needs_real_data
    batch = _ring_batch(16)
    x, cond = module.real_samples(batch)
    torch.testing.assert_close(x, module.sample_teacher(batch["noise"], None, nfe=8, method="heun"))
    cached = {**batch, "pair_target": torch.ones(16, 2), "pair_cond": None}
    torch.testing.assert_close(module.real_samples(cached)[0], torch.ones(16, 2))


def test_ladd_optional_distillation_term_regresses_onto_the_teachers_sample_of_the_same_noise():
    module = _ladd(real_data="teacher", teacher_nfe=4, distillation_weight=0.3)
    batch = _ring_batch(16)
    torch.manual_seed(5)
    losses = module.generator_loss(batch)
    target = module.sample_teacher(batch["noise"], None, nfe=4, method="heun")
    torch.testing.assert_close(batch["pair_target"], target)           # solved once, kept for the batch's steps
    with torch.no_grad():
        expected = ((module.generate(batch["noise"]) - target) ** 2).mean()
    torch.testing.assert_close(losses["distillation"].detach(), expected)
    torch.testing.assert_close(losses["loss"], losses["adversarial"] + 0.3 * losses["distillation"])
    with pytest.raises(ValueError, match="needs real_data: teacher"):
        _ladd(distillation_weight=0.3)


def test_ladd_config_errors_are_named():
    with pytest.raises(ValueError, match="'noise'"):
        _ladd(real_data="noise")
    with pytest.raises(ValueError, match=r"3 feature maps \(widths \[2, 2, 8\]\) for 2 heads \(feature_channels \[2, 2\]\)"):
        LADD(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student=_student(),
             discriminator=TeacherFeatureDiscriminator([2, 2]))
    with pytest.raises(ValueError, match="takes no critic network"):
        LADD(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student=_student(), critic=_student(),
             discriminator=TeacherFeatureDiscriminator([2, 2, 8]))
    with pytest.raises(ValueError, match="TeacherFeatureDiscriminator"):
        LADD(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student=_student(), discriminator=nn.Linear(2, 1))


def _sana(weight, **kwargs):
    return SANASprint(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student=_student(boundary=True),
                      discriminator=TeacherFeatureDiscriminator([2, 2, 8], hidden=16), adversarial_weight=weight,
                      tangent_warmup_steps=10, **kwargs)


def test_sana_sprint_loss_is_the_scm_loss_plus_w_times_the_ladd_term():
    batch = _ring_batch()
    torch.manual_seed(3)
    scd = ContinuousConsistencyDistillation(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()),
                                            student=_student(boundary=True), tangent_warmup_steps=10)
    torch.manual_seed(3)
    sana, plain = _sana(0.7), _sana(0.0)
    plain.load_state_dict(sana.state_dict())
    scd.student.load_state_dict(sana.student.state_dict())
    scd.log_variance.load_state_dict(sana.log_variance.state_dict())
    torch.manual_seed(4)
    reference = scd.generator_loss(batch)["loss"]
    torch.manual_seed(4)
    hybrid = sana.generator_loss(batch)
    torch.manual_seed(4)
    without = plain.generator_loss(batch)
    assert torch.equal(hybrid["scm"], reference) and torch.equal(without["loss"], reference)
    torch.testing.assert_close(hybrid["loss"], reference + 0.7 * hybrid["adversarial"], rtol=0, atol=1e-6)
    assert abs(float(hybrid["adversarial"])) > 1e-3


def test_sana_sprint_step_adaptive_times_follow_the_step_budget_draw():
    module = _sana(0.5, max_time_probability=0.5, max_inference_steps=4)
    torch.manual_seed(0)
    t = module.step_adaptive_times(40_000, "cpu")
    grids = torch.cat([module.evaluation_times(k) for k in range(1, 5)])
    assert all(bool((grids - v).abs().min() < 1e-9) for v in t.unique())
    t_max = float(module.student_times[0])
    # P(t_max) = p + (1 - p) * mean_K 1/K over K = 1..4 (each K-step grid starts at t_max)
    expected = 0.5 + 0.5 * (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4
    assert abs(float((t == t_max).double().mean()) - expected) < 0.01
    with pytest.raises(ValueError, match="max_time_probability must be in \\[0, 1\\], got 1.5"):
        _sana(0.5, max_time_probability=1.5)
    with pytest.raises(ValueError, match="adversarial_weight must be >= 0, got -1"):
        _sana(-1.0)


# ------------------------------------------------------------------ MNIST configs build and train
@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "assets", "mnist-teacher", "unet")),
                    reason="the shipped MNIST teacher is missing")
@pytest.mark.parametrize("method", ["ladd", "sana_sprint"])
def test_mnist_config_runs_a_few_steps(method, tmp_path):
    cli = build(f"experiments/mnist/{method}.yaml", "--trainer.max_steps=4", "--trainer.callbacks=[]",
                "--data.init_args.batch_size=4", root=str(tmp_path))
    module = cli.model
    heads = [p.detach().clone() for p in module.discriminator.parameters()]
    cli.trainer.fit(module, cli.datamodule)
    assert module.critic is None       # the heads read the frozen teacher; no critic network
    assert any(not torch.equal(a, b) for a, b in zip(heads, module.discriminator.parameters()))
    samples = module.sample(torch.randn(4, 1, 28, 28), torch.arange(4), nfe=2)
    assert samples.shape == (4, 1, 28, 28) and torch.isfinite(samples).all()


# ------------------------------------------------------------------ the shared loss choice in the other GAN methods
def test_dmd2_sida_and_scott_take_the_hinge_game_by_name_and_density_ratio_methods_refuse_it():
    from lightning_modules.losses import non_saturating_gan_discriminator
    from lightning_modules.methods.dmd2 import DMD2
    from lightning_modules.methods.f_distill import FDistill
    from lightning_modules.methods.scott import SCott
    from lightning_modules.methods.sida import SiDA
    from lightning_modules.networks import DiscriminatorHead

    def teacher():
        return GaussianMixtureTeacher("ring8", EDMSchedule())

    head = DiscriminatorHead(32)
    default = DMD2(teacher=teacher(), student=_student(), discriminator=head, gan_generator_weight=1.0)
    assert default.gan_discriminator_term is non_saturating_gan_discriminator      # the papers' default kept
    for method in (DMD2(teacher=teacher(), student=_student(), discriminator=head, gan_loss="hinge"),
                   SiDA(teacher=teacher(), student=_student(), discriminator=head, gan_loss="hinge"),
                   SCott(teacher=teacher(), student=_student(boundary=True), discriminator=head, gan_loss="hinge")):
        assert (method.gan_generator_term, method.gan_discriminator_term) == (hinge_generator, hinge_discriminator)
    logits = torch.tensor([[0.5], [-3.0]])
    sida = SiDA(teacher=teacher(), student=_student(), discriminator=head, gan_loss="hinge")
    x_g, y_real = torch.zeros(2, 2), torch.full((2, 2), 0.5)
    # SiDA's batch-averaged term, hinge: dim * mean(-logit) / mean-|x_g - y_real| normaliser (0.5 here)
    torch.testing.assert_close(sida.adversarial_loss(logits, x_g, y_real), torch.tensor(2 * 1.25 / 0.5))
    with pytest.raises(ValueError, match="'least_squares'"):
        DMD2(teacher=teacher(), student=_student(), discriminator=head, gan_loss="least_squares")
    with pytest.raises(ValueError, match="gan_loss must be 'non_saturating', got 'hinge'"):
        FDistill(teacher=teacher(), student=_student(), discriminator=head, gan_loss="hinge")
