"""scripts/memory_plan.py against what the framework actually builds, on tiny pipeline folders: parameter bytes of the
loaded teacher, LoRA counts of the peft-wrapped student, optimizer state of torch's AdamW and bitsandbytes' AdamW8bit
after one step, FSDP division, the activation trace (meta device == real tensors), the phases, and clear errors."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import memory_plan as mp  # noqa: E402

from lightning_modules.methods import DMD2, SiD  # noqa: E402
from lightning_modules.pipelines import LatentTeacher  # noqa: E402
from tests.tiny_pipelines import BUILDERS  # noqa: E402

DTYPES = {"fp32": None, "bf16": "bfloat16"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_plan")
    return {name: BUILDERS[name](str(root / name)) for name in ("sd15", "sd3")}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, each storage once (bitsandbytes shares its quantisation maps)."""
    seen = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                seen[value.untyped_storage().data_ptr()] = value.numel() * value.element_size()
    return sum(seen.values())


def _one_step(optimizer, params):
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    return _state_bytes(optimizer)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_teacher_and_full_copies_bytes_equal_the_loaded_networks(folders, dtype):
    plan = mp.memory_plan(folders["sd15"], teacher_dtype=dtype, trainable_dtype=dtype, activations=False)
    teacher = LatentTeacher(folders["sd15"], torch_dtype=DTYPES[dtype])
    assert mp.component_bytes(plan, "frozen teacher") == _bytes(teacher.unet.parameters())
    assert plan["backbone_parameters"] == sum(p.numel() for p in teacher.unet.parameters())
    module = DMD2(teacher=teacher)   # student and critic: copies of the teacher, in its dtype
    assert mp.component_bytes(plan, "student weights") == _bytes(module.generator_parameters())
    assert mp.component_bytes(plan, "fake critic weights") == _bytes(module.critic_parameters())
    assert mp.component_bytes(plan, "student gradients") == _bytes(module.generator_parameters())
    vae = mp.component_bytes(plan, "VAE")
    from lightning_modules.networks import LatentAutoencoder
    assert vae == _bytes(LatentAutoencoder(folders["sd15"]).parameters())


@pytest.mark.parametrize("name", ["sd15", "sd3"])
@pytest.mark.parametrize("targets", [None, ["to_q", "to_v"]], ids=["default-targets", "to_q-to_v"])
def test_lora_counts_equal_the_framework_peft_student(folders, name, targets):
    options = {"rank": 4, "alpha": 4} | ({"target_modules": targets} if targets else {})
    module = DMD2(teacher=LatentTeacher(folders[name], torch_dtype="bfloat16"), student_lora=options)
    adapters = module.generator_parameters()
    plan = mp.memory_plan(folders[name], student="lora", critic="lora", lora_rank=4, lora_targets=targets,
                          activations=False)
    assert plan["trainable_parameters"]["student"] == sum(p.numel() for p in adapters)
    assert sorted(mp.load_architecture(folders[name]).lora_numels(4, targets)) == sorted(p.numel() for p in adapters)
    # peft builds the adapters in the base layer's dtype (bf16 here): the planner's bytes are the measured ones
    assert {p.dtype for p in adapters} == {torch.bfloat16}
    assert mp.component_bytes(plan, "student LoRA adapters") == _bytes(adapters)
    assert mp.component_bytes(plan, "fake critic LoRA adapters") == _bytes(module.critic_parameters())


@pytest.mark.parametrize("student", ["full", "lora"])
def test_adamw_state_equals_torch_after_one_step(folders, student):
    lora = {"rank": 4, "alpha": 4} if student == "lora" else None
    module = SiD(teacher=LatentTeacher(folders["sd15"]), student_lora=lora)
    params = module.generator_parameters()
    measured = _one_step(torch.optim.AdamW(params, lr=1e-4), params)
    plan = mp.memory_plan(folders["sd15"], method="sid", student=student, critic=student, lora_rank=4,
                          teacher_dtype="fp32", activations=False)
    assert mp.component_bytes(plan, "student optimizer state") == measured
    assert mp.adamw_state_bytes([p.numel() for p in params], "fp32") == measured


