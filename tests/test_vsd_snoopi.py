"""VSD / SwiftBrush (LoRA critic) and SNOOPI (random-scale guidance on teacher and critic; NASA negative guidance).

* Gradients on the exact teacher: the student is an affine generator with a known Gaussian law (per class for the
  conditional cases), the LoRA critic is replaced by the exact denoiser of that law, and the method's gradient is
  compared with SwiftBrush's formula written out independently in epsilon space, w(t) (eps_T^w - eps_F^w) with
  w(t) = sigma_VP^2, using Tweedie denoisers from torch.distributions and CFG applied by hand.
* The LoRA critic: the teacher's output is bitwise unchanged by the critic (at construction and after critic updates),
  the critic starts equal to its base, only adapter weights are trainable, state-dict keys, checkpoints
  (weights_only=True) and the toy warm-start synchronisation.
* Memory: critic trainable bytes + optimizer state, LoRA vs DMD2's full copy, on the shipped MNIST teacher
  (``critic_memory_report``; ``.venv/bin/python -m tests.test_vsd_snoopi`` also prints peak RSS per method).
* NASA: identity at lambda = 0, changes only through cross-attention, matches attention computed by hand; the
  class-embedding analogue equals a network whose embedding rows were edited by hand.
* Convergence on ring8 (VSD unconditional; SNOOPI on ring8 with classes = pairs of opposite modes, so a class is
  bimodal and the per-class one-step start collapses onto the origin).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_modules import DMD2
from lightning_modules.diffusion import EDMSchedule, KarrasRampTime, VPDiscreteSchedule
from lightning_modules.methods.snoopi import SNOOPI, cross_attention_layers, negative_away_steering
from lightning_modules.methods.vsd import VSD
from lightning_modules.networks import (Denoiser, DiffusersUNetDenoiser, GaussianMixture, GaussianMixtureTeacher,
                                        ToyMLPDenoiser, get_toy_law)
from lightning_modules.networks.lora import LoRACritic
from tests.helpers import AffineGenerator, fix_randomness, independent_x0

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_TEACHER = os.path.join(ROOT, "assets", "mnist-teacher")
B = 64
UNET_CONFIG = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                   norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=11, attention_head_dim=4)
CONDITION_UNET_CONFIG = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                             layers_per_block=1, norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


# ====================================================================== exact-teacher gradients
class ConditionalAffineGenerator(Denoiser):
    """One-step generator x = m_y + A_y z: given the label its law is N(m_y, A_y A_y^T); unconditionally the mixture
    of those Gaussians with the label weights."""

    def __init__(self, means, matrices, schedule=None):
        super().__init__(schedule, prediction_type="x0")
        self.means = nn.Parameter(torch.as_tensor(means, dtype=torch.float64).clone())
        self.matrices = nn.Parameter(torch.as_tensor(matrices, dtype=torch.float64).clone())
        self.num_classes = self.means.shape[0]

    @property
    def data_shape(self):
        return (self.means.shape[1],)

    def predict(self, x_t, t, cond):
        _, sigma = self.schedule.alpha_sigma(t.double())
        z = x_t.double() / sigma[:, None]
        return self.means[cond] + torch.einsum("bde,be->bd", self.matrices[cond], z)

    def law(self, class_weights) -> GaussianMixture:
        A = self.matrices.detach()
        return GaussianMixture(class_weights, self.means.detach(), A @ A.transpose(1, 2),
                               component_classes=torch.arange(self.num_classes), name="student")


def _with_exact_networks(module, student, critic):
    """The test pattern of test_method_gradients: the student is an affine generator of known law and the critic the
    exact denoiser of that law (here replacing the LoRA critic the method built)."""
    module.student, module.critic = student, critic
    return module


def _class_law(law: GaussianMixture, label: int) -> GaussianMixture:
    keep = law.component_classes == label
    return GaussianMixture(law.weights[keep] / law.weights[keep].sum(), law.means[keep], law.covariances[keep])


def _swiftbrush_gradient(x_t, alpha, sigma, x0_real, x0_fake):
    """SwiftBrush's score gradient w(t) (eps_T - eps_F), w = sigma_VP^2, from x0 estimates (eps is scale-free in x_t,
    so a VE/EDM schedule's eps equals its variance-preserving counterpart's)."""
    eps_real = (x_t - alpha[:, None] * x0_real) / sigma[:, None]
    eps_fake = (x_t - alpha[:, None] * x0_fake) / sigma[:, None]
    sigma_vp_squared = sigma ** 2 / (alpha ** 2 + sigma ** 2)
    return sigma_vp_squared[:, None] * (eps_real - eps_fake)


def _fixed_draws(schedule, seed):
    t = KarrasRampTime(0.02, 0.98)(B, schedule, torch.Generator().manual_seed(seed))
    eps = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return t, eps


@pytest.mark.parametrize("schedule", [EDMSchedule(), VPDiscreteSchedule()], ids=["edm", "vp-discrete"])
def test_vsd_generator_gradient_is_swiftbrush_score_difference(schedule):
    torch.manual_seed(0)
    teacher = GaussianMixtureTeacher("aniso", schedule)
    module = VSD(teacher=teacher, student=ToyMLPDenoiser(2, hidden=8, depth=1))
    student = AffineGenerator([0.1, -0.2], [[0.5, 0.1], [-0.2, 0.4]], schedule)
    _with_exact_networks(module, student, GaussianMixtureTeacher(student.law(), schedule))
    noise = torch.randn(B, 2, dtype=torch.float64)
    t, eps = _fixed_draws(schedule, 1)
    fix_randomness(module, [t], [eps])
    module.generator_loss({"noise": noise})["loss"].backward()

    with torch.no_grad():
        x_g = student.mean + noise @ student.matrix.T
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x_g + sigma[:, None] * eps
    g = _swiftbrush_gradient(x_t, alpha, sigma, independent_x0(teacher.law, x_t, alpha, sigma),
                             independent_x0(student.law(), x_t, alpha, sigma))
    dloss_dx = g / (B * 2)                                    # d/dx of mean_b mean_d 1/2 (x - sg(x - g))^2
    assert torch.allclose(student.mean.grad, dloss_dx.sum(0), rtol=1e-6, atol=1e-12)
    assert torch.allclose(student.matrix.grad, dloss_dx.T @ noise, rtol=1e-6, atol=1e-12)
    assert dloss_dx.sum(0).norm() > 1e-4                      # informative: the student is far from the data law


def test_vsd_with_dmd_weighting_is_dmd2_gradient():
    """gradient_weighting='dmd' reproduces DMD2 exactly: VSD differs from DMD2 only by its weighting and critic."""
    schedule = EDMSchedule()
    grads = []
    for method, kwargs in [(DMD2, {}), (VSD, {"gradient_weighting": "dmd"})]:
        torch.manual_seed(0)
        module = method(teacher=GaussianMixtureTeacher("aniso", schedule), student=ToyMLPDenoiser(2, hidden=8, depth=1),
                        **kwargs)
        student = AffineGenerator([0.1, -0.2], [[0.5, 0.1], [-0.2, 0.4]], schedule)
        _with_exact_networks(module, student, GaussianMixtureTeacher(student.law(), schedule))
        fix_randomness(module, *[[v] for v in _fixed_draws(schedule, 1)])
        module.generator_loss({"noise": torch.randn(B, 2, dtype=torch.float64,
                                                    generator=torch.Generator().manual_seed(9))})["loss"].backward()
        grads.append(torch.cat([student.mean.grad, student.matrix.grad.flatten()]))
    assert torch.equal(grads[0], grads[1]) and grads[0].norm() > 1e-4


def _conditional_setup(method, **kwargs):
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)            # conditional: every mode is a class
    module = method(teacher=teacher, student=ToyMLPDenoiser(2, hidden=8, depth=1, num_classes=8), **kwargs)
    generator = torch.Generator().manual_seed(3)
    means = 0.3 * torch.randn(8, 2, dtype=torch.float64, generator=generator)
    matrices = 0.2 * torch.eye(2, dtype=torch.float64) + 0.05 * torch.randn(8, 2, 2, dtype=torch.float64,
                                                                             generator=generator)
    student = ConditionalAffineGenerator(means, matrices, schedule)
    class_weights = teacher.law.class_weights()
    _with_exact_networks(module, student, GaussianMixtureTeacher(student.law(class_weights), schedule))
    return module, teacher.law, student, student.law(class_weights)


def _independent_conditional_gradient(teacher_law, student, student_law, noise, labels, t, eps, scale, guide_critic):
    schedule = student.schedule
    with torch.no_grad():
        x_g = student.means[labels] + torch.einsum("bde,be->bd", student.matrices[labels], noise)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x_g + sigma[:, None] * eps
    real_u, fake_u = independent_x0(teacher_law, x_t, alpha, sigma), independent_x0(student_law, x_t, alpha, sigma)
    real_c, fake_c = torch.empty_like(x_t), torch.empty_like(x_t)
    for label in labels.unique().tolist():
        rows = labels == label
        real_c[rows] = independent_x0(_class_law(teacher_law, label), x_t[rows], alpha[rows], sigma[rows])
        fake_c[rows] = independent_x0(_class_law(student_law, label), x_t[rows], alpha[rows], sigma[rows])
    real = real_u + scale * (real_c - real_u)                       # CFG (Ho & Salimans 2022) by hand
    fake = fake_u + scale * (fake_c - fake_u) if guide_critic else fake_c
    dloss_dx = _swiftbrush_gradient(x_t, alpha, sigma, real, fake) / (noise.shape[0] * 2)
    mean_grad = torch.zeros_like(student.means).index_add_(0, labels, dloss_dx)
    matrix_grad = torch.zeros_like(student.matrices).index_add_(0, labels, dloss_dx[:, :, None] * noise[:, None, :])
    return mean_grad, matrix_grad


@pytest.mark.parametrize("case", ["snoopi-random-scale", "vsd-fixed-scale", "vsd-unguided-critic"])
def test_guided_generator_gradient_matches_cfg_on_teacher_and_exact_critic(case):
    if case == "snoopi-random-scale":
        module, law, student, student_law = _conditional_setup(SNOOPI, guidance_scale_range=(2.0, 8.0))
    else:
        module, law, student, student_law = _conditional_setup(
            VSD, guidance_scale=2.5, guide_critic=case == "vsd-fixed-scale")
    noise = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(B) % 8
    t, eps = _fixed_draws(module.schedule, 6)
    fix_randomness(module, [t], [eps])
    torch.manual_seed(11)
    out = module.generator_loss({"noise": noise, "cond": labels})
    out["loss"].backward()
    scale = float(out["guidance_scale"])
    if case == "snoopi-random-scale":
        assert 2.0 <= scale <= 8.0
        torch.manual_seed(12)
        assert module.sample_guidance_scale() != scale       # drawn anew for every step
    else:
        assert scale == 2.5
    guide_critic = case != "vsd-unguided-critic"
    mean_grad, matrix_grad = _independent_conditional_gradient(law, student, student_law, noise, labels, t, eps,
                                                               scale, guide_critic)
    assert torch.allclose(student.means.grad, mean_grad, rtol=1e-6, atol=1e-12)
    assert torch.allclose(student.matrices.grad, matrix_grad, rtol=1e-6, atol=1e-12)
    assert mean_grad.norm() > 1e-4
    # the critic's guidance is really in play: the other choice gives a clearly different gradient
    other, _ = _independent_conditional_gradient(law, student, student_law, noise, labels, t, eps, scale,
                                                 not guide_critic)
    assert (other - mean_grad).norm() > 0.05 * mean_grad.norm()


def test_critic_label_dropout_uses_the_null_label():
    module, *_ = _conditional_setup(VSD, critic_label_dropout=0.5)
    torch.manual_seed(0)
    labels = torch.arange(4000) % 8
    dropped = module.drop_labels(labels)
    null = dropped == 8
    assert 0.45 < null.float().mean() < 0.55 and torch.equal(dropped[~null], labels[~null])


# ====================================================================== the LoRA critic
def _unet_teacher(config=UNET_CONFIG, seed=0):
    torch.manual_seed(seed)
    return DiffusersUNetDenoiser(config=config, preconditioning="edm", schedule=EDMSchedule())


def _cross_attention_student(seed=0):
    """A tiny Stable-Diffusion-like one-step student: UNet2DConditionModel, epsilon prediction, DDPM schedule."""
    torch.manual_seed(seed)
    return DiffusersUNetDenoiser(config=CONDITION_UNET_CONFIG, unet_class="UNet2DConditionModel",
                                 prediction_type="epsilon", schedule=VPDiscreteSchedule())


def _network_teacher_case(kind, n=4, seed=1):
    """(teacher, (x, t, cond) inputs, condition factory for a batch): a class-conditional UNet2DModel with EDM
    preconditioning (the MNIST teacher's kind) or a cross-attention UNet2DConditionModel on the DDPM schedule."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    if kind == "unet2d-class":
        t = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=torch.float64)[:n]
        return _unet_teacher(), (x, t, torch.arange(n) % 10), lambda b: torch.arange(b) % 10
    t = torch.tensor([10.0, 200.0, 500.0, 900.0], dtype=torch.float64)[:n]
    states = lambda b: torch.randn(b, 3, 12, generator=torch.Generator().manual_seed(b))
    return _cross_attention_student(), (x, t, states(n)), states


