"""sCM (sCT / sCD) and MeanFlow against closed forms.

One Gaussian N(mu, s^2 I). In TrigFlow (x_t = cos t x0 + sin t z, z ~ N(0, sd^2 I)) the marginal is
N(cos t mu, v(t)^2 I), v(t)^2 = s^2 cos^2 t + sd^2 sin^2 t, the PF-ODE trajectories are x_t - cos t mu ∝ v(t), and the
consistency function is f(x, t) = mu + (x - cos t mu) s / v(t) (f(x, 0) = x). On it df/dt = 0 along the exact
velocity, so sCD's tangent g = cos t df-/dt (r = 1) vanishes; for f_k(x, t) = mu + (x - cos t mu) k(t) with another
k, df/dt = (dx/dt + sin t mu) k + (x - cos t mu) k' and g = r cos t df/dt - (1 - r) cos^2 t (sd F - dx/dt).
In linear interpolation (z_t = (1 - t) x + t e) the trajectories are z_t - (1 - t) mu ∝ w(t) = sqrt((1-t)^2 s^2 + t^2),
and the average velocity is u(z, r, t) = (z - z_r) / (t - r), z_r = (1 - r) mu + (z - (1 - t) mu) w(r) / w(t).
"""
import math

import pytest
import torch

from lightning_modules.diffusion import EDMSchedule
from lightning_modules.diffusion.schedules import TrigFlowSchedule
from lightning_modules.diffusion.tangents import jvp
from lightning_modules.methods.meanflow import MeanFlow
from lightning_modules.methods.scm import ContinuousConsistencyDistillation, ContinuousConsistencyTraining
from lightning_modules.networks import GaussianMixture, GaussianMixtureTeacher, ToyMLPDenoiser
from lightning_modules.networks.meanflow import MeanFlowStudent

MU = torch.tensor([0.3, -0.5], dtype=torch.float64)
S, SD = 0.4, 0.5


def _teacher(schedule):
    return GaussianMixtureTeacher(GaussianMixture([1.0], MU[None], (S ** 2 * torch.eye(2, dtype=torch.float64))[None]),
                                  schedule)


def _v(t):
    return (S ** 2 * torch.cos(t) ** 2 + SD ** 2 * torch.sin(t) ** 2).sqrt()


def _k(t, eps):
    return S * (1 + eps * torch.sin(t)) / _v(t)


def _dk(t, eps):
    dv = (SD ** 2 - S ** 2) * torch.sin(t) * torch.cos(t) / _v(t)
    return S * (eps * torch.cos(t) / _v(t) - (1 + eps * torch.sin(t)) * dv / _v(t) ** 2)


class TrigAffineStudent(ToyMLPDenoiser):
    """f_k in TrigFlow coordinates, written as a denoiser on any schedule (its MLP unused); eps = 0 is exact."""

    eps = 0.0

    def forward(self, x, tau, cond=None, prediction="x0"):
        s = self.schedule.edm_sigma(tau.double())
        alpha, _ = self.schedule.alpha_sigma(tau.double())
        t = torch.atan(s / SD)[:, None]
        x_trig = torch.cos(t) * x.double() / alpha[:, None]
        out = MU + (x_trig - torch.cos(t) * MU) * _k(t, self.eps)
        return out + 0.0 * sum(p.sum() for p in self.parameters())


def _scm(cls, schedule, eps=0.0, **kwargs):
    student = TrigAffineStudent(2, hidden=4, depth=1, boundary_condition=True, sigma_data=SD).double()
    student.eps = eps
    return cls(teacher=_teacher(schedule), student=student, sigma_data=SD, **kwargs)


