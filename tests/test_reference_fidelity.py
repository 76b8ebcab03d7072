"""Reference-fidelity defaults (issue 15), each pinned against the authors' released code:

(a) every method on the shared critic mechanism evaluates the critic (and its discriminator head) in eval mode inside
    the generator step and restores every submodule's mode afterwards; the critic step still trains in train mode
    (SiD's and Diff-Instruct's training loops; DMD2's fake unet has no dropout);
(c) DMD2 on discrete VP teachers: generator timesteps uniform on {20..980}, critic timesteps uniform on {0..999} with
    the unweighted epsilon-MSE (DMD2's main/sd_guidance.py);
(f) DMD2 on EDM teachers: generator on the Karras ramp [0.02, 0.98], critic on the whole ramp with EDM's weighting
    (DMD2's main/edm/edm_guidance.py: compute_loss_fake draws randint(0, num_train_timesteps));
(d) f-distill / Uni-Instruct ratio bins: equal slices of native time, i.e. of sigma on EDM (NVlabs FastGen's
    FdistillModel), with the Karras-ramp slices behind ratio_bin_spacing="karras_ramp";
clipping: SiD, SiDA and Diff-Instruct default to no gradient clipping (their releases clip nothing), the rest to 10;
(b) consistency distillation's target network: theta- starts as theta and every update, the first included, is an
    EMA step (Song et al. 2023, Alg. 2; openai/consistency_models' target-model update), not a copy;
(e) a consistency student whose parameterisation breaks f(x, t_min) = x is warned about by name when built.
"""
from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch

from lightning_modules import METHODS, DMD2, DiffInstruct, SiD
from lightning_modules.diffusion import (DiscreteUniformTime, EDMSchedule, KarrasRampTime, UniformTime,
                                         VPDiscreteSchedule)
from lightning_modules.losses import dsm_weight
from lightning_modules.methods import DMD, SFD, SIM, VSD, FDistill, SiDA, UniInstruct
from lightning_modules.methods.density_ratio import TimeBinnedRatioNormalizer
from lightning_modules.methods.score_distillation import ScoreDistillationModule
from lightning_modules.networks import DiscriminatorHead, GaussianMixtureTeacher, ToyMLPDenoiser

B = 16


# ======================================================================== (a) the critic's mode in the generator step
def _dropout_critic(schedule, num_classes=0):
    return ToyMLPDenoiser(2, hidden=16, depth=3, dropout=0.5, num_classes=num_classes, schedule=schedule)


def _method(name):
    """A toy module of each method with a dropout critic (and discriminator head where the method has one)."""
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    student = ToyMLPDenoiser(2, hidden=16, depth=2)
    common = dict(teacher=teacher, student=student)
    if name == "dmd2_gan":
        return DMD2(**common, critic=_dropout_critic(schedule), discriminator=DiscriminatorHead(16),
                    gan_generator_weight=0.5, gan_critic_weight=0.1)
    if name == "dmd":
        return DMD(**common, critic=_dropout_critic(schedule), regression_weight=0.0)
    if name == "diff_instruct":
        return DiffInstruct(**common, critic=_dropout_critic(schedule))
    if name == "sid":
        return SiD(**common, critic=_dropout_critic(schedule))
    if name == "sim":
        return SIM(**common, critic=_dropout_critic(schedule))
    if name == "sida":
        return SiDA(**common, critic=_dropout_critic(schedule), discriminator=DiscriminatorHead(16),
                    gan_generator_weight=0.5)
    if name == "fdistill":
        return FDistill(**common, critic=_dropout_critic(schedule), discriminator=DiscriminatorHead(16))
    if name == "uni_instruct":
        return UniInstruct(**common, critic=_dropout_critic(schedule), discriminator=DiscriminatorHead(16))
    if name == "sfd":
        student = ToyMLPDenoiser(2, hidden=16, depth=2, num_classes=8)
        return SFD(teacher=teacher, student=student, critic=_dropout_critic(schedule, num_classes=8),
                   forget_classes=[0])
    if name == "vsd":
        module = VSD(teacher=teacher, student=ToyMLPDenoiser(2, hidden=16, depth=3), lora_rank=4, lora_dropout=0.5)
        with torch.no_grad():  # LoRA's B starts at 0, where adapter dropout has no effect: move the adapters
            for p in module.critic_parameters():
                p.add_(0.3 * torch.randn_like(p))
        return module
    raise KeyError(name)


MODE_METHODS = ["dmd2_gan", "dmd", "diff_instruct", "sid", "sim", "sida", "fdistill", "uni_instruct", "sfd", "vsd"]


