"""SCott and RG-LCD against closed forms on the exact Gaussian(-mixture) teacher (EDM time: x_t = x + t z).

For one Gaussian N(mu, s^2 I) the denoiser is D(x, t) = mu + s^2/(s^2 + t^2)(x - mu), so every solver step is affine
in (x_t, z'):
* DDIM-eta from t to r: x_r = D + sqrt(r^2 - c^2) (x_t - D)/t + c z',  c^2 = eta^2 r^2 (t^2 - r^2)/t^2;
* EDM's churn + Heun: t^ = (1 + eta) t, y = x_t + sqrt(t^^2 - t^2) z', then x_r - mu = g (y - mu) with
  g = 1 + (r - t^)/2 [t^/(s^2 + t^^2) + r k/(s^2 + r^2)],  k = 1 + (r - t^) t^/(s^2 + t^^2);
  mean mu + g (x_t - mu), variance g^2 (t^^2 - t^2) per coordinate.
"""
import math

import pytest
import torch

from lightning_modules.diffusion import EDMSchedule, heun_step
from lightning_modules.diffusion.samplers import ddim_step
from lightning_modules.methods.consistency import ConsistencyDistillation
from lightning_modules.methods.rg_lcd import RewardGuidedLCD
from lightning_modules.methods.scott import SCott
from lightning_modules.networks import DiscriminatorHead, GaussianMixture, GaussianMixtureTeacher, ToyMLPDenoiser
from lightning_modules.methods.rewards import LatentRewardModel, MixtureLogDensity

MU = torch.tensor([0.3, -0.5], dtype=torch.float64)
S = 0.4


def _gaussian_law(std=S):
    return GaussianMixture([1.0], MU[None], (std ** 2 * torch.eye(2, dtype=torch.float64))[None])


def _student(seed=0):
    torch.manual_seed(seed)
    return ToyMLPDenoiser(2, hidden=16, depth=2, boundary_condition=True, sigma_data=0.5).double()


def _scott(teacher, **kwargs):
    return SCott(teacher=teacher, student=_student(), discriminator=DiscriminatorHead(16), **kwargs)


def _fixed_pairs(module, t, r):
    module.time_pairs = lambda n, device: (torch.full((n,), t, dtype=torch.float64),
                                           torch.full((n,), r, dtype=torch.float64))


def _vec(v, n):
    return torch.full((n,), v, dtype=torch.float64)


# ------------------------------------------------------------------ SCott's target
@pytest.mark.parametrize("law", ["gaussian", "ring8"])
def test_scott_target_with_eta_zero_is_cds_heun_step(law):
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher(_gaussian_law() if law == "gaussian" else "ring8", schedule)
    scott, cd = _scott(teacher, eta=0.0), ConsistencyDistillation(teacher=teacher, student=_student())
    x0 = teacher.law.sample(64, torch.Generator().manual_seed(1))[0]
    for t, r in [(2.0, 1.5), (0.3, 0.2), (60.0, 40.0)]:
        _fixed_pairs(scott, t, r), _fixed_pairs(cd, t, r)
        torch.manual_seed(3)
        ours = scott.consistency_pair({"real": x0, "noise": x0})
        torch.manual_seed(3)
        theirs = cd.consistency_pair({"real": x0, "noise": x0})
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[2], theirs[2])
    # DDIM-eta at eta = 0 is the deterministic DDIM step; two sub-steps are two Heun steps through the Karras midpoint
    x = ours[0]
    t, r = _vec(2.0, 64), _vec(1.5, 64)
    ddim = _scott(teacher, eta=0.0, solver="ddim")
    torch.testing.assert_close(ddim.solver_step(x, t, r, None), ddim_step(x, teacher(x, t), t, r, schedule))
    two = _scott(teacher, eta=0.0, solver_steps=2)
    mid = _vec(((2.0 ** (1 / 7) + 1.5 ** (1 / 7)) / 2) ** 7, 64)
    expected = heun_step(teacher, heun_step(teacher, x, t, mid, schedule), mid, r, schedule)
    torch.testing.assert_close(two.target_point({}, None, None, x, t, r, None), expected)


def _closed_form(solver, x_t, t, r, eta):
    if solver == "ddim":
        d = MU + S ** 2 / (S ** 2 + t ** 2) * (x_t - MU)
        c2 = eta ** 2 * r ** 2 * (t ** 2 - r ** 2) / t ** 2
        return d + math.sqrt(r ** 2 - c2) * (x_t - d) / t, c2
    th = (1 + eta) * t
    k = 1 + (r - th) * th / (S ** 2 + th ** 2)
    g = 1 + (r - th) / 2 * (th / (S ** 2 + th ** 2) + r * k / (S ** 2 + r ** 2))
    return MU + g * (x_t - MU), g ** 2 * (th ** 2 - t ** 2)


