"""Noise schedules, prediction-space conversions and training time samplers against closed forms and diffusers."""
import math
import re

import pytest
import torch

from lightning_modules.diffusion import (EDMSchedule, KarrasIndexTime, KarrasRampTime, LogitNormalTime, LogNormalTime,
                                         RectifiedFlowSchedule, TrigFlowSchedule, UniformTime, VPContinuousSchedule,
                                         VPDiscreteSchedule, convert, from_x0, karras_sigmas, to_x0)
from lightning_modules.diffusion.parameterization import PREDICTION_SPACES

F64 = torch.float64

SCHEDULES = {
    "vp_discrete": VPDiscreteSchedule,
    "vp_continuous": VPContinuousSchedule,
    "edm": EDMSchedule,
    "rectified_flow": RectifiedFlowSchedule,
    "trigflow": TrigFlowSchedule,
}
CONTINUOUS = [k for k in SCHEDULES if k != "vp_discrete"]


def _times(schedule, n):
    """n native times spread over [t_min, t_max] (both ends included), integer for the discrete schedule."""
    t = torch.linspace(schedule.t_min, schedule.t_max, n, dtype=F64)
    return t.round() if schedule.is_discrete else t


def _noisy(schedule, n=24, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, dim, generator=g, dtype=F64)
    eps = torch.randn(n, dim, generator=g, dtype=F64)
    t = _times(schedule, n)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * eps
    return x0, eps, x_t, t


