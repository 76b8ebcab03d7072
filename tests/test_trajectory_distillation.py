"""Exact tests for the trajectory-distillation methods (KD, progressive distillation, guidance distillation, BOOT)
on the exact Gaussian-mixture teacher: every target is checked against an independent formula (tests/helpers.py's
autograd Tweedie posterior mean, or a single Gaussian's closed-form denoiser)."""
from __future__ import annotations

import torch

from lightning_modules.diffusion import EDMSchedule, VPContinuousSchedule
from lightning_modules.methods.boot import BOOT
from lightning_modules.methods.knowledge_distillation import KnowledgeDistillation
from lightning_modules.methods.progressive import (GuidanceDistillation, ProgressiveDistillation, ddim_to,
                                                   one_step_target, truncated_snr_weight)
from lightning_modules.networks.gaussian_mixture import GaussianMixture, GaussianMixtureTeacher
from lightning_modules.networks.guidance_embedded import GuidanceEmbeddedDenoiser
from lightning_modules.networks.mlp import ToyMLPDenoiser
from lightning_modules.networks.signal_mlp import SignalMLP
from lightning_modules.networks.toy_laws import get_toy_law
from tests.helpers import independent_x0

import pytest


def _ddim(x, d, a_t, s_t, a_s, s_s):
    return a_s[:, None] * d + s_s[:, None] * (x - a_t[:, None] * d) / s_t[:, None]


def _pd(schedule=None, law="ring8", **kwargs):
    schedule = schedule or EDMSchedule()
    teacher = GaussianMixtureTeacher(law, schedule)
    dim = teacher.law.dim
    student = ToyMLPDenoiser(dim, hidden=16, depth=2, num_classes=teacher.num_classes if kwargs.pop("cond", False) else 0)
    return ProgressiveDistillation(teacher=teacher, student=student, **kwargs)


@pytest.mark.parametrize("schedule", [EDMSchedule(), VPContinuousSchedule()], ids=["edm", "vp"])
def test_pd_two_step_target_equals_two_exact_teacher_ddim_steps(schedule):
    module = _pd(schedule, initial_steps=4)
    law = get_toy_law("ring8")
    times = module.fine_times
    g = torch.Generator().manual_seed(0)
    x0, _ = law.sample(6, g)
    t, mid, end = (times[[0, 2, 4, 0, 2, 4]], times[[1, 3, 5, 1, 3, 5]], times[[2, 4, 6, 2, 4, 6]])
    z_t = schedule.add_noise(x0, torch.randn(6, 2, generator=g, dtype=torch.float64), t)
    z_end, x_tilde = module.two_step_target(z_t, t, mid, end, None)
    # independent: the autograd Tweedie posterior mean and DDIM written out (Song et al. 2021, Eq. 12)
    (a_t, s_t), (a_m, s_m), (a_e, s_e) = (schedule.alpha_sigma(v) for v in (t, mid, end))
    z_mid = _ddim(z_t, independent_x0(law, z_t, a_t, s_t), a_t, s_t, a_m, s_m)
    expected = _ddim(z_mid, independent_x0(law, z_mid, a_m, s_m), a_m, s_m, a_e, s_e)
    assert torch.allclose(z_end.double(), expected, atol=1e-9), (z_end - expected).abs().max()
    # the one-step target: a single student DDIM step t -> t'' with x0 = x~ lands on the two-step result
    one_step = ddim_to(z_t, x_tilde, t, end, schedule)
    assert torch.allclose(one_step.double(), expected, atol=1e-8)
    # Salimans & Ho Alg. 2 line 10 written in (alpha, sigma)
    ratio = (s_e / s_t)[:, None]
    salimans = (expected - ratio * z_t) / (a_e[:, None] - ratio * a_t[:, None])
    assert torch.allclose(x_tilde.double(), salimans, atol=1e-8)


