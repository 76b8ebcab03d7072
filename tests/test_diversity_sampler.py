"""Diversity distillation's hybrid sampler (Gandikota & Bau 2025): the first steps of a student's grid are teacher
ODE steps, the student does the rest -- checked step for step against the two pieces it is made of, its NFE count,
its errors, and its route through every method's ``sample``."""
import pytest
import torch

from lightning_modules import DMD2
from lightning_modules.diffusion import EDMSchedule, heun_step, ddim_step, hybrid_sample, prior_sample, student_steps
from lightning_modules.diffusion.samplers import sampler_times
from lightning_modules.networks import GaussianMixtureTeacher, ToyMLPDenoiser


class Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


@pytest.fixture
def pieces():
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    student = ToyMLPDenoiser(2, 32, 2).double()
    student.schedule = schedule
    times = sampler_times(schedule, 4, "student")
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return schedule, (lambda x, t: teacher(x, t, None)), (lambda x, t: student(x, t, None)), times, noise


@pytest.mark.parametrize("method", ["heun", "euler"])
@pytest.mark.parametrize("teacher_steps", [1, 2, 3])
def test_hybrid_is_teacher_ode_steps_then_the_student_loop(pieces, method, teacher_steps):
    schedule, teacher, student, times, noise = pieces
    counted_teacher, counted_student = Counted(teacher), Counted(student)
    out = hybrid_sample(counted_teacher, counted_student, noise, times, schedule, teacher_steps, method,
                        torch.Generator().manual_seed(5))
    x = prior_sample(noise, times[0], schedule)
    for i in range(teacher_steps):
        t, s = (torch.full((64,), float(v), dtype=torch.float64) for v in (times[i], times[i + 1]))
        x = heun_step(teacher, x, t, s, schedule) if method == "heun" else ddim_step(x, teacher(x, t), t, s, schedule)
    expected = student_steps(student, x, times[teacher_steps:], schedule, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert counted_teacher.calls == (2 if method == "heun" else 1) * teacher_steps
    assert counted_student.calls == len(times) - teacher_steps


def test_all_teacher_but_the_last_step_is_the_teachers_ode_on_the_student_grid(pieces):
    """teacher_steps = K - 1 with the teacher as 'student': the teacher's own Heun sampler on that grid."""
    schedule, teacher, _, times, noise = pieces
    from lightning_modules.diffusion import heun_sample
    out = hybrid_sample(teacher, teacher, noise, times, schedule, len(times) - 1, "heun")
    torch.testing.assert_close(out, heun_sample(teacher, prior_sample(noise, times[0], schedule), times, schedule))


@pytest.mark.parametrize("teacher_steps", [0, 4, -1])
def test_bad_teacher_steps_are_named(pieces, teacher_steps):
    schedule, teacher, student, times, noise = pieces
    with pytest.raises(ValueError, match=f"got {teacher_steps}"):
        hybrid_sample(teacher, student, noise, times, schedule, teacher_steps)
    with pytest.raises(ValueError, match="'rk4'"):
        hybrid_sample(teacher, student, noise, times, schedule, 1, "rk4")


def test_every_module_samples_hybrid_through_its_teacher():
    schedule = EDMSchedule()
    module = DMD2(teacher=GaussianMixtureTeacher("ring8", schedule), student=ToyMLPDenoiser(2, 32, 2))
    calls = []
    original = module.teacher_x0
    module.teacher_x0 = lambda x, t, cond, guidance_scale=None: calls.append(1) or original(x, t, cond)
    noise = torch.randn(16, 2)
    plain = module.sample(noise, None, 2)
    assert not calls
    hybrid = module.sample(noise, None, 2, teacher_steps=1)
    assert len(calls) == 2 and hybrid.shape == plain.shape  # one Heun step of the teacher
    module.sample(noise, None, 2, teacher_steps=1, teacher_method="euler")
    assert len(calls) == 3


@pytest.mark.slow  # 3000 batches of DMD2 then 2x4000-sample metrics: 60-160 s on 2 shared cores; `make test-all`
def test_hybrid_sampler_raises_recall_of_a_reverse_kl_student(tmp_path):
    """A 4-step DMD2 student of a mixture with a light, distant mode (experiments/toy/light_mode/dmd2_hybrid.yaml)
    is mode-seeking: its samples cover the modes but not their spread (recall well below the teacher's). Handing the
    first steps to the teacher's ODE buys recall back at a cost in NFE. Measured with this config (EMA student, one
    seed, 3000 batches, ~60 s): NFE 4 recall 0.721 / precision 0.968 -> hybrid with 3 teacher Heun steps (NFE 7)
    0.831 / 0.906, 4/4 modes both. Without the EMA (raw student, same law and budget): NFE 4 0.50; hybrid 1 teacher
    step (NFE 5) 0.57; 3 (NFE 7) 0.84; the teacher's 32-step Heun 0.998; its 1-step samples keep one mode."""
    from callbacks import GroundTruthMetrics
    from tests.toy_runs import build

    cli = build("experiments/toy/light_mode/dmd2_hybrid.yaml", root=str(tmp_path))
    cli.trainer.fit(cli.model, cli.datamodule)
    law = cli.datamodule.law
    plain = GroundTruthMetrics(num_samples=4000, nfe=[4], num_floor_sets=1, verbose=False).evaluate(cli.model, law)[4]
    hybrid = GroundTruthMetrics(num_samples=4000, nfe=[4], num_floor_sets=1, verbose=False,
                                teacher_steps=3).evaluate(cli.model, law)[4]
    print(f"recall {plain['recall']:.3f} -> {hybrid['recall']:.3f}, modes {plain['modes_covered']} -> "
          f"{hybrid['modes_covered']}, precision {plain['precision']:.3f} -> {hybrid['precision']:.3f}")
    assert plain["recall"] < 0.8  # the reverse-KL student lacks diversity
    assert hybrid["recall"] > plain["recall"] + 0.07
    assert hybrid["modes_covered"] >= plain["modes_covered"]


def test_flow_hybrid_is_teacher_flow_steps_then_the_student_flow():
    """On a flow student's uniform tau grid: m teacher Heun intervals (2 evaluations each), then the student's Euler
    for the rest -- equal to composing the two integrators by hand; with teacher = student and Euler it is the plain
    flow sampler."""
    from lightning_modules.diffusion.samplers import flow_hybrid_sample, flow_sample
    teacher_v = Counted(lambda y, tau: -y * (1 + tau[:, None]))
    student_v = Counted(lambda y, tau: 0.5 * y + tau[:, None])
    z = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    steps, tau_max = 4, 0.9
    hybrid = flow_hybrid_sample(teacher_v, student_v, z, steps, tau_max, teacher_steps=2)
    assert (teacher_v.calls, student_v.calls) == (4, 2)
    grid = torch.linspace(tau_max, 0.0, steps + 1, dtype=torch.float64)
    y = tau_max * z
    for i in range(steps):
        tau, dt = torch.full((32,), float(grid[i]), dtype=torch.float64), float(grid[i + 1] - grid[i])
        if i < 2:
            v = teacher_v.fn(y, tau)
            v = 0.5 * (v + teacher_v.fn(y + dt * v, torch.full_like(tau, float(grid[i + 1]))))
        else:
            v = student_v.fn(y, tau)
        y = y + dt * v
    torch.testing.assert_close(hybrid, y, rtol=0, atol=1e-12)
    same = flow_hybrid_sample(student_v.fn, student_v.fn, z, steps, tau_max, 1, "euler")
    torch.testing.assert_close(same, flow_sample(student_v.fn, z, steps, tau_max), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="got 4"):
        flow_hybrid_sample(teacher_v, student_v, z, steps, tau_max, teacher_steps=4)


def test_flow_students_sample_hybrid_through_their_teacher():
    from lightning_modules.methods import RectifiedFlow
    module = RectifiedFlow(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()),
                           student=ToyMLPDenoiser(dim=2, hidden=32, depth=2, sigma_data=0.5))
    calls = []
    original = module.teacher_x0
    module.teacher_x0 = lambda x, t, cond, guidance_scale=None: calls.append(1) or original(x, t, cond)
    noise = torch.randn(16, 2)
    plain = module.sample(noise, None, 3)
    assert not calls
    hybrid = module.sample(noise, None, 3, teacher_steps=2)
    assert len(calls) == 4 and hybrid.shape == plain.shape and not torch.equal(hybrid, plain)
