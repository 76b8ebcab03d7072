"""Export: a trained student becomes a diffusers folder (unet/ safetensors + scheduler config + distillation.json +
README) whose one-step sample, computed with diffusers classes alone, equals the student's own one-step sample."""
import copy
import json
import os
import re

import pytest
import torch

from lightning_modules import DMD2
from lightning_modules.cli import main
from lightning_modules.diffusion import EDMSchedule, VPDiscreteSchedule
from lightning_modules.export import export_student, one_step_sample_from_export
from lightning_modules.networks import DiffusersUNetDenoiser, ToyMLPDenoiser

UNET_CONFIG = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                   norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=11)
TOL = dict(rtol=1e-5, atol=1e-5)


def _perturb(network, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _module(schedule, num_class_embeds=11, seed=0, **denoiser_kwargs):
    torch.manual_seed(seed)
    teacher = DiffusersUNetDenoiser(config=dict(UNET_CONFIG, num_class_embeds=num_class_embeds), schedule=schedule,
                                    **denoiser_kwargs)
    module = DMD2(teacher)  # student=None: a copy of the teacher
    _perturb(module.student, seed + 1)
    return module


def _inputs(n=3, seed=0, conditional=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), (torch.tensor([0, 5, 9])[:n] if conditional else None)


def _readme_sample(folder, monkeypatch):
    """Run the README's python snippet as written (from the folder's parent) and return its noise, labels, sample."""
    text = open(os.path.join(folder, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "lightning_modules" not in code
    monkeypatch.chdir(os.path.dirname(folder))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace["noise"], namespace["labels"], namespace["sample"]


@pytest.mark.parametrize("boundary_condition", [False, True], ids=["edm", "edm-boundary"])
def test_edm_class_conditional_student_round_trip(tmp_path, monkeypatch, boundary_condition):
    module = _module(EDMSchedule(), preconditioning="edm", boundary_condition=boundary_condition)
    noise, cond = _inputs()
    expected = module.sample(noise, cond, nfe=1)
    with torch.no_grad():
        assert not torch.allclose(expected, module.teacher(80.0 * noise, torch.full((3,), 80.0, dtype=torch.float64),
                                                           cond), atol=1e-3)  # the student is not the teacher

    folder = export_student(module, str(tmp_path / "student"))
    assert folder == str(tmp_path / "student")
    assert sorted(os.listdir(folder)) == ["README.md", "distillation.json", "scheduler", "unet"]
    unet_files = os.listdir(os.path.join(folder, "unet"))
    assert any(f.endswith(".safetensors") for f in unet_files) and not any(f.endswith(".bin") for f in unet_files)
    scheduler_config = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
    assert scheduler_config["_class_name"] == "EDMEulerScheduler"
    assert (scheduler_config["sigma_min"], scheduler_config["sigma_max"], scheduler_config["sigma_data"]) == (
        0.002, 80.0, 0.5)
    info = json.load(open(os.path.join(folder, "distillation.json")))
    assert info["method"] == "DMD2" and info["weights"] == "student"
    assert info["student_timesteps"] == [80.0] and info["student_sigmas"] == [80.0]
    assert info["conditioning"]["num_classes"] == 10 and info["conditioning"]["null_label"] == 10
    assert info["preconditioning"]["type"] == "edm"
    assert info["preconditioning"]["boundary_condition"] is boundary_condition
    assert info["schedule"]["class"] == "EDMSchedule"

    torch.testing.assert_close(one_step_sample_from_export(folder, noise, cond), expected, **TOL)
    if getattr(module.student, "num_classes", 0):  # no labels: the null label, as the student does
        torch.testing.assert_close(one_step_sample_from_export(folder, noise), module.sample(noise, None, nfe=1), **TOL)
    if not boundary_condition:  # the README's snippet, run verbatim, gives the student's sample too
        noise, labels, sample = _readme_sample(folder, monkeypatch)
        torch.testing.assert_close(sample, module.sample(noise, labels, nfe=1), **TOL)
    assert not [name for name in os.listdir(tmp_path) if name != "student"]  # no staging folder left behind


def test_ema_weights_are_exported_when_tracked(tmp_path):
    module = _module(EDMSchedule(), preconditioning="edm", seed=3)
    ema = copy.deepcopy(module.student).requires_grad_(False)
    _perturb(ema, 7)
    if hasattr(module, "set_evaluation_network"):  # held outside nn.Module's registry
        module.set_evaluation_network(ema)
    else:
        module.evaluation_student = ema
    assert module.evaluation_student is ema
    noise, cond = _inputs(seed=1)
    ema_folder = export_student(module, str(tmp_path / "ema"))
    raw_folder = export_student(module, str(tmp_path / "raw"), use_ema=False)
    torch.testing.assert_close(one_step_sample_from_export(ema_folder, noise, cond), module.sample(noise, cond, nfe=1),
                               **TOL)
    with torch.no_grad():
        raw = module.generate(noise, cond, nfe=1, network=module.student.eval())
    torch.testing.assert_close(one_step_sample_from_export(raw_folder, noise, cond), raw, **TOL)
    assert not torch.allclose(raw, module.sample(noise, cond, nfe=1), atol=1e-3)
    assert json.load(open(os.path.join(ema_folder, "distillation.json")))["weights"] == "ema"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_discrete_unconditional_student_round_trip(tmp_path, monkeypatch, prediction_type):
    schedule = VPDiscreteSchedule()
    module = _module(schedule, num_class_embeds=None, prediction_type=prediction_type)
    noise, _ = _inputs(conditional=False)
    folder = export_student(module, str(tmp_path / "vp"))
    scheduler_config = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
    assert scheduler_config["_class_name"] == "DDPMScheduler"
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
        assert scheduler_config[key] == getattr(schedule, key)
    assert scheduler_config["prediction_type"] == prediction_type
    info = json.load(open(os.path.join(folder, "distillation.json")))
    assert info["unet_timesteps"] == [999] and info["conditioning"] == {"type": "unconditional"}

    torch.testing.assert_close(one_step_sample_from_export(folder, noise), module.sample(noise, None, nfe=1), **TOL)
    noise, labels, sample = _readme_sample(folder, monkeypatch)
    assert labels is None
    torch.testing.assert_close(sample, module.sample(noise, None, nfe=1), **TOL)


def test_existing_folder_is_refused_unless_overwrite(tmp_path):
    module = _module(EDMSchedule(), preconditioning="edm")
    target = tmp_path / "taken_folder"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="taken_folder"):
        export_student(module, str(target))
    assert os.listdir(target) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["taken_folder"]  # the staging folder was cleaned up
    export_student(module, str(target), overwrite=True)
    assert "keep.txt" not in os.listdir(target) and "unet" in os.listdir(target)
    assert sorted(os.listdir(tmp_path)) == ["taken_folder"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_student(module, str(empty))  # an existing empty folder is fine
    assert "distillation.json" in os.listdir(empty)


def test_non_unet_student_is_a_type_error_naming_the_class(tmp_path):
    module = DMD2(ToyMLPDenoiser(dim=2, hidden=8, depth=2, schedule=EDMSchedule()))
    with pytest.raises(TypeError, match="ToyMLPDenoiser"):
        export_student(module, str(tmp_path / "mlp"))
    assert not os.path.exists(tmp_path / "mlp")


CLI_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  max_epochs: 1
  num_sanity_val_steps: 0
  limit_val_batches: 0
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: callbacks.StudentEMA
      init_args: {{decay: 0.5}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {ckpt_dir}, filename: last}}
data:
  class_path: datamodules.NoiseDataModule
  init_args: {{shape: [1, 8, 8], num_classes: 10, batch_size: 4, batches_per_epoch: 20, val_batches: 1}}
model:
  class_path: lightning_modules.DMD2
  init_args:
    teacher:
      class_path: lightning_modules.networks.DiffusersUNetDenoiser
      init_args:
        config:
          sample_size: 8
          in_channels: 1
          out_channels: 1
          block_out_channels: [8, 16]
          layers_per_block: 1
          norm_num_groups: 4
          down_block_types: [DownBlock2D, DownBlock2D]
          up_block_types: [UpBlock2D, UpBlock2D]
          num_class_embeds: 11
        preconditioning: edm
        schedule: {{class_path: lightning_modules.diffusion.EDMSchedule}}
    generator_optimizer:
      class_path: torch.optim.Adam
      init_args: {{lr: 1.0e-3}}
    critic_optimizer:
      class_path: torch.optim.Adam
      init_args: {{lr: 1.0e-3}}
"""


def test_distill_export_command(tmp_path):
    config = tmp_path / "tiny_unet_dmd2.yaml"
    config.write_text(CLI_CONFIG.format(ckpt_dir=tmp_path / "ckpts"))
    fitted = main(["fit", "-c", str(config), "--trainer.max_epochs=1", "--data.init_args.batches_per_epoch=2",
                   "--trainer.default_root_dir", str(tmp_path)])
    module = fitted.model
    ckpt = str(tmp_path / "ckpts" / "last.ckpt")
    assert os.path.isfile(ckpt) and module.evaluation_student is not None
    noise, cond = _inputs(seed=2)

    out = tmp_path / "exported"
    main(["export", "-c", str(config), "--ckpt_path", ckpt, "--export_dir", str(out)])
    torch.testing.assert_close(one_step_sample_from_export(str(out), noise, cond), module.sample(noise, cond, nfe=1),
                               **TOL)
    assert json.load(open(out / "distillation.json"))["weights"] == "ema"

    raw = tmp_path / "exported_raw"
    main(["export", "-c", str(config), "--ckpt_path", ckpt, "--export_dir", str(raw), "--use_ema", "false"])
    with torch.no_grad():
        expected = module.generate(noise, cond, nfe=1, network=module.student.eval())
    torch.testing.assert_close(one_step_sample_from_export(str(raw), noise, cond), expected, **TOL)
    assert not torch.allclose(expected, module.sample(noise, cond, nfe=1), atol=1e-4)  # EMA != raw after training

    with pytest.raises(FileExistsError, match="exported"):
        main(["export", "-c", str(config), "--ckpt_path", ckpt, "--export_dir", str(out)])