def test_pd_single_gaussian_ddim_map_in_closed_form():
    """A single Gaussian N(mu, s^2 I): D(x_t) = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu), so two
    DDIM steps are an affine map written out by hand; the last step to sigma = 0 returns D itself."""
    mu, s2 = torch.tensor([[0.3, -0.2]], dtype=torch.float64), 0.25
    law = GaussianMixture(torch.ones(1), mu, s2 * torch.eye(2)[None].double())
    schedule = EDMSchedule()
    module = ProgressiveDistillation(teacher=GaussianMixtureTeacher(law, schedule),
                                     student=ToyMLPDenoiser(2, hidden=8, depth=1), initial_steps=2)
    times = module.fine_times  # 4 levels, the last step goes to sigma = 0

    def D(x, sig):  # EDM: alpha = 1
        return mu + s2 / (s2 + sig ** 2) * (x - mu)

    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    for i, end in ((0, times[2]), (1, None)):
        t, m = times[2 * i].expand(5), times[2 * i + 1].expand(5)
        z_t = x * 0 + (mu + float(times[2 * i]) * x)
        end_vec = None if end is None else end.expand(5)
        z_end, x_tilde = module.two_step_target(z_t, t, m, end_vec, None)
        st, sm = float(times[2 * i]), float(times[2 * i + 1])
        z_m = D(z_t, st) + sm / st * (z_t - D(z_t, st))
        if end is None:
            expected = D(z_m, sm)
            assert torch.allclose(x_tilde.double(), expected, atol=1e-10)  # x~ = z_t'' at the end
        else:
            se = float(end)
            expected = D(z_m, sm) + se / sm * (z_m - D(z_m, sm))
            assert torch.allclose(ddim_to(z_t, x_tilde, t, end_vec, schedule).double(), expected, atol=1e-9)
        assert torch.allclose(z_end.double(), expected, atol=1e-10)


