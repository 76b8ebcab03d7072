"""NCT (methods/nct.py): the exact teacher's ODE map as the frozen one-step generator, the built-in boundary
condition, the noise-space consistency loss and its gradient against a hand-written formula, the refusals, and a
short ring8 run in which the fraction of controlled samples landing in the requested mode rises from chance."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.diffusion import EDMSchedule
from lightning_modules.methods.nct import MixtureComponentControl, NoiseConsistencyTraining, NoiseControlAdapter
from lightning_modules.networks import GaussianMixtureTeacher
from lightning_modules.networks.ode_generator import TeacherODEGenerator


def _module(levels=4, **kwargs):
    torch.manual_seed(0)
    teacher = GaussianMixtureTeacher("ring8", EDMSchedule())
    module = NoiseConsistencyTraining(teacher=teacher, student=TeacherODEGenerator(teacher, nfe=4),
                                      adapter=NoiseControlAdapter([2], 8, hidden=16, depth=2),
                                      control=MixtureComponentControl("ring8"), num_noise_levels=levels, **kwargs)
    with torch.no_grad():   # a non-zero adapter (it starts at zero)
        for p in module.adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.double()


def test_ode_generator_is_the_teacher_sampler_and_differentiable():
    teacher = GaussianMixtureTeacher("ring8", EDMSchedule())
    module = _module()
    z = torch.randn(32, 2, dtype=torch.float64, requires_grad=True)
    ours = module.frozen_generator(z)
    assert torch.allclose(ours, module.sample_teacher(z.detach(), None, nfe=4, method="heun"), atol=1e-12)
    (grad,) = torch.autograd.grad(ours[:, 0].sum(), z)
    assert float(grad.abs().sum()) > 0
    h = 1e-6  # central finite difference of the first output coordinate in the first input coordinate
    bump = torch.zeros_like(z.detach()); bump[:, 0] = h
    fd = (module.frozen_generator(z.detach() + bump)[:, 0] - module.frozen_generator(z.detach() - bump)[:, 0]) / (2 * h)
    assert torch.allclose(grad[:, 0], fd, rtol=1e-4, atol=1e-6)
    assert TeacherODEGenerator(teacher).data_shape == (2,)


def test_boundary_is_the_frozen_generator_exactly():
    module = _module()
    z = torch.randn(16, 2, dtype=torch.float64)
    control = torch.randint(0, 8, (16,))
    zero = torch.zeros(16, dtype=torch.float64)
    assert torch.equal(module.adapted_generator(z, zero, control), module.frozen_generator(z))
    ones = torch.ones(16, dtype=torch.float64)
    assert not torch.allclose(module.adapted_generator(z, ones, control), module.frozen_generator(z))


def test_noise_space_diffusion_keeps_the_standard_normal():
    module = _module()
    z, eps = torch.randn(200000, 2, dtype=torch.float64), torch.randn(200000, 2, dtype=torch.float64)
    s = torch.full((200000,), 0.6, dtype=torch.float64)
    z_s = module.noised(z, eps, s)
    assert torch.allclose(torch.cov(z_s.T), torch.eye(2, dtype=torch.float64), atol=0.01)
    assert float(torch.corrcoef(torch.stack([z_s[:, 0], z[:, 0]]))[0, 1]) == pytest.approx(math.sqrt(1 - 0.36),
                                                                                         abs=0.005)


def test_consistency_loss_and_gradient_match_the_hand_formula():
    module = _module(levels=4)
    g = torch.Generator().manual_seed(2)
    z, eps = torch.randn(12, 2, generator=g, dtype=torch.float64), torch.randn(12, 2, generator=g, dtype=torch.float64)
    control, n = torch.randint(0, 8, (12,), generator=g), torch.randint(1, 5, (12,), generator=g)
    ours = module.consistency_loss(z, eps, control, n)["loss"]

    generator, adapter = module.frozen_generator, module.adapter
    total = 0.0
    for i in range(12):
        def adapted(level, keep_graph):
            s = level / 4
            z_s = math.sqrt(1 - s ** 2) * z[i:i + 1] + s * eps[i:i + 1]
            shift = adapter(z_s, torch.tensor([s], dtype=torch.float64), control[i:i + 1])
            out = generator(z_s + s * shift)
            return out if keep_graph else out.detach()
        target = adapted(int(n[i]) - 1, False)
        total = total + ((adapted(int(n[i]), True) - target) ** 2).mean()
        if int(n[i]) == 1:   # the first level's target is the frozen generator at the coupled noise itself
            assert torch.allclose(target, generator(z[i:i + 1]), atol=1e-12)
    hand = total / 12
    assert float(ours) == pytest.approx(float(hand), rel=1e-10)
    params = list(adapter.parameters())
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(hand, params)):
        assert torch.allclose(a, b, atol=1e-12)
    assert (n == 1).any() and (n > 1).any()


def test_the_teachers_ode_map_as_the_generator_is_held_by_reference():
    teacher = GaussianMixtureTeacher("ring8", EDMSchedule())
    module = NoiseConsistencyTraining(teacher=teacher, adapter=NoiseControlAdapter([2], 8),
                                      control=MixtureComponentControl("ring8"), ode_generator_nfe=3)
    assert isinstance(module.student, TeacherODEGenerator) and module.student.teacher is module.teacher
    assert module.student.nfe == 3 and module.generator_parameters() == list(module.adapter.parameters())
    assert module.trainable_parameter_fraction() == 1.0   # the exact generator has no weights; the adapter trains
    with pytest.raises(ValueError, match="not both"):
        NoiseConsistencyTraining(teacher=teacher, student=TeacherODEGenerator(teacher), adapter=NoiseControlAdapter(
            [2], 8), control=MixtureComponentControl("ring8"), ode_generator_nfe=3)


def test_bad_inputs_are_named():
    teacher = GaussianMixtureTeacher("ring8", EDMSchedule())
    with pytest.raises(ValueError, match="embeds 5 control values but the control model gives 8"):
        NoiseConsistencyTraining(teacher=teacher, student=TeacherODEGenerator(teacher, nfe=2),
                                 adapter=NoiseControlAdapter([2], 5), control=MixtureComponentControl("ring8"))
    with pytest.raises(ValueError, match="one-step generator; got 2 student times"):
        NoiseConsistencyTraining(teacher=teacher, student=TeacherODEGenerator(teacher, nfe=2),
                                 adapter=NoiseControlAdapter([2], 8), control=MixtureComponentControl("ring8"),
                                 student_sigmas=[80.0, 1.0])
    with pytest.raises(ValueError, match="num_noise_levels must be >= 1, got 0"):
        _module(levels=0)
    with pytest.raises(ValueError, match=r"control values must be in \[0, 8\), got \[0, 9\]"):
        NoiseControlAdapter([2], 8)(torch.zeros(2, 2), torch.zeros(2), torch.tensor([0, 9]))


def test_nct_teaches_the_generator_to_land_in_the_requested_mode(tmp_path):
    """ring8/nct.yaml at 150 batches. Measured, one seed: fraction in the requested mode 0.125 -> 0.788 (0.974 at
    300 batches, 26 s)."""
    from tests.toy_runs import build

    cli = build("experiments/toy/ring8/nct.yaml", "--data.init_args.batches_per_epoch=150",
                "--model.init_args.generator_lr_scheduler.init_args.T_max=150", root=str(tmp_path))
    module, datamodule = cli.model, cli.datamodule
    module.setup("fit")
    g = torch.Generator().manual_seed(11)
    z, requested = torch.randn(2000, 2, generator=g), torch.randint(0, 8, (2000,), generator=g)

    def accuracy():
        with torch.no_grad():
            return float((module.control(module.sample(z, requested, 1)) == requested).float().mean())

    before = accuracy()
    cli.trainer.fit(module, datamodule)
    after = accuracy()
    print(f"nct ring8: fraction in the requested mode {before:.3f} -> {after:.3f}")
    assert before < 0.2
    assert after > 0.6