@pytest.mark.parametrize("solver", ["heun", "ddim"])
@pytest.mark.parametrize("t, r, eta", [(2.0, 1.5, 0.3), (0.5, 0.4, 1.0), (10.0, 6.0, 0.1)])
def test_scott_target_mean_and_variance_over_the_injected_noise(solver, t, r, eta):
    schedule = EDMSchedule()
    module = _scott(GaussianMixtureTeacher(_gaussian_law(), schedule), eta=eta, solver=solver)
    x_t = torch.tensor([[1.2, 0.4]], dtype=torch.float64)
    mean, variance = _closed_form(solver, x_t, t, r, eta)
    # exact: the step is affine in z', x_r = m + sqrt(v) z'
    zero = module.solver_step(x_t, _vec(t, 1), _vec(r, 1), None, noise=torch.zeros(1, 2, dtype=torch.float64))
    torch.testing.assert_close(zero, mean, rtol=1e-10, atol=1e-12)
    for e in torch.eye(2, dtype=torch.float64):
        moved = module.solver_step(x_t, _vec(t, 1), _vec(r, 1), None, noise=e[None]) - zero
        torch.testing.assert_close(moved, math.sqrt(variance) * e[None], rtol=1e-9, atol=1e-12)
    assert variance > 0
    # Monte Carlo through the method's own target_point (its own noise draws)
    n = 100_000
    torch.manual_seed(0)
    x_r = module.target_point({}, None, None, x_t.expand(n, 2), _vec(t, n), _vec(r, n), None)
    assert (x_r.mean(0) - mean[0]).abs().max() < 5 * math.sqrt(variance / n)
    assert float(x_r.var(0).mean()) == pytest.approx(variance, rel=0.02)


# ------------------------------------------------------------------ SCott's adversarial term
def test_scott_adversarial_gradients_match_the_closed_form():
    """A linear discriminator D(x) = w.x + b at a fixed noise level s: the generator's term
    mean_i softplus(-D(x_i + s n_i)) has gradient -sigma(-l_i) w / B in x_i; the critic's term
    mean_i softplus(-l_real,i) + softplus(l_fake,i) has gradient mean_i [-sigma(-l_r) x'_r + sigma(l_f) x'_f] in w."""
    schedule = EDMSchedule()
    module = _scott(GaussianMixtureTeacher(_gaussian_law(), schedule), eta=0.2)
    s = 0.7
    module.gan_time_sampler = lambda n, schedule, generator=None, device="cpu": torch.full((n,), s, dtype=torch.float64)
    module.discriminator = torch.nn.Linear(2, 1).double()
    module.discriminator_logits = lambda x, t, cond: module.discriminator(x).squeeze(1)
    w, b = module.discriminator.weight[0].detach(), module.discriminator.bias.detach()
    x_fake = torch.randn(32, 2, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    loss = module.adversarial_generator_loss(x_fake, None)
    (grad,) = torch.autograd.grad(loss, x_fake)
    torch.manual_seed(1)
    n = torch.randn(32, 2, dtype=torch.float64)
    logits = (x_fake.detach() + s * n) @ w + b
    torch.testing.assert_close(grad, -torch.sigmoid(-logits)[:, None] * w[None] / 32)
    # the critic side
    x_real = MU + S * torch.randn(32, 2, dtype=torch.float64)
    torch.manual_seed(2)
    loss = module.adversarial_critic_loss(x_real, None, x_fake, None)
    (grad_w,) = torch.autograd.grad(loss, module.discriminator.weight)
    torch.manual_seed(2)
    real_s = x_real + s * torch.randn(32, 2, dtype=torch.float64)
    fake_s = x_fake.detach() + s * torch.randn(32, 2, dtype=torch.float64)
    expected = (-torch.sigmoid(-(real_s @ w + b))[:, None] * real_s
                + torch.sigmoid(fake_s @ w + b)[:, None] * fake_s).mean(0)
    torch.testing.assert_close(grad_w[0], expected)


def test_scott_generator_and_critic_losses_reach_their_networks():
    torch.manual_seed(0)
    schedule = EDMSchedule()
    module = _scott(GaussianMixtureTeacher("ring8", schedule), eta=0.2, gan_generator_weight=0.5)
    x0 = module.teacher.law.sample(64, torch.Generator().manual_seed(1))[0]
    batch = {"real": x0, "noise": x0}
    critic = module.critic_loss(batch)
    head = list(module.discriminator.parameters())
    assert all(g is not None and g.norm() > 0 for g in torch.autograd.grad(critic["loss"], head))
    assert {id(p) for p in head} <= {id(p) for p in module.critic_parameters()}
    torch.manual_seed(5)
    losses = module.generator_loss(batch)
    torch.testing.assert_close(losses["loss"], losses["consistency"] + 0.5 * losses["gan"])
    gan_grads = torch.autograd.grad(losses["gan"], module.generator_parameters(), allow_unused=True)
    assert sum(float(g.norm()) for g in gan_grads if g is not None) > 0


# ------------------------------------------------------------------ rewards
def test_mixture_reward_gradient_is_the_closed_form_score():
    law = MixtureLogDensity("ring8")
    std2 = 0.08 ** 2
    x = (1.1 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).requires_grad_()
    value = law(x)
    torch.testing.assert_close(value, law.law.log_prob(x.detach()))
    (grad,) = torch.autograd.grad(value.sum(), x)
    means = law.law.means
    log_w = -((x.detach()[:, None] - means[None]) ** 2).sum(-1) / (2 * std2)
    w = torch.softmax(log_w, 1)  # equal weights and covariances: responsibilities from distances alone
    expected = (w[:, :, None] * (means[None] - x.detach()[:, None])).sum(1) / std2
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, law.gradient(x.detach()))
    # the requested mode: log N(x; mu_c, std^2 I), gradient (mu_c - x) / std^2
    labels = torch.arange(64) % 8
    xc = x.detach().clone().requires_grad_()
    (grad_c,) = torch.autograd.grad(law(xc, labels).sum(), xc)
    torch.testing.assert_close(grad_c, (means[labels] - xc.detach()) / std2, rtol=1e-6, atol=1e-6)


