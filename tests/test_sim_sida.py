"""SIM and SiDA against independent computations on the exact Gaussian-mixture teacher.

SIM: (a) the module's generator gradient equals autograd of the per-sample formula through Tweedie denoisers built from
torch.distributions; (b) the score-gradient theorem itself: the surrogate's Monte-Carlo gradient (critic frozen at the
student's law) equals the gradient of the true divergence E d(T - D_theta) in which the student's exact denoiser
depends on theta -- and the stop-gradient reading of the paper's loss fails the same check; (c) SIM with d = 1/2 ||.||^2
is SiD with alpha = 0.5. SiDA: generator gradient = SiD's + weight * the batch-normalised GAN term's, critic loss =
DSM + weight * GAN. Both converge on ring8.
"""
import math

import pytest
import torch
from torch import nn

from lightning_modules import SiD
from lightning_modules.diffusion import EDMSchedule, LogNormalTime, VPDiscreteSchedule
from lightning_modules.losses import dsm_weight
from lightning_modules.methods.sida import SiDA
from lightning_modules.methods.sim import SIM, sim_surrogate
from lightning_modules.networks.denoiser import FeatureTap
from lightning_modules.networks import DiscriminatorHead, GaussianMixtureTeacher, ToyMLPDenoiser, get_toy_law
from tests.helpers import AffineGenerator, affine_denoised, fix_randomness, fixed_generator_draws, independent_x0

B = 64
MEAN, MATRIX = [0.1, -0.2], [[0.5, 0.1], [-0.2, 0.4]]


def _affine_setup(method_cls, schedule=None, critic_cls=GaussianMixtureTeacher, law_name="aniso", **kwargs):
    torch.manual_seed(0)
    schedule = schedule or EDMSchedule()
    teacher = GaussianMixtureTeacher(law_name, schedule)
    student = AffineGenerator(MEAN, MATRIX)
    critic = critic_cls(student.law(), schedule)
    module = method_cls(teacher=teacher, student=student, critic=critic, **kwargs)
    noise = torch.randn(B, 2, dtype=torch.float64)
    return module, teacher.law, student, noise


@pytest.mark.parametrize("schedule", [EDMSchedule(), VPDiscreteSchedule()], ids=["edm", "vp-discrete"])
@pytest.mark.parametrize("huber_c", [None, 0.05])
def test_sim_generator_gradient_matches_independent_pseudo_huber_formula(schedule, huber_c):
    module, law, student, noise = _affine_setup(SIM, schedule=schedule, huber_c=huber_c)
    t, eps = fixed_generator_draws(module, schedule, B)
    module.generator_loss({"noise": noise})["loss"].backward()

    # independent: L_i = [sqrt(|D|^2 + c^2) - c + D / sqrt(|D|^2 + c^2) . (y_f - x_g)] / sg(mean |x_g - y_r|)
    d = affine_denoised(law, student.law(), student, noise, t, eps, schedule)
    m, A, x_g, y_real, y_fake = d.m, d.A, d.x_g, d.y_real, d.y_fake
    c = 0.1 * math.sqrt(2) if huber_c is None else huber_c
    delta = y_real - y_fake
    root = (delta.pow(2).sum(1) + c * c).sqrt()
    w = (x_g - y_real).detach().abs().mean(1).clamp_min(1e-5)
    ((root - c + (delta * (y_fake - x_g)).sum(1) / root) / w).mean().backward()
    assert torch.allclose(student.mean.grad, m.grad, rtol=1e-6, atol=1e-10)
    assert torch.allclose(student.matrix.grad, A.grad, rtol=1e-6, atol=1e-10)
    assert m.grad.norm() > 1e-3 and A.grad.norm() > 1e-3


def test_sim_with_l2_distance_is_sid_with_alpha_one_half():
    """d = 1/2 ||.||^2: 1/2 |D|^2 + D . (F - x_g) = D . (T - x_g) - 1/2 |D|^2, SiD's Eq. 23 with alpha = 0.5."""
    grads, losses = [], []
    for method_cls, kwargs in [(SIM, {"distance": "l2"}), (SiD, {"alpha": 0.5})]:
        module, law, student, noise = _affine_setup(method_cls, **kwargs)
        fixed_generator_draws(module, module.schedule, B)
        loss = module.generator_loss({"noise": noise})["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([student.mean.grad, student.matrix.grad.flatten()]))
    assert torch.allclose(losses[0], losses[1], rtol=1e-12)
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14)
    assert grads[0].norm() > 1e-3
    # ... and it is not SiD at the paper's alpha = 1.2: the identity pins alpha
    module, _, student, noise = _affine_setup(SiD, alpha=1.2)
    fixed_generator_draws(module, module.schedule, B)
    module.generator_loss({"noise": noise})["loss"].backward()
    assert not torch.allclose(grads[0], torch.cat([student.mean.grad, student.matrix.grad.flatten()]), rtol=1e-3)


