"""LCM, multistep CD (MCD / TSCD) and TCM against closed forms on exact Gaussian-mixture teachers.

* skipping-step target: one DDIM / Euler / Heun step of the exact teacher equals a fine PF-ODE integration to the
  earlier time within the solver's error, with local orders 2 (DDIM / Euler) and 3 (Heun);
* guided target: with per-sample w the teacher step uses D_w = D_u + w (D_c - D_u) of the exact conditional mixture
  (independent Tweedie x0 from autograd, tests/helpers.py);
* MCD: for one Gaussian N(mu, s^2 I) in EDM time, the segment-wise consistency function is
  f(x, t) = mu + (x - mu) sqrt((s^2 + e^2) / (s^2 + t^2)) with e the segment's lower edge; it has loss ~ 0;
* the segment curriculum (8 -> 4 -> 2 -> 1) and its checkpointed buffer; TCM's boundary target.
"""
import copy

import torch

from lightning_modules.diffusion import EDMSchedule, VPContinuousSchedule
from lightning_modules.methods.lcm import LatentConsistencyModel, solver_step
from lightning_modules.methods.multistep_cd import (MultistepConsistencyModel,
                                                    TrajectorySegmentedConsistencyDistillation)
from lightning_modules.methods.tcm import TruncatedConsistencyModel
from lightning_modules.networks import GaussianMixture, GaussianMixtureTeacher, ToyMLPDenoiser
from lightning_modules.networks.guidance_mlp import GuidanceToyMLPDenoiser, GuidedLabels
from lightning_modules.networks.toy_laws import get_toy_law
from tests.helpers import independent_x0

MU = torch.tensor([0.3, -0.5], dtype=torch.float64)
S = 0.4


def _gaussian():
    return GaussianMixture([1.0], MU[None], (S ** 2 * torch.eye(2, dtype=torch.float64))[None])


def _fine_ode(teacher, schedule, x, t_from, t_to, steps=2000):
    """RK4 in native time of dx/dt = (a'/a) x + (s' - a' s/a) eps^, with the exact teacher."""
    def slope(x, t):
        tv = torch.full((x.shape[0],), t, dtype=torch.float64)
        alpha, sigma = schedule.alpha_sigma(tv)
        da, ds = schedule.alpha_sigma_derivative(tv)
        eps = (x - alpha[:, None] * teacher(x, tv, None).double()) / sigma[:, None]
        return (da / alpha)[:, None] * x + (ds - da * sigma / alpha)[:, None] * eps
    h = (t_to - t_from) / steps
    t = t_from
    for _ in range(steps):
        k1 = slope(x, t); k2 = slope(x + h / 2 * k1, t + h / 2)
        k3 = slope(x + h / 2 * k2, t + h / 2); k4 = slope(x + h * k3, t + h)
        x, t = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
    return x


def test_skipping_step_solvers_match_the_pf_ode_with_their_order():
    for schedule, t in [(EDMSchedule(), 2.0), (VPContinuousSchedule(), 0.5)]:
        teacher = GaussianMixtureTeacher(get_toy_law("ring8"), schedule)
        x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.5
        denoise = lambda x_, s_: teacher(x_, s_, None).double()
        errors = {}
        for solver in ("ddim", "euler", "heun"):
            errors[solver] = []
            for h in (0.2 * t, 0.1 * t, 0.05 * t):
                tv, sv = torch.full((64,), t, dtype=torch.float64), torch.full((64,), t - h, dtype=torch.float64)
                exact = _fine_ode(teacher, schedule, x, t, t - h, steps=400)
                errors[solver].append(float((solver_step(solver, denoise, x, tv, sv, schedule) - exact).abs().max()))
        for solver, order in (("ddim", 2), ("euler", 2), ("heun", 3)):
            e = errors[solver]
            ratio = e[1] / e[2]
            # halving h divides a local error O(h^(order)) by ~2^order
            assert 2 ** order * 0.6 < ratio < 2 ** order * 1.6, (schedule, solver, e)
        assert errors["heun"][-1] < errors["ddim"][-1]


def _ring_lcm(**kwargs):
    teacher = GaussianMixtureTeacher(get_toy_law("ring8"), EDMSchedule())
    student = GuidanceToyMLPDenoiser(2, hidden=16, depth=2, num_classes=8, boundary_condition=True)
    return LatentConsistencyModel(teacher=teacher, student=student, **kwargs)


