"""The Gaussian-mixture laws and their exact teacher against independent torch.distributions computations."""

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from lightning_modules.diffusion import EDMSchedule, VPDiscreteSchedule, teacher_sample
from lightning_modules.evaluation.sample_metrics import ground_truth_metrics
from lightning_modules.networks import GaussianMixture, GaussianMixtureTeacher, get_toy_law

F64 = torch.float64


def random_mixture(dim=5, k=6, seed=0, classes=None):
    g = torch.Generator().manual_seed(seed)
    weights = torch.softmax(torch.randn(k, generator=g, dtype=F64), 0)
    means = torch.randn(k, dim, generator=g, dtype=F64)
    a = 0.4 * torch.randn(k, dim, dim, generator=g, dtype=F64)
    covariances = a @ a.transpose(1, 2) + 0.05 * torch.eye(dim, dtype=F64)
    return GaussianMixture(weights, means, covariances, component_classes=classes, name=f"random{dim}d")


LAWS = {"ring8": lambda: get_toy_law("ring8"), "aniso": lambda: get_toy_law("aniso"), "random5d": random_mixture}
SCHEDULES = {"edm": EDMSchedule, "vp_discrete": VPDiscreteSchedule}
TIMES = {"edm": [0.002, 0.01, 0.05, 0.2, 0.5, 1.0, 3.0, 10.0, 80.0],
         "vp_discrete": [0.0, 5.0, 30.0, 100.0, 250.0, 500.0, 750.0, 900.0, 999.0]}


def independent_marginal(weights, means, covariances, alpha, sigma):
    """p_t = sum_k pi_k N(alpha mu_k, alpha^2 S_k + sigma^2 I), one mixture per sample (batch shape (B,))."""
    b, (k, d) = alpha.shape[0], means.shape
    eye = torch.eye(d, dtype=F64)
    loc = alpha[:, None, None] * means[None]
    cov = alpha[:, None, None, None] ** 2 * covariances[None] + sigma[:, None, None, None] ** 2 * eye
    return MixtureSameFamily(Categorical(probs=weights.expand(b, k)), MultivariateNormal(loc, covariance_matrix=cov))


def independent_score(weights, means, covariances, x_t, alpha, sigma):
    x = x_t.detach().clone().requires_grad_(True)
    log_p = independent_marginal(weights, means, covariances, alpha, sigma).log_prob(x)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    return grad


