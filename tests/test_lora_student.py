"""A LoRA student (peft, adapter "student") on a latent teacher: it starts as the teacher, only its adapters train,
and a DMD2 step moves them; a VSD LoRA critic sits beside it on the same frozen teacher."""
from __future__ import annotations

import pytest
import torch

from lightning_modules.methods import DMD2, VSD
from lightning_modules.pipelines import LatentTeacher
from tests.tiny_pipelines import BUILDERS, random_condition


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return BUILDERS["sd15"](str(tmp_path_factory.mktemp("lora") / "sd15"))


@pytest.mark.parametrize("method", [DMD2, VSD], ids=["dmd2", "vsd"])
def test_lora_student_starts_as_teacher_and_trains_only_adapters(sd15, method):
    torch.manual_seed(0)
    extra = {"lora_rank": 2} if method is VSD else {}
    module = method(teacher=LatentTeacher(sd15), guidance_scale=2.0, student_lora={"rank": 4, "alpha": 4}, **extra)
    student = module.student
    assert student.adapter_name == "student" and student.text_conditioned
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".student." in n for n in trainable)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0]), random_condition(2)
    with torch.no_grad():
        assert torch.allclose(student(x, t, cond), module.teacher(x, t, cond), atol=1e-6)
    batch = {"noise": torch.randn(2, 4, 8, 8), "cond": random_condition(2)}
    loss = module.generator_loss(batch)["loss"]
    params = list(module.generator_parameters())
    grads = torch.autograd.grad(loss, params)
    assert len(params) == len(trainable)
    total = sum(float(g.norm()) for g in grads)
    # DMD2's guided real score differs from its fake critic at the start; VSD's LoRA critic starts *as* the teacher
    # (LoRA B = 0), so its first generator gradient, weighted (critic - teacher), is exactly zero (SwiftBrush Sec. 3)
    assert total > 0 if method is DMD2 else total == 0.0


def test_copies_of_a_lora_student_share_the_teacher(sd15):
    """The critic (a copy of the LoRA student) and the EMA copy adapt the one registered teacher: no hidden second
    teacher, ``.to()`` reaches every network, and each copy has its own adapters."""
    import copy

    from torch.optim.swa_utils import AveragedModel

    module = DMD2(teacher=LatentTeacher(sd15), guidance_scale=2.0, student_lora={"rank": 4, "alpha": 4})
    teacher = module.teacher
    assert module.critic.base_network is teacher and module.student.base_network is teacher
    ema = AveragedModel(module.student)
    assert ema.module.base_network is teacher
    assert {id(p) for p in ema.parameters()}.isdisjoint(id(p) for p in module.student.parameters())
    assert sum(p.numel() for p in ema.module.parameters()) == module.student.adapter_parameter_count()
    copied = copy.deepcopy(module.student)
    for (_, ours), (_, theirs) in zip(module.student.adapter_layers(), copied.adapter_layers()):
        assert theirs.base_layer is ours.base_layer and theirs.lora_A is not ours.lora_A
    module.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    assert all(p.dtype == torch.float64 for p in module.critic.parameters())
    torch.manual_seed(0)
    batch = {"noise": torch.randn(2, 4, 8, 8, dtype=torch.float64), "cond": random_condition(2)}
    batch["cond"] = batch["cond"].to(torch.float64) if hasattr(batch["cond"], "to") else batch["cond"]
    loss = module.critic_loss(batch)["loss"]
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