def _batch(module, seed=1):
    generator = torch.Generator().manual_seed(seed)
    batch = {"noise": torch.randn(B, 2, generator=generator),
             "real": module.teacher.law.sample(B, generator)[0].float()}
    if isinstance(module, SFD):
        batch["cond"] = torch.arange(B) % 8
    return batch


def _loss(module, batch, seed=7):
    """The generator loss at a fixed seed, the module's state (f-distill's ratio-bin EMAs) put back afterwards."""
    state = {k: v.clone() for k, v in module.state_dict().items()}
    torch.manual_seed(seed)
    loss = module.generator_loss(batch)["loss"].detach()
    module.load_state_dict(state)
    return loss


def _networks(module):
    return [n for n in (module.critic, module.discriminator) if n is not None]


@pytest.mark.parametrize("name", MODE_METHODS)
def test_generator_step_evaluates_the_critic_in_eval_mode(name):
    module = _method(name)
    module.train()
    batch = _batch(module)
    seen = []
    handles = [m.register_forward_pre_hook(lambda mod, _: seen.append(mod.training))
               for n in _networks(module) for m in n.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Linear))]
    modes_before = [m.training for n in _networks(module) for m in n.modules()]
    loss = _loss(module, batch)
    assert seen and not any(seen)                              # every critic / head layer ran in eval mode
    assert [m.training for n in _networks(module) for m in n.modules()] == modes_before   # and got its mode back
    assert module.critic.training
    for handle in handles:
        handle.remove()

    # the same step with the critic put in eval mode by hand: the same number; and with the critic left in train
    # mode (the mechanism switched off) dropout changes it -- so the equality above is not vacuous
    assert torch.equal(_loss(module, batch), loss)             # deterministic given the seed
    for network in _networks(module):
        network.eval()
    assert torch.equal(_loss(module, batch), loss)
    module.train()
    module.critic_in_eval_mode = contextlib.nullcontext
    train_mode = _loss(module, batch)
    assert torch.isfinite(train_mode) and not torch.allclose(train_mode, loss, rtol=1e-4, atol=0.0), name


def test_critic_step_still_trains_the_critic_in_train_mode():
    module = _method("dmd2_gan")
    module.train()
    batch = _batch(module)
    seen = []
    handle = module.critic.body[1].register_forward_pre_hook(lambda mod, _: seen.append(mod.training))

    def critic_loss(seed=3):
        torch.manual_seed(seed)
        return module.critic_loss(batch)["loss"].detach()

    train_mode = critic_loss()
    assert seen and all(seen)
    module.critic.eval()
    eval_mode = critic_loss()
    module.train()
    handle.remove()
    assert not torch.allclose(train_mode, eval_mode, rtol=1e-4, atol=0.0)  # dropout was active in the critic step
    assert torch.equal(critic_loss(), train_mode)


def test_every_critic_method_wraps_its_generator_loss():
    """Each registered method on the shared critic mechanism (and a new subclass) gets the eval-mode generator step."""
    critic_methods = [cls for cls in METHODS.values() if issubclass(cls, ScoreDistillationModule)]
    assert len(critic_methods) >= 12
    for cls in critic_methods:
        assert getattr(cls.generator_loss, "runs_critic_in_eval_mode", False), cls.__name__

    class Custom(DMD2):
        def generator_loss(self, batch):
            return {"loss": self.critic(batch["noise"], torch.full((len(batch["noise"]),), 1.0)).sum(),
                    "training": torch.tensor(self.critic.training)}

    module = Custom(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student=ToyMLPDenoiser(2, 8, 2))
    module.train()
    assert not bool(module.generator_loss({"noise": torch.randn(2, 2)})["training"]) and module.critic.training


# ============================================================================ (c) DMD2 on discrete VP teachers
def _ramp(schedule, t):
    """The Karras ramp coordinate u of native times t (0 at sigma_max, 1 at sigma_min, rho 7)."""
    s = schedule.edm_sigma(t.double()) ** (1 / 7)
    top = schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=torch.float64)) ** (1 / 7)
    bottom = schedule.edm_sigma(torch.tensor(schedule.t_min, dtype=torch.float64)) ** (1 / 7)
    return (s - top) / (bottom - top)


