"""README "Distill your own teacher": every YAML file and command of the section runs as written.

The section's ``/models/...`` and ``/src/...`` paths are replaced by tiny stand-ins built here (a DDPMPipeline saved
by diffusers, a pickled EDM-style network, an empty code folder); everything else -- the files' contents and the
commands -- is taken from the README text, and each run is shortened only by trainer overrides.
"""
from __future__ import annotations

import os
import pickle
import re
import shlex

import pytest

from lightning_modules.cli import main
from lightning_modules.networks.mixture_law import law_sigma_data
from tests.tiny_edm import GaussianEDMPrecond

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--trainer.max_steps=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0",
         "--trainer.num_sanity_val_steps=0", "--trainer.callbacks=[]"]


def section() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("## Distill your own teacher")
    return text[start:text.index("\n## ", start + 1)]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", section(), flags=re.S)


def yaml_files() -> dict[str, tuple[str, str]]:
    """{file name: (content, the command in its header comment)}"""
    files = {}
    for block in blocks("yaml"):
        header = block.splitlines()[0]
        match = re.match(r"# (\S+\.yaml)\s+--\s+(distill .+)$", header)
        assert match, f"a README yaml block must start with '# FILE.yaml  --  distill ...', got {header!r}"
        files[match.group(1)] = (block, match.group(2))
    return files


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder / "ddpm")
    with open(folder / "edm.pkl", "wb") as handle:
        pickle.dump({"ema": GaussianEDMPrecond(sigma_data=0.5, img_resolution=32, img_channels=3, label_dim=10)},
                    handle)
    os.makedirs(folder / "edm-src")
    return {"/models/ddpm-cifar10-32": str(folder / "ddpm"),
            "/models/edm-cifar10-32x32-cond-vp.pkl": str(folder / "edm.pkl"), "/src/edm": str(folder / "edm-src")}


def run_command(command: str, workdir, stand_ins) -> object:
    argv = shlex.split(command)
    assert argv[:2] == ["distill", "fit"], command
    argv = [os.path.join(workdir, a) if a.endswith(".yaml") and not a.startswith("experiments/") else a
            for a in argv[1:]]
    for placeholder, real in stand_ins.items():
        argv = [a.replace(placeholder, real) for a in argv]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return main([*argv, *SHORT, f"--trainer.default_root_dir={workdir}"])
    finally:
        os.chdir(cwd)


def write_files(workdir, stand_ins):
    for name, (content, _) in yaml_files().items():
        for placeholder, real in stand_ins.items():
            content = content.replace(placeholder, real)
        (workdir / name).write_text(content)


def test_the_section_has_the_three_teachers():
    assert set(yaml_files()) == {"my_diffusers_teacher.yaml", "my_edm_teacher.yaml", "my_law.yaml"}
    assert len(blocks("bash")) == 1


@pytest.mark.parametrize("name, teacher_class", [("my_diffusers_teacher.yaml", "DiffusersUNetDenoiser"),
                                                 ("my_edm_teacher.yaml", "EDMPickleTeacher"),
                                                 ("my_law.yaml", "GaussianMixtureTeacher")])
def test_each_yaml_file_runs_with_its_command(name, teacher_class, tmp_path, stand_ins):
    write_files(tmp_path, stand_ins)
    overrides = ["--model.init_args.warm_start_steps=5", "--data.init_args.batches_per_epoch=4"] \
        if name == "my_law.yaml" else ["--data.init_args.batch_size=2"]
    cli = run_command(yaml_files()[name][1] + " " + " ".join(overrides), tmp_path, stand_ins)
    assert type(cli.model.teacher).__name__ == teacher_class
    assert cli.trainer.global_step >= 2
    if name == "my_law.yaml":
        law = cli.datamodule.law
        assert law.name == "three_blobs" and cli.model.teacher.law is not law and law.num_components == 3
        assert cli.model.teacher.law.weights.tolist() == pytest.approx([0.5, 0.3, 0.2])
        assert cli.model.student.sigma_data == pytest.approx(law_sigma_data(law))
    if name == "my_diffusers_teacher.yaml":
        assert cli.model.teacher.data_shape == (3, 32, 32) and cli.model.schedule.is_discrete
        # the file names no optimizer: the default AdamW (once a str that failed at configure_optimizers)
        assert {type(o).__name__ for o in cli.trainer.optimizers} == {"AdamW"}
    if name == "my_edm_teacher.yaml":
        assert cli.model.teacher.num_classes == 10


def test_the_command_line_law_runs(tmp_path, stand_ins):
    (command,) = [line for line in blocks("bash")[0].splitlines() if line.startswith("distill ")]
    cli = run_command(command + " --model.init_args.warm_start_steps=5 --data.init_args.batches_per_epoch=4",
                      tmp_path, stand_ins)
    assert cli.model.teacher.law.num_components == 2 and cli.datamodule.law.means.tolist() == [[-1, 0], [1, 0]]