def _trig_batch(module, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + S * torch.randn(n, 2, dtype=torch.float64, generator=g)
    t = torch.linspace(0.05, 1.5, n, dtype=torch.float64)
    z = SD * torch.randn(n, 2, dtype=torch.float64, generator=g)
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    return x0, z, x_t, t


# ------------------------------------------------------------------ tangents
class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sin()

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


def test_jvp_matches_finite_differences_in_float64_and_falls_back():
    torch.manual_seed(0)
    net = ToyMLPDenoiser(2, hidden=32, depth=3, boundary_condition=True, schedule=EDMSchedule()).double().eval()
    x, t = torch.randn(16, 2, dtype=torch.float64), torch.rand(16, dtype=torch.float64) * 3 + 0.05
    fn = lambda a, b: net(a, b, None)  # noqa: E731
    # the toy MLP casts its noise embedding to float32 (mlp.FourierFeatures): the time tangent is float32-accurate,
    # the data tangent float64-accurate. Measured relative errors: 7e-5 (time + data), ~1e-10 (data only).
    for tangents, bound in [((torch.randn_like(x), torch.zeros_like(t)), 1e-8),
                            ((torch.randn_like(x), torch.ones_like(t)), 1e-3)]:
        with torch.no_grad():
            out, forward = jvp(fn, (x, t), tangents, method="forward")
            out_fd, central = jvp(fn, (x, t), tangents, method="finite_difference")
        torch.testing.assert_close(out, out_fd)
        assert float((forward - central).abs().max() / forward.abs().max()) < bound
    # an operator without a forward-mode formula: "auto" warns and takes the central difference
    y = torch.randn(5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="finite difference"):
        _, tangent = jvp(_NoForwardAD.apply, (y,), (torch.ones_like(y),), method="auto")
    torch.testing.assert_close(tangent, y.cos(), rtol=1e-8, atol=1e-8)
    with pytest.raises((RuntimeError, NotImplementedError)):
        jvp(_NoForwardAD.apply, (y,), (torch.ones_like(y),), method="forward")


# ------------------------------------------------------------------ sCM
@pytest.mark.parametrize("schedule", [TrigFlowSchedule(sigma_data=SD), EDMSchedule()], ids=["trigflow", "edm"])
def test_scd_tangent_vanishes_at_the_exact_consistency_function(schedule):
    module = _scm(ContinuousConsistencyDistillation, schedule, tangent_warmup_steps=0)
    x0, z, x_t, t = _trig_batch(module)
    dx_dt = module.velocity(x0, z, x_t, t, None)
    # the teacher's velocity is the exact PF-ODE's: d/dt (cos t mu + c v(t))
    c = (x_t - torch.cos(t)[:, None] * MU) / _v(t)[:, None]
    dv = ((SD ** 2 - S ** 2) * torch.sin(t) * torch.cos(t) / _v(t))[:, None]
    torch.testing.assert_close(dx_dt, -torch.sin(t)[:, None] * MU + c * dv, rtol=1e-9, atol=1e-9)
    F_minus, dF_dt = module.target_tangent(x_t, t, dx_dt, None)
    g = module.tangent(F_minus, dF_dt, x_t, dx_dt, t, normalise=False)
    assert float(g.abs().max()) < 1e-8
    # boundary: f(x, t_min) = x
    lo, _ = module.trig_range()
    t_min = torch.full((8,), lo, dtype=torch.float64)
    x = torch.randn(8, 2, dtype=torch.float64)
    f = module.consistency_function(module.student, x, t_min, None)
    assert float((f - x).abs().max()) < 1e-4  # f(x, t) - x = O(t^2) at t_min (EDM: t_min = atan(0.004))


@pytest.mark.parametrize("schedule", [TrigFlowSchedule(sigma_data=SD), EDMSchedule()], ids=["trigflow", "edm"])
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_scm_tangent_off_the_exact_function_is_its_closed_form(schedule, ratio):
    eps = 0.3
    module = _scm(ContinuousConsistencyDistillation, schedule, eps=eps)
    x0, z, x_t, t = _trig_batch(module)
    dx_dt = module.velocity(x0, z, x_t, t, None)
    F_minus, dF_dt = module.target_tangent(x_t, t, dx_dt, None)
    g = module.tangent(F_minus, dF_dt, x_t, dx_dt, t, ratio=ratio, normalise=False)
    tt = t[:, None]
    f = MU + (x_t - torch.cos(tt) * MU) * _k(tt, eps)
    F = (torch.cos(tt) * x_t - f) / (SD * torch.sin(tt))
    df_dt = (dx_dt + torch.sin(tt) * MU) * _k(tt, eps) + (x_t - torch.cos(tt) * MU) * _dk(tt, eps)
    expected = ratio * torch.cos(tt) * df_dt - (1 - ratio) * torch.cos(tt) ** 2 * (SD * F - dx_dt)
    torch.testing.assert_close(F_minus, F, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-7)
    assert float(g.abs().max()) > 1e-2


def test_sct_tangent_is_unbiased_for_scd_tangent():
    """g is affine in dx_t/dt and E[cos t z - sin t x0 | x_t] is the PF-ODE velocity, so E[g_sCT | x_t] = g_sCD:
    sampled over the Gaussian posterior of (x0, z) given one x_t."""
    schedule = TrigFlowSchedule(sigma_data=SD)
    module = _scm(ContinuousConsistencyTraining, schedule, eps=0.3, tangent_warmup_steps=0)
    t = torch.tensor(0.7, dtype=torch.float64)
    x_t = torch.tensor([[0.9, -0.2]], dtype=torch.float64)
    post_mean = MU + S ** 2 * math.cos(t) / _v(t) ** 2 * (x_t - math.cos(t) * MU)
    post_std = S * SD * math.sin(t) / _v(t)
    n = 200_000
    x0 = post_mean + post_std * torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = (x_t - math.cos(t) * x0) / math.sin(t)
    tn, xn = t.expand(n).clone(), x_t.expand(n, 2).clone()
    dx_ct = module.velocity(x0, z, xn, tn, None)
    F_minus, dF_dt = module.target_tangent(xn, tn, dx_ct, None)
    g_ct = module.tangent(F_minus, dF_dt, xn, dx_ct, tn, normalise=False)
    cd = _scm(ContinuousConsistencyDistillation, schedule, eps=0.3, tangent_warmup_steps=0)
    dx_cd = cd.velocity(None, None, x_t, t[None], None)
    F1, dF1 = cd.target_tangent(x_t, t[None], dx_cd, None)
    g_cd = cd.tangent(F1, dF1, x_t, dx_cd, t[None], normalise=False)
    se = float(g_ct.std(0).max()) / math.sqrt(n)
    assert float((g_ct.mean(0) - g_cd[0]).abs().max()) < 5 * se
    assert float(g_cd.abs().max()) > 1e-2


def test_scm_warmup_normalisation_and_checkpoint_state():
    torch.manual_seed(0)
    student = ToyMLPDenoiser(2, hidden=16, depth=2, boundary_condition=True, sigma_data=0.5)
    module = ContinuousConsistencyTraining(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student=student,
                                           tangent_warmup_steps=100)
    assert module.warmup_ratio() == 0.0
    for _ in range(25):
        module.on_generator_step_end()
    assert int(module.tangent_step) == 25 and module.warmup_ratio() == 0.25
    module.tangent_step.fill_(400)
    assert module.warmup_ratio() == 1.0
    # normalisation g / (||g|| + 0.1)
    x = torch.randn(6, 2)
    t = torch.full((6,), 0.8, dtype=torch.float64)
    raw = module.tangent(torch.randn(6, 2), torch.randn(6, 2), x, torch.randn(6, 2), t, normalise=False)
    torch.testing.assert_close(module.tangent(*[raw * 0] * 2, x, torch.zeros(6, 2), t, ratio=0.0) * 0, raw * 0)
    g = torch.randn(6, 2) * torch.tensor([[0.01], [0.1], [1.0], [10.0], [100.0], [1e3]])
    normed = module.tangent(-g / (module.sigma_d * torch.cos(t)[:, None] ** 2), torch.zeros(6, 2), x,
                            torch.zeros(6, 2), t, ratio=0.0)
    torch.testing.assert_close(normed, g / (g.norm(dim=1, keepdim=True) + 0.1), rtol=1e-5, atol=1e-6)
    # the checkpoint carries the warm-up clock and the weighting network
    other = ContinuousConsistencyTraining(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()),
                                          student=ToyMLPDenoiser(2, hidden=16, depth=2, boundary_condition=True,
                                                                 sigma_data=0.5), tangent_warmup_steps=100)
    assert "tangent_step" in module.state_dict() and any(k.startswith("log_variance") for k in module.state_dict())
    other.load_state_dict(module.state_dict())
    assert int(other.tangent_step) == 400
    # the loss runs, and its gradient reaches the student and the weighting
    batch = {"real": torch.randn(32, 2), "noise": torch.randn(32, 2)}
    out = module.generator_loss(batch)
    out["loss"].backward()
    assert student.output[-1].weight.grad.abs().sum() > 0
    assert module.log_variance.net[-1].bias.grad.abs().sum() > 0
    assert {id(p) for p in module.log_variance.parameters()} <= {id(p) for p in module.generator_parameters()}