def test_discrete_uniform_time_draws_every_timestep_of_the_range_equally():
    schedule = VPDiscreteSchedule()
    n = 400_000
    for (lo, hi), (first, last) in [((0.02, 0.98), (20, 980)), ((0.0, 1.0), (0, 999))]:
        t = DiscreteUniformTime(lo, hi)(n, schedule, torch.Generator().manual_seed(0))
        assert t.dtype == torch.float64 and torch.equal(t, t.round())
        assert (int(t.min()), int(t.max())) == (first, last)
        counts = torch.bincount(t.long() - first, minlength=last - first + 1).double()
        assert len(counts) == last - first + 1 and (counts > 0).all()
        expected = n / len(counts)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        dof = len(counts) - 1
        assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), chi2        # uniform over the integers of the range
    # the rounded continuous draw it replaces gives its end points about half the mass
    rounded = UniformTime(0.0, 1.0)(n, schedule, torch.Generator().manual_seed(0))
    assert (rounded == 0).double().mean() < 0.7 / 1000
    with pytest.raises(ValueError, match="discrete-time schedule; EDMSchedule"):
        DiscreteUniformTime()(4, EDMSchedule())


def test_dmd2_defaults_on_a_vp_discrete_teacher_are_the_sd_release():
    schedule = VPDiscreteSchedule()
    module = DMD2(teacher=GaussianMixtureTeacher("ring8", schedule), student=ToyMLPDenoiser(2, 8, 2))
    assert module.critic_weighting == "epsilon"
    generator = module.generator_time_sampler(100_000, schedule, torch.Generator().manual_seed(1))
    critic = module.critic_time_sampler(100_000, schedule, torch.Generator().manual_seed(2))
    assert (generator.min().item(), generator.max().item()) == (20.0, 980.0)
    assert (critic.min().item(), critic.max().item()) == (0.0, 999.0)
    assert abs(generator.mean().item() - 500.0) < 3 and abs(critic.mean().item() - 499.5) < 3
    # the previous default, the Karras ramp on the EDM noise level, leaves [20, 980] and is not uniform in timesteps
    karras = KarrasRampTime(0.02, 0.98)(100_000, schedule, torch.Generator().manual_seed(1))
    assert karras.min() < 20 and karras.max() > 980 and abs(karras.mean().item() - 500) > 30
    # config values still win
    explicit = DMD2(teacher=GaussianMixtureTeacher("ring8", schedule), student=ToyMLPDenoiser(2, 8, 2),
                    critic_time_sampler=KarrasRampTime(0.1, 0.9), critic_weighting="edm",
                    generator_time_sampler=UniformTime())
    assert explicit.critic_weighting == "edm" and isinstance(explicit.critic_time_sampler, KarrasRampTime)
    assert isinstance(explicit.generator_time_sampler, UniformTime)


def test_dmd2_critic_loss_on_a_latent_teacher_is_the_unweighted_epsilon_mse(tmp_path):
    from lightning_modules.pipelines import LatentTeacher
    from tests.tiny_pipelines import random_condition, save_tiny_sd15

    torch.manual_seed(0)
    module = DMD2(teacher=LatentTeacher(save_tiny_sd15(str(tmp_path / "sd15"))))
    assert module.critic_weighting == "epsilon" and isinstance(module.critic_time_sampler, DiscreteUniformTime)
    cond = random_condition(4)
    x_g = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noises = []

    def noise_like(x):
        noises.append(torch.randn_like(x))
        return noises[-1]

    module.noise_like = noise_like
    module.sample_times = lambda sampler, n: torch.tensor([0.0, 20.0, 500.0, 999.0], dtype=torch.float64)
    loss, x_t, t = module.critic_denoising_loss(x_g, cond)
    # independent: the critic UNet's raw epsilon output against the drawn noise, mean over C, H, W (DMD2's loss_fake)
    eps = noises[0]
    with torch.no_grad():
        eps_pred = module.critic.unet(x_t, t.float(), encoder_hidden_states=cond.embeds).sample
    expected = ((eps_pred.double() - eps.double()) ** 2).flatten(1).mean(1)
    assert torch.allclose(loss.detach().double(), expected, rtol=1e-4, atol=1e-6), (loss, expected)
    # EDM's weighting of the same x0 errors would be a different loss (by a factor (1 + s^2 / sd^2) per sample)
    edm = expected * dsm_weight(module.schedule, t, "edm") / dsm_weight(module.schedule, t, "epsilon")
    assert not torch.allclose(edm, expected, rtol=1e-2)