def _gaussian_x0(x_t, mean, cov, sigma):
    """E[x0 | x_t] for x0 ~ N(mean, cov), x_t = x0 + sigma eps (EDM), differentiable in (mean, cov)."""
    C = cov + sigma ** 2 * torch.eye(2, dtype=torch.float64)
    return mean + (x_t - mean) @ torch.linalg.solve(C, cov)   # cov C^{-1} (x - m), row form (C, cov symmetric)


@pytest.mark.parametrize("distance, huber_c", [("pseudo_huber", 0.1), ("l2", None)])
def test_sim_surrogate_has_the_true_divergence_gradient(distance, huber_c):
    """THE score-gradient theorem, by Monte Carlo. Student x = m + A z (law N(m, A A^T)), exact ring8 teacher, one
    noise level sigma = 1 (EDM). True divergence: E_{z, eps} d(T(x_t) - D_theta(x_t)) with D_theta the student's exact
    denoiser, whose parameters move with theta (autograd through both x_t and D_theta's law). Surrogate: the critic
    frozen at theta, gradients through x_t only. 16 batches of 4096 samples, common random numbers; the mean
    difference must lie within 4 standard errors per coordinate and within 5% of the gradient norm. With c = 0.1 the
    median |Delta| is ~0.3, so the pseudo-Huber case is far from its quadratic regime."""
    law = get_toy_law("ring8")
    mean0, matrix0 = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(MATRIX, dtype=torch.float64)
    sigma, batches, n = 1.0, 16, 4096
    c = huber_c if huber_c is not None else 1.0

    def d(delta):
        return 0.5 * delta.pow(2).sum(1) if distance == "l2" else (delta.pow(2).sum(1) + c * c).sqrt() - c

    def d_prime(delta):
        return delta if distance == "l2" else delta / (delta.pow(2).sum(1, keepdim=True) + c * c).sqrt()

    def gradient(kind, z, eps):
        m, A = mean0.clone().requires_grad_(True), matrix0.clone().requires_grad_(True)
        x_g = m + z @ A.T
        x_t = x_g + sigma * eps
        ones = torch.ones(n, dtype=torch.float64)
        y_real = independent_x0(law, x_t, ones, sigma * ones, create_graph=True)
        if kind == "true":
            loss = d(y_real - _gaussian_x0(x_t, m, A @ A.T, sigma)).mean()
        else:
            y_fake = _gaussian_x0(x_t, mean0, matrix0 @ matrix0.T, sigma)         # critic frozen at theta
            if kind == "surrogate":
                loss = sim_surrogate(x_g, y_real, y_fake, distance, c).mean()
            else:  # the paper's -d'(y) . (s_p - grad log q(x_t | x_0)) with d'(y) stop-gradient, in x0 units
                loss = -(d_prime(y_real - y_fake).detach() * (y_real - x_g)).sum(1).mean()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [m, A])])

    draws = torch.Generator().manual_seed(1)
    per_batch = {"true": [], "surrogate": [], "stop_gradient": []}
    for _ in range(batches):
        z = torch.randn(n, 2, dtype=torch.float64, generator=draws)
        eps = torch.randn(n, 2, dtype=torch.float64, generator=draws)
        for kind in per_batch:
            per_batch[kind].append(gradient(kind, z, eps))
    grads = {kind: torch.stack(v) for kind, v in per_batch.items()}
    true = grads["true"].mean(0)
    assert true.norm() > 0.1                                     # far from the data law: a decisive gradient
    difference = grads["surrogate"] - grads["true"]
    standard_error = difference.std(0) / math.sqrt(batches)
    assert (difference.mean(0).abs() < 4 * standard_error).all(), (difference.mean(0), standard_error)
    assert difference.mean(0).norm() < 0.05 * true.norm()
    # the check can fail: the stop-gradient estimator is off by more than the gradient itself
    wrong = (grads["stop_gradient"] - grads["true"]).mean(0)
    assert wrong.norm() > 0.5 * true.norm()


def test_sim_rejects_bad_configuration():
    with pytest.raises(ValueError, match="distance"):
        _affine_setup(SIM, distance="l1")
    with pytest.raises(ValueError, match="huber_c"):
        _affine_setup(SIM, huber_c=0.0)
    with pytest.raises(ValueError, match="alpha"):
        _affine_setup(SIM, alpha=1.2)


def test_sim_drops_non_finite_samples():
    module, _, _, noise = _affine_setup(SIM)
    noise[5] = float("nan")
    out = module.generator_loss({"noise": noise})
    assert torch.isfinite(out["loss"]) and out["finite_fraction"].item() == pytest.approx((B - 1) / B)


# ---------------------------------------------------------------------------------------------------- SiDA
class ExactCriticWithBottleneck(GaussianMixtureTeacher):
    """The student's exact denoiser, exposing a parameter-free 'bottleneck' tanh([x_t, log sigma]) for a head."""

    def __init__(self, law, schedule=None):
        super().__init__(law, schedule)
        self.bottleneck = nn.Tanh()

    def feature_module(self):
        return self.bottleneck

    def predict(self, x_t, t, cond):
        _, sigma = self.schedule.alpha_sigma(t.double())
        self.bottleneck(torch.cat([x_t, sigma.log()[:, None].to(x_t.dtype)], dim=1))
        return super().predict(x_t, t, cond)


