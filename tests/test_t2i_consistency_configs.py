"""experiments/mnist_t2i/consistency/{lcm, lcm_lora, hyper_sd}.yaml build against the shipped text-to-image teacher
and take one generator step on image-caption pairs; the LCM-LoRA delta merged into the teacher's weights gives the student."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from tests.test_t2i_pair_configs import NUM_IMAGES, _overrides, pairs_script
from tests.toy_runs import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [os.path.join(ROOT, "experiments", "mnist_t2i", "consistency", f"{n}.yaml") for n in ("lcm", "lcm_lora", "hyper_sd")]


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory):
    return pairs_script.make(str(tmp_path_factory.mktemp("pairs") / "mnist-t2i-pairs"), NUM_IMAGES)


def _step(config, pair_folder, tmp_path):
    torch.manual_seed(0)
    cli = build(config, *_overrides(pair_folder, tmp_path))
    module, datamodule = cli.model, cli.datamodule
    datamodule.setup("fit")
    batch = module.prepare_batch(next(iter(datamodule.train_dataloader())))
    module.setup("fit")
    module.train()
    loss = module.generator_loss(batch)["loss"]
    params = module.generator_parameters()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return module, loss, grads, batch


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_t2i_consistency_config_builds_and_steps(config, pair_folder, tmp_path):
    module, loss, grads, _ = _step(config, pair_folder, tmp_path)
    assert torch.isfinite(loss)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert module.boundary_scalings == ("none" if "hyper_sd" in config else "lcm")
    if "lora" in config or "hyper_sd" in config:
        assert all("lora_" in n for n, p in module.student.named_parameters() if p.requires_grad)
    if os.path.basename(config) == "lcm.yaml":   # w ~ U[1.5, 3] embedded into the student (LCM Sec. 4.2)
        assert module.guidance_embedding and (module.w_min, module.w_max, module.eval_guidance_scale) == (1.5, 3.0, 2.0)


def test_lcm_lora_delta_merges_onto_the_teachers_weights(pair_folder, tmp_path):
    module, _, _, batch = _step(CONFIGS[1], pair_folder, tmp_path)
    student = module.student
    with torch.no_grad():
        for _, layer in student.adapter_layers():
            torch.nn.init.normal_(layer.lora_B[student.adapter_name].weight, std=0.02)
    merged = copy.deepcopy(module.teacher)
    with torch.no_grad():
        for path, layer in student.adapter_layers():
            a = layer.lora_A[student.adapter_name].weight
            b = layer.lora_B[student.adapter_name].weight
            scale = layer.scaling[student.adapter_name]
            target = merged.get_submodule(path)
            if a.ndim == 4:  # conv: B (out, r, 1, 1) after A (r, in, k, k)
                delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
            else:
                delta = b @ a
            target.weight.add_(scale * delta)
    student.eval()
    x, cond = batch["real"], batch["real_cond"]
    t = torch.full((x.shape[0],), 500.0, dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = student(x, t, cond), merged(x, t, cond)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert not torch.allclose(ours, module.teacher(x, t, cond), atol=1e-4)