# ============================================================================ (f) DMD2 on EDM teachers
def test_dmd2_defaults_on_an_edm_teacher_are_the_imagenet_release():
    schedule = EDMSchedule()
    module = DMD2(teacher=GaussianMixtureTeacher("ring8", schedule), student=ToyMLPDenoiser(2, 8, 2))
    assert module.critic_weighting == "edm"
    generator = _ramp(schedule, module.generator_time_sampler(100_000, schedule, torch.Generator().manual_seed(1)))
    critic = _ramp(schedule, module.critic_time_sampler(100_000, schedule, torch.Generator().manual_seed(2)))
    # generator: index uniform in [20, 980] of the 1000-point Karras grid; critic: the whole grid
    assert 0.02 - 1e-9 <= generator.min() < 0.021 and 0.979 < generator.max() <= 0.98 + 1e-9
    assert critic.min() < 1e-3 and critic.max() > 1 - 1e-3
    for u in (generator, critic):
        assert abs(u.mean().item() - 0.5) < 0.005
    assert abs((critic < 0.02).double().mean().item() - 0.02) < 0.003   # the 2% tails the generator never sees
    assert abs((critic > 0.98).double().mean().item() - 0.02) < 0.003
    # the family members that kept their own draws
    di = DiffInstruct(teacher=GaussianMixtureTeacher("ring8", VPDiscreteSchedule()), student=ToyMLPDenoiser(2, 8, 2))
    assert di.critic_weighting == "edm"
    assert SiD(teacher=GaussianMixtureTeacher("ring8", VPDiscreteSchedule()),
               student=ToyMLPDenoiser(2, 8, 2)).critic_weighting == "edm"


# ============================================================================ (d) f-distill's ratio bins
def test_ratio_bins_are_equal_slices_of_sigma_on_edm_by_default():
    schedule = EDMSchedule()
    normaliser = TimeBinnedRatioNormalizer(schedule)
    assert normaliser.spacing == "time"
    edges = normaliser.bin_edges()
    assert torch.allclose(edges, torch.tensor([0.002 + i * (80 - 0.002) / 10 for i in range(11)],
                                              dtype=torch.float64))
    assert abs(edges[1].item() - 8.0018) < 1e-12
    sigma = torch.tensor([0.002, 1.0, 8.0017, 8.0019, 40.0, 79.9, 80.0], dtype=torch.float64)
    assert normaliser.bin_index(sigma).tolist() == [0, 0, 0, 1, 4, 9, 9]
    # the Karras-ramp slices behind the option: bin 0 at sigma_max, the edges are Karras sigmas
    ramp = TimeBinnedRatioNormalizer(schedule, spacing="karras_ramp")
    inv = 1 / 7
    expected = torch.tensor([(80 ** inv + i / 10 * (0.002 ** inv - 80 ** inv)) ** 7 for i in range(11)],
                            dtype=torch.float64)
    assert torch.allclose(ramp.bin_edges(), expected)
    assert ramp.bin_index(sigma).tolist() == [9, 5, 3, 3, 1, 0, 0]
    # on a discrete VP teacher: equal slices of the timestep range (FastGen's t in [0, 0.999] is timestep / 1000)
    vp = TimeBinnedRatioNormalizer(VPDiscreteSchedule())
    assert torch.allclose(vp.bin_edges(), torch.linspace(0, 999, 11, dtype=torch.float64))
    assert vp.bin_index(torch.tensor([0.0, 99.0, 100.0, 998.0, 999.0])).tolist() == [0, 0, 1, 9, 9]
    with pytest.raises(ValueError, match="'sigma'"):
        TimeBinnedRatioNormalizer(schedule, spacing="sigma")


