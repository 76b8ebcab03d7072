"""experiments/mnist_t2i: every config builds against the shipped text-to-image teacher and takes a generator step
(and a critic step where the method has a critic) in the prompt-only regime (batches of noise and encoded captions, no image); every method has a
prompt-only config, a pair-regime config (experiments/mnist_t2i/pairs, tests/test_t2i_pair_configs.py) or a reason."""
from __future__ import annotations

import glob
import importlib
import os
import re

import pytest
import torch
import yaml

from lightning_modules.conditioning.condition import TextCondition, select_conditions
from lightning_modules.methods import METHODS
from tests.toy_runs import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.environ.get("MNIST_T2I_ASSETS", os.path.join(ROOT, "assets", "mnist-t2i"))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "mnist_t2i", "*.yaml")))
#: the image-text pair regime (datamodules.ImageTextDataModule on MNIST images with their captions), one level down so
#: the prompt-only glob above never picks them up; tests/test_t2i_pair_configs.py steps each of them
PAIR_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "mnist_t2i", "pairs", "*.yaml")))
#: methods without a prompt-only config, and why; those served by the pair regime name their pair config
NOT_PROMPT_ONLY = {
    "tad_sr": "restoration: conditioned on a low-quality image (ImageCondition), not on prompts",
    "oftsr": "a restoration student: its condition is the LQ image (ImageCondition), not a prompt; configs in "
             "experiments/mnist_sr and the toy suite",
    "yonos_sr": "scale distillation needs HQ images and their LQ versions at two factors (the restoration regime, "
                "experiments/mnist_sr); there is no prompt-only form",
    "instarevive": "its condition is the LQ image of the restoration regime (experiments/mnist_sr); the paper's "
                   "captions would be a second, text condition, not wired here",
    "agd": "data-free and prompt-capable (the paper distils SD2.1 / SDXL), but it trains no critic, which this "
           "prompt-only step test steps, and its adapters on the UNet2DConditionModel teacher are not configured yet",
    "hipa": "its high-frequency term and KD's teacher pairs are wired for pixel / toy data; a prompt-only config on "
            "the latent teacher (pairs from the guided teacher ODE, the term on latents or decoded images) is not yet "
            "written or tested",
    "nct": "its control models read class labels (mixture component, MNIST classifier); a text-conditioned generator "
           "with a new image control is not yet wired",
    "sana_sprint": "sCD's TrigFlow map rides on an EDM-preconditioned student (see scd) and its x_t are noised real "
                   "images (its LADD half's heads take prompts, as experiments/mnist_t2i/ladd.yaml)",
    "cd": "its targets start from noised real samples (the pair regime has them), but its student needs the boundary "
          "condition f(x, t_min) = x, which has no parametrization for an epsilon-prediction diffusers UNet here "
          "(boundary_condition is EDM-only; no LCM-style c_skip / c_out in training): the consistency-family issue, "
          "like its MNIST config",
    "ict": "consistency training without a teacher: its pairs are the same real image under the same noise at two "
           "times, so prompts alone give it nothing to train on, and its student needs the boundary condition "
           "(see cd); the text-to-image members of the family are LCM / LCM-LoRA / Hyper-SD",
    "ect": "consistency tuning without a teacher: its pairs are noised real images, none in the prompt-only regime, "
           "and its student needs the boundary condition (see cd); the text-to-image members of the family are LCM / "
           "LCM-LoRA / Hyper-SD",
    "sct": "continuous-time consistency training from data: its tangent dx_t/dt = cos t z - sin t x0 needs real "
           "images, none in the prompt-only regime",
    "scd": "its TrigFlow change of variables rides on an EDM-preconditioned student (c_skip = cos^2 t, c_out = "
           "sigma_d sin t); an epsilon-prediction diffusers UNet has no such parametrization here, and the tangent "
           "JVP through diffusers attention falls back to finite differences on CPU -- not wired for the latent "
           "teacher yet",
    "meanflow": "its two-time student wraps the toy MLP / MNIST UNet time embeddings (networks.meanflow); the "
                "diffusers UNet's time embedding is not hooked yet, and its data-velocity variant needs real images",
    "scott": "a CD target with a stochastic teacher step plus a GAN on real images: its pairs start from noised real "
             "samples (none prompt-only), and its student needs the boundary condition (see cd)",
    "rf1": "1-rectified flow regresses the velocity of independent (image, noise) couplings: it needs real images",
    "reflow": "its on-the-fly coupling needs only noise, but its velocity student (flow_velocity over an x0 "
              "denoiser) and Euler-on-tau sampler are not wired through the latent teacher's TextCondition yet",
    "rf2pp": "as reflow (the same coupling source and velocity student, another time law and distance)",
    "instaflow": "as reflow for its first stage; its distillation stage is then ordinary regression on the 2-RF's ODE",
    "slimflow": "its annealing reflow mixes in independent (image, noise) couplings, so it needs real images while "
                "annealing",
    "mcd": "its segment-edge consistency function is a DDIM step over the student's x0 (fine for any UNet), but its "
           "targets start from noised real latents, none prompt-only: the segment mechanism serves text-to-image as "
           "Hyper-SD's TSCD (experiments/mnist_t2i/consistency/hyper_sd.yaml, image-text pairs)",
    "lcm": "latent consistency distillation starts its pairs from noised real latents (the paper trains on LAION "
           "images): experiments/mnist_t2i/consistency/{lcm,lcm_lora}.yaml on image-text pairs "
           "(tests/test_t2i_consistency_configs.py)",
    "tscd": "as lcm: experiments/mnist_t2i/consistency/hyper_sd.yaml on image-text pairs",
    "tcm": "two-stage CD: like cd, its pairs are noised real samples and its student needs the boundary condition",
    "kd": "as dmd: its pairs (cached or on the fly) store class ids as conditions; a prompt-conditioned pair file is "
          "not written yet",
    "pd": "progressive distillation regresses two teacher DDIM steps from noised real samples (Salimans & Ho Alg. 2): "
          "no real latents prompt-only",
    "guidance_distill": "its phase 0 needs only noise, but its phase 1 is progressive distillation on noised real "
                        "samples (see pd), and the w-embedding wrapper is wired for the toy MLP / MNIST UNet only",
    "boot": "data-free, but its student is a signal network without preconditioning (networks.signal_mlp / a "
            "sample-prediction UNet); no such latent student is built from the diffusers teacher yet",
    "dmd": "its regression term needs teacher noise -> image pairs, and the pair files (lightning_modules."
           "trajectory_pairs, datamodules.pairs) store class ids as conditions, not prompts",
    "sida": "its GAN term compares real and generated images: experiments/mnist_t2i/pairs/sida.yaml",
    "fdistill": "the discriminator that estimates the density ratio is trained on real versus generated samples: "
                "experiments/mnist_t2i/pairs/fdistill.yaml",
    "uni_instruct": "the discriminator that estimates the density ratio is trained on real versus generated samples: "
                    "experiments/mnist_t2i/pairs/uni_instruct.yaml",
}