# ------------------------------------------------------------------ MeanFlow
def _w(t):
    return ((1 - t) ** 2 * S ** 2 + t ** 2).sqrt()


def _u_exact(z, r, t, eps=0.0):
    rr, tt = r.double()[:, None], t.double()[:, None]
    z_r = (1 - rr) * MU + (z.double() - (1 - tt) * MU) * _w(rr) / _w(tt)
    return (z.double() - z_r) / (tt - rr) * (1 + eps * tt)


class ExactMeanFlowStudent(MeanFlowStudent):
    eps = 0.0

    def average_velocity(self, z, r, t, cond=None):
        return _u_exact(z, r, t, self.eps) + 0.0 * sum(p.sum() for p in self.parameters())


def _meanflow(eps=0.0, **kwargs):
    schedule = EDMSchedule()
    inner = ToyMLPDenoiser(2, hidden=8, depth=1, boundary_condition=True, sigma_data=0.5)
    student = ExactMeanFlowStudent(inner).double()
    student.eps = eps
    return MeanFlow(teacher=_teacher(schedule), student=student, velocity_source="teacher", **kwargs)


def test_meanflow_target_is_the_exact_average_velocity():
    module = _meanflow()
    n = 64
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(n, 2, dtype=torch.float64, generator=g)
    e = torch.randn(n, 2, dtype=torch.float64, generator=g)
    t = torch.linspace(0.1, 0.95, n, dtype=torch.float64)
    r = t * torch.linspace(0.0, 0.9, n, dtype=torch.float64)
    z = (1 - t[:, None]) * x0 + t[:, None] * e
    v = module.velocity(x0, e, z, t, None)
    # the teacher's velocity is the exact flow's: d/dt ((1 - t) mu + c w(t))
    c = (z - (1 - t[:, None]) * MU) / _w(t)[:, None]
    dw = ((t - (1 - t) * S ** 2) / _w(t))[:, None]
    torch.testing.assert_close(v, -MU + c * dw, rtol=1e-8, atol=1e-8)
    target = module.target(z, r, t, v, None)
    torch.testing.assert_close(target, _u_exact(z, r, t), rtol=1e-7, atol=1e-8)
    # off the exact average velocity the target moves away from the student's value
    off = _meanflow(eps=0.3)
    assert float((off.target(z, r, t, v, None) - _u_exact(z, r, t, 0.3)).abs().max()) > 1e-2