def noisy_batch(law, schedule, times, per_time=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(times, dtype=F64).repeat_interleave(per_time)
    x0, _ = law.sample(t.shape[0], generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    alpha, sigma = schedule.alpha_sigma(t)
    return alpha[:, None] * x0 + sigma[:, None] * eps, t, alpha, sigma


def per_sample_relative_error(a, b):
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


@pytest.mark.parametrize("law_name", list(LAWS))
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_noisy_log_density_matches_torch_distributions(law_name, schedule_name):
    """log p_t(x_t) == MixtureSameFamily(Categorical(pi), MVN(alpha mu_k, alpha^2 S_k + sigma^2 I)).log_prob (1e-10)."""
    law, schedule = LAWS[law_name](), SCHEDULES[schedule_name]()
    x_t, t, alpha, sigma = noisy_batch(law, schedule, TIMES[schedule_name])
    expected = independent_marginal(law.weights, law.means, law.covariances, alpha, sigma).log_prob(x_t)
    # log-densities reach -1e6 at sigma = 0.002, hence the 1e-12 relative part
    torch.testing.assert_close(law.noisy_log_prob(x_t, alpha, sigma), expected, rtol=1e-12, atol=1e-10)
    clean = MixtureSameFamily(Categorical(probs=law.weights), MultivariateNormal(law.means, law.covariances))
    torch.testing.assert_close(law.log_prob(x_t), clean.log_prob(x_t), rtol=1e-12, atol=1e-10)


def teacher_and_noisy_batch(law_name, schedule_name, seed):
    law, schedule = LAWS[law_name](), SCHEDULES[schedule_name]()
    return law, GaussianMixtureTeacher(law, schedule), noisy_batch(law, schedule, TIMES[schedule_name], seed=seed)


@pytest.mark.parametrize("law_name", list(LAWS))
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_teacher_score_is_autograd_of_independent_density(law_name, schedule_name):
    """Teacher's score prediction == grad_x log p_t(x) of the independent MixtureSameFamily (1e-8 relative)."""
    law, teacher, (x_t, t, alpha, sigma) = teacher_and_noisy_batch(law_name, schedule_name, seed=1)
    expected = independent_score(law.weights, law.means, law.covariances, x_t, alpha, sigma)
    score = teacher(x_t, t, prediction="score")
    assert score.dtype == F64
    assert per_sample_relative_error(score, expected) < 1e-8


@pytest.mark.parametrize("law_name", list(LAWS))
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_tweedie_posterior_mean(law_name, schedule_name):
    """Tweedie: E[x0 | x_t] == (x_t + sigma^2 grad log p_t(x_t)) / alpha (float64, 1e-10)."""
    law, teacher, (x_t, t, alpha, sigma) = teacher_and_noisy_batch(law_name, schedule_name, seed=2)
    grad = independent_score(law.weights, law.means, law.covariances, x_t, alpha, sigma)
    tweedie = (x_t + sigma[:, None] ** 2 * grad) / alpha[:, None]
    torch.testing.assert_close(teacher(x_t, t), tweedie, rtol=0, atol=1e-10)
    torch.testing.assert_close(law.posterior_mean(x_t, alpha, sigma), tweedie, rtol=0, atol=1e-10)


def test_tweedie_with_float32_inputs_keeps_dtype():
    """A float32 x_t gets a float32 x0 that still equals the float64 Tweedie mean to float32 precision."""
    law, schedule = get_toy_law("aniso"), EDMSchedule()
    x_t, t, alpha, sigma = noisy_batch(law, schedule, TIMES["edm"], seed=3)
    teacher = GaussianMixtureTeacher(law, schedule)
    out = teacher(x_t.float(), t.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), teacher(x_t.float().double(), t), rtol=1e-5, atol=1e-5)


def _restricted_tweedie(law, c, x_t, alpha, sigma):
    mask = law.component_classes == c
    weights = law.weights[mask] / law.weights[mask].sum()
    grad = independent_score(weights, law.means[mask], law.covariances[mask], x_t, alpha, sigma)
    return (x_t + sigma[:, None] ** 2 * grad) / alpha[:, None]


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_class_conditional_posterior_is_restricted_mixture(schedule_name):
    """E[x0 | x_t, c] == Tweedie mean of the mixture of class c's components with re-normalised weights; the null
    label num_classes (and cond=None) gives the unconditional mean."""
    law = random_mixture(dim=3, k=6, seed=4, classes=[0, 0, 1, 1, 1, 2])
    schedule = SCHEDULES[schedule_name]()
    teacher = GaussianMixtureTeacher(law, schedule)
    assert teacher.num_classes == 3
    x_t, t, alpha, sigma = noisy_batch(law, schedule, TIMES[schedule_name], seed=5)
    unconditional = teacher(x_t, t)
    for c in range(3):
        cond = torch.full((t.shape[0],), c)
        conditional = teacher(x_t, t, cond)
        torch.testing.assert_close(conditional, _restricted_tweedie(law, c, x_t, alpha, sigma), rtol=0, atol=1e-10)
        assert (conditional - unconditional).abs().max() > 1e-2
    # a batch mixing classes and the null label
    mixed = torch.arange(t.shape[0]) % 4
    out = teacher(x_t, t, mixed)
    for c in range(3):
        rows = mixed == c
        torch.testing.assert_close(out[rows], _restricted_tweedie(law, c, x_t[rows], alpha[rows], sigma[rows]),
                                   rtol=0, atol=1e-10)
    assert torch.equal(out[mixed == 3], unconditional[mixed == 3])
    assert torch.equal(teacher(x_t, t, torch.full((t.shape[0],), 3)), unconditional)
    assert torch.equal(teacher(x_t, t, None), unconditional)


def test_every_component_its_own_class_on_toy_laws():
    """On aniso every component is a class: conditioning on c gives the single-Gaussian posterior
    mu_c + alpha S_c (alpha^2 S_c + sigma^2 I)^-1 (x_t - alpha mu_c)."""
    law, schedule = get_toy_law("aniso"), EDMSchedule()
    teacher = GaussianMixtureTeacher(law, schedule)
    assert teacher.num_classes == law.num_components == 4
    x_t, t, alpha, sigma = noisy_batch(law, schedule, TIMES["edm"], per_time=2, seed=6)
    for c in range(4):
        cov = alpha[:, None, None] ** 2 * law.covariances[c] + sigma[:, None, None] ** 2 * torch.eye(2, dtype=F64)
        gain = alpha[:, None, None] * law.covariances[c] @ torch.linalg.inv(cov)
        expected = law.means[c] + (gain @ (x_t - alpha[:, None] * law.means[c])[..., None])[..., 0]
        torch.testing.assert_close(teacher(x_t, t, torch.full((t.shape[0],), c)), expected, rtol=0, atol=1e-10)


def test_mixture_moments_and_validation():
    """Exact samples of aniso have mean sum pi mu and covariance sum pi (S + mu mu^T) - m m^T; bad weights raise."""
    law = get_toy_law("aniso")
    x, component = law.sample(40000, generator=torch.Generator().manual_seed(7))
    mean = (law.weights[:, None] * law.means).sum(0)
    second = (law.weights[:, None, None] * (law.covariances + law.means[:, :, None] * law.means[:, None, :])).sum(0)
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=0.01)
    torch.testing.assert_close(torch.cov(x.T), second - torch.outer(mean, mean), rtol=0, atol=0.01)
    frequencies = torch.bincount(component, minlength=4).double() / 40000
    torch.testing.assert_close(frequencies, law.weights, rtol=0, atol=0.01)
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture([0.5, 0.6], law.means[:2], law.covariances[:2])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture([0.5, 0.5], law.means[:2], torch.zeros(2, 2, 2))


