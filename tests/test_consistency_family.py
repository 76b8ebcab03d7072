"""The consistency family (CD, iCT, ECT) against closed forms.

For one Gaussian N(mu, s^2 I) in EDM time (x_t = x + t z) the marginal is N(mu, (s^2 + t^2) I), the denoiser is
D(x, t) = mu + s^2/(s^2 + t^2) (x - mu), and the PF-ODE dx/dt = (x - D)/t = t (x - mu)/(s^2 + t^2) (Karras et al.
2022, Eq. 3) is linear with solution (x(t) - mu) ∝ sqrt(s^2 + t^2). The consistency function (CM Eq. 2-3: the map of
x_t to the trajectory's point at t_min, with f(x, t_min) = x) is therefore

  f(x, t) = mu + (x - mu) a(t),   a(t) = sqrt((s^2 + t_min^2) / (s^2 + t^2)).

What is true of the losses at this exact f (and is asserted below):
* CD: the target f(x^_r, r) with x^_r one teacher Heun step differs from f(x_t, t) only by a(r) times the Heun step's
  error, O((t - r)^3): tiny, not zero.
* CT (the same z at both times): f(x + t z, t) - f(x + r z, r) = (x - mu)(a(t) - a(r)) + z (t a(t) - r a(r)) is not
  zero for a sample, and E||.||^2 / dim = s^2 (a(t) - a(r))^2 + (t a(t) - r a(r))^2 exactly (x - mu and z independent).
  What vanishes is the first-order residual in expectation: given x_t, E[z | x_t] = (x_t - D(x_t, t))/t, so
  E[x_r | x_t] is the exact-score Euler step and, f being affine in x, E[f(x_r, r) | x_t] = f(Euler step, r) -- CT's
  expected target is CD's target with an Euler teacher (CM Theorem 2), off f(x_t, t) by O((t - r)^2).
"""
import math

import pytest
import torch

from callbacks import ConsistencyCurriculum
from lightning_modules import ConsistencyDistillation, EasyConsistencyTuning, ImprovedConsistencyTraining
from lightning_modules.diffusion import EDMSchedule, heun_step
from lightning_modules.diffusion.time_samplers import (ECTMappingTime, LogNormalIndexTime, ect_ratio,
                                                       ict_discretization_steps)
from lightning_modules.networks import GaussianMixture, GaussianMixtureTeacher, ToyMLPDenoiser

MU = torch.tensor([0.3, -0.5], dtype=torch.float64)
S = 0.4  # the Gaussian's standard deviation


def _a(t, t_min):
    return ((S ** 2 + t_min ** 2) / (S ** 2 + t ** 2)).sqrt()


class ExactConsistencyFunction(ToyMLPDenoiser):
    """A student that is the closed-form consistency function of N(MU, S^2 I) (its MLP is unused)."""

    def forward(self, x_t, t, cond=None, prediction="x0"):
        t = t.to(torch.float64).reshape(-1, 1)
        out = MU + (x_t.to(torch.float64) - MU) * _a(t, self.schedule.t_min)
        return out + 0.0 * sum(p.sum() for p in self.parameters())  # keeps the graph attached to parameters


def _gaussian_teacher(schedule):
    return GaussianMixtureTeacher(GaussianMixture([1.0], MU[None], (S ** 2 * torch.eye(2, dtype=torch.float64))[None]),
                                  schedule)


def _fixed_pairs(module, t, r):
    module.time_pairs = lambda n, device: (torch.full((n,), t, dtype=torch.float64),
                                           torch.full((n,), r, dtype=torch.float64))


def _data(n, seed=0):
    return MU + S * torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ (a) CD's teacher step vs the exact ODE
def _fine_heun(teacher, schedule, x, t_from, t_to, steps=400):
    grid = torch.linspace(t_from, t_to, steps + 1, dtype=torch.float64)
    for a, b in zip(grid[:-1], grid[1:]):
        x = heun_step(lambda v, t: teacher(v, t), x, torch.full((x.shape[0],), float(a), dtype=torch.float64),
                      torch.full((x.shape[0],), float(b), dtype=torch.float64), schedule)
    return x