@pytest.mark.parametrize("method_cls", [FDistill, UniInstruct])
def test_methods_bin_the_generator_times_by_sigma(method_cls):
    schedule = EDMSchedule()
    kwargs = dict(teacher=GaussianMixtureTeacher("ring8", schedule), student=ToyMLPDenoiser(2, 16, 2),
                  discriminator=DiscriminatorHead(16))
    module = method_cls(**kwargs)
    old = method_cls(**kwargs, ratio_bin_spacing="karras_ramp")
    assert module.density_ratio.normalizer.spacing == "time" and old.density_ratio.normalizer.spacing == "karras_ramp"
    t = torch.tensor([0.5, 12.0, 12.0, 75.0], dtype=torch.float64)
    assert old.density_ratio.normalizer.bin_index(t).tolist() == [6, 3, 3, 0]
    module.train()
    logits = torch.log(torch.tensor([2.0, 1.0, 3.0, 0.5]))
    ratio, _ = module.density_ratio.estimate(module, logits, t)
    stats = module.density_ratio.normalizer
    # bins 0 (sigma 0.5), 1 (sigma 12, twice) and 9 (sigma 75) moved half-way (EMA 0.5) to their batch means
    expected = torch.ones(10, dtype=torch.float64)
    expected[0], expected[1], expected[9] = 1.5, 1.5, 0.75
    assert torch.allclose(stats.bin_mean_ratio, expected) and stats.bin_updates.tolist() == [1, 1] + [0] * 7 + [1]
    assert torch.allclose(ratio, torch.tensor([2 / 1.5, 1 / 1.5, 3 / 1.5, 0.5 / 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match="ratio_bin_spacing 'ramp'"):
        method_cls(**kwargs, ratio_bin_spacing="ramp", normalize_ratio_per_bin=False)


# ============================================================================ clipping defaults
NO_CLIPPING = {"sid", "sida", "diff_instruct"}


def _declared_default(cls, name):
    """The default the CLI shows for ``name``: the first __init__ in the MRO that declares it."""
    for klass in cls.__mro__:
        parameter = inspect.signature(klass.__init__).parameters.get(name) if "__init__" in vars(klass) else None
        if parameter is not None and parameter.kind is not inspect.Parameter.VAR_KEYWORD:
            return parameter.default
    raise AssertionError(f"{cls.__name__} has no {name}")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_declares_its_clipping_default(method):
    expected = None if method in NO_CLIPPING else 10.0
    for name in ("generator_clip_norm", "critic_clip_norm"):
        assert _declared_default(METHODS[method], name) == expected, (method, name)


@pytest.mark.parametrize("cls, expected", [(SiD, None), (SiDA, None), (DiffInstruct, None), (SIM, 10.0),
                                           (DMD2, 10.0)])
def test_clipping_defaults_reach_the_optimizer_step(cls, expected):
    kwargs = {"discriminator": DiscriminatorHead(16)} if cls is SiDA else {}
    module = cls(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student=ToyMLPDenoiser(2, 16, 2), **kwargs)
    assert module.hparams.generator_clip_norm == expected and module.hparams.critic_clip_norm == expected
    clipped = cls(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student=ToyMLPDenoiser(2, 16, 2),
                  generator_clip_norm=3.0, critic_clip_norm=4.0, **kwargs)
    assert (clipped.hparams.generator_clip_norm, clipped.hparams.critic_clip_norm) == (3.0, 4.0)


def test_clipping_defaults_through_the_cli():
    from tests.toy_runs import build

    for config, expected in [("experiments/toy/ring8/sid.yaml", None), ("experiments/toy/ring8/sida.yaml", None),
                             ("experiments/toy/ring8/diff_instruct.yaml", None),
                             ("experiments/toy/ring8/dmd2.yaml", 10.0), ("experiments/toy/ring8/sim.yaml", 10.0)]:
        model = build(config).model
        assert (model.hparams.generator_clip_norm, model.hparams.critic_clip_norm) == (expected, expected), config


# ------------------------------------------------------------------ (b), (e): consistency distillation's target network
def _cd(boundary_condition=True, decay=0.95):
    from lightning_modules.methods import ConsistencyDistillation

    schedule = EDMSchedule()
    torch.manual_seed(0)
    student = ToyMLPDenoiser(2, hidden=32, depth=2, boundary_condition=boundary_condition, sigma_data=0.5)
    return ConsistencyDistillation(teacher=GaussianMixtureTeacher("ring8", schedule), student=student,
                                   target_ema_decay=decay, warm_start_steps=0)


def test_cd_target_first_update_is_an_ema_step_not_a_copy():
    """Song et al. 2023, Alg. 2: theta- <- theta once, then theta- <- mu theta- + (1 - mu) theta after each update;
    torch's AveragedModel alone would make the first update a copy of the updated online weights."""
    module = _cd(decay=0.9)
    start = {k: v.clone() for k, v in module.student.state_dict().items()}
    assert all(torch.equal(v, module.target_student.module.state_dict()[k]) for k, v in start.items())
    with torch.no_grad():
        for parameter in module.student.parameters():
            parameter.add_(1.0)
    module.on_generator_step_end()
    for name, value in module.target_student.module.named_parameters():
        torch.testing.assert_close(value, 0.9 * start[name] + 0.1 * (start[name] + 1.0))
    module.on_generator_step_end()  # the second update averages again, from the first's result
    for name, value in module.target_student.module.named_parameters():
        torch.testing.assert_close(value, 0.9 * (start[name] + 0.1) + 0.1 * (start[name] + 1.0))


def test_cd_warns_when_the_student_breaks_the_boundary_condition():
    from lightning_modules.methods.consistency import boundary_error

    with pytest.warns(UserWarning, match=r"breaks the boundary condition f\(x, t_min\) = x"):
        module = _cd(boundary_condition=False)
    assert boundary_error(module.student, module.schedule) > 1e-4
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = _cd(boundary_condition=True)
    assert boundary_error(module.student, module.schedule) < 1e-6