def _critic_updates(module, condition, steps=3, lr=1e-2, batch_size=8):
    optimizer = torch.optim.Adam(module.critic_parameters(), lr=lr)
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 + step)
        batch = {"noise": torch.randn(batch_size, *module.teacher.data_shape, generator=generator),
                 "cond": condition(batch_size)}
        loss = module.critic_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("kind", ["unet2d-class", "unet2d-condition"])
def test_lora_critic_leaves_the_teacher_bitwise_unchanged_and_starts_equal_to_it(kind):
    teacher, (x, t, y), condition = _network_teacher_case(kind)
    with torch.no_grad():
        reference = teacher(x, t, y).clone()
    reference_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = VSD(teacher=teacher, lora_rank=2)
    with torch.no_grad():
        assert torch.equal(teacher(x, t, y), reference)              # after injection
        assert torch.equal(module.critic(x, t, y), reference)        # LoRA B = 0: F = T (SwiftBrush's start)
    _critic_updates(module, condition)
    with torch.no_grad():
        assert torch.equal(teacher(x, t, y), reference)              # after critic training steps
        moved = (module.critic(x, t, y) - reference).abs().max()
    assert moved > 1e-3                                              # the critic did learn something
    state = teacher.state_dict()
    assert list(state) == list(reference_state) and all(torch.equal(state[k], reference_state[k]) for k in state)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # the teacher's module tree holds no adapter outside the critic's forward, also after a failing forward
    with pytest.raises(Exception):
        module.critic(torch.randn(2, 3, 8, 8), t[:2], y[:2])
    assert not any("lora" in type(m).__module__ for m in teacher.modules())
    if kind == "unet2d-condition":   # attention, feed-forward and transformer projections are adapted too
        paths = [path for path, _ in module.critic.adapter_layers()]
        for suffix in ("attn2.to_k", "ff.net.2", "proj_in", "conv1"):
            assert any(p.endswith(suffix) for p in paths)