def config_method(config: str) -> str:
    """The METHODS name of a config's model.class_path (pair configs are named after the method and its variant)."""
    with open(config, encoding="utf-8") as handle:
        module_name, _, class_name = yaml.safe_load(handle)["model"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return next(name for name, method in METHODS.items() if method is cls)


def _overrides(tmp_path):
    return ["--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.teacher.init_args.pipeline_path={ASSETS}",
            f"--model.init_args.autoencoder.init_args.pretrained_path={ASSETS}",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--data.init_args.batch_size=4"]


def test_every_method_has_a_t2i_config_or_a_stated_reason():
    names = {os.path.splitext(os.path.basename(c))[0] for c in CONFIGS}
    missing = sorted(set(METHODS) - names - set(NOT_PROMPT_ONLY))
    assert not missing, f"methods with neither an experiments/mnist_t2i config nor a stated reason: {missing}"
    assert not names & set(NOT_PROMPT_ONLY), "a method listed as not prompt-only has a prompt-only config"
    pair_configs = {}
    for config in PAIR_CONFIGS:
        pair_configs.setdefault(config_method(config), []).append(os.path.relpath(config, ROOT))
    assert {"sida", "fdistill", "uni_instruct", "dmd2"} <= set(pair_configs), sorted(pair_configs)
    for method, reason in NOT_PROMPT_ONLY.items():
        named = set(re.findall(r"experiments/mnist_t2i/pairs/\S+?\.yaml", reason))
        # a reason points to exactly the pair configs of its method, and a method without one says why instead
        assert named == set(pair_configs.get(method, [])), (method, named, pair_configs.get(method))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.basename(c))
def test_config_builds_and_steps_on_prompts_only(config, tmp_path):
    torch.manual_seed(0)
    cli = build(config, *_overrides(tmp_path))
    module, datamodule = cli.model, cli.datamodule
    assert tuple(module.student.data_shape) == tuple(datamodule.shape) == (4, 8, 8)
    assert module.autoencoder is not None
    # CFG on the teacher wherever the teacher is queried (PSO never queries it: it tunes the student against its start)
    assert (module.hparams.guidance_scale > 1 or min(getattr(module.hparams, "guidance_scale_range", None) or [0]) >= 1
            or type(module).__name__ == "PairwiseSampleOptimization")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"noise", "cond", "prompts"} and isinstance(batch["cond"], TextCondition)
    assert batch["cond"].labels is not None  # label_parser: prompt adherence can be scored
    module.setup("fit")
    if hasattr(module, "attach_prompts"):  # SFD's override prompts, DisBack's stage-1 prompts (fit: trainer.datamodule)
        module.attach_prompts(datamodule)
    if hasattr(module, "prepare_path"):  # DisBack: a two-step stage-1 recording on the prompts, then stage 2
        module.path_steps, module.path_checkpoints, module.path_batch_size = 2, 1, 4
        module.path_dir = str(tmp_path / "degradation-paths")
        assert len(module.prepare_path()["nodes"]) == 2
    module.train()
    for phase in ("critic", "generator") if module.uses_critic else ("generator",):
        parameters = list(module.critic_parameters() if phase == "critic" else module.generator_parameters())
        loss = (module.critic_loss if phase == "critic" else module.generator_loss)(batch)["loss"]
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        norms = [float(g.norm()) for g in grads if g is not None]
        assert torch.isfinite(loss), (phase, float(loss))
        assert norms and sum(norms) > 0, phase
        with torch.no_grad():  # a LoRA critic starts equal to the teacher (F - T = 0): it must move first
            for p, g in zip(parameters, grads):
                if g is not None and phase == "critic":
                    p -= g / max(float(g.norm()), 1e-12)
    with torch.no_grad():
        images = module.to_images(module.sample(batch["noise"][:2], select_conditions(batch["cond"], torch.arange(2)),
                                                nfe=1))
    assert images.shape == (2, 1, 32, 32)