def test_truncated_snr_weight():
    sig = torch.tensor([0.25, 0.5, 1.0, 2.0, 80.0], dtype=torch.float64)
    assert torch.allclose(truncated_snr_weight(sig), torch.tensor([16.0, 4.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    module = _pd(initial_steps=2)
    x0 = torch.zeros(3, 2)
    t = module.fine_times[:3]
    target = torch.ones(3, 2)
    out = module.regression(module.schedule.add_noise(x0, torch.randn(3, 2), t), t, None, target)
    assert out["loss"] >= out["distance"] - 1e-6


def test_pd_stage_halving_teacher_copy_and_checkpoint():
    module = _pd(initial_steps=4, steps_per_stage=10)
    assert module.num_stages == 3 and len(module.student_times) == 4
    fine = module.fine_times
    assert torch.equal(module.student_times, fine[::2])
    assert torch.equal(module.evaluation_times(None), module.student_times)
    module.apply_curriculum(5, 100)
    assert int(module.stage) == 0
    with torch.no_grad():
        module.student.output[1].bias.add_(1.0)  # the student moved during stage 0
    module.apply_curriculum(10, 100)
    assert int(module.stage) == 1 and len(module.student_times) == 2 and torch.equal(module.student_times, fine[::4])
    for (name, a), b in zip(module.student.state_dict().items(), module.stage_teacher.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in module.stage_teacher.parameters())
    # the stage-1 teacher is the frozen stage-0 student, not the exact teacher
    x, t = torch.randn(4, 2), module.fine_times[:4]
    assert torch.allclose(module.pd_teacher_x0(x, t, None), module.stage_teacher(x, t, None))
    with torch.no_grad():
        module.student.output[1].bias.add_(1.0)
    module.apply_curriculum(1000, 100)  # clipped to the last stage: one step
    assert int(module.stage) == 2 and len(module.student_times) == 1
    state = module.state_dict()
    fresh = _pd(initial_steps=4, steps_per_stage=10)
    fresh.load_state_dict(state)
    assert int(fresh.stage) == 2 and torch.equal(fresh.student_times, module.student_times)
    assert torch.equal(fresh.stage_teacher.output[1].bias, module.stage_teacher.output[1].bias)
    # the sampler: N_s deterministic DDIM steps of the student
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fresh.sample(noise), fresh.sample(noise))
    losses = fresh.generator_loss({"noise": noise, "real": torch.randn(8, 2)})
    assert torch.isfinite(losses["loss"])


def test_pd_loss_uses_the_stage_grid_and_end_case():
    module = _pd(initial_steps=1)  # one stage: a 1-step student from 2 teacher steps, t'' = the data end
    torch.manual_seed(0)
    x0 = torch.randn(5, 2)
    captured = {}
    original = module.regression
    module.regression = lambda z, t, c, target, g=None: captured.update(z=z, t=t, target=target) or original(z, t, c, target, g)
    module.pd_loss(x0, None)
    law = get_toy_law("ring8")
    times = module.fine_times
    z, t = captured["z"].double(), captured["t"]
    assert torch.all(t == times[0])
    a, s = module.schedule.alpha_sigma(t)
    am, sm = module.schedule.alpha_sigma(times[1].expand(5))
    z_mid = _ddim(z, independent_x0(law, z, a, s), a, s, am, sm)
    assert torch.allclose(captured["target"].double(), independent_x0(law, z_mid, am, sm), atol=1e-5)


def test_guidance_stage1_target_equals_closed_form_cfg_of_the_conditional_mixture():
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    student = GuidanceEmbeddedDenoiser(ToyMLPDenoiser(2, hidden=16, depth=2, num_classes=8))
    module = GuidanceDistillation(teacher=teacher, student=student, initial_steps=2, guidance_range=(1.0, 5.0),
                                  guidance_steps=10)
    law = get_toy_law("ring8")
    g = torch.Generator().manual_seed(3)
    n = 8
    labels = torch.arange(8)
    t = schedule.time_from_edm_sigma(torch.exp(torch.linspace(-2, 2, n, dtype=torch.float64)))
    x_t = torch.randn(n, 2, generator=g, dtype=torch.float64) * (1 + t[:, None])
    w = module.draw_guidance(n, "cpu")
    target = module.guided_target(x_t, t, labels, w)
    alpha, sigma = schedule.alpha_sigma(t)
    uncond = independent_x0(law, x_t, alpha, sigma)
    cond = torch.stack([independent_x0(GaussianMixture(torch.ones(1), law.means[k:k + 1], law.covariances[k:k + 1]),
                                       x_t[k:k + 1], alpha[k:k + 1], sigma[k:k + 1])[0] for k in range(n)])
    expected = uncond + w[:, None] * (cond - uncond)
    assert torch.allclose(target.double(), expected, atol=1e-8), (target - expected).abs().max()
    # the student sees w: a zero-initialised guidance projection leaves it the base network until trained
    base = student.base(x_t.float(), t, labels)
    assert torch.allclose(student(x_t.float(), t, labels, guidance=w), base)
    with torch.no_grad():
        student.embed.projection.bias.add_(0.3)
    assert not torch.allclose(student(x_t.float(), t, labels, guidance=w), base)
    # stage 1 -> stage 2: the w-conditioned student becomes the progressive teacher
    module.apply_curriculum(10, 100)
    assert int(module.phase) == 1 and int(module.stage) == 0
    assert torch.allclose(module.pd_teacher_x0(x_t.float(), t, labels, w), student(x_t.float(), t, labels, guidance=w))
    batch = {"noise": torch.randn(n, 2), "cond": labels, "real": torch.randn(n, 2), "real_cond": labels}
    assert torch.isfinite(module.generator_loss(batch)["loss"])


def test_kd_target_equals_high_accuracy_teacher_ode_and_modes():
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    module = KnowledgeDistillation(teacher=teacher, student=ToyMLPDenoiser(2, hidden=16, depth=2), mode="on_the_fly",
                                   teacher_nfe=255, teacher_sampler="heun")
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = module.teacher_target(z, None)
    # reference: RK4 on the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma in log sigma, 4000 steps, with the law's
    # closed-form posterior mean, from sigma_max to the sampler's last level, then the final denoising
    from lightning_modules.diffusion.samplers import sampler_times
    last = float(sampler_times(schedule, 255, "heun")[-1])
    law = get_toy_law("ring8")

    def D(x, sig):
        return law.posterior_mean(x, torch.ones(x.shape[0], dtype=torch.float64),
                                  torch.full((x.shape[0],), sig, dtype=torch.float64))

    def f(x, u):  # d x / d u with u = log sigma
        return x - D(x, float(torch.exp(torch.tensor(u))))

    us = torch.linspace(torch.tensor(80.0).log().item(), torch.tensor(last).log().item(), 4001, dtype=torch.float64)
    x = 80.0 * z
    for u0, u1 in zip(us[:-1].tolist(), us[1:].tolist()):
        h = u1 - u0
        k1 = f(x, u0); k2 = f(x + h / 2 * k1, u0 + h / 2); k3 = f(x + h / 2 * k2, u0 + h / 2); k4 = f(x + h * k3, u1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    reference = D(x, last)
    assert (ours - reference).abs().max() < 1e-3, (ours - reference).abs().max()  # measured 4.0e-4 (63 NFE: 7.0e-3)
    loss = module.generator_loss({"noise": z.float()})["loss"]
    expected = ((module.generate(z.float()) - ours.float()) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    # pairs mode: the batch's cached pairs
    pairs = KnowledgeDistillation(teacher=teacher, student=module.student, mode="pairs")
    batch = {"noise": z.float(), "pair_noise": z.float()[:8], "pair_target": ours.float()[:8]}
    assert torch.allclose(pairs.generator_loss(batch)["loss"], ((module.generate(z.float()[:8]) - ours.float()[:8]) ** 2).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="pair_noise"):
        pairs.generator_loss({"noise": z.float()})
    # streaming: the buffer holds exact teacher pairs, refreshed every k steps, and travels in the state dict
    stream = KnowledgeDistillation(teacher=teacher, student=module.student, mode="streaming", buffer_size=32,
                                   refresh_every=2, refresh_size=8, teacher_nfe=63)
    stream.generator_loss({"noise": z.float()})
    assert int(stream.buffer_filled) == 32
    assert torch.allclose(stream.buffer_target, stream.teacher_target(stream.buffer_noise, None), atol=1e-5)
    before = stream.buffer_noise.clone()
    stream.on_generator_step_end(); stream.on_generator_step_end()
    stream.generator_loss({"noise": z.float()})
    changed = (stream.buffer_noise != before).any(1)
    assert int(changed.sum()) == 8 and int(stream.buffer_cursor) == 8
    assert {"buffer_noise", "buffer_target", "kd_step"} <= set(stream.state_dict())


def test_boot_target_equals_one_exact_teacher_step_from_the_student_output():
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    module = BOOT(teacher=teacher, student=SignalMLP(2, hidden=16, depth=2), num_steps=8)
    law = get_toy_law("ring8")
    eps = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    index = torch.arange(8)
    t, s = module.boot_times[index], module.boot_times[index + 1]
    y_t = module.signal(module.student, eps.float(), t, None).double()
    target = module.bootstrap_target(y_t, eps, t, s, None)
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    x_t = a_t[:, None] * y_t + s_t[:, None] * eps
    x_s = _ddim(x_t, independent_x0(law, x_t, a_t, s_t), a_t, s_t, a_s, s_s)
    expected = (x_s - s_s[:, None] * eps) / a_s[:, None]
    assert torch.allclose(target.double(), expected, atol=1e-8)
    # the boundary: y(eps, T) = D_T(sigma_T eps, T), and a DDIM step from there keeps eps (signal unchanged)
    boundary = module.boundary_target(eps, None)
    T = module.boot_times[:1].expand(8)
    aT, sT = schedule.alpha_sigma(T)
    assert torch.allclose(boundary.double(), independent_x0(law, sT[:, None] * eps, aT, sT), atol=1e-8)
    assert module.boot_times[-1] == pytest.approx(schedule.t_min)
    loss = module.generator_loss({"noise": eps.float()})
    assert torch.isfinite(loss["loss"])
    assert module.sample(eps.float()).shape == (8, 2)


def test_pd_stage_survives_a_lightning_checkpoint(tmp_path):
    """A short fit through the CLI config: the stage curriculum advances (ConsistencyCurriculum), and the checkpoint
    carries the stage, the frozen stage teacher and the callback's step."""
    from tests.toy_runs import build

    overrides = ["--data.init_args.batches_per_epoch=25", "--data.init_args.batch_size=32",
                 "--model.init_args.warm_start_steps=0", "--model.init_args.initial_steps=4",
                 "--model.init_args.steps_per_stage=10", "--trainer.callbacks=[{class_path: callbacks.ConsistencyCurriculum}]"]
    cli = build("experiments/toy/ring8/pd.yaml", *overrides, root=str(tmp_path))
    cli.trainer.fit(cli.model, cli.datamodule)
    assert int(cli.model.stage) == 2 and len(cli.model.student_times) == 1
    path = str(tmp_path / "pd.ckpt")
    cli.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert int(checkpoint["state_dict"]["stage"]) == 2
    assert any(key.startswith("stage_teacher.") for key in checkpoint["state_dict"])
    fresh = build("experiments/toy/ring8/pd.yaml", *overrides, root=str(tmp_path)).model
    fresh.load_state_dict(checkpoint["state_dict"])
    assert int(fresh.stage) == 2 and torch.equal(fresh.student_times, cli.model.student_times)
    for a, b in zip(fresh.stage_teacher.parameters(), cli.model.stage_teacher.parameters()):
        assert torch.equal(a, b)
    steps = [state["step"] for key, state in checkpoint["callbacks"].items() if "ConsistencyCurriculum" in key]
    assert steps == [25]
