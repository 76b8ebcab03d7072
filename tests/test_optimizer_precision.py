"""Memory-saving training options through the CLI on the shipped text-to-image config: bitsandbytes 8-bit AdamW as
the generator / critic optimizer (state in uint8, resumable from a checkpoint) and bf16 mixed precision (the
student's UNet computes in bfloat16 under autocast, the master weights stay float32)."""
from __future__ import annotations

import os

import pytest
import torch

from tests.test_t2i_configs import ASSETS, ROOT, _overrides
from tests.toy_runs import build

CONFIG = os.path.join(ROOT, "experiments", "mnist_t2i", "dmd2.yaml")
EIGHT_BIT = ["--model.init_args.generator_optimizer=bitsandbytes.optim.AdamW8bit",
             "--model.init_args.generator_optimizer.init_args.lr=1e-4",
             "--model.init_args.critic_optimizer=bitsandbytes.optim.AdamW8bit",
             "--model.init_args.critic_optimizer.init_args.lr=1e-4"]


def _fit(tmp_path, *extra):
    cli = build(CONFIG, *_overrides(tmp_path), "--trainer.max_steps=4", "--trainer.limit_val_batches=0", *extra)
    before = [p.detach().clone() for p in cli.model.generator_parameters()]
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli, before


def test_adamw8bit_trains_keeps_uint8_state_and_resumes(tmp_path):
    pytest.importorskip("bitsandbytes")
    cli, before = _fit(tmp_path, *EIGHT_BIT, "--trainer.enable_checkpointing=true")
    generator, critic = cli.model.optimizers()
    for optimizer in (generator.optimizer, critic.optimizer):
        assert type(optimizer).__name__ == "AdamW8bit"
        large = [p for group in optimizer.param_groups for p in group["params"] if p.numel() >= 4096]
        assert large and all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in large)
    moved = sum(int(not torch.equal(a, b)) for a, b in zip(before, cli.model.generator_parameters()))
    assert moved > 0
    checkpoint = tmp_path / "last.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    resumed = build(CONFIG, *_overrides(tmp_path / "resumed"), "--trainer.max_steps=6", "--trainer.limit_val_batches=0",
                    *EIGHT_BIT)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(checkpoint))
    assert resumed.trainer.global_step == 6
    state = resumed.model.optimizers()[0].optimizer.state
    assert any(torch.is_tensor(s.get("state1")) and s["state1"].dtype == torch.uint8 for s in state.values())


def test_bf16_mixed_runs_the_student_in_bfloat16_with_float32_weights(tmp_path):
    seen = []
    cli = build(CONFIG, *_overrides(tmp_path), "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                "--trainer.precision=bf16-mixed")
    unet = next(m for m in cli.model.student.modules() if type(m).__name__ == "UNet2DConditionModel")
    hook = unet.conv_out.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    cli.trainer.fit(cli.model, cli.datamodule)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in cli.model.generator_parameters())
    assert all(torch.isfinite(p).all() for p in cli.model.generator_parameters())