def test_adamw8bit_state_equals_bitsandbytes_after_one_step(folders):
    bnb = pytest.importorskip("bitsandbytes")
    # around the 32-bit / 8-bit threshold (min_8bit_size = 4096), a block remainder, bf16, and the tiny UNet's tensors
    params = [torch.nn.Parameter(torch.randn(n)) for n in (1, 255, 4095, 4096, 4097, 70_000)]
    params.append(torch.nn.Parameter(torch.randn(64, 300, dtype=torch.bfloat16)))
    measured = _one_step(bnb.optim.AdamW8bit(params, lr=1e-3), params)
    assert mp.adamw8bit_state_bytes([p.numel() for p in params]) == measured
    assert mp.adamw8bit_state_bytes([4095]) == 8 * 4095                       # 32-bit state below the threshold
    assert mp.adamw8bit_state_bytes([4096]) == 2 * 4096 + 8 * 16 + 2048       # uint8 + absmax + shared maps
    assert mp.adamw8bit_state_bytes([100, 200]) == 8 * 300                    # no 8-bit tensor: no maps

    module = DMD2(teacher=LatentTeacher(folders["sd15"]))
    params = module.generator_parameters()
    assert any(p.numel() >= mp.BNB_MIN_8BIT_SIZE for p in params) and any(p.numel() < 4096 for p in params)
    measured = _one_step(bnb.optim.AdamW8bit(params, lr=1e-4), params)
    plan = mp.memory_plan(folders["sd15"], optimizer="adamw8bit", activations=False)
    assert mp.component_bytes(plan, "student optimizer state") == measured


@pytest.mark.parametrize("teacher_sharding", ["replicate", "shard"])
def test_fsdp_divides_the_sharded_parts_by_n(folders, teacher_sharding):
    one = mp.memory_plan("sdxl", gpus=1, activations=False)
    eight = mp.memory_plan("sdxl", gpus=8, teacher_sharding=teacher_sharding, activations=False)
    by_name = lambda plan: {c["component"].split(",")[0]: c["bytes"] for c in plan["components"]}  # noqa: E731
    a, b = by_name(one), by_name(eight)
    for name in a:
        if name.startswith(("student", "fake critic")):
            assert b[name] == math.ceil(a[name] / 8), name
    teacher = "frozen teacher (real score) weights"
    assert b[teacher] == (math.ceil(a[teacher] / 8) if teacher_sharding == "shard" else a[teacher])
    assert b["VAE"] == a["VAE"]
    assert mp.shard(10, 4) == 3 and mp.shard(10, 1) == 10 and mp.shard(10, 4, sharded=False) == 10
    assert eight["persistent"] == sum(c["bytes"] for c in eight["components"])


def test_activation_trace_on_meta_equals_real_tensors_and_scales_with_batch(folders):
    from tests.tiny_pipelines import _unet

    arch = mp.load_architecture(folders["sd15"])
    for checkpointing in (False, True):
        for mode in ("trainable", "input_grad"):
            counts = {}
            for device in ("cpu", "meta"):
                for batch in (1, 3):
                    model = _unet() if device == "cpu" else mp._fresh_meta(arch, torch.float32)
                    model.requires_grad_(mode == "trainable")
                    inputs = mp.backbone_inputs(arch, model, batch, 16, 5, torch.float32, device=device,
                                                input_grad=mode == "input_grad")
                    counts[device, batch] = mp.saved_activation_bytes(model, inputs, checkpointing)["total"]
            assert counts["cpu", 1] == counts["meta", 1] > 0 and counts["cpu", 3] == counts["meta", 3]
            assert counts["meta", 3] == 3 * counts["meta", 1]
    plain = mp.trace_network(arch, "trainable", 2, 16, 5, "fp32", False)["total"]
    checkpointed = mp.trace_network(arch, "trainable", 2, 16, 5, "fp32", True)
    assert 0 < checkpointed["total"] < plain and checkpointed["largest_block"] > 0
    # bf16 halves the activations, except the float32 ones (attention log-sum-exp, norm statistics, time embedding)
    assert plain / 2 < mp.trace_network(arch, "trainable", 2, 16, 5, "bf16", False)["total"] < plain


