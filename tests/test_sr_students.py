"""OFTSR, YONOS-SR and InstaRevive against independent formulas on an exact conditional teacher, and short
super-resolution runs in which each one-step student's PSNR rises.

The exact teacher: 8x8 single-channel images x ~ N(0, S) (a smooth squared-exponential covariance), observed at
factor s as y_s = avgpool_s(x) + n, n ~ N(0, s_n^2 I); the condition image is y_s nearest-upsampled to 8x8 (so
avgpool_s of it gives y_s back). The posterior x | y_s is Gaussian N(m, C) and the noisy posterior at EDM level sigma
is N(m, C + sigma^2 I), so the denoiser and the probability-flow ODE are closed form:

    D(x_sigma; y) = m + C (C + sigma^2 I)^{-1} (x_sigma - m)
    x(sigma) - m  = (C + sigma^2 I)^{1/2} (C + sigma0^2 I)^{-1/2} (x(sigma0) - m)        (C's eigenbasis)

The network below computes m, C in the information form; the test formulas use the covariance (Kalman) form and
Tweedie's formula D = x + sigma^2 grad log N(x; m, C + sigma^2 I) by autograd, so they are independent of it.
"""
from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer

from lightning_modules.conditioning.condition import ImageCondition
from lightning_modules.diffusion import EDMSchedule
from lightning_modules.diffusion.samplers import sampler_times, teacher_sample
from lightning_modules.evaluation.restoration_metrics import psnr_per_image
from lightning_modules.methods.instarevive import InstaRevive
from lightning_modules.methods.oftsr import OFTSR, chord_endpoint, chord_point, karras_ramp_times
from lightning_modules.methods.yonos_sr import YONOSSR, degraded_condition
from lightning_modules.networks.denoiser import Denoiser
from lightning_modules.networks.preconditioning import edm_precondition

SIZE, NOISE_STD, SCALES = 8, 0.05, (2, 4)


