"""Memory options: gradient checkpointing reaches the diffusers backbones of the trained networks and leaves the
DMD2 generator gradient unchanged; the attention backend is chosen and named; bad values are named."""
from __future__ import annotations

import logging

import pytest
import torch

from lightning_modules.methods import DMD2
from lightning_modules.networks import ToyMLPDenoiser
from lightning_modules.networks.memory import apply_memory_options, diffusers_backbones, resolve_attention
from lightning_modules.pipelines import LatentTeacher
from tests.tiny_pipelines import BUILDERS, random_condition


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return BUILDERS["sd15"](str(tmp_path_factory.mktemp("memory") / "sd15"))


def generator_gradient(folder, checkpointing: bool, caplog=None):
    torch.manual_seed(0)
    module = DMD2(teacher=LatentTeacher(folder), guidance_scale=2.0, gradient_checkpointing=checkpointing)
    module.train()
    torch.manual_seed(1)
    batch = {"noise": torch.randn(2, 4, 8, 8), "cond": random_condition(2)}
    loss = module.generator_loss(batch)["loss"]
    grads = torch.autograd.grad(loss, list(module.generator_parameters()))
    return module, loss.detach(), torch.cat([g.flatten() for g in grads])


def test_checkpointing_is_on_the_student_only_and_gradients_are_unchanged(sd15, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_modules.base"):
        module, loss, grad = generator_gradient(sd15, True)
    assert [r.getMessage() for r in caplog.records if "attention" in r.getMessage()] == [
        "attention: sdpa; gradient checkpointing on the trained networks"]
    student_unets, teacher_unets = diffusers_backbones(module.student), diffusers_backbones(module.teacher)
    assert student_unets and all(u.is_gradient_checkpointing for u in student_unets)
    assert not any(u.is_gradient_checkpointing for u in teacher_unets)
    _, plain_loss, plain_grad = generator_gradient(sd15, False)
    assert torch.allclose(loss, plain_loss, rtol=1e-5, atol=1e-7)
    assert torch.allclose(grad, plain_grad, rtol=1e-4, atol=1e-7) and plain_grad.norm() > 0


def test_attention_choice_and_bad_values_are_named():
    assert resolve_attention("auto") == ("sdpa" if not torch.cuda.is_available() else resolve_attention("auto"))
    assert resolve_attention("sdpa") == "sdpa"
    with pytest.raises(ValueError, match="'flash9'"):
        resolve_attention("flash9")
    toy = ToyMLPDenoiser(2, hidden=8, depth=1)
    assert apply_memory_options(toy) is None  # nothing to change on a network without a diffusers backbone
    with pytest.raises(ValueError, match="ToyMLPDenoiser"):
        apply_memory_options(toy, gradient_checkpointing=True)


def lora_generator_gradient(folder, checkpointing: bool):
    torch.manual_seed(0)
    module = DMD2(teacher=LatentTeacher(folder), guidance_scale=2.0, gradient_checkpointing=checkpointing,
                  student_lora={"rank": 4, "alpha": 4})
    module.train()
    with torch.no_grad():  # adapters away from their zero start, so the LoRA path carries gradient and output
        for name, p in module.student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    torch.manual_seed(1)
    batch = {"noise": torch.randn(2, 4, 8, 8), "cond": random_condition(2)}
    loss = module.generator_loss(batch)["loss"]
    parameters = [p for p in module.generator_parameters()]
    grads = torch.autograd.grad(loss, parameters)
    return module, loss.detach(), torch.cat([g.flatten() for g in grads])


def test_checkpointing_a_lora_student_recomputes_with_its_adapters(sd15):
    """The LoRA student swaps its adapters into the shared teacher only during its forward; checkpointed blocks are
    recomputed in backward, after that, so they must re-attach them: the gradient equals the plain one."""
    module, loss, grad = lora_generator_gradient(sd15, True)
    assert any(u.is_gradient_checkpointing for u in diffusers_backbones(module.teacher))
    _, plain_loss, plain_grad = lora_generator_gradient(sd15, False)
    assert torch.allclose(loss, plain_loss, rtol=1e-5, atol=1e-7)
    assert plain_grad.norm() > 0 and torch.allclose(grad, plain_grad, rtol=1e-4, atol=1e-6)
