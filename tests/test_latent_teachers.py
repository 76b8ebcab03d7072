"""Latent diffusers teachers from local pipeline folders: schedules mapped exactly, predictions converted exactly,
and a DMD2 and a VSD step in the prompt-only regime on every tiny architecture (SD1.5, SDXL, SD3, PixArt)."""
from __future__ import annotations

import pytest
import torch

from lightning_modules.methods import DMD2, VSD
from lightning_modules.networks import LatentAutoencoder
from lightning_modules.pipelines import LatentTeacher, schedule_from_scheduler_config
from tests.tiny_pipelines import BUILDERS, random_condition


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(str(root / name)) for name, build in BUILDERS.items()}


@pytest.mark.parametrize("config", [
    dict(_class_name="DDPMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(_class_name="DDIMScheduler", beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(_class_name="EulerDiscreteScheduler", beta_schedule="squaredcos_cap_v2"),
], ids=["scaled_linear", "linear", "cosine"])
def test_vp_schedules_reproduce_diffusers_alphas_cumprod(config):
    import diffusers

    scheduler = getattr(diffusers, config["_class_name"])(**{k: v for k, v in config.items() if k != "_class_name"})
    schedule, prediction = schedule_from_scheduler_config(config)
    alpha, _ = schedule.alpha_sigma(torch.arange(1000, dtype=torch.float64))
    assert prediction == "epsilon"
    assert torch.allclose(alpha ** 2, scheduler.alphas_cumprod.double(), atol=2e-7, rtol=1e-6)


def test_unknown_scheduler_and_bad_folder_are_named(tmp_path):
    with pytest.raises(ValueError, match="scheduler 'KarrasVeScheduler' is not supported"):
        schedule_from_scheduler_config({"_class_name": "KarrasVeScheduler"})
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        LatentTeacher(str(tmp_path / "nowhere"))
    (tmp_path / "model_index.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        LatentTeacher(str(tmp_path))


def _independent_x0(name, teacher, x_t, t, cond):
    """x0 from the raw backbone output and the diffusers scheduler's own coefficients."""
    import diffusers
    import json
    import os

    with open(os.path.join(teacher.pipeline_path, "scheduler", "scheduler_config.json")) as handle:
        config = json.load(handle)
    scheduler = getattr(diffusers, config.pop("_class_name"))(**{k: v for k, v in config.items()
                                                                  if not k.startswith("_")})
    with torch.no_grad():
        if name == "sd3":
            v = teacher.transformer(x_t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                                    timestep=t * 1000).sample
            return x_t - t[:, None, None, None] * v                          # x_t = (1-t) x0 + t eps, v = eps - x0
        if name == "pixart":
            eps = teacher.transformer(x_t, encoder_hidden_states=cond.embeds, timestep=t, encoder_attention_mask=cond.mask,
                                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
        else:
            kwargs = {}
            if name == "sdxl":
                kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled,
                                               "time_ids": torch.tensor([[16, 16, 0, 0, 16, 16]] * len(t)).float()}
            eps = teacher.unet(x_t, t, encoder_hidden_states=cond.embeds, **kwargs).sample
    abar = scheduler.alphas_cumprod.double()[t.long()][:, None, None, None]
    return (x_t.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_teacher_loads_and_converts_exactly(folders, name):
    teacher = LatentTeacher(folders[name])
    assert teacher.text_conditioned and teacher.data_shape == (4, 8, 8)
    cond = random_condition(3, mask=name == "pixart")
    x_t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64) if name == "sd3" else torch.tensor([50., 400., 900.],
                                                                                                dtype=torch.float64)
    with torch.no_grad():
        ours = teacher(x_t, t, cond)
    expected = _independent_x0(name, teacher, x_t, t.float(), cond)
    assert torch.allclose(ours.double(), expected.double(), atol=1e-4, rtol=1e-4), (ours - expected).abs().max()


@pytest.mark.parametrize("method", [DMD2, VSD], ids=["dmd2", "vsd"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_prompt_only_step_on_every_architecture(folders, name, method):
    torch.manual_seed(0)
    kwargs = {"lora_rank": 2} if method is VSD else {}
    module = method(teacher=LatentTeacher(folders[name]), guidance_scale=3.0, **kwargs)
    batch = {"noise": torch.randn(2, 4, 8, 8), "cond": random_condition(2, mask=name == "pixart")}
    before = [p.detach().clone() for p in module.generator_parameters()]
    for phase, parameters in (("critic", module.critic_parameters()), ("generator", module.generator_parameters())):
        loss = (module.critic_loss if phase == "critic" else module.generator_loss)(batch)["loss"]
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        norms = [g.norm() for g in grads if g is not None]
        assert torch.isfinite(loss) and norms and all(torch.isfinite(n) for n in norms), (name, phase)
        assert sum(float(n) for n in norms) > 0, (name, phase)
        with torch.no_grad():  # VSD's LoRA critic starts equal to the teacher (F - T = 0): it must move first
            for p, g in zip(parameters, grads):
                if g is not None:
                    p -= (1.0 if phase == "critic" else 1e-3) * g / max(float(g.norm()), 1e-12)
    changed = sum(int(not torch.equal(a, b)) for a, b in zip(before, module.generator_parameters()))
    assert changed > 0


def test_autoencoder_scaling_and_shapes(folders):
    vae = LatentAutoencoder(folders["sd3"])
    assert vae.scaling_factor == 0.5 and vae.shift_factor == 0.1 and vae.latent_shape(16) == (4, 8, 8)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = vae.encode(images)
    raw = vae.vae.encode(images).latent_dist.mode()
    assert torch.allclose(latents, (raw - 0.1) * 0.5, atol=1e-6)
    decoded = vae.decode(latents)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1
    assert torch.allclose(decoded, vae.vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LatentAutoencoder(folders["sd3"], subfolder="missing")