@pytest.mark.parametrize("law, num_steps, bound", [("gaussian", 18, 0.08), ("ring8", 18, 0.12), ("ring8", 80, 0.05)])
def test_cd_target_is_one_heun_step_of_the_exact_pf_ode(law, num_steps, bound):
    """x^_{t_n} of CD (Song et al. 2023, Eq. 7 with the Heun solver) against the exact ODE solution from the same
    x_{t_{n+1}}: closed form for one Gaussian, 400 Heun substeps for the ring (their own error ~(1/400)^2 of one
    step's). Over every pair of the Karras grid, the one-step error relative to the exact move |x(t_n) - x(t_{n+1})|
    is bounded; measured maxima: Gaussian 0.050 (N = 18), ring8 0.094 (N = 18) and 0.036 (N = 80), largest at
    sigma ~ 0.1-0.6 where the ring's modes bend the trajectories; the error shrinks with the grid (third order)."""
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = _gaussian_teacher(schedule) if law == "gaussian" else GaussianMixtureTeacher("ring8", schedule)
    student = ToyMLPDenoiser(2, hidden=16, depth=2, boundary_condition=True).double()
    module = ConsistencyDistillation(teacher=teacher, student=student, num_discretization_steps=num_steps)
    grid = module.discretization.grid(schedule)
    x0 = _data(64) if law == "gaussian" else teacher.law.sample(64, torch.Generator().manual_seed(1))[0].double()
    worst = 0.0
    for j in range(len(grid) - 1):
        t, r = float(grid[j]), float(grid[j + 1])
        _fixed_pairs(module, t, r)
        torch.manual_seed(j)
        x_t, t_t, x_r, t_r, _ = module.consistency_pair({"real": x0, "noise": x0})
        assert torch.all(t_t == t) and torch.all(t_r == r)
        if law == "gaussian":
            exact = MU + (x_t - MU) * math.sqrt((S ** 2 + r ** 2) / (S ** 2 + t ** 2))
        else:
            exact = _fine_heun(teacher, schedule, x_t, t, r)
        move = float((exact - x_t).norm(dim=1).max())
        worst = max(worst, float((x_r - exact).norm(dim=1).max()) / move)
    assert worst < bound, worst


# ------------------------------------------------------------------ (b) an exact student's CD and CT losses
def test_exact_consistency_function_satisfies_the_boundary_condition_and_the_ode():
    schedule = EDMSchedule()
    f = ExactConsistencyFunction(2, hidden=4, depth=1, schedule=schedule).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    t_min = torch.full((8,), schedule.t_min, dtype=torch.float64)
    torch.testing.assert_close(f(x, t_min), x)  # CM Eq. 3
    # f is constant along an exact trajectory x(t) - mu = (x(1) - mu) sqrt((s^2 + t^2)/(s^2 + 1))
    for t in [0.1, 1.0, 10.0, 80.0]:
        x_t = MU + (x - MU) * math.sqrt((S ** 2 + t ** 2) / (S ** 2 + 1.0))
        torch.testing.assert_close(f(x_t, torch.full((8,), t, dtype=torch.float64)), f(x, torch.ones(8).double()))