# --------------------------------------------------------------------------- prediction-space conversions
@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("source", PREDICTION_SPACES)
@pytest.mark.parametrize("target", PREDICTION_SPACES)
def test_conversion_round_trip(name, source, target):
    """x0 -> source -> target -> x0 and target -> source are identities (to_x0 inverts from_x0) in float64."""
    schedule = SCHEDULES[name]()
    x0, _, x_t, t = _noisy(schedule)
    in_source = from_x0(x0, source, x_t, t, schedule)
    in_target = convert(in_source, source, target, x_t, t, schedule)
    back = to_x0(in_target, target, x_t, t, schedule)
    torch.testing.assert_close(back, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(convert(in_target, target, source, x_t, t, schedule), in_source,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_true_targets_give_true_x0(name):
    """For x_t = alpha x0 + sigma eps the true eps, v = alpha eps - sigma x0, u = alpha' x0 + sigma' eps and
    score = -eps / sigma, written out here, all convert back to the true x0 (and from_x0 reproduces them)."""
    schedule = SCHEDULES[name]()
    x0, eps, x_t, t = _noisy(schedule, seed=1)
    alpha, sigma = (c[:, None] for c in schedule.alpha_sigma(t))
    d_alpha, d_sigma = (c[:, None] for c in schedule.alpha_sigma_derivative(t))
    truths = {"x0": x0, "epsilon": eps, "v": alpha * eps - sigma * x0, "flow": d_alpha * x0 + d_sigma * eps,
              "score": -eps / sigma}
    for space, value in truths.items():
        torch.testing.assert_close(to_x0(value, space, x_t, t, schedule), x0, rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{space}: {m}")
        torch.testing.assert_close(from_x0(x0, space, x_t, t, schedule), value, rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f"{space}: {m}")


def test_rectified_flow_velocity_is_eps_minus_x0():
    """Rectified flow (Liu et al. 2022): x_t = (1 - t) x0 + t eps has velocity u = eps - x0."""
    schedule = RectifiedFlowSchedule()
    x0, eps, x_t, t = _noisy(schedule, seed=2)
    torch.testing.assert_close(from_x0(x0, "flow", x_t, t, schedule), eps - x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(convert(eps, "epsilon", "velocity", x_t, t, schedule), eps - x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(to_x0(eps - x0, "flow", x_t, t, schedule), x0, rtol=0, atol=1e-12)


def test_unknown_space_names_the_bad_value():
    """canonical_space rejects unknown names and quotes them."""
    schedule = EDMSchedule()
    x0, _, x_t, t = _noisy(schedule)
    with pytest.raises(ValueError, match="'noise_pred'"):
        from_x0(x0, "noise_pred", x_t, t, schedule)


# --------------------------------------------------------------------------- VP discrete == diffusers DDPM
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_vp_discrete_add_noise_matches_diffusers(beta_schedule):
    """add_noise == diffusers DDPMScheduler.add_noise (alpha_t^2 = prod(1 - beta)) to 1e-6 per unit of |x0| + |noise|
    (diffusers keeps alphas_cumprod in float32)."""
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=0.00085,
                              beta_end=0.012)
    schedule = VPDiscreteSchedule(beta_schedule=beta_schedule)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1000, 4, generator=g)
    noise = torch.randn(1000, 4, generator=g)
    timesteps = torch.randperm(1000, generator=g)
    expected = reference.add_noise(x0, noise, timesteps)
    got = schedule.add_noise(x0, noise, timesteps)
    assert got.dtype == torch.float32
    # |error| <= 1e-6 (|x0| + |noise|): the coefficients agree to 1e-6 (diffusers' float32 cumprod)
    assert ((got - expected).abs() <= 1e-6 * (x0.abs() + noise.abs())).all()
    alpha, sigma = schedule.alpha_sigma(timesteps)
    reference_alpha_bar = reference.alphas_cumprod[timesteps].double()
    torch.testing.assert_close(alpha, reference_alpha_bar.sqrt(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sigma, (1 - reference_alpha_bar).sqrt(), rtol=0, atol=1e-6)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(1000, dtype=F64), rtol=0, atol=1e-12)
    assert (schedule.t_min, schedule.t_max) == (0.0, 999.0)


def test_vp_discrete_rejects_unknown_beta_schedule():
    """Unknown beta schedules are refused by name."""
    with pytest.raises(ValueError, match="'cosine'"):
        VPDiscreteSchedule(beta_schedule="cosine")


# --------------------------------------------------------------------------- Karras grid
def _karras_eq5(n, sigma_min, sigma_max, rho):
    """Karras et al. (2022) Eq. 5 written out term by term."""
    out = []
    for i in range(n):
        out.append((sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("n,sigma_min,sigma_max,rho", [(18, 0.002, 80.0, 7.0), (40, 0.01, 14.6, 7.0),
                                                       (5, 0.1, 3.0, 3.0)])
def test_karras_sigmas_eq5(n, sigma_min, sigma_max, rho):
    """karras_sigmas == Eq. 5 of Karras et al. 2022: descending from sigma_max to sigma_min."""
    sigmas = karras_sigmas(n, sigma_min, sigma_max, rho)
    assert sigmas.dtype == F64 and sigmas.shape == (n,)
    torch.testing.assert_close(sigmas, _karras_eq5(n, sigma_min, sigma_max, rho), rtol=1e-12, atol=0)
    assert (sigmas[1:] < sigmas[:-1]).all()
    assert sigmas[0].item() == pytest.approx(sigma_max, rel=1e-12)
    assert sigmas[-1].item() == pytest.approx(sigma_min, rel=1e-12)


def test_karras_sigmas_match_diffusers():
    """karras_sigmas == diffusers EulerDiscreteScheduler._convert_to_karras (rho = 7) on the same endpoints."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler()
    in_sigmas = torch.tensor([14.6146, 3.0, 0.5, 0.0292], dtype=F64)
    expected = torch.as_tensor(scheduler._convert_to_karras(in_sigmas, 25), dtype=F64)
    torch.testing.assert_close(karras_sigmas(25, 0.0292, 14.6146, 7.0), expected, rtol=1e-10, atol=0)


def test_karras_sigmas_edge_cases():
    """num = 1 gives [sigma_max]; num < 1 raises naming num."""
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [80.0]
    with pytest.raises(ValueError, match="num=0"):
        karras_sigmas(0, 0.002, 80.0)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_karras_times_span_the_schedule(name):
    """schedule.karras_times(N) maps Eq. 5 on [edm_sigma(t_min), edm_sigma(t_max)] to native time, descending."""
    schedule = SCHEDULES[name]()
    times = schedule.karras_times(12)
    s_lo = schedule.edm_sigma(torch.tensor(schedule.t_min, dtype=F64)).item()
    s_hi = schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=F64)).item()
    assert times.shape == (12,)
    assert times[0].item() == pytest.approx(schedule.t_max, rel=1e-9)
    assert times[-1].item() == pytest.approx(schedule.t_min, rel=1e-9, abs=1e-12)
    assert (times[1:] <= times[:-1]).all()
    if not schedule.is_discrete:
        torch.testing.assert_close(schedule.edm_sigma(times), _karras_eq5(12, s_lo, s_hi, 7.0), rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- time <-> EDM sigma
@pytest.mark.parametrize("name", CONTINUOUS)
def test_time_from_edm_sigma_inverts_edm_sigma(name):
    """time_from_edm_sigma(sigma(t) / alpha(t)) == t on continuous schedules."""
    schedule = SCHEDULES[name]()
    t = torch.linspace(schedule.t_min, schedule.t_max, 101, dtype=F64)
    torch.testing.assert_close(schedule.time_from_edm_sigma(schedule.edm_sigma(t)), t, rtol=1e-9, atol=1e-9)


def test_vp_discrete_time_from_edm_sigma_is_nearest_index():
    """VP discrete: integer t round-trips exactly; any sigma maps to the index whose log edm_sigma is nearest."""
    schedule = VPDiscreteSchedule()
    steps = torch.arange(1000, dtype=F64)
    table = schedule.edm_sigma(steps)
    assert (table[1:] > table[:-1]).all()
    assert torch.equal(schedule.time_from_edm_sigma(table), steps)
    g = torch.Generator().manual_seed(4)
    sigmas = torch.exp(torch.empty(500, dtype=F64).uniform_(math.log(0.01), math.log(200.0), generator=g))
    nearest = (sigmas.log()[:, None] - table.log()[None]).abs().argmin(1).to(F64)
    assert torch.equal(schedule.time_from_edm_sigma(sigmas), nearest)
    assert schedule.time_from_edm_sigma(torch.tensor([1e-6, 1e6], dtype=F64)).tolist() == [0.0, 999.0]


# --------------------------------------------------------------------------- derivatives
@pytest.mark.parametrize("name", CONTINUOUS)
def test_alpha_sigma_derivative_matches_finite_difference(name):
    """(alpha', sigma') == central finite difference of alpha_sigma (step 1e-6, interior times)."""
    schedule = SCHEDULES[name]()
    h = 1e-6
    span = schedule.t_max - schedule.t_min
    t = torch.linspace(schedule.t_min + 1e-4 * span, schedule.t_max - 1e-4 * span, 37, dtype=F64)
    d_alpha, d_sigma = schedule.alpha_sigma_derivative(t)
    a_plus, s_plus = schedule.alpha_sigma(t + h)
    a_minus, s_minus = schedule.alpha_sigma(t - h)
    fd_alpha, fd_sigma = (a_plus - a_minus) / (2 * h), (s_plus - s_minus) / (2 * h)
    scale_a = fd_alpha.abs().max().clamp_min(1.0)
    scale_s = fd_sigma.abs().max().clamp_min(1.0)
    assert ((d_alpha - fd_alpha).abs() <= 1e-5 * torch.maximum(fd_alpha.abs(), 1e-3 * scale_a)).all()
    assert ((d_sigma - fd_sigma).abs() <= 1e-5 * torch.maximum(fd_sigma.abs(), 1e-3 * scale_s)).all()


# --------------------------------------------------------------------------- schedule arguments
@pytest.mark.parametrize("factory,bad", [
    (lambda: VPDiscreteSchedule(num_train_timesteps=1), "1"),
    (lambda: VPContinuousSchedule(beta_min=5.0, beta_max=2.0), "beta_min=5.0"),
    (lambda: EDMSchedule(sigma_min=3.0, sigma_max=2.0), "sigma_min=3.0"),
    (lambda: RectifiedFlowSchedule(t_min=0.7, t_max=0.2), "t_min=0.7"),
    (lambda: TrigFlowSchedule(t_max=2.0), "t_max=2.0"),
])
def test_schedule_arguments_are_validated(factory, bad):
    """Invalid schedule arguments raise ValueError quoting the bad value."""
    with pytest.raises(ValueError, match=re.escape(bad)):
        factory()


# --------------------------------------------------------------------------- time samplers
TIME_SAMPLERS = {
    "uniform": lambda: UniformTime(),
    "uniform_dmd2": lambda: UniformTime(0.02, 0.98),
    "lognormal": lambda: LogNormalTime(),
    "logitnormal": lambda: LogitNormalTime(),
    "karras_index": lambda: KarrasIndexTime(18),
    "karras_ramp": lambda: KarrasRampTime(),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("sampler_name", list(TIME_SAMPLERS))
def test_time_samplers_stay_in_range(name, sampler_name):
    """Every sampler returns (n,) float64 native times in [t_min, t_max] (integers on the discrete schedule)."""
    schedule = SCHEDULES[name]()
    sampler = TIME_SAMPLERS[sampler_name]()
    t = sampler(2000, schedule, generator=torch.Generator().manual_seed(5))
    assert t.shape == (2000,) and t.dtype == F64
    assert t.min().item() >= schedule.t_min and t.max().item() <= schedule.t_max
    if schedule.is_discrete:
        assert torch.equal(t, t.round())
    assert t.unique().numel() > 10


def test_uniform_time_fractions():
    """UniformTime(lo, hi) covers [t_min + lo span, t_min + hi span] with mean at the middle."""
    schedule = EDMSchedule()
    t = UniformTime(0.25, 0.5)(20000, schedule, generator=torch.Generator().manual_seed(6))
    span = schedule.t_max - schedule.t_min
    lo, hi = schedule.t_min + 0.25 * span, schedule.t_min + 0.5 * span
    assert t.min().item() >= lo and t.max().item() <= hi
    assert t.mean().item() == pytest.approx((lo + hi) / 2, rel=0.01)


def test_lognormal_time_on_edm_has_edm_moments():
    """LogNormalTime on EDM: ln(sigma) ~ N(-1.2, 1.2^2) (Karras et al. 2022, Table 1), checked at n = 20000."""
    t = LogNormalTime()(20000, EDMSchedule(), generator=torch.Generator().manual_seed(7))
    log_sigma = t.log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.04)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.04)


def test_lognormal_time_is_the_same_noise_law_on_every_schedule():
    """Drawn in EDM sigma and mapped through time_from_edm_sigma, so a seed gives the same noise levels on VP."""
    vp, edm = VPContinuousSchedule(t_min=1e-5), EDMSchedule(sigma_min=1e-3, sigma_max=1e3)
    t_vp = LogNormalTime()(500, vp, generator=torch.Generator().manual_seed(8))
    t_edm = LogNormalTime()(500, edm, generator=torch.Generator().manual_seed(8))
    inside = (t_edm > 0.01) & (t_edm < 100)
    assert inside.sum() > 450
    torch.testing.assert_close(vp.edm_sigma(t_vp)[inside], t_edm[inside], rtol=1e-9, atol=0)


def test_logitnormal_time_median_is_midpoint():
    """LogitNormalTime(0, 1): u = sigmoid(N(0, 1)) has median 1/2, so t has median (t_min + t_max) / 2."""
    schedule = TrigFlowSchedule()
    t = LogitNormalTime()(20000, schedule, generator=torch.Generator().manual_seed(9))
    assert t.median().item() == pytest.approx((schedule.t_min + schedule.t_max) / 2, rel=0.02)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_karras_index_pairs_are_adjacent_grid_points(name):
    """KarrasIndexTime.pairs returns (grid[n], grid[n+1]) of the descending Karras grid, the first the noisier."""
    schedule = SCHEDULES[name]()
    sampler = KarrasIndexTime(num_steps=18)
    grid = sampler.grid(schedule)
    t_n, t_next = sampler.pairs(3000, schedule, generator=torch.Generator().manual_seed(10))
    index = (t_n[:, None] == grid[None]).to(torch.int64).argmax(1)
    assert torch.equal(grid[index], t_n)
    assert torch.equal(grid[index + 1], t_next)
    assert (t_next < t_n).all() if not schedule.is_discrete else (t_next <= t_n).all()
    assert set(index.tolist()) == set(range(17))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_karras_index_grid_is_the_float64_karras_grid(name):
    """KarrasIndexTime.grid == schedule.karras_times (endpoints t_max, t_min exact: no float32 round trip)."""
    schedule = SCHEDULES[name]()
    grid = KarrasIndexTime(num_steps=18).grid(schedule)
    torch.testing.assert_close(grid, schedule.karras_times(18), rtol=1e-12, atol=1e-14)
    assert grid[0].item() <= schedule.t_max + 1e-15 and grid[-1].item() >= schedule.t_min - 1e-15


def test_karras_ramp_time_sigma_range():
    """KarrasRampTime(low, high) on EDM draws sigma between ramp(high) and ramp(low) of Eq. 5."""
    schedule = EDMSchedule()
    t = KarrasRampTime(0.2, 1.0)(5000, schedule, generator=torch.Generator().manual_seed(11))
    lo = _karras_eq5(6, 0.002, 80.0, 7.0)[-1].item()                       # ramp 1.0 -> sigma_min
    hi = ((80.0 ** (1 / 7) + 0.2 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7)  # ramp 0.2
    assert t.min().item() >= lo - 1e-12 and t.max().item() <= hi + 1e-9
    assert t.max().item() > 0.9 * hi and t.min().item() < 0.01


@pytest.mark.parametrize("factory,bad", [
    (lambda: UniformTime(0.6, 0.4), "0.6"),
    (lambda: UniformTime(-0.5, 0.4), "-0.5"),
    (lambda: LogNormalTime(std=-0.25), "-0.25"),
    (lambda: LogitNormalTime(std=-1.5), "-1.5"),
    (lambda: KarrasIndexTime(num_steps=1), "got 1"),
    (lambda: KarrasRampTime(low=0.7, high=0.3), "low=0.7"),
    (lambda: KarrasRampTime(low=0.1, high=1.5), "high=1.5"),
])
def test_time_sampler_arguments_are_validated(factory, bad):
    """Invalid time-sampler arguments raise ValueError quoting the bad value."""
    with pytest.raises(ValueError, match=re.escape(bad)):
        factory()