def test_rg_lcd_gradient_is_cd_gradient_plus_beta_reward_gradient():
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    reward = MixtureLogDensity("ring8", conditional=False)
    beta = 0.01
    module = RewardGuidedLCD(teacher=teacher, student=_student(), reward=reward, reward_weight=beta)
    params = module.generator_parameters()
    x0 = teacher.law.sample(64, torch.Generator().manual_seed(1))[0]
    batch = {"real": x0, "noise": x0}
    torch.manual_seed(4)
    total = torch.autograd.grad(module.generator_loss(batch)["loss"], params)
    torch.manual_seed(4)
    cd = torch.autograd.grad(ConsistencyDistillation.generator_loss(module, batch)["loss"], params)
    torch.manual_seed(4)
    online = module.consistency_terms(batch)["online"]
    # d/dtheta [-beta mean_i r(f_i)] = J^T (-beta / B grad r(f_i)), grad r in closed form
    vector = -beta / 64 * reward.gradient(online.detach())
    reward_grad = torch.autograd.grad(online, params, grad_outputs=vector.to(online))
    for g, c, rg in zip(total, cd, reward_grad):
        torch.testing.assert_close(g, c + rg, rtol=1e-7, atol=1e-10)
    assert sum(float(rg.norm()) for rg in reward_grad) > 0


@pytest.mark.parametrize("lrm_loss", ["regression", "preference"])
def test_latent_reward_model_is_driven_toward_the_expert(lrm_loss):
    """The LRM trained by the module's critic loss on a broad Gaussian law with the expert log N(x; mu, I): its error
    to the expert (regression: values; preference: the generated-minus-real differences it determines) drops."""
    torch.manual_seed(0)
    schedule = EDMSchedule()
    law = _gaussian_law(std=1.0)
    teacher = GaussianMixtureTeacher(law, schedule)
    lrm = LatentRewardModel([2], hidden=64, depth=2).double()
    module = RewardGuidedLCD(teacher=teacher, student=_student(), reward=MixtureLogDensity(law, conditional=False),
                             latent_reward_model=lrm, lrm_loss=lrm_loss)
    assert module.uses_critic and {id(p) for p in module.critic_parameters()} == {id(p) for p in lrm.parameters()}
    optimizer = torch.optim.Adam(module.critic_parameters(), lr=3e-3)
    x_a = law.sample(2000, torch.Generator().manual_seed(9))[0]
    x_b = x_a.flip(0) * 1.5

    def error():
        with torch.no_grad():
            if lrm_loss == "regression":
                return float(((lrm(x_a) - module.reward(x_a)) ** 2).mean())
            return float((((lrm(x_a) - lrm(x_b)) - (module.reward(x_a) - module.reward(x_b))) ** 2).mean())

    start = error()
    for step in range(400):
        x0 = law.sample(128, torch.Generator().manual_seed(step))[0]
        loss = module.critic_loss({"real": x0, "noise": x0})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = error()
    assert end < 0.1 * start, (start, end)
    # the generator's reward is the proxy's: gradient reaches the student through the LRM
    x0 = law.sample(64, torch.Generator().manual_seed(1))[0]
    losses = module.generator_loss({"real": x0, "noise": x0})
    grads = torch.autograd.grad(losses["loss"], module.generator_parameters(), allow_unused=True)
    assert sum(float(g.norm()) for g in grads if g is not None) > 0