def test_lora_critic_trains_only_adapters_and_checkpoints_only_them():
    teacher = _unet_teacher()
    fresh_keys = list(_unet_teacher().state_dict())
    module = VSD(teacher=teacher, lora_rank=2)
    critic = module.critic
    assert isinstance(critic, LoRACritic) and critic.base_network is teacher and not critic.own_base
    adapters = {id(p) for p in critic.adapters.parameters()}
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert {id(p) for p in module.critic_parameters()} == adapters and not adapters & teacher_ids
    generator_optimizer, critic_optimizer = module.configure_optimizers()[0]
    assert {id(p) for group in critic_optimizer.param_groups for p in group["params"]} == adapters
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(module) == count(teacher) + count(module.student) + critic.adapter_parameter_count()
    state = module.state_dict()
    critic_keys = [k for k in state if k.startswith("critic.")]
    assert critic_keys and all(".lora_A." in k or ".lora_B." in k for k in critic_keys)
    assert [k[len("teacher."):] for k in state if k.startswith("teacher.")] == fresh_keys
    # every targeted layer kind is adapted: attention projections, ResNet convolutions, time-embedding projections
    paths = [path for path, _ in critic.adapter_layers()]
    for suffix in ("to_q", "to_v", "conv1", "time_emb_proj"):
        assert any(p.endswith(suffix) for p in paths)
    with pytest.raises(ValueError, match="overwrite the teacher"):
        critic.load_state_dict(teacher.state_dict())


