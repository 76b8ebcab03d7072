"""experiments/mnist_t2i/rg_lcd.yaml: builds against the shipped text-to-image teacher and CLIP, and one LRM (critic)
step and one generator step run in the prompt-only regime (the teacher's own samples stand in for data latents):
the LRM gets gradient from the expert CLIP score of decoded latents, and the proxy reward reaches the student."""
from __future__ import annotations

import os

import torch

from lightning_modules.conditioning.condition import TextCondition
from lightning_modules.methods.rewards import CLIPReward
from tests.toy_runs import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.environ.get("MNIST_T2I_ASSETS", os.path.join(ROOT, "assets", "mnist-t2i"))
CONFIG = os.path.join(ROOT, "experiments", "mnist_t2i", "rg_lcd.yaml")


def _grad_norm(loss, parameters):
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    return sum(0.0 if g is None else float(g.norm()) for g in grads)


def test_rg_lcd_t2i_config_builds_and_steps_with_its_clip_reward(tmp_path):
    torch.manual_seed(0)
    cli = build(CONFIG, "--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path}",
                f"--model.init_args.teacher.init_args.pipeline_path={ASSETS}",
                f"--model.init_args.autoencoder.init_args.pretrained_path={ASSETS}",
                f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--data.init_args.batch_size=4",
                "--model.init_args.teacher_data_nfe=2")
    module, datamodule = cli.model, cli.datamodule
    assert isinstance(module.reward, CLIPReward) and module.uses_critic and module.autoencoder is not None
    assert tuple(module.student.data_shape) == (4, 8, 8)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert isinstance(batch["cond"], TextCondition) and len(batch["prompts"]) == 4
    module.setup("fit")
    module.train()
    module._check_batch(batch)  # prompt-only is accepted: teacher_data_nfe stands in for real latents
    critic = module.critic_loss(batch)
    assert torch.isfinite(critic["loss"]) and torch.isfinite(critic["expert_reward"])
    assert _grad_norm(critic["loss"], module.critic_parameters()) > 0
    losses = module.generator_loss(batch)
    assert torch.isfinite(losses["loss"]) and "reward" in losses
    assert _grad_norm(losses["loss"], module.generator_parameters()) > 0
    # the expert CLIP reward itself is differentiable in the latents, through the VAE decoder
    latents = module.student(module.schedule.add_noise(batch["_teacher_data"], torch.randn(4, 4, 8, 8),
                                                       torch.full((4,), 500.0, dtype=torch.float64)),
                             torch.full((4,), 500.0, dtype=torch.float64), batch["cond"])
    reward = module.expert_reward(latents, batch["cond"], batch["prompts"]).mean()
    assert torch.isfinite(reward) and _grad_norm(reward, module.generator_parameters()) > 0