def test_guided_skipping_step_target_is_closed_form_cfg_of_the_conditional_mixture():
    module = _ring_lcm(guidance_range=[1.0, 6.0], solver="ddim", num_teacher_steps=41, skip_interval=4)
    law, schedule = get_toy_law("ring8"), module.schedule
    gen = torch.Generator().manual_seed(1)
    n = 8
    labels = torch.arange(n) % 8
    x0 = law.sample(n, gen, classes=labels)[0]
    batch = {"noise": torch.randn(n, 2), "real": x0.float().double(), "real_cond": labels}
    torch.manual_seed(3)
    x_t, t, x_r, r, cond = module.consistency_pair(batch)
    assert isinstance(cond, GuidedLabels) and cond.guidance.min() >= 1.0 and cond.guidance.max() <= 6.0
    assert cond.guidance.std() > 0  # one w per sample
    w = cond.guidance
    alpha, sigma = schedule.alpha_sigma(t)
    d_u = independent_x0(law, x_t, alpha, sigma)
    d_c = torch.stack([independent_x0(GaussianMixture([1.0], law.means[i:i + 1], law.covariances[i:i + 1]),
                                      x_t[j:j + 1], alpha[j:j + 1], sigma[j:j + 1])[0]
                       for j, i in enumerate(labels.tolist())])
    guided = d_u + w[:, None] * (d_c - d_u)
    expected = guided + (r / t)[:, None] * (x_t - guided)  # DDIM in EDM time
    assert torch.allclose(x_r.double(), expected, atol=1e-8), (x_r - expected).abs().max()
    # the sub-grid: every k-th point of the 41-point Karras grid, ending at t_min
    assert len(module.sub_grid) == 11 and abs(float(module.sub_grid[-1]) - schedule.t_min) < 1e-12
    assert set(t.tolist()) <= set(module.sub_grid.tolist())


def test_w_embedding_starts_at_zero_and_is_used():
    module = _ring_lcm(guidance_range=[1.0, 6.0])
    x, t = torch.randn(4, 2), torch.full((4,), 1.0, dtype=torch.float64)
    labels = torch.arange(4)
    plain = module.student(x, t, labels)
    guided = module.student(x, t, GuidedLabels(labels, torch.full((4,), 5.0)))
    assert torch.allclose(plain, guided)
    torch.nn.init.normal_(module.student.guidance_projection.weight)
    assert not torch.allclose(plain, module.student(x, t, GuidedLabels(labels, torch.full((4,), 5.0))))


class ExactSegmentFunction(ToyMLPDenoiser):
    """x0 prediction whose DDIM step to the segment edge e is the exact flow map of N(MU, S^2 I): the closed form
    D(x, t) = x - t (x - mu)(1 - a)/(t - e) with a = sqrt((S^2 + e^2)/(S^2 + t^2)) needs e, set per call."""
    edge = None

    def forward(self, x_t, t, cond=None, prediction="x0"):
        if self.edge is None:  # the construction-time boundary probe
            return x_t
        t = t.double().reshape(-1, 1)
        e = self.edge.double().reshape(-1, 1)
        a = ((S ** 2 + e ** 2) / (S ** 2 + t ** 2)).sqrt()
        flow = MU + (x_t.double() - MU) * a
        same = (t - e).abs() < 1e-12  # t on the edge: DDIM to t returns x_t whatever x0
        x0 = (flow - (e / t) * x_t.double()) / torch.where(same, torch.ones_like(t), 1 - e / t)  # x_e = x0 + (e/t)(x_t - x0)
        x0 = torch.where(same, x_t.double(), x0)
        return x0 + 0.0 * sum(p.sum() for p in self.parameters())


def test_mcd_consistency_target_maps_to_the_segment_edge_in_closed_form():
    schedule = EDMSchedule()
    student = ExactSegmentFunction(2, hidden=8, depth=1)
    module = MultistepConsistencyModel(teacher=GaussianMixtureTeacher(_gaussian(), schedule), student=student,
                                       num_segments=4, num_teacher_steps=161, skip_interval=4, solver="heun",
                                       distance_metric="l2")
    edges = module.segment_edges()
    assert len(edges) == 5 and abs(float(edges[-1]) - schedule.t_min) < 1e-12
    x0 = MU + S * torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    x_t, t, x_r, r, cond = module.consistency_pair({"noise": x0, "real": x0})
    edge = module.lower_edge(t)
    assert (edge < t).all() and (edge <= r + 1e-12).all()
    student.edge = edge
    online = module.consistency_function(student, x_t, t, None, t)
    a = ((S ** 2 + edge ** 2) / (S ** 2 + t ** 2)).sqrt()[:, None]
    assert torch.allclose(online.double(), MU + (x_t - MU) * a, atol=1e-9)  # f(x, t) = x_{s(t)}: the segment edge
    target = module.consistency_function(student, x_r, r, None, t)
    # the loss at the exact function is the Heun step's error only (tiny), not the distance to t_min
    assert float((online - target).abs().max()) < 5e-3  # measured 1.5e-3 (largest Heun step)
    to_t_min = MU + (x_t - MU) * ((S ** 2 + schedule.t_min ** 2) / (S ** 2 + t ** 2)).sqrt()[:, None]
    assert float((online - to_t_min).abs().max()) > 0.05