def _toy_vsd(seed=0, **kwargs):
    torch.manual_seed(seed)
    return VSD(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student=ToyMLPDenoiser(2, hidden=32, depth=3),
               warm_start_steps=30, warm_start_batch_size=64, lora_rank=4, **kwargs)


def test_toy_lora_critic_base_is_a_frozen_copy_synchronised_after_warm_start():
    module = _toy_vsd()
    critic = module.critic
    assert module.critic_base == "student" and critic.own_base
    assert not {id(p) for p in critic.base.parameters()} & {id(p) for p in module.student.parameters()}
    module.setup("fit")                                      # warm start: regress the student, then copy it
    x, t = torch.randn(16, 2), torch.full((16,), 1.5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(critic(x, t), module.student(x, t))
    base_state = {k: v.clone() for k, v in critic.base.state_dict().items()}
    optimizer = torch.optim.Adam(module.critic_parameters(), lr=1e-2)
    for _ in range(3):
        loss = module.critic_loss({"noise": torch.randn(64, 2)})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, base_state[k]) for k, v in critic.base.state_dict().items())   # the base stays frozen
    with torch.no_grad():
        assert not torch.allclose(critic(x, t), module.student(x, t))


def test_toy_vsd_checkpoint_loads_with_weights_only_and_resumes(tmp_path):
    from lightning.pytorch import Trainer

    from callbacks import TwoTimeScaleUpdate
    from datamodules import ToyMixtureDataModule

    def trainer(steps):
        return Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                       callbacks=[TwoTimeScaleUpdate(2)], default_root_dir=str(tmp_path))

    datamodule = ToyMixtureDataModule("ring8", batch_size=32, batches_per_epoch=20)
    module = _toy_vsd()
    fit = trainer(6)
    fit.fit(module, datamodule)
    path = str(tmp_path / "vsd.ckpt")
    fit.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    keys = checkpoint["state_dict"].keys()
    assert any(k.startswith("critic.base.") for k in keys) and any(".lora_B.critic." in k for k in keys)
    restored = _toy_vsd(seed=1)
    restored.load_state_dict(checkpoint["state_dict"])
    x, t = torch.randn(16, 2), torch.full((16,), 0.7, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(restored.critic(x, t), module.critic(x, t))
        assert torch.equal(restored.student(x, t), module.student(x, t))
    trainer(10).fit(_toy_vsd(seed=2), datamodule, ckpt_path=path)     # Lightning's own (weights_only) restore


def test_bad_config_values_raise_value_errors_naming_them():
    teacher = GaussianMixtureTeacher("ring8", EDMSchedule())
    student = lambda: ToyMLPDenoiser(2, hidden=8, depth=1, num_classes=8)
    for kwargs, match in [({"critic_base": "copy"}, "copy"), ({"gradient_weighting": "sds"}, "sds"),
                          ({"critic_label_dropout": 1.5}, "1.5"), ({"lora_rank": 0}, "rank"),
                          ({"critic_base": "teacher"}, "no weights|none"), ({"gan_critic_weight": 0.1}, "0.1"),
                          ({"critic": student()}, "critic_base")]:
        with pytest.raises(ValueError, match=match):
            VSD(teacher=teacher, student=student(), **kwargs)
    for kwargs, match in [({"guidance_scale": 3.0}, "3.0"), ({"guidance_scale_range": (5.0, 2.0)}, "5.0"),
                          ({"guide_critic": False}, "guide_critic")]:
        with pytest.raises(ValueError, match=match):
            SNOOPI(teacher=teacher, student=student(), **kwargs)
    with pytest.raises(ValueError, match="conditional teacher"):
        SNOOPI(teacher=_unet_teacher(dict(UNET_CONFIG, num_class_embeds=None)), lora_rank=2)
    with pytest.raises(ValueError, match="cond"):
        SNOOPI(teacher=teacher, student=student()).generator_loss({"noise": torch.randn(4, 2)})


# ====================================================================== memory: LoRA critic vs full copy
def _mnist_teacher():
    return DiffusersUNetDenoiser(pretrained_path=MNIST_TEACHER, subfolder="unet", preconditioning="edm",
                                 schedule=EDMSchedule())


def build_mnist_module(method: str, lora_rank: int = 4):
    """DMD2 (a full trainable critic copy) or VSD (a rank-``lora_rank`` LoRA on the teacher), shipped MNIST teacher."""
    if method == "dmd2":
        return DMD2(teacher=_mnist_teacher())
    return VSD(teacher=_mnist_teacher(), lora_rank=lora_rank, lora_alpha=lora_rank)


def critic_memory_report(module, batch_size: int = 8) -> dict[str, int]:
    """Bytes of the critic's trainable parameters and of its Adam state after one critic update, and of all the
    module's parameters (teacher, student and critic counted once each)."""
    params = module.critic_parameters()
    optimizer = torch.optim.Adam(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch = {"noise": torch.randn(batch_size, *module.teacher.data_shape, generator=generator),
             "cond": torch.arange(batch_size) % 10}
    module.critic_loss(batch)["loss"].backward()
    optimizer.step()
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"critic_trainable_bytes": nbytes(params), "critic_optimizer_state_bytes": nbytes(state),
            "module_parameter_bytes": nbytes(module.parameters())}


def _peak_rss_of_one_training_step(method: str) -> int:
    """Peak resident memory (KiB, ru_maxrss) of a fresh process that builds ``method`` on the MNIST teacher and takes
    one critic and one generator step with Adam."""
    code = ("import resource, sys, torch; sys.path.insert(0, %r); torch.set_num_threads(1);"
            "from tests.test_vsd_snoopi import build_mnist_module, critic_memory_report;"
            "m = build_mnist_module(%r); critic_memory_report(m);"
            "opt = torch.optim.Adam(m.generator_parameters(), lr=1e-4);"
            "m.generator_loss({'noise': torch.randn(8, 1, 28, 28), 'cond': torch.arange(8)})['loss'].backward();"
            "opt.step(); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)") % (ROOT, method)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return int(out.stdout.strip().splitlines()[-1])


def memory_benchmark(with_rss: bool = True) -> dict[str, dict[str, int]]:
    """The comparison printed by ``python -m tests.test_vsd_snoopi``: bytes per method and, optionally, peak RSS."""
    results = {}
    for method in ("dmd2", "vsd"):
        torch.manual_seed(0)
        results[method] = critic_memory_report(build_mnist_module(method))
        if with_rss:
            results[method]["peak_rss_kib"] = _peak_rss_of_one_training_step(method)
    return results


@pytest.mark.skipif(not os.path.isdir(MNIST_TEACHER), reason="the shipped MNIST teacher is missing (make teacher)")
def test_lora_critic_trainable_and_optimizer_bytes_are_a_small_fraction_of_a_full_copy():
    report = memory_benchmark(with_rss=False)
    full = report["dmd2"]["critic_trainable_bytes"] + report["dmd2"]["critic_optimizer_state_bytes"]
    lora = report["vsd"]["critic_trainable_bytes"] + report["vsd"]["critic_optimizer_state_bytes"]
    teacher_bytes = sum(p.numel() * p.element_size() for p in _mnist_teacher().parameters())
    print(f"critic params + Adam state: full copy {full / 2**20:.2f} MiB, LoRA {lora / 2**20:.2f} MiB "
          f"({lora / full:.1%}); module parameters {report['dmd2']['module_parameter_bytes'] / 2**20:.2f} vs "
          f"{report['vsd']['module_parameter_bytes'] / 2**20:.2f} MiB")
    assert report["dmd2"]["critic_trainable_bytes"] == teacher_bytes       # DMD2's critic is a full copy
    assert report["dmd2"]["critic_optimizer_state_bytes"] >= 2 * teacher_bytes
    assert lora < 0.15 * full
    # the module holds the teacher once: VSD's parameters are teacher + student + adapters, one network less than DMD2
    assert report["vsd"]["module_parameter_bytes"] == 2 * teacher_bytes + report["vsd"]["critic_trainable_bytes"]
    assert report["dmd2"]["module_parameter_bytes"] == 3 * teacher_bytes


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(MNIST_TEACHER), reason="the shipped MNIST teacher is missing (make teacher)")
def test_peak_rss_report_runs():
    """Peak RSS is reported, not asserted: with a 0.27M-parameter teacher the saving (about 3 MiB) is below the noise
    of a process that imports torch and diffusers."""
    report = memory_benchmark(with_rss=True)
    print(report)
    assert all(r["peak_rss_kib"] > 0 for r in report.values())