def test_cd_loss_of_the_exact_consistency_function_is_the_heun_error_only():
    schedule = EDMSchedule()
    student = ExactConsistencyFunction(2, hidden=4, depth=1, boundary_condition=True).double()
    module = ConsistencyDistillation(teacher=_gaussian_teacher(schedule), student=student, num_discretization_steps=18)
    grid = module.discretization.grid(schedule)
    x0 = _data(512)
    ratios = []
    for j in range(len(grid) - 1):
        t, r = float(grid[j]), float(grid[j + 1])
        _fixed_pairs(module, t, r)
        torch.manual_seed(j)
        loss = float(module.generator_loss({"real": x0, "noise": x0})["loss"])
        # the same loss from the independent closed form: a(r)^2 * mean (Heun error)^2
        torch.manual_seed(j)
        x_t, _, x_r, _, _ = module.consistency_pair({"real": x0, "noise": x0})
        exact_r = MU + (x_t - MU) * math.sqrt((S ** 2 + r ** 2) / (S ** 2 + t ** 2))
        a_r = float(_a(torch.tensor(r, dtype=torch.float64), schedule.t_min))
        expected = a_r ** 2 * float(((x_r - exact_r) ** 2).mean())
        assert loss == pytest.approx(expected, rel=1e-6, abs=1e-18)
        # O(h^3)^2: below the residual of CT at the same exact f and pair (the closed form of the next test)
        tt, rr = torch.tensor(t, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
        a_t, a_r_ = _a(tt, schedule.t_min), _a(rr, schedule.t_min)
        ct_residual = float(S ** 2 * (a_t - a_r_) ** 2 + (t * a_t - r * a_r_) ** 2)
        assert 0 < loss < ct_residual, (t, r, loss, ct_residual)
        ratios.append(loss / ct_residual)
    assert max(ratios) < 0.5, ratios


def _ict_exact(schedule, **kwargs):
    student = ExactConsistencyFunction(2, hidden=4, depth=1, boundary_condition=True).double()
    return ImprovedConsistencyTraining(teacher=_gaussian_teacher(schedule), student=student, **kwargs)


@pytest.mark.parametrize("t, r", [(2.0, 1.5), (0.5, 0.45), (40.0, 30.0)])
def test_ct_loss_of_the_exact_consistency_function_is_its_closed_form_not_zero(t, r):
    schedule = EDMSchedule()
    module = _ict_exact(schedule, distance_metric="l2")
    _fixed_pairs(module, t, r)
    torch.manual_seed(0)
    out = module.generator_loss({"real": _data(200_000, seed=3), "noise": _data(1)})
    tt, rr = torch.tensor(t, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
    a_t, a_r = _a(tt, schedule.t_min), _a(rr, schedule.t_min)
    expected = float(S ** 2 * (a_t - a_r) ** 2 + (t * a_t - r * a_r) ** 2)
    assert float(out["distance"]) == pytest.approx(expected, rel=0.02)
    assert float(out["loss"]) == pytest.approx(expected / (t - r), rel=0.02)  # lambda = 1/(t - r), iCT Sec. 3.2
    assert expected > 0


@pytest.mark.parametrize("t, r", [(2.0, 1.5), (0.5, 0.4)])
def test_ct_expected_target_is_the_exact_euler_step_target(t, r):
    """Given x_t, x ~ N(D(x_t, t), s^2 t^2/(s^2 + t^2)) and z = (x_t - x)/t; the mean of CT's target f(x + r z, r)
    over that posterior equals f(Euler step of the exact PF-ODE from x_t, r) (CM Theorem 2's mechanism)."""
    schedule = EDMSchedule()
    module = _ict_exact(schedule, distance_metric="l2")
    f = module.student
    x_t = torch.tensor([[1.2, 0.4]], dtype=torch.float64)
    denoised = MU + S ** 2 / (S ** 2 + t ** 2) * (x_t - MU)
    n = 400_000
    x = denoised + S * t / math.sqrt(S ** 2 + t ** 2) * torch.randn(n, 2, dtype=torch.float64,
                                                                     generator=torch.Generator().manual_seed(0))
    z = (x_t - x) / t
    targets = module.target_point({}, x, z, x_t.expand(n, 2), None, torch.full((n,), r, dtype=torch.float64), None)
    mean_target = f(targets, torch.full((n,), r, dtype=torch.float64)).mean(0)
    euler = x_t - (t - r) * (x_t - denoised) / t
    expected = f(euler, torch.full((1,), r, dtype=torch.float64))[0]
    standard_error = float(f(targets, torch.full((n,), r, dtype=torch.float64)).std(0).max()) / math.sqrt(n)
    assert (mean_target - expected).abs().max() < 5 * standard_error
    # and the Euler target is off f(x_t, t) by O((t - r)^2), not zero
    online = f(x_t, torch.full((1,), t, dtype=torch.float64))[0]
    assert (expected - online).abs().max() > 1e-5  # deterministic: 4e-4 at (2, 1.5), 2e-3 at (0.5, 0.4)


# ------------------------------------------------------------------ (c) the curriculum
def _ring_module(cls, **kwargs):
    schedule = EDMSchedule()
    torch.manual_seed(0)
    student = ToyMLPDenoiser(2, hidden=16, depth=2, boundary_condition=True, sigma_data=0.5)
    return cls(teacher=GaussianMixtureTeacher("ring8", schedule), student=student, **kwargs)


def test_ict_curriculum_follows_its_formula_and_lives_in_the_checkpoint():
    """N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)) (iCT Sec. 3.4); K = 1000,
    s0 = 10, s1 = 1280: K' = floor(1000 / 8) = 125."""
    module = _ring_module(ImprovedConsistencyTraining)
    callback = ConsistencyCurriculum(total_steps=1000)
    expected = {0: 11, 124: 11, 125: 21, 249: 21, 250: 41, 500: 161, 874: 641, 875: 1281, 999: 1281, 5000: 1281}
    for k, n in expected.items():
        assert ict_discretization_steps(k, 1000, 10, 1280) == n
        callback.step = k
        callback.on_train_batch_start(None, module, None, 0)
        assert int(module.discretization_steps) == n
        module.time_pairs(4, "cpu")
        assert module.discretization.num_steps == n
    # K = 400k, the paper's CIFAR-10 run: K' = 50000
    assert [ict_discretization_steps(k, 400_000) for k in (0, 49_999, 50_000, 350_000)] == [11, 11, 21, 1281]
    # the callback counts generator updates and its count, and the module's N, are checkpoint state
    callback = ConsistencyCurriculum(total_steps=1000)
    for stepped in [True, True, False, True]:
        module.generator_stepped = stepped
        callback.on_train_batch_end(None, module, None, None, 0)
    assert callback.state_dict() == {"step": 3}
    restored = ConsistencyCurriculum(total_steps=1000)
    restored.load_state_dict(callback.state_dict())
    assert restored.step == 3
    module.discretization_steps.fill_(321)
    other = _ring_module(ImprovedConsistencyTraining)
    other.load_state_dict(module.state_dict())
    assert int(other.discretization_steps) == 321
    other.time_pairs(2, "cpu")
    assert other.discretization.num_steps == 321


def test_ect_stage_curriculum_and_mapping_function():
    """stage = floor(k / d); r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))) clamped at 0 (ECT, Sec. 3)."""
    module = _ring_module(EasyConsistencyTuning, stage_steps=250)
    callback = ConsistencyCurriculum(total_steps=1000)
    for k, stage in {0: 0, 249: 0, 250: 1, 999: 3, 1000: 4}.items():
        callback.step = k
        callback.on_train_batch_start(None, module, None, 0)
        assert int(module.stage) == stage
    t = torch.tensor([0.01, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)
    for stage in [0, 1, 3, 7]:
        expected = [max(0.0, 1 - 2.0 ** -(stage + 1) * (1 + 8 / (1 + math.exp(v)))) for v in t.tolist()]
        torch.testing.assert_close(ect_ratio(t, stage), torch.tensor(expected, dtype=torch.float64))
    sampler = ECTMappingTime(stage=3)
    schedule = EDMSchedule()
    t_noisy, t_clean = sampler.pairs(20_000, schedule, torch.Generator().manual_seed(0))
    assert torch.all(t_noisy >= t_clean) and torch.all(t_clean >= schedule.t_min)
    free = t_clean > schedule.t_min
    torch.testing.assert_close(t_clean[free], (t_noisy * ect_ratio(t_noisy, 3))[free])
    log_t = t_noisy[(t_noisy > schedule.t_min) & (t_noisy < schedule.t_max)].log()
    assert abs(float(log_t.mean()) + 1.1) < 0.1  # the lognormal(-1.1, 2.0) draw (clipped tails are few)
    other = _ring_module(EasyConsistencyTuning, stage_steps=250)
    other.load_state_dict(module.state_dict())
    assert int(other.stage) == 4


# ------------------------------------------------------------------ (d) iCT's lognormal index distribution
@pytest.mark.parametrize("num_steps", [11, 41])
def test_ict_lognormal_index_frequencies_match_their_definition(num_steps):
    """p(sigma_i, sigma_{i+1}) ∝ erf((ln sigma_{i+1} - P_mean)/(sqrt 2 P_std)) - erf((ln sigma_i - P_mean)/(sqrt 2
    P_std)) on sigma_i = (s_min^(1/7) + (i-1)/(N-1) (s_max^(1/7) - s_min^(1/7)))^7 (iCT Sec. 3.5), computed here
    independently of the sampler; 400k draws within 5 standard errors of it."""
    schedule = EDMSchedule()
    s_min, s_max, rho, p_mean, p_std = 0.002, 80.0, 7.0, -1.1, 2.0
    sigmas = [(s_min ** (1 / rho) + i / (num_steps - 1) * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho
              for i in range(num_steps)]  # ascending
    cdf = [math.erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std)) for s in sigmas]
    mass = [cdf[i + 1] - cdf[i] for i in range(num_steps - 1)]
    exact = torch.tensor([m / sum(mass) for m in mass], dtype=torch.float64)
    sampler = LogNormalIndexTime(num_steps)
    n = 400_000
    t_noisy, t_clean = sampler.pairs(n, schedule, torch.Generator().manual_seed(0))
    lower = torch.tensor(sigmas, dtype=torch.float64)
    index = torch.searchsorted(lower, t_clean.contiguous() * (1 + 1e-9)) - 1  # position of sigma_i in the grid
    torch.testing.assert_close(t_noisy, lower[index + 1])  # (sigma_{i+1}, sigma_i): adjacent, the noisier first
    frequency = torch.bincount(index, minlength=num_steps - 1).double() / n
    standard_error = (exact * (1 - exact) / n).sqrt()
    assert torch.all((frequency - exact).abs() <= 5 * standard_error + 1e-6), (frequency - exact).abs().max()
    torch.testing.assert_close(sampler.probabilities(schedule).flip(0), exact)


def test_curriculum_runs_in_a_fit_and_its_state_is_in_the_lightning_checkpoint(tmp_path):
    """A short fit of ring8/ict.yaml (s0 = 10, s1 = 20): with K = 24, K' = floor(24 / 2) = 12, so N = 11 for the
    first 12 generator updates and 21 after; the checkpoint holds the callback's count and the module's N."""
    from tests.toy_runs import build

    cli = build("experiments/toy/ring8/ict.yaml", "--data.init_args.batches_per_epoch=24",
                "--model.init_args.warm_start_steps=0", "--trainer.callbacks=[]", root=str(tmp_path))
    callback = ConsistencyCurriculum(total_steps=24)
    cli.trainer.callbacks.append(callback)
    seen = []
    original = cli.model.time_pairs
    cli.model.time_pairs = lambda n, device: (seen.append(int(cli.model.discretization_steps)), original(n, device))[1]
    cli.trainer.fit(cli.model, cli.datamodule)
    assert seen == [11] * 12 + [21] * 12
    path = tmp_path / "ict.ckpt"
    cli.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert int(checkpoint["state_dict"]["discretization_steps"]) == 21
    assert {"step": 24} in checkpoint["callbacks"].values()