def test_phases_follow_the_methods(folders):
    dmd2 = mp.memory_plan(folders["sd15"], method="dmd2", text_tokens=5)
    sid = mp.memory_plan(folders["sd15"], method="sid", text_tokens=5)
    names = lambda plan, phase: [r["component"] for r in plan["phases"][phase]["rows"]  # noqa: E731
                                 if r["group"] == "activations" and "largest block" not in r["component"]]
    assert [n.split(" (")[0] for n in names(dmd2, "generator")] == ["generator phase: activations of student G"]
    assert len(names(sid, "generator")) == 3 and "teacher T (batch 2" in names(sid, "generator")[1]
    assert names(dmd2, "critic") == names(sid, "critic")
    assert sid["total"] > dmd2["total"]
    assert sid["total"] == sid["persistent"] + max(p["bytes"] for p in sid["phases"].values())
    no_cfg = mp.memory_plan(folders["sd15"], method="sid", text_tokens=5, guidance=False)
    assert "teacher T (batch 1" in names(no_cfg, "generator")[1]
    # with checkpointing: what each network keeps, plus ONE recomputed block (backward recomputes one at a time)
    checkpointed = mp.memory_plan(folders["sd15"], method="sid", text_tokens=5, gradient_checkpointing=True)
    rows = checkpointed["phases"]["generator"]["rows"]
    assert sum("largest block" in r["component"] for r in rows) == 1
    assert checkpointed["phases"]["generator"]["bytes"] < sid["phases"]["generator"]["bytes"]


def test_presets_match_their_published_counts():
    exact = {"sd15": 859_520_964, "sdxl": 2_567_463_684, "flux": 11_901_408_320}
    for name, count in exact.items():
        arch = mp.preset_architecture(name)
        assert arch.parameters == count
        assert abs(count - mp.PRESETS[name].published_parameters) <= 0.02 * mp.PRESETS[name].published_parameters
    assert mp.preset_architecture("flux").vae_parameters == 83_819_683


def test_bad_sources_are_named(tmp_path, capsys):
    with pytest.raises(mp.PlanError, match="'sdxx'.*sd15, sdxl"):
        mp.load_architecture("sdxx")
    with pytest.raises(mp.PlanError, match="unknown preset 'sd2'"):
        mp.preset_architecture("sd2")
    with pytest.raises(mp.PlanError, match=f"{tmp_path}.*no model_index.json"):
        mp.folder_architecture(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Nothing", "vae": ["diffusers", "X"]}))
    with pytest.raises(mp.PlanError, match=f"{tmp_path}.*neither a unet nor a transformer"):
        mp.folder_architecture(str(tmp_path))
    with pytest.raises(mp.PlanError, match="does not exist"):
        mp.folder_architecture(str(tmp_path / "missing"))
    assert mp.main(["no-such-model"]) == 2
    assert "'no-such-model' is neither a preset" in capsys.readouterr().err


def test_cli_markdown_and_json(folders, capsys):
    assert mp.main([folders["sd15"], "--method", "sid", "--student", "lora", "--critic", "lora", "--lora-rank", "4",
                    "--optimizer", "adamw8bit", "--gpus", "2", "--gradient-checkpointing", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["options"]["gpus"] == 2 and plan["total"] > plan["persistent"] > 0
    assert mp.main([folders["sd15"], "--no-activations"]) == 0
    out = capsys.readouterr().out
    assert "| component | bytes | GiB |" in out and "**total per GPU**" in out


def test_grid_axes_are_typed_and_checked(folders, capsys):
    axes = mp.parse_grid(["gpus=1,8", "student+critic=full+full,lora+lora", "gradient-checkpointing=false,true"])
    assert axes == [(("gpus",), [(1,), (8,)]), (("student", "critic"), [("full", "full"), ("lora", "lora")]),
                    (("gradient_checkpointing",), [(False,), (True,)])]
    with pytest.raises(mp.PlanError, match="'gpu'"):
        mp.parse_grid(["gpu=1,8"])
    with pytest.raises(mp.PlanError, match="one value per key"):
        mp.parse_grid(["student+critic=full"])
    rows = mp.grid_plans(folders["sd15"], mp.parse_grid(["gpus=1,4"]), activations=False)
    assert [options["gpus"] for options, _ in rows] == [1, 4] and rows[0][1]["total"] > rows[1][1]["total"]
    assert mp.main([folders["sd15"], "--no-activations", "--grid", "optimizer=adamw,adamw8bit"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| optimizer |") and len(table) == 4