# ====================================================================== NASA
def _record_outputs(network, run):
    """(module name, output) in the order modules finish, for every module except the insides of cross-attention
    layers (NASA calls their key / value projections once more, for the negative condition)."""
    cross = [name for name, _ in cross_attention_layers(network)]

    def record(module, inputs, output, name):
        output = output[0] if isinstance(output, tuple) else output
        records.append((name, output.detach().clone() if torch.is_tensor(output) else None))

    records = []
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: record(mod, i, o, name))
               for name, m in network.named_modules() if not any(name.startswith(c + ".") for c in cross)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return records


def test_nasa_on_cross_attention_is_identity_at_zero_and_acts_only_through_cross_attention():
    student = _cross_attention_student()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([999.0, 999.0])
    positive, negative = torch.randn(2, 3, 12), torch.randn(2, 5, 12)
    processors = {name: attn.processor for name, attn in cross_attention_layers(student.unet)}
    assert processors                                                      # the tiny UNet has cross-attention
    with torch.no_grad():
        plain = student(x, t, positive)
        with negative_away_steering(student, negative, 0.0):
            at_zero = student(x, t, positive)
        with negative_away_steering(student, negative, 1.0):
            steered = student(x, t, positive)
    assert torch.equal(at_zero, plain)
    assert (steered - plain).abs().max() > 1e-4
    assert {name: attn.processor for name, attn in cross_attention_layers(student.unet)} == processors  # restored
    # the first module whose output changes (in execution order) is a cross-attention layer
    before = _record_outputs(student.unet, lambda: student(x, t, positive))
    with negative_away_steering(student, negative, 1.0):
        after = _record_outputs(student.unet, lambda: student(x, t, positive))
    assert [name for name, _ in before] == [name for name, _ in after]
    first = next(i for i, ((_, a), (_, b)) in enumerate(zip(before, after))
                 if a is not None and not torch.equal(a, b))
    cross = {name for name, _ in cross_attention_layers(student.unet)}
    assert before[first][0] in cross
    self_attention = [n for n, _ in before[:first] if n.endswith("attn1")]
    assert self_attention                                  # a self-attention layer ran first and was left unchanged