def test_segment_curriculum_8_4_2_1_and_its_checkpoint_state():
    teacher = GaussianMixtureTeacher(get_toy_law("ring8"), EDMSchedule())
    module = TrajectorySegmentedConsistencyDistillation(
        teacher=teacher, student=ToyMLPDenoiser(2, hidden=8, depth=1, boundary_condition=True),
        num_teacher_steps=161, skip_interval=5)
    seen = []
    for step in range(0, 100, 10):
        module.apply_curriculum(step, 100)
        seen.append(int(module.num_segments))
    assert seen == [8, 8, 8, 4, 4, 2, 2, 2, 1, 1]
    assert module.state_dict()["num_segments"] == 1
    fresh = TrajectorySegmentedConsistencyDistillation(
        teacher=teacher, student=ToyMLPDenoiser(2, hidden=8, depth=1, boundary_condition=True),
        num_teacher_steps=161, skip_interval=5)
    fresh.load_state_dict(module.state_dict())
    assert int(fresh.num_segments) == 1
    # one model, several budgets: the sampler spends nfe = segment count evaluations
    calls = []
    net = fresh.student
    orig = net.forward
    net.forward = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    for nfe in (1, 2, 4, 8):
        calls.clear()
        out = fresh.generate(torch.randn(3, 2), None, nfe)
        assert out.shape == (3, 2) and len(calls) == nfe


def test_tcm_stage2_targets_use_the_frozen_stage1_model_at_the_dividing_time():
    teacher = GaussianMixtureTeacher(get_toy_law("ring8"), EDMSchedule())
    module = TruncatedConsistencyModel(teacher=teacher, student=ToyMLPDenoiser(2, hidden=16, depth=2,
                                                                               boundary_condition=True),
                                       dividing_sigma=1.0, stage1_steps=5, num_discretization_steps=18)
    module.apply_curriculum(0, 10)
    assert int(module.stage) == 1
    module.apply_curriculum(5, 10)
    frozen = copy.deepcopy(module.student)
    assert int(module.stage) == 2 and module.state_dict()["stage"] == 2
    torch.manual_seed(0)
    t, r = module.time_pairs(512, "cpu")
    sigma_t, sigma_r = module.schedule.edm_sigma(t), module.schedule.edm_sigma(r)
    assert (sigma_r >= 1.0 - 1e-9).all() and (sigma_t > sigma_r).all()
    assert 0.2 < float((sigma_r - 1.0).abs().lt(1e-9).double().mean()) < 0.4  # boundary share 0.25 + 1/17
    # the student moves, the boundary stays the stage-1 model
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(0.1)
    target = module.target_network
    x = torch.randn(4, 2)
    tt = torch.tensor([float(module.dividing_time)] * 2 + [5.0, 20.0], dtype=torch.float64)
    out = target(x, tt, None)
    assert torch.allclose(out[:2], frozen(x[:2], tt[:2]), atol=1e-6)
    assert torch.allclose(out[2:], module.target_student.module(x[2:], tt[2:]), atol=1e-6)
    times = module.evaluation_times(3)
    assert (module.schedule.edm_sigma(times) >= 1.0 - 1e-9).all()


def test_mnist_lcm_student_embeds_the_per_sample_w():
    """experiments/mnist/lcm.yaml: the UNet student is wrapped in GuidanceEmbeddedDenoiser, so LCM draws w per sample
    (guidance_range [1, 3]) and the w reaches the UNet's time embedding: zero at initialisation (the student is the
    teacher copy), then a change in w changes the output, and only the samples whose w changed."""
    from lightning_modules.cli import main

    cli = main(["-c", "experiments/mnist/lcm.yaml", "--trainer.logger=false"], run=False)
    module = cli.model
    assert module.guidance_embedding and (module.w_min, module.w_max, module.eval_guidance_scale) == (1.0, 3.0, 2.0)
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t, labels = torch.full((3,), 2.0, dtype=torch.float64), torch.tensor([1, 4, 7])
    with torch.no_grad():
        plain = module.student(x, t, labels)
        at_init = module.student(x, t, GuidedLabels(labels, torch.tensor([1.0, 2.0, 3.0])))
        torch.testing.assert_close(plain, at_init, rtol=0, atol=0)
        torch.nn.init.normal_(module.student.embed.projection.weight, std=0.1)
        first = module.student(x, t, GuidedLabels(labels, torch.tensor([1.0, 2.0, 3.0])))
        second = module.student(x, t, GuidedLabels(labels, torch.tensor([1.0, 2.0, 1.5])))
    assert (first - plain).abs().max() > 1e-3
    torch.testing.assert_close(first[:2], second[:2], rtol=0, atol=1e-6)
    assert (first[2] - second[2]).abs().max() > 1e-4