def test_meanflow_student_starts_as_its_network_samples_in_one_step_and_keeps_the_boundary():
    schedule = EDMSchedule()
    torch.manual_seed(0)
    inner = ToyMLPDenoiser(2, hidden=16, depth=2, boundary_condition=True, sigma_data=0.5, schedule=schedule)
    student = MeanFlowStudent(inner)
    x, tau = torch.randn(8, 2), torch.full((8,), 2.0, dtype=torch.float64)
    torch.testing.assert_close(student(x, tau), inner(x, tau))  # zero-initialised interval embedding
    module = MeanFlow(teacher=GaussianMixtureTeacher("ring8", schedule), student=student)
    with torch.no_grad():
        student.interval_embedding[-1].bias.fill_(0.3)
    # forward = z_t - t u(z_t, 0, t): the jump to r = 0
    s = schedule.edm_sigma(tau)
    t = s / (1 + s)
    z = (1 - t[:, None]) * x.double()
    jump = z - t[:, None] * student.average_velocity(z.float(), torch.zeros_like(t), t).double()
    torch.testing.assert_close(student(x, tau).double(), jump, rtol=1e-5, atol=1e-5)
    # boundary f(x, t_min) = x, and one-step samples through the framework's generate path
    from lightning_modules.methods.consistency_family import boundary_error
    assert boundary_error(student, schedule) < 1e-4
    samples = module.sample(torch.randn(16, 2))
    assert samples.shape == (16, 2) and torch.isfinite(samples).all()
    # the loss runs and reaches the interval embedding
    out = module.generator_loss({"real": torch.randn(32, 2), "noise": torch.randn(32, 2)})
    out["loss"].backward()
    assert student.interval_embedding[-1].weight.grad.abs().sum() > 0
    # (t, r): t >= r, the configured fraction equal
    t_s, r_s = module.sample_times(20000, "cpu")
    assert torch.all(t_s >= r_s)
    assert abs(float((t_s == r_s).double().mean()) - 0.75) < 0.02