def test_nasa_cross_attention_output_matches_attention_by_hand():
    student = _cross_attention_student()
    name, attn = cross_attention_layers(student.unet)[0]
    captured = {}
    pre = attn.register_forward_pre_hook(lambda m, args, kwargs: captured.update(h=args[0] if args else
                                         kwargs["hidden_states"], context=kwargs["encoder_hidden_states"]),
                                         with_kwargs=True)
    post = attn.register_forward_hook(lambda m, i, o: captured.update(out=o))
    positive, negative, scale = torch.randn(2, 3, 12), torch.randn(2, 5, 12), 0.7
    with torch.no_grad(), negative_away_steering(student, negative, scale):
        student(torch.randn(2, 1, 8, 8), torch.tensor([500.0, 20.0]), positive)
    pre.remove()
    post.remove()

    def attention(query_states, context):
        q, k, v = attn.to_q(query_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, -1).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return (weights @ v).transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])

    with torch.no_grad():
        assert torch.equal(captured["context"], positive)
        z = attention(captured["h"], positive) - scale * attention(captured["h"], negative)
        expected = attn.to_out[0](z)
    assert torch.allclose(captured["out"], expected, atol=1e-5)


def _edited_embedding_copy(network, embedding_path, labels, negative, scale):
    """A copy of ``network`` whose class-embedding rows e(y_i) were replaced by e(y_i) - scale e(neg_i) by hand."""
    edited = copy.deepcopy(network)
    embedding = edited.get_submodule(embedding_path)
    with torch.no_grad():
        rows = embedding.weight[labels] - scale * embedding.weight[negative]
        embedding.weight[labels] = rows
    return edited