def test_digits64_law():
    """digits64: 64-D, 10 classes x 3 components, class weights = digit frequencies, samples in the pixel range."""
    from sklearn.datasets import load_digits

    law = get_toy_law("digits64")
    assert (law.dim, law.num_classes, law.num_components) == (64, 10, 30)
    assert law.component_classes.tolist() == [c for c in range(10) for _ in range(3)]
    digits = load_digits()
    frequencies = torch.bincount(torch.as_tensor(digits.target), minlength=10).double() / len(digits.target)
    torch.testing.assert_close(law.class_weights(), frequencies, rtol=0, atol=1e-12)
    x, component = law.sample(3000, generator=torch.Generator().manual_seed(8))
    assert x.shape == (3000, 64)
    assert x.abs().max() < 5.0
    assert (x.abs() > 1.5).double().mean() < 0.03
    pixel_mean = torch.as_tensor(digits.data / 16.0 * 2.0 - 1.0).mean(0)
    torch.testing.assert_close(x.mean(0), pixel_mean, rtol=0, atol=0.1)
    classes = torch.arange(200) % 10
    _, component = law.sample(200, generator=torch.Generator().manual_seed(9), classes=classes)
    assert torch.equal(law.component_classes[component], classes)
    teacher = GaussianMixtureTeacher("digits64", EDMSchedule())
    assert teacher.data_shape == (64,) and teacher.num_classes == 10


def test_digits64_class_conditional_posterior():
    """digits64 conditioned on digit c == Tweedie mean of that digit's 3 components (64-D, full covariances)."""
    law = get_toy_law("digits64")
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher(law, schedule)
    x_t, t, alpha, sigma = noisy_batch(law, schedule, [0.05, 0.5, 2.0, 20.0], per_time=2, seed=10)
    for c in (0, 7):
        expected = _restricted_tweedie(law, c, x_t, alpha, sigma)
        torch.testing.assert_close(teacher(x_t, t, torch.full((t.shape[0],), c)), expected, rtol=0, atol=1e-9)


def test_heun_63_nfe_reproduces_ring8():
    """EDM Heun (Karras et al. 2022 Alg. 1) on the exact ring8 teacher, 32 Karras times = 63 NFE, n = 5000:
    sliced W2 <= 1.3 x the exact-sample floor and mode-weight TV < 0.03 (fixed seeds: SW2 at n = 5000 has a
    ~+-40% seed-to-seed spread even for exact samples); and the samples are close to a 4x finer Heun solve."""
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    calls = []

    def denoise(x, t):
        calls.append(t.shape[0])
        return teacher(x, t)

    times = schedule.karras_times(32)
    assert times.shape == (32,) and times[0].item() == pytest.approx(80.0) and times[-1].item() == pytest.approx(0.002)
    noise = torch.randn(5000, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    samples = teacher_sample(denoise, noise, times, schedule, method="heun")
    assert len(calls) == 63
    fine = teacher_sample(teacher, noise[:1000], schedule.karras_times(128), schedule, method="heun")
    # Heun is second order: 32 -> 128 times shrinks the error ~16x; at 32 times it is ~0.003 (4% of a mode's std)
    assert (samples[:1000] - fine).abs().median() < 6e-3
    assert (samples[:1000] - fine).abs().max() < 3e-2
    metrics = ground_truth_metrics(samples, teacher.law, generator=torch.Generator().manual_seed(101),
                                   num_projections=256, max_points=1000)
    assert metrics["sliced_w2"] <= 1.3 * metrics["sliced_w2_floor"], metrics
    assert metrics["mode_weight_tv"] < 0.03, metrics
    assert metrics["modes_covered"] == 8
    # the same metric flags a sampler that stops too early (last time sigma = 0.3 instead of 0.002, no denoise)
    coarse = teacher_sample(teacher, noise, schedule.karras_times(32, edm_sigma_min=0.3), schedule, method="heun")
    blurred = coarse + 0.3 * torch.randn(coarse.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    bad = ground_truth_metrics(blurred, teacher.law, generator=torch.Generator().manual_seed(101),
                               num_projections=256, max_points=1000)
    assert bad["sliced_w2"] > 1.3 * bad["sliced_w2_floor"]
