"""LoRA students for any method (``student_lora`` on the shared DistillationModule): with a student network given, the
adapters sit on that network as an owned, frozen base (on the toy suite the base is what the warm start fits to the
exact teacher). For several method families the student starts as its base, only adapter weights receive gradient
and optimizer state, and the trainable fraction is the closed-form LoRA count."""
from __future__ import annotations

import pytest
import torch

from tests.toy_runs import build

RANK = 4
# ring8's ToyMLPDenoiser(dim 2, hidden 256, depth 4): Linear layers input (2 + 64 Fourier -> 256), 3 x body
# (256 -> 256), output (256 -> 2); a rank-r adapter on an (in -> out) layer has r (in + out) weights.
TOY_MLP_ADAPTER_WEIGHTS = RANK * ((66 + 256) + 3 * (256 + 256) + (256 + 2))
TOY_MLP_WEIGHTS = (66 * 256 + 256) + 3 * (256 * 256 + 256) + (256 * 2 + 2)

# one method per mechanism: distribution matching (+ its LoRA-critic variant), score identity, consistency,
# trajectory regression, guidance-embedded students, rectified flow
METHODS = ["dmd2", "vsd", "sid", "cd", "kd", "guidance_distill", "rf1"]


@pytest.mark.parametrize("method", METHODS)
def test_lora_student_on_a_toy_network(method, tmp_path):
    torch.manual_seed(0)
    cli = build(f"experiments/toy/ring8/{method}.yaml", "--model.init_args.warm_start_steps=30",
                f"--model.init_args.student_lora={{rank: {RANK}}}", root=str(tmp_path))
    module = cli.model
    module.setup("fit")
    student = module.student
    assert student.own_base and student.adapter_name == "student"
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".student." in n for n in trainable)
    base = student.base_network
    ADAPTER_WEIGHTS = sum(RANK * (m.in_features + m.out_features) for m in base.modules()
                          if isinstance(m, torch.nn.Linear))
    BASE_WEIGHTS = sum(p.numel() for p in base.parameters())
    if method != "guidance_distill":  # its student embeds w in an extra layer
        assert (ADAPTER_WEIGHTS, BASE_WEIGHTS) == (TOY_MLP_ADAPTER_WEIGHTS, TOY_MLP_WEIGHTS)
    assert student.adapter_parameter_count() == ADAPTER_WEIGHTS
    assert module.trainable_parameter_fraction() == pytest.approx(ADAPTER_WEIGHTS / (ADAPTER_WEIGHTS + BASE_WEIGHTS))

    # the warm start fitted the base and left the adapters at B = 0: the student is its base network
    x, t = torch.randn(64, 2), torch.full((64,), float(module.student_times[0]), dtype=torch.float64)
    cond = torch.zeros(64, dtype=torch.long) if base.num_classes else None
    with torch.no_grad():
        assert torch.equal(student(x, t, cond), base(x, t, cond))
    base_before = {k: v.clone() for k, v in student.base_network.state_dict().items()}

    batch = next(iter(cli.datamodule.train_dataloader()))
    optimizers, _ = module.configure_optimizers()
    generator_optimizer = optimizers[0]
    assert sum(p.numel() for group in generator_optimizer.param_groups for p in group["params"]) == ADAPTER_WEIGHTS
    loss = module.generator_loss(batch)["loss"]
    generator_optimizer.zero_grad()
    loss.backward()
    grads = [p.grad for p in module.generator_parameters()]
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert all(p.grad is None for p in student.base_network.parameters())
    generator_optimizer.step()
    state = sum(v.numel() for s in generator_optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    assert state == 2 * ADAPTER_WEIGHTS  # Adam's two moments, for the adapters only
    assert all(torch.equal(v, student.base_network.state_dict()[k]) for k, v in base_before.items())
    with torch.no_grad():
        assert not torch.equal(student(x, t, cond), base(x, t, cond))  # the step moved the adapters


def test_lora_student_needs_a_network_with_weights():
    from lightning_modules.diffusion import EDMSchedule
    from lightning_modules.methods.dmd2 import DMD2
    from lightning_modules.networks import GaussianMixtureTeacher

    with pytest.raises(ValueError, match="GaussianMixtureTeacher has none"):
        DMD2(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student_lora={"rank": 4})
    with pytest.raises(ValueError, match="unknown student_lora option"):
        DMD2(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()), student_lora={"rnak": 4})