@pytest.mark.parametrize("network_kind", ["unet2d-class-embedding", "toy-mlp"])
def test_nasa_on_class_embeddings_subtracts_the_negative_embedding(network_kind):
    torch.manual_seed(0)
    if network_kind == "toy-mlp":
        network = ToyMLPDenoiser(2, hidden=16, depth=2, num_classes=8, schedule=EDMSchedule())
        x, path = torch.randn(4, 2), "class_embedding"
    else:
        network = _unet_teacher()
        x, path = torch.randn(4, 1, 8, 8), "unet.class_embedding"
    t = torch.full((4,), 80.0, dtype=torch.float64)
    labels, negative, scale = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6, 7, 4]), 0.8
    with torch.no_grad():
        plain = network(x, t, labels)
        with negative_away_steering(network, negative, 0.0):
            at_zero = network(x, t, labels)
        with negative_away_steering(network, negative, scale):
            steered = network(x, t, labels)
        by_hand = _edited_embedding_copy(network, path, labels, negative, scale)(x, t, labels)
    assert torch.equal(at_zero, plain)
    assert torch.equal(steered, by_hand) and not torch.allclose(steered, plain)
    assert not network.get_submodule(path)._forward_hooks                     # the hook is gone afterwards


def test_snoopi_sample_with_negative_condition():
    torch.manual_seed(0)
    module = SNOOPI(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()),
                    student=ToyMLPDenoiser(2, hidden=16, depth=2, num_classes=8), lora_rank=2)
    noise, labels = torch.randn(8, 2), torch.arange(8)
    opposite = (labels + 4) % 8
    plain = module.sample(noise, labels)
    assert torch.equal(module.sample(noise, labels, negative_cond=opposite, negative_scale=0.0), plain)
    steered = module.sample(noise, labels, negative_cond=opposite, negative_scale=0.5)
    assert not torch.allclose(steered, plain)
    with pytest.raises(ValueError, match="-1"):
        module.sample(noise, labels, negative_cond=opposite, negative_scale=-1.0)


# ====================================================================== convergence on ring8
def paired_ring8() -> GaussianMixture:
    """ring8 with 4 classes, each the pair of opposite modes: every class is bimodal and its mean is the origin."""
    ring = get_toy_law("ring8")
    return GaussianMixture(ring.weights, ring.means, ring.covariances, component_classes=[0, 1, 2, 3] * 2,
                           name="ring8-paired")


