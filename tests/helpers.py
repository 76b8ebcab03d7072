"""Small test utilities: an affine Gaussian generator, independent closed-form denoisers, fixed-randomness patches."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from lightning_modules.networks import Denoiser, GaussianMixture


class AffineGenerator(Denoiser):
    """One-step generator x = m + A z with z = x_T / sigma(T): its law is exactly N(m, A A^T)."""

    def __init__(self, mean, matrix, schedule=None):
        super().__init__(schedule, prediction_type="x0")
        self.mean = nn.Parameter(torch.as_tensor(mean, dtype=torch.float64).clone())
        self.matrix = nn.Parameter(torch.as_tensor(matrix, dtype=torch.float64).clone())

    @property
    def data_shape(self):
        return (self.mean.numel(),)

    def predict(self, x_t, t, cond):
        _, sigma = self.schedule.alpha_sigma(t.double())
        z = x_t.double() / sigma[:, None]
        return self.mean + z @ self.matrix.T

    def law(self) -> GaussianMixture:
        A = self.matrix.detach()
        return GaussianMixture([1.0], self.mean.detach()[None], (A @ A.T)[None], name="student")


def independent_noisy_log_prob(law: GaussianMixture, x_t, alpha, sigma):
    """log p_t(x_t) from torch.distributions (independent of GaussianMixture's eigenbasis code)."""
    D = law.dim
    B = x_t.shape[0]
    alpha = alpha.double().reshape(B, 1, 1)
    sigma = sigma.double().reshape(B, 1, 1)
    loc = alpha * law.means[None]                                              # (B, K, D)
    cov = alpha[..., None] ** 2 * law.covariances[None] + sigma[..., None] ** 2 * torch.eye(D, dtype=torch.float64)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=law.weights.expand(B, -1)),
        torch.distributions.MultivariateNormal(loc, covariance_matrix=cov))
    return mixture.log_prob(x_t.double())


def independent_x0(law: GaussianMixture, x_t, alpha, sigma, create_graph=False):
    """Tweedie: E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha, with the score from autograd."""
    x = x_t.double() if create_graph else x_t.detach().double().requires_grad_(True)
    if not x.requires_grad:
        x = x.requires_grad_(True)
    score, = torch.autograd.grad(independent_noisy_log_prob(law, x, alpha, sigma).sum(), x, create_graph=create_graph)
    return (x + sigma.double()[:, None] ** 2 * score) / alpha.double()[:, None]


def fix_randomness(module, times, noises):
    """Make a method draw the given times and noises (in call order) instead of random ones."""
    times, noises = list(times), list(noises)
    module.sample_times = lambda sampler, n: times.pop(0)
    module.noise_like = lambda x: noises.pop(0).to(x.dtype)


def fixed_generator_draws(module, schedule, batch_size: int, seed: int = 3):
    """Make the module's generator step draw these (t, eps): t on the Karras ramp [0.2, 1.0], eps standard normal."""
    from lightning_modules.diffusion import KarrasRampTime

    t = KarrasRampTime(0.2, 1.0)(batch_size, schedule, torch.Generator().manual_seed(seed))
    eps = torch.randn(batch_size, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    fix_randomness(module, [t], [eps])
    return t, eps


def affine_denoised(law: GaussianMixture, student_law, student, noise, t, eps, schedule) -> SimpleNamespace:
    """The generator step of an ``AffineGenerator`` student x_g = m + A z written out independently: fresh
    differentiable copies (m, A), x_t = alpha x_g + sigma eps, and Tweedie x0 estimates of the teacher's ``law``
    (y_real) and of ``student_law`` (y_fake) from torch.distributions scores."""
    m = student.mean.detach().clone().requires_grad_(True)
    A = student.matrix.detach().clone().requires_grad_(True)
    x_g = m + noise @ A.T
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x_g + sigma[:, None] * eps
    return SimpleNamespace(m=m, A=A, x_g=x_g, x_t=x_t, alpha=alpha, sigma=sigma,
                           y_real=independent_x0(law, x_t, alpha, sigma, create_graph=True),
                           y_fake=independent_x0(student_law, x_t, alpha, sigma, create_graph=True))


def state_difference(a, b, path="") -> float:
    """Largest float difference between two nested checkpoint-like structures (non-floats must be equal)."""
    if isinstance(a, torch.Tensor):
        if a.dtype.is_floating_point:
            return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        assert torch.equal(a, b), path
        return 0.0
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, set(a) ^ set(b))
        return max([state_difference(a[k], b[k], f"{path}.{k}") for k in a], default=0.0)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return max([state_difference(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))], default=0.0)
    assert a == b, (path, a, b)
    return 0.0


_PORTS_GIVEN: set[int] = set()


def own_port() -> int:
    """A free TCP port not handed to another run of this session: multi-process runs started side by side (and
    next to another test worker's) must not meet at one rendezvous port, where ranks of two runs join one group."""
    import socket
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port
