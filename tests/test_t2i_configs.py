"""experiments/mnist_t2i: every config builds against the shipped text-to-image teacher and takes a critic and a
generator step in the prompt-only regime (batches of noise and encoded captions, no image)."""
from __future__ import annotations

import glob
import os

import pytest
import torch

from lightning_modules.conditioning.condition import TextCondition, select_conditions
from lightning_modules.methods import METHODS
from tests.toy_runs import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.environ.get("MNIST_T2I_ASSETS", os.path.join(ROOT, "assets", "mnist-t2i"))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "mnist_t2i", "*.yaml")))
#: methods without a prompt-only config, and why (the pair regime, datamodules.ImageTextDataModule, serves them)
NOT_PROMPT_ONLY = {
    "cd": "consistency distillation regresses onto the teacher's ODE from noised real samples",
    "dmd": "its regression term needs teacher noise -> image pairs (datamodules.pairs)",
    "sida": "its GAN term compares real and generated images",
    "fdistill": "the discriminator that estimates the density ratio is trained on real versus generated samples",
    "uni_instruct": "the discriminator that estimates the density ratio is trained on real versus generated samples",
    "msd": "its students are routed by class id; text prompts carry no routing classes",
    "sfd": "forgetting is defined on class ids (forget_classes / override_classes)",
    "disback": "stage 1 records the degradation path with sampled class labels; text-conditioned recording is open",
}


def _overrides(tmp_path):
    return ["--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.teacher.init_args.pipeline_path={ASSETS}",
            f"--model.init_args.autoencoder.init_args.pretrained_path={ASSETS}",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--data.init_args.batch_size=4"]


def test_every_prompt_only_method_has_a_config():
    names = {os.path.splitext(os.path.basename(c))[0] for c in CONFIGS}
    missing = sorted(set(METHODS) - names - set(NOT_PROMPT_ONLY))
    assert not missing, f"methods with neither an experiments/mnist_t2i config nor a stated reason: {missing}"
    assert not names & set(NOT_PROMPT_ONLY), "a method listed as not prompt-only has a prompt-only config"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.basename(c))
def test_config_builds_and_steps_on_prompts_only(config, tmp_path):
    torch.manual_seed(0)
    cli = build(config, *_overrides(tmp_path))
    module, datamodule = cli.model, cli.datamodule
    assert tuple(module.student.data_shape) == tuple(datamodule.shape) == (4, 8, 8)
    assert module.autoencoder is not None
    assert module.hparams.guidance_scale > 1 or min(getattr(module.hparams, "guidance_scale_range", None) or [0]) >= 1
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"noise", "cond", "prompts"} and isinstance(batch["cond"], TextCondition)
    assert batch["cond"].labels is not None  # label_parser: prompt adherence can be scored
    module.setup("fit")
    module.train()
    for phase in ("critic", "generator"):
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