def _float64_head():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 1), nn.Flatten(0)).double()


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_sida_generator_gradient_is_sid_plus_weighted_batch_normalised_gan(weight):
    head = _float64_head()
    module, law, student, noise = _affine_setup(SiDA, critic_cls=ExactCriticWithBottleneck, discriminator=head,
                                                alpha=1.2, gan_generator_weight=weight)
    schedule = module.schedule
    t, eps = fixed_generator_draws(module, schedule, B)
    out = module.generator_loss({"noise": noise})
    out["loss"].backward()

    # independent SiD part (Eq. 23) and GAN part, each differentiated on its own
    def independent(part):
        d = affine_denoised(law, student.law(), student, noise, t, eps, schedule)
        m, A, x_g, y_real, y_fake = d.m, d.A, d.x_g, d.y_real, d.y_fake
        w = (x_g - y_real).detach().abs().mean(1).clamp_min(1e-5)
        if part == "sid":
            loss = (((y_real - y_fake) * ((y_real - x_g) - 1.2 * (y_real - y_fake))).sum(1) / w).mean()
        else:  # dim * batch-mean softplus(-clamp(logit)) / w_i, averaged over i
            logits = head(torch.tanh(torch.cat([d.x_t, d.sigma.log()[:, None]], dim=1))).clamp(-10, 10)
            loss = (2 * torch.nn.functional.softplus(-logits).mean() / w).mean()
        loss.backward()
        return torch.cat([m.grad, A.grad.flatten()]), loss.detach()

    sid_grad, sid_loss = independent("sid")
    gan_grad, gan_loss = independent("gan")
    got = torch.cat([student.mean.grad, student.matrix.grad.flatten()])
    assert torch.allclose(got, sid_grad + weight * gan_grad, rtol=1e-6, atol=1e-10)
    assert torch.allclose(out["sid"], sid_loss, rtol=1e-9) and torch.allclose(out["gan"], gan_loss, rtol=1e-9)
    assert sid_grad.norm() > 1e-3 and gan_grad.norm() > 1e-2      # both parts are informative


def test_sida_critic_loss_is_dsm_plus_weighted_gan():
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    student = ToyMLPDenoiser(2, hidden=32, depth=2)
    head = DiscriminatorHead(32)
    module = SiDA(teacher=teacher, student=student, discriminator=head, gan_critic_weight=0.25)
    real, _ = teacher.law.sample(B, torch.Generator().manual_seed(5))
    batch = {"noise": torch.randn(B, 2), "real": real.float()}
    sampler = LogNormalTime(-1.2, 1.2)
    t_fake, t_real = (sampler(B, schedule, torch.Generator().manual_seed(s)) for s in (6, 7))
    eps_fake, eps_real = (torch.randn(B, 2, generator=torch.Generator().manual_seed(s)) for s in (8, 9))
    fix_randomness(module, [t_fake, t_real], [eps_fake, eps_real])
    out = module.critic_loss(batch)

    # independent composition: the critic and head called directly (FeatureTap is the network's own bottleneck hook)
    with torch.no_grad():
        x_g = module.generator_training_sample(batch)
        critic, softplus = module.critic, torch.nn.functional.softplus
        fake_t = schedule.add_noise(x_g, eps_fake, t_fake)
        real_t = schedule.add_noise(batch["real"], eps_real, t_real)
        with FeatureTap(critic) as tap:
            dsm = (dsm_weight(schedule, t_fake).float() * ((critic(fake_t, t_fake) - x_g) ** 2).mean(1)).mean()
        fake_logits = head(tap.features)
        with FeatureTap(critic) as tap:
            critic(real_t, t_real)
        gan = (softplus(-head(tap.features)) + softplus(fake_logits)).mean()
    assert torch.allclose(out["denoising"], dsm, rtol=1e-5)
    assert torch.allclose(out["gan"], gan, rtol=1e-5)
    assert torch.allclose(out["loss"], dsm + 0.25 * gan, rtol=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_sida_needs_a_head_real_data_and_sane_weights():
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    with pytest.raises(ValueError, match="discriminator"):
        SiDA(teacher=teacher, student=ToyMLPDenoiser(2, hidden=16, depth=2))
    with pytest.raises(ValueError, match="gan_generator_weight"):
        SiDA(teacher=teacher, student=ToyMLPDenoiser(2, hidden=16, depth=2), discriminator=DiscriminatorHead(16),
             gan_generator_weight=-1.0)
    module = SiDA(teacher=teacher, student=ToyMLPDenoiser(2, hidden=16, depth=2), discriminator=DiscriminatorHead(16))
    assert module.needs_real_data
    with pytest.raises(ValueError, match="real"):
        module._check_batch({"noise": torch.randn(4, 2)})