def fit_conditional_ring(method_cls, batches: int, **kwargs):
    """(metrics after warm start, after fit, seconds) of a one-step student on the paired ring: the toy configs'
    settings (MLP 256 x 4, LoRA rank 16, Adam 1e-4, TTUR 5:1, cosine decay, EMA 0.99), data-free batches of noise
    and labels."""
    import time

    from lightning.pytorch import Trainer, seed_everything

    from callbacks import GroundTruthMetrics, StudentEMA, TwoTimeScaleUpdate
    from datamodules.noise import NoiseDataModule

    seed_everything(0)
    law = paired_ring8()
    adam = lambda params: torch.optim.Adam(params, lr=1e-4, betas=(0.0, 0.99))
    module = method_cls(teacher=GaussianMixtureTeacher(law, EDMSchedule()),
                        student=ToyMLPDenoiser(2, hidden=256, depth=4, num_classes=4, sigma_data=0.5),
                        warm_start_steps=1000,
                        lora_rank=16, lora_alpha=16, generator_optimizer=adam, critic_optimizer=adam,
                        generator_lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 800),
                        critic_lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 4000), **kwargs)
    datamodule = NoiseDataModule(shape=[2], batch_size=256, batches_per_epoch=batches, num_classes=4,
                                 class_weights=law.class_weights().tolist())
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[TwoTimeScaleUpdate(5), StudentEMA(0.99)])
    module.setup("fit")
    metric = GroundTruthMetrics(num_samples=3000, nfe=[1], num_floor_sets=1, verbose=False)
    before = metric.evaluate(module, law)[1]
    start = time.time()
    trainer.fit(module, datamodule)
    seconds = time.time() - start
    return before, metric.evaluate(module, law)[1], seconds


def _report(name, before, after, seconds):
    print(f"{name}: sliced W2 {before['sliced_w2']:.4f} -> {after['sliced_w2']:.4f} (floor "
          f"{after['sliced_w2_floor']:.4f}), TV {after['mode_weight_tv']:.4f}, modes {after['modes_covered']:.0f}, "
          f"{seconds:.1f}s")


def test_vsd_converges_on_ring(tmp_path):
    from tests.toy_runs import fit_and_measure

    before, after, seconds = fit_and_measure("experiments/toy/ring8/vsd.yaml",
                                             "--data.init_args.batches_per_epoch=1500",
                                             "--model.init_args.warm_start_steps=1000", root=str(tmp_path))
    _report("vsd", before, after, seconds)
    assert after["sliced_w2"] * 6.0 < before["sliced_w2"]                  # measured: 0.686 -> 0.073 (9.4x)
    assert after["sliced_w2"] < 3.5 * after["sliced_w2_floor"]             # measured: 2.4x the floor
    assert after["modes_covered"] == 8 and after["mode_weight_tv"] < 0.06


def test_snoopi_converges_on_ring_with_bimodal_classes():
    """Random guidance in [2, 8] on the teacher and the LoRA critic; each class (a pair of opposite modes) starts
    collapsed at the origin and must split into its two modes."""
    before, after, seconds = fit_conditional_ring(SNOOPI, 1500, guidance_scale_range=(2.0, 8.0))
    _report("snoopi", before, after, seconds)
    assert after["sliced_w2"] * 3.5 < before["sliced_w2"]                  # measured: 0.682 -> 0.141 (4.8x)
    assert after["sliced_w2"] < 6.0 * after["sliced_w2_floor"]             # measured: 4.6x the floor
    assert after["modes_covered"] == 8 and after["mode_weight_tv"] < 0.1


if __name__ == "__main__":
    torch.set_num_threads(1)
    for method, numbers in memory_benchmark(with_rss=True).items():
        mib = {k.replace("_bytes", "").replace("_kib", ""): v / (2 ** 20 if k.endswith("bytes") else 1024)
               for k, v in numbers.items()}
        print(method, {k: f"{v:.2f} MiB" for k, v in mib.items()})


# ====================================================================== exact resume
def test_snoopi_resume_from_checkpoint_matches_uninterrupted_fit(tmp_path):
    """Stopping and resuming reproduces an uninterrupted fit: the LoRA adapters, the owned frozen base, the student and
    EMA, and the random draws (guidance scale, label dropout) all come back (the pattern of
    test_distributed_and_resume.py, on SNOOPI, which runs every VSD code path plus its own draws)."""
    from tests.test_distributed_and_resume import QUIET as RESUME_QUIET, assert_same_tensors, fit_straight_and_resumed

    config = ["-c", "experiments/toy/ring8/snoopi.yaml", *RESUME_QUIET, "--data.init_args.batches_per_epoch=7"]
    straight, first, resumed = fit_straight_and_resumed(tmp_path, config)
    assert resumed["global_step"] == straight["global_step"] > first["global_step"]
    assert_same_tensors(straight["module"], resumed["module"], atol=1e-6)
    assert_same_tensors(straight["callbacks"]["StudentEMA"]["average"], resumed["callbacks"]["StudentEMA"]["average"],
                        atol=1e-6)
    adapters = [k for k in straight["module"] if ".lora_B." in k]
    assert adapters and any(not torch.equal(first["module"][k], straight["module"][k]) for k in adapters)