# ---------------------------------------------------------------------------------------------- the exact teacher
def prior_covariance() -> torch.Tensor:
    ij = torch.stack(torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij"), -1).reshape(-1, 2).double()
    squared = ((ij[:, None] - ij[None]) ** 2).sum(-1)
    return 0.35 ** 2 * torch.exp(-squared / (2 * 1.5 ** 2)) + 0.02 ** 2 * torch.eye(SIZE * SIZE, dtype=torch.float64)


def pooling_matrix(factor: int) -> torch.Tensor:
    """A_s: (d / s^2, d) block averaging of an 8x8 image flattened row-major."""
    basis = torch.eye(SIZE * SIZE, dtype=torch.float64).reshape(-1, 1, SIZE, SIZE)
    return torch.nn.functional.avg_pool2d(basis, factor).reshape(SIZE * SIZE, -1).T


class LinearGaussianSRTeacher(Denoiser):
    """The exact conditional denoiser of the module docstring (information form); dropped / absent conditions give
    the prior's denoiser."""

    image_conditioned = True

    def __init__(self, schedule=None):
        super().__init__(schedule=schedule or EDMSchedule())
        self.covariance = prior_covariance()
        self.scales, self.num_classes = list(SCALES), 0
        self.register_buffer("_anchor", torch.zeros(()))

    @property
    def data_shape(self):
        return (1, SIZE, SIZE)

    def _posterior_of(self, factor: int | None):
        """(C, its eigen-decomposition, gain K with m = y K^T) for a factor (None: the prior), cached: C does not
        depend on y."""
        cache = self.__dict__.setdefault("_cache", {})
        if factor not in cache:
            if factor is None:
                c, gain = self.covariance, None
            else:
                a = pooling_matrix(factor)
                c = torch.linalg.inv(torch.linalg.inv(self.covariance) + a.T @ a / NOISE_STD ** 2)
                gain = c @ a.T / NOISE_STD ** 2
            cache[factor] = (c, *torch.linalg.eigh(c), gain)
        return cache[factor]

    def posterior(self, cond: ImageCondition | None, n: int):
        """(m (n, d), C (n, d, d), eigenvalues (n, d), eigenvectors (n, d, d)) of x | y per row."""
        c, values, vectors, _ = self._posterior_of(None)
        means = torch.zeros(n, SIZE * SIZE, dtype=torch.float64)
        covs, eigenvalues, eigenvectors = c.expand(n, -1, -1).clone(), values.expand(n, -1).clone(), \
            vectors.expand(n, -1, -1).clone()
        if cond is None:
            return means, covs, eigenvalues, eigenvectors
        dropped = cond.dropped_rows()
        for factor in SCALES:
            rows = (cond.scale == factor) & ~dropped
            if not bool(rows.any()):
                continue
            c, values, vectors, gain = self._posterior_of(factor)
            y = torch.nn.functional.avg_pool2d(cond.image[rows].double(), factor).flatten(1)
            means[rows], covs[rows], eigenvalues[rows], eigenvectors[rows] = y @ gain.T, c, values, vectors
        return means, covs, eigenvalues, eigenvectors

    def predict(self, x_t, t, cond):
        sigma = self.schedule.edm_sigma(t.double())
        mean, _, eigenvalues, vectors = self.posterior(cond, x_t.shape[0])
        shrink = eigenvalues / (eigenvalues + sigma[:, None] ** 2)
        centred = x_t.double().flatten(1) - mean
        x0 = mean + torch.einsum("bij,bj->bi", vectors, shrink * torch.einsum("bji,bj->bi", vectors, centred))
        return x0.reshape(x_t.shape).to(x_t.dtype)


def kalman_posterior(y: torch.Tensor, factor: int):
    """m, C of x | y by the covariance form: m = S A^T (A S A^T + s_n^2 I)^{-1} y, C = S - S A^T (...)^{-1} A S."""
    s, a = prior_covariance(), pooling_matrix(factor)
    gain = s @ a.T @ torch.linalg.inv(a @ s @ a.T + NOISE_STD ** 2 * torch.eye(a.shape[0], dtype=torch.float64))
    return y.double() @ gain.T, s - gain @ a @ s


def tweedie_denoiser(x: torch.Tensor, sigma: float, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """D = x + sigma^2 grad log N(x; m, C + sigma^2 I), row by row, by autograd."""
    x = x.double().flatten(1).detach().requires_grad_(True)
    total = cov + sigma ** 2 * torch.eye(cov.shape[-1], dtype=torch.float64)
    log_p = sum(torch.distributions.MultivariateNormal(mean[i], total).log_prob(x[i]) for i in range(len(x)))
    return x + sigma ** 2 * torch.autograd.grad(log_p, x)[0]


def exact_ode(x_start: torch.Tensor, sigma_start: float, sigma: float, mean: torch.Tensor, cov: torch.Tensor):
    """The exact PF-ODE from x_start at sigma_start to sigma (module docstring), one posterior for all rows."""
    eigenvalues, vectors = torch.linalg.eigh(cov)
    factor = ((eigenvalues + sigma ** 2) / (eigenvalues + sigma_start ** 2)).sqrt()
    centred = x_start.double().flatten(1) - mean
    return mean + ((centred @ vectors) * factor) @ vectors.T


# ---------------------------------------------------------------------------------------------- data and students
def sr_pairs(n: int, factor: int, seed: int) -> dict:
    """HQ images from the prior, their LQ condition at ``factor`` (noisy, nearest-upsampled), noise."""
    generator = torch.Generator().manual_seed(seed)
    hq = (torch.linalg.cholesky(prior_covariance()) @ torch.randn(SIZE * SIZE, n, generator=generator,
                                                                  dtype=torch.float64)).T
    hq = hq.reshape(n, 1, SIZE, SIZE)
    lq = torch.nn.functional.avg_pool2d(hq, factor)
    lq = lq + NOISE_STD * torch.randn(lq.shape, generator=generator, dtype=torch.float64)
    image = torch.nn.functional.interpolate(lq, scale_factor=factor, mode="nearest")
    cond = ImageCondition(image.float(), scale=torch.full((n,), factor, dtype=torch.long))
    return {"real": hq.float(), "noise": torch.randn(n, 1, SIZE, SIZE, generator=generator), "cond": cond,
            "real_cond": cond}


class ExactSRData(LightningDataModule):
    """Seeded batches of ``sr_pairs`` (fresh pairs each batch)."""

    provides_real_data = True
    num_classes = 0

    def __init__(self, factor: int, batches: int, batch_size: int = 64):
        super().__init__()
        self.factor, self.batches, self.batch_size = factor, batches, batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader([sr_pairs(self.batch_size, self.factor, 1000 + i)
                                            for i in range(self.batches)], batch_size=None)


class TinySRDenoiser(Denoiser):
    """An EDM-preconditioned MLP on [c_in x, condition image, factor one-hot, c_noise] (a stand-in student)."""

    image_conditioned = True

    def __init__(self, hidden: int = 256, seed: int = 0):
        super().__init__(schedule=EDMSchedule())
        torch.manual_seed(seed)
        d = SIZE * SIZE
        self.net = torch.nn.Sequential(torch.nn.Linear(2 * d + len(SCALES) + 2, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, d))
        self.scales, self.num_classes, self.sigma_data = list(SCALES), 0, 0.35

    @property
    def data_shape(self):
        return (1, SIZE, SIZE)

    def backbone(self, x, c_noise, cond):
        n = x.shape[0]
        if cond is None:
            image, onehot = torch.zeros_like(x), torch.zeros(n, len(SCALES) + 1, dtype=x.dtype)
            onehot[:, -1] = 1
        else:
            index = torch.where(cond.dropped_rows(), len(SCALES),
                                (cond.scale[:, None] == torch.tensor(SCALES)).long().argmax(1))
            image, onehot = cond.image, torch.nn.functional.one_hot(index, len(SCALES) + 1).to(x.dtype)
        features = torch.cat([x.flatten(1), image.flatten(1), onehot, c_noise[:, None]], 1)
        return self.net(features).reshape(x.shape)

    def predict(self, x_t, t, cond):
        return edm_precondition(self.backbone, x_t, t, cond, self.schedule, self.sigma_data)


@functools.lru_cache(maxsize=1)
def teacher_fitted_state(steps: int = 400) -> dict:
    """Weights of a TinySRDenoiser regressed onto the exact teacher's denoiser (x2 and x4 conditions, EDM lognormal
    noise levels): the stand-in for "student and critic start as copies of the teacher" (DMD2's initialisation)."""
    teacher, network = LinearGaussianSRTeacher(), TinySRDenoiser(seed=3)
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(5)
    for step in range(steps):
        pairs = sr_pairs(128, SCALES[step % 2], seed=50_000 + step)
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(128, generator=generator, dtype=torch.float64))
        x_t = pairs["real"] + sigma.float().reshape(-1, 1, 1, 1) * torch.randn(pairs["real"].shape, generator=generator)
        with torch.no_grad():
            target = teacher(x_t, sigma, pairs["cond"])
        weight = ((sigma ** 2 + 0.35 ** 2) / (sigma * 0.35) ** 2).float()
        loss = (weight * ((network(x_t, sigma, pairs["cond"]) - target) ** 2).flatten(1).mean(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in network.state_dict().items()}


def teacher_fitted(seed: int = 3) -> TinySRDenoiser:
    network = TinySRDenoiser(seed=seed)
    network.load_state_dict(teacher_fitted_state())
    return network


def conditional_w2(module, factor: int, num_lq: int = 4, num_noise: int = 512) -> float:
    """Mean over ``num_lq`` LQ images of the squared 2-Wasserstein distance between the Gaussian fit of the one-step
    outputs G(z; y) over ``num_noise`` noises and the exact posterior N(m(y), C): ||mu - m||^2 + tr(Cov + C -
    2 (C^1/2 Cov C^1/2)^1/2) -- a ground-truth distribution metric (0 for a perfect conditional sampler)."""
    base = sr_pairs(num_lq, factor, seed=77)
    total = 0.0
    for i in range(num_lq):
        one = ImageCondition(base["cond"].image[i:i + 1], scale=base["cond"].scale[i:i + 1])
        cond = ImageCondition(one.image.expand(num_noise, -1, -1, -1), scale=one.scale.expand(num_noise))
        noise = torch.randn(num_noise, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            outputs = module.sample(noise, cond, 1).double().flatten(1)
        mean, cov = module.teacher.posterior(one, 1)[:2]
        values, vectors = torch.linalg.eigh(cov[0])
        root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
        fit_mean, fit_cov = outputs.mean(0), torch.cov(outputs.T)
        cross = torch.linalg.eigvalsh(root @ fit_cov @ root).clamp_min(0).sqrt().sum()
        total += float(((fit_mean - mean[0]) ** 2).sum() + fit_cov.trace() + cov[0].trace() - 2 * cross)
    return total / num_lq


class FixedTimes:
    def __init__(self, t):
        self.t = t

    def __call__(self, n, schedule, generator=None, device="cpu"):
        return torch.full((n,), float(self.t), dtype=torch.float64)


def one_step_psnr(module, pairs) -> float:
    with torch.no_grad():
        return float(psnr_per_image(module.sample(pairs["noise"], pairs["cond"], 1).clamp(-1, 1),
                                    pairs["real"]).mean())


def fit(module, factor: int, batches: int):
    Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0).fit(
        module, ExactSRData(factor, batches))


# ---------------------------------------------------------------------------------------------- the exact teacher
def test_exact_teacher_matches_the_kalman_posterior_and_tweedie():
    teacher = LinearGaussianSRTeacher()
    pairs = sr_pairs(4, 4, seed=3)
    y = torch.nn.functional.avg_pool2d(pairs["cond"].image.double(), 4).flatten(1)
    mean, cov = kalman_posterior(y, 4)
    x = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 1.3
    for sigma in (0.05, 1.3):
        t = torch.full((4,), sigma, dtype=torch.float64)
        expected = torch.stack([tweedie_denoiser(x[i:i + 1], sigma, mean[i:i + 1], cov)[0] for i in range(4)])
        torch.testing.assert_close(teacher(x, t, pairs["cond"]).double().flatten(1), expected, atol=2e-5, rtol=1e-4)
    # an observation at x4 says less than one at x2: the posterior's total variance is larger
    y2 = torch.nn.functional.avg_pool2d(sr_pairs(1, 2, seed=3)["cond"].image.double(), 2).flatten(1)
    assert float(kalman_posterior(y2, 2)[1].trace()) < 0.5 * float(cov.trace())


# ---------------------------------------------------------------------------------------------- OFTSR
def oftsr(**kwargs):
    return OFTSR(teacher=LinearGaussianSRTeacher(), student=TinySRDenoiser(), **kwargs)


def test_oftsr_chord_maps_invert_each_other():
    schedule = EDMSchedule()
    x_start, x0 = torch.randn(3, 1, 8, 8) * 80, torch.randn(3, 1, 8, 8)
    t_start, t = torch.full((3,), 80.0, dtype=torch.float64), torch.tensor([0.01, 1.0, 20.0], dtype=torch.float64)
    point = chord_point(x_start, x0, t_start, t, schedule)
    # EDM (alpha = 1): the chord point is x0 + (sigma_t / sigma_T) (x_T - x0)
    torch.testing.assert_close(point, x0 + (t / 80.0).float().reshape(-1, 1, 1, 1) * (x_start - x0))
    torch.testing.assert_close(chord_endpoint(x_start, point, t_start, t, schedule), x0, atol=1e-4, rtol=1e-5)
    u = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert karras_ramp_times(schedule, u).tolist() == pytest.approx([80.0, 0.002])


def test_oftsr_losses_against_the_closed_form_teacher():
    """Each of the three terms equals its formula written with the Kalman posterior and Tweedie's denoiser; the
    teacher's step is Heun's (Karras et al. Alg. 1) computed by hand on that denoiser."""
    module = oftsr(knob_step=0.1)
    pairs = sr_pairs(3, 4, seed=5)
    torch.manual_seed(11)
    losses = module.generator_loss(pairs)
    torch.manual_seed(11)
    t, t_next = module.knob_pairs(3)
    y = torch.nn.functional.avg_pool2d(pairs["cond"].image.double(), 4).flatten(1)
    mean, cov = kalman_posterior(y, 4)
    z = pairs["noise"].double().flatten(1)
    s_max = 80.0

    def student(sigma):
        with torch.no_grad():
            return module.student((sigma.reshape(-1, 1, 1, 1) * pairs["noise"].double()).float(), sigma,
                                  pairs["cond"]).double().flatten(1)

    def denoise(x, sigma):
        return torch.stack([tweedie_denoiser(x[i:i + 1], float(sigma[i]), mean[i:i + 1], cov)[0]
                            for i in range(len(x))])

    x_start = s_max * z
    g_t, g_next, g_start = student(t), student(t_next), student(torch.full((3,), s_max, dtype=torch.float64))
    point = g_t + (t[:, None] / s_max) * (x_start - g_t)
    d_point = denoise(point, t)
    euler = point + (t_next - t)[:, None] * (point - d_point) / t[:, None]
    slope_next = (euler - denoise(euler, t_next)) / t_next[:, None]
    heun = point + (t_next - t)[:, None] * 0.5 * ((point - d_point) / t[:, None] + slope_next)
    student_point = g_next + (t_next[:, None] / s_max) * (x_start - g_next)
    expected = {"distillation": ((student_point - heun) ** 2).mean(),
                "boundary": ((g_start - denoise(x_start, torch.full((3,), s_max, dtype=torch.float64))) ** 2).mean(),
                "alignment": ((g_t - d_point) ** 2).mean()}
    for name, value in expected.items():
        assert float(losses[name]) == pytest.approx(float(value), rel=2e-4), name
    assert float(losses["loss"]) == pytest.approx(float(expected["distillation"] + 0.1 * expected["boundary"]
                                                        + 0.01 * expected["alignment"]), rel=2e-4)


class OracleKnobStudent(TinySRDenoiser):
    """x^_0(t): the chord endpoint through the EXACT teacher trajectory point at t (at t_max its limit, T(x_T))."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def predict(self, x_t, t, cond):
        sigma = self.schedule.edm_sigma(t.double())
        z = x_t.double().flatten(1) / sigma[:, None]
        mean, cov = self.teacher.posterior(cond, len(z))[:2]
        out = []
        for i in range(len(z)):
            s = float(sigma[i])
            if s >= 80.0 - 1e-9:
                out.append(self.teacher(80.0 * x_t[i:i + 1].double() / s, t[i:i + 1], _row(cond, i)).double().flatten())
                continue
            point = exact_ode(80.0 * z[i:i + 1], 80.0, s, mean[i:i + 1], cov[i])[0]
            out.append((point - (s / 80.0) * 80.0 * z[i]) / (1.0 - s / 80.0))
        return torch.stack(out).reshape(x_t.shape).to(x_t.dtype)


def _row(cond, i):
    from lightning_modules.conditioning.condition import select_conditions
    return select_conditions(cond, torch.tensor([i]))


def test_oftsr_fixed_point_is_the_teacher_trajectory_and_spans_fidelity_to_realism():
    """The student built from the exact ODE (every chord point on the teacher's trajectory) zeroes the boundary term
    and leaves only the Heun step's local error in the distillation term; a perturbed one does not. Its outputs at
    the two ends of the knob are the posterior mean (higher PSNR) and the ODE's restoration (the teacher's sample)."""
    teacher = LinearGaussianSRTeacher().double()
    module = OFTSR(teacher=teacher, student=OracleKnobStudent(teacher), knob_step=0.05)
    pairs = sr_pairs(16, 4, seed=8)
    pairs = {k: (v.double() if torch.is_tensor(v) else v) for k, v in pairs.items()}
    torch.manual_seed(3)
    losses = module.generator_loss(pairs)
    # measured: distillation 2.7e-6 (the Heun steps' local error), boundary 1.9e-32
    assert float(losses["boundary"]) < 1e-12 and float(losses["distillation"]) < 1e-5, losses
    module.student.predict = (lambda original: lambda x, t, c: original(x, t, c) + 0.05)(module.student.predict)
    torch.manual_seed(3)
    perturbed = module.generator_loss(pairs)
    # measured: boundary 0.05^2 = 2.5e-3, distillation 2.1e-4 (80x the oracle's)
    assert float(perturbed["boundary"]) == pytest.approx(0.05 ** 2, rel=1e-6)
    assert float(perturbed["distillation"]) > 20 * float(losses["distillation"]) + 1e-4, perturbed
    # the knob: t_max gives the posterior mean, t -> t_min the exact ODE solution of the same noise
    oracle = OracleKnobStudent(teacher).double()
    n = 64
    pairs = sr_pairs(n, 4, seed=9)
    pairs = {k: (v.double() if torch.is_tensor(v) else v) for k, v in pairs.items()}
    pairs["cond"] = pairs["cond"].to(torch.float64)
    mean, cov = teacher.posterior(pairs["cond"], n)[:2]

    def at(sigma):
        t = torch.full((n,), sigma, dtype=torch.float64)
        return oracle(sigma * pairs["noise"], t, pairs["cond"]).flatten(1)

    fidelity, realism = at(80.0), at(0.002)
    ode_end = torch.stack([exact_ode(80.0 * pairs["noise"][i:i + 1], 80.0, 0.0, mean[i:i + 1], cov[i])[0]
                           for i in range(n)])
    # the chord endpoint through x(sigma) is x(sigma) - sigma z + O(sigma / sigma_max): O(sigma) from x(0)
    assert float((realism - ode_end).abs().max()) < 1e-2 and float((realism - ode_end).abs().mean()) < 2e-3
    hq = pairs["real"].flatten(1)
    mse_fidelity, mse_realism = float(((fidelity - hq) ** 2).mean()), float(((realism - hq) ** 2).mean())
    # the posterior mean's error is the posterior variance (trace C / d); a posterior sample's is twice that
    posterior_variance = float(cov[0].trace()) / (SIZE * SIZE)
    assert mse_fidelity == pytest.approx(posterior_variance, rel=0.35)
    assert mse_realism == pytest.approx(2 * posterior_variance, rel=0.35)


def test_oftsr_bad_arguments():
    with pytest.raises(ValueError, match="one-step student"):
        oftsr(student_sigmas=[80.0, 1.0])
    with pytest.raises(ValueError, match=r"knob_step .* must be in \(0, 1\), got 1.5"):
        oftsr(knob_step=1.5)
    with pytest.raises(ValueError, match="teacher_solver must be one of"):
        oftsr(teacher_solver="rk4")
    with pytest.raises(ValueError, match="boundary_weight must be >= 0, got -1"):
        oftsr(boundary_weight=-1)


# ---------------------------------------------------------------------------------------------- YONOS-SR
def yonos(**kwargs):
    return YONOSSR(teacher=LinearGaussianSRTeacher(), student=TinySRDenoiser(), **kwargs)


def test_yonos_scale_distillation_target_is_the_x2_posterior_denoiser():
    """L_scale = lambda(t) ||G(x_t; y4) - T(x_t; y2)||^2 with T the closed-form x2 posterior denoiser (Kalman form
    and Tweedie), y2 made from the same HQ image, x_t the HQ image noised; lambda = EDM's weight."""
    module = yonos(scale_path=[2, 4], scale_steps=10, upsample="nearest")
    module.time_sampler = FixedTimes(0.7)
    pairs = sr_pairs(3, 4, seed=6)
    eps = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    module.noise_like = lambda x: eps
    loss = module.scale_distillation_loss(pairs, stage=0)
    x_t = pairs["real"] + 0.7 * eps
    y2 = torch.nn.functional.avg_pool2d(pairs["real"].double(), 2).flatten(1)  # noise-free x2 view of the HQ image
    mean, cov = kalman_posterior(y2, 2)
    target = torch.stack([tweedie_denoiser(x_t[i:i + 1], 0.7, mean[i:i + 1], cov)[0] for i in range(3)])
    with torch.no_grad():
        prediction = module.student(x_t, torch.full((3,), 0.7, dtype=torch.float64), pairs["cond"])
    weight = (0.7 ** 2 + 0.5 ** 2) / (0.7 * 0.5) ** 2
    expected = weight * ((prediction.double().flatten(1) - target) ** 2).mean(1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
    # the x2 teacher's target is closer to the HQ image than the x4 posterior denoiser of the same x_t
    with torch.no_grad():
        x4_target = module.teacher(x_t, torch.full((3,), 0.7, dtype=torch.float64), pairs["cond"]).double().flatten(1)
    hq = pairs["real"].double().flatten(1)
    assert float(((target - hq) ** 2).mean()) < 0.6 * float(((x4_target - hq) ** 2).mean())


def test_yonos_stages_and_the_one_step_loss():
    module = yonos(scale_path=[2, 4], scale_steps=3, one_step_steps=2, upsample="nearest")
    assert [module.stage(k) for k in range(6)] == [0, 0, 0, 1, 1, 1]
    pairs = sr_pairs(4, 4, seed=7)
    module.generator_steps.fill_(3)
    losses = module.generator_loss(pairs)
    with torch.no_grad():
        restored = module.student(80.0 * pairs["noise"], torch.full((4,), 80.0, dtype=torch.float64), pairs["cond"])
    assert float(losses["one_step"]) == pytest.approx(float(((restored - pairs["real"]) ** 2).mean()), rel=1e-5)
    assert "scale_distillation" not in losses and float(losses["stage"]) == 1.0
    # a three-factor path: stage 2's teacher is the student as stage 1 left it, at x4
    teacher = LinearGaussianSRTeacher()
    teacher.scales = [1, 2, 4]  # a teacher that also knows the identity "factor" 1 (bookkeeping only)
    path = YONOSSR(teacher=teacher, student=TinySRDenoiser(), scale_path=[1, 2, 4], scale_steps=2)
    assert path.stage_teacher(0)[1] == 1 and path.stage_teacher(1)[1] == 2
    with torch.no_grad():
        path.student.net[0].bias.add_(1.0)
    for _ in range(2):
        path.on_generator_step_end()
    torch.testing.assert_close(path.previous_student.net[0].bias, path.student.net[0].bias)
    # the condition at x2 from an HQ image: the area average upsampled back
    cond = degraded_condition(pairs["real"], 2, "nearest")
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(cond.image, 2),
                               torch.nn.functional.avg_pool2d(pairs["real"], 2))
    with pytest.raises(ValueError, match=r"scale_path must be >= 2 increasing factors"):
        yonos(scale_path=[4, 2])
    with pytest.raises(ValueError, match="the teacher knows factors"):
        yonos(scale_path=[3, 6])
    with pytest.raises(ValueError, match=r"the student knows factors \[2, 4\], not 8"):
        yonos(scale_path=[2, 4, 8])
    with pytest.raises(ValueError, match="scale_steps must be >= 1, got 0"):
        yonos(scale_steps=0)


# ---------------------------------------------------------------------------------------------- InstaRevive
def instarevive(**kwargs):
    return InstaRevive(teacher=LinearGaussianSRTeacher(), student=TinySRDenoiser(), **kwargs)


def test_instarevive_scope_schedule_and_discrepancy_control():
    module = instarevive(scope_start=0.1, scope_end=0.6, scope_steps=10)
    assert [module.scheduled_scope(k) for k in (0, 5, 10, 50)] == pytest.approx([0.1, 0.35, 0.6, 0.6])
    module.generator_steps.fill_(5)
    times = module.generator_time_sampler(2000, module.schedule)
    u = torch.tensor([module.ramp_position(float(s)) for s in times])
    assert float(u.min()) >= 0.35 - 1e-9 and float(u.max()) <= 0.98 + 1e-9 and float(u.min()) < 0.36
    assert module.ramp_sigma(module.ramp_position(3.0)) == pytest.approx(3.0)
    adaptive = instarevive(scope_control="discrepancy", scope_start=0.0, scope_end=0.6, scope_gain=4.0)
    hq = torch.zeros(2, 1, SIZE, SIZE)
    # RMS 0.25 -> sigma_hi = 1.0 (inside the clamp); RMS 100 -> the widest scope; RMS 0 -> the narrowest
    assert adaptive.ramp_sigma(adaptive.discrepancy_scope(hq + 0.25, hq)) == pytest.approx(1.0)
    assert adaptive.discrepancy_scope(hq + 100, hq) == pytest.approx(0.0, abs=1e-9)
    assert adaptive.discrepancy_scope(hq, hq) == pytest.approx(0.6)
    assert adaptive.needs_real_data and not module.needs_real_data
    with pytest.raises(ValueError, match="need 0 <= scope_start <= scope_end < scope_high"):
        instarevive(scope_start=0.7, scope_end=0.5)
    with pytest.raises(ValueError, match="scope_control must be one of"):
        instarevive(scope_control="cosine")


def test_instarevive_gradient_is_the_exact_score_difference_at_the_scoped_noise():
    """With the critic replaced by the exact denoiser of ANOTHER Gaussian (the prior: an unconditional 'fake'), the
    generator's gradient w.r.t. x_g is (D_fake - D_real) / mean|x_g - D_real| / dim (DMD2 Eq. 2 with DMD's
    normaliser), D_real the Tweedie denoiser of the x4 posterior, at the noise level the scope gives."""
    module = instarevive(scope_start=0.5, scope_end=0.5, scope_high=0.51)
    module.critic = LinearGaussianSRTeacher()
    module.critic.posterior = lambda cond, n: LinearGaussianSRTeacher.posterior(module.critic, None, n)
    pairs = sr_pairs(3, 4, seed=12)
    x_g = (0.4 * torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    module.generator_training_sample = lambda batch: x_g
    eps = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    module.noise_like = lambda x: eps
    torch.manual_seed(0)
    losses = module.generator_loss(pairs)
    losses["loss"].backward()
    torch.manual_seed(0)
    sigmas = module.schedule.edm_sigma(module.generator_time_sampler(3, module.schedule)).tolist()
    assert [module.ramp_position(s) for s in sigmas] == pytest.approx([0.505] * 3, abs=0.006)
    x_t = x_g.detach() + torch.tensor(sigmas).reshape(3, 1, 1, 1) * eps
    y = torch.nn.functional.avg_pool2d(pairs["cond"].image.double(), 4).flatten(1)
    mean, cov = kalman_posterior(y, 4)
    d_real = torch.stack([tweedie_denoiser(x_t[i:i + 1], sigmas[i], mean[i:i + 1], cov)[0] for i in range(3)])
    d_fake = torch.stack([tweedie_denoiser(x_t[i:i + 1], sigmas[i], torch.zeros(1, SIZE * SIZE, dtype=torch.float64),
                                           prior_covariance())[0] for i in range(3)])
    x = x_g.detach().double().flatten(1)
    expected = (d_fake - d_real) / (x - d_real).abs().mean(1, keepdim=True) / (SIZE * SIZE)
    torch.testing.assert_close(x_g.grad.double().flatten(1), expected / 3, atol=1e-6, rtol=1e-4)
    assert float(losses["scope_low"]) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- convergence
def test_exact_sr_teacher_reference_numbers():
    """The yardsticks the runs below are read against: x4 one-step PSNR of the teacher's posterior mean and of its
    32-NFE Heun restoration (a posterior sample) on the same 256 pairs."""
    teacher, pairs = LinearGaussianSRTeacher(), sr_pairs(256, 4, seed=99)
    t_max = torch.full((256,), 80.0, dtype=torch.float64)
    with torch.no_grad():
        mmse = float(psnr_per_image(teacher(80.0 * pairs["noise"], t_max, pairs["cond"]).clamp(-1, 1),
                                    pairs["real"]).mean())
        times = sampler_times(teacher.schedule, 32, "heun")
        ode = teacher_sample(lambda x, t: teacher(x, t, pairs["cond"]), pairs["noise"], times, teacher.schedule)
    ode_psnr = float(psnr_per_image(ode.clamp(-1, 1), pairs["real"]).mean())
    print(f"exact x4 teacher: posterior mean {mmse:.4f} dB, 32-NFE Heun {ode_psnr:.4f} dB")
    assert mmse == pytest.approx(MEASURED["teacher_mmse"], abs=0.05)
    assert ode_psnr == pytest.approx(MEASURED["teacher_heun32"], abs=0.05)


@pytest.mark.parametrize("method", ["oftsr", "yonos_sr"])
def test_one_step_student_psnr_rises_on_exact_x4_sr(method):
    """A fresh tiny student, a couple of hundred updates against the exact teacher: its one-step x4 PSNR on 256
    held-out pairs rises by more than the floor and ends no more than 1 dB below the teacher's 32-NFE Heun PSNR (the
    issue's "1 step within 1 dB of the teacher at 32 steps", on the closed-form task)."""
    batches, gain_floor = RUNS[method]
    teacher, student = LinearGaussianSRTeacher(), TinySRDenoiser(seed=1)
    if method == "oftsr":  # evaluated at its default knob, t_max: the high-fidelity end
        module = OFTSR(teacher=teacher, student=student, knob_step=0.1, teacher_solver="euler",
                       generator_optimizer=adam(2e-3))
    else:
        module = YONOSSR(teacher=teacher, student=student, scale_path=[2, 4], scale_steps=batches // 2,
                         one_step_steps=batches // 2, upsample="nearest", generator_optimizer=adam(2e-3))
    pairs = sr_pairs(256, 4, seed=99)
    before = one_step_psnr(module, pairs)
    fit(module, 4, batches)
    after = one_step_psnr(module, pairs)
    print(f"{method}: one-step x4 PSNR {before:.2f} -> {after:.2f} dB "
          f"(exact teacher 32-NFE {MEASURED['teacher_heun32']:.2f}, posterior mean {MEASURED['teacher_mmse']:.2f})")
    assert after > before + gain_floor, (before, after)
    assert after > MEASURED["teacher_heun32"] - 1.0, (after, MEASURED["teacher_heun32"])


def test_instarevive_conditional_law_approaches_the_exact_posterior():
    """Student and critic start as copies of the teacher (a tiny net regressed onto it), as in DMD2: the one-step
    output is then about the posterior mean (no spread). Dynamic score matching for 300 updates moves the one-step
    conditional law toward the exact posterior N(m(y), C): its Gaussian W2^2 falls by more than the factor, and the
    PSNR (a posterior sample's is lower than the mean's) stays within 1 dB of the teacher's 32-NFE Heun PSNR."""
    batches, factor = RUNS["instarevive"]
    module = InstaRevive(teacher=LinearGaussianSRTeacher(), student=teacher_fitted(), critic=teacher_fitted(),
                         scope_start=0.02, scope_end=0.4, scope_steps=batches, generator_optimizer=adam(1e-4),
                         critic_optimizer=adam(1e-3))
    pairs = sr_pairs(256, 4, seed=99)
    before, psnr_before = conditional_w2(module, 4), one_step_psnr(module, pairs)
    fit(module, 4, batches)
    after, psnr_after = conditional_w2(module, 4), one_step_psnr(module, pairs)
    print(f"instarevive: conditional W2^2 {before:.3f} -> {after:.3f}, one-step x4 PSNR {psnr_before:.2f} -> "
          f"{psnr_after:.2f} dB (exact teacher 32-NFE {MEASURED['teacher_heun32']:.2f})")
    assert after * factor < before, (before, after)
    assert psnr_after > MEASURED["teacher_heun32"] - 1.0
    assert int(module.generator_steps) == batches and module.generator_time_sampler.low == pytest.approx(0.4)


def adam(lr):
    return lambda parameters: torch.optim.Adam(parameters, lr=lr)


MEASURED = {"teacher_mmse": 18.3049, "teacher_heun32": 14.9324}
RUNS = {
    # oftsr / yonos_sr: (batches of 64, PSNR gain floor in dB); measured, one seed: oftsr 15.56 -> 17.89, yonos_sr
    # 15.56 -> 18.06 dB (the posterior mean: 18.30; the teacher's 32-NFE Heun samples: 14.93)
    "oftsr": (200, 1.5),
    "yonos_sr": (200, 1.5),
    # instarevive: (batches, W2^2 reduction factor); measured, one seed: 2.835 -> 1.918 (1.48x), PSNR 17.33 -> 17.28
    "instarevive": (300, 1.25),
}
