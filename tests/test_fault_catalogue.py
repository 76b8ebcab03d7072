"""Fault catalogue: bad input and faults tried the way a new user meets them, each ending in a clear error that names
the bad value, with nothing already written lost or half-written (every case snapshots the files it could touch
and compares them byte for byte afterwards). [fixed] marks a case that failed unclearly, silently or lossily before
this catalogue and was fixed (files in brackets); the others already behaved and are kept as regression tests.

Config (``distill fit -c ...``)
  unknown_key_cli               SystemExit 2: "unrecognized arguments: --trainer.max_stepz=3"
  unknown_key_in_yaml           SystemExit 2: names the class and "Option 'warm_start_stepz' is not accepted"
  wrong_type_value              SystemExit 2: "batch_size": "Expected a <class 'int'>. Got value: abc"
  unknown_class_path            SystemExit 2: "callbacks.NoSuchCallback" ... "has no attribute 'NoSuchCallback'"
  missing_config_file           SystemExit 2: "File does not exist: '<path>'"
  yaml_syntax_error             [fixed: named no file, only "<unicode string>", line 2 (cli_guards)] SystemExit 2:
                                "config file <path>, line 3, column 1: invalid YAML (...)"
  config_not_a_mapping          [fixed: "Unexpected config: <its text>", no file (cli_guards)] SystemExit 2: "config
                                file <path> holds a YAML str, not a mapping of settings"
  config_not_utf8               [fixed: bare UnicodeDecodeError traceback (cli_guards)] SystemExit 2: "config file
                                <path> is not UTF-8 text (byte 23 is b'\\xff')"
  negative_batch_size           ValueError: "batch_size must be >= 1, got -4"
  unknown_toy_law               ValueError: "unknown toy law 'spiral'; expected one of [...]"
  negative_max_steps            MisconfigurationException: "max_steps ... You passed in -5"
  zero_hidden_size              ValueError: "ToyMLPDenoiser needs positive sizes, got dim=2, hidden=0, depth=4"
  nonexistent_teacher_path      ValueError: "pretrained_path '<path>/unet' is not a diffusers model folder"
  val_check_interval_too_large  [fixed: the shipped val_check_interval 1000 made every run of < 1000 batches stop with
                                Lightning's ValueError after set-up (cli_guards)] clamped to the epoch with a warning
                                naming 1000 and the epoch's 3 batches; the fit validates at the epoch's end
Resuming (``distill fit --ckpt_path FILE``); the good checkpoint and the bad file stay byte-identical, no .ckpt is
written
  ckpt_missing                  [fixed: failed only after the trainer's set-up (cli_guards)] FileNotFoundError:
                                "--ckpt_path <path>: no such file; checkpoints in <folder>: <the good one>"
  ckpt_zero_bytes               [fixed: said "not a zip file" (checkpoint_io)] CorruptCheckpointError: "<path> ... the
                                file is empty (0 bytes)"
  ckpt_truncated                CorruptCheckpointError: "<path> is truncated or corrupt ... other checkpoints in that
                                folder: <the good one>"
  ckpt_text_file                [fixed: "truncated or corrupt" (checkpoint_io)] NotACheckpointError: "<path> is a text
                                file (it starts with '...')"
  ckpt_bare_state_dict          [fixed: Lightning's KeyError: 'pytorch-lightning_version' (checkpoint_io)]
                                NotACheckpointError: "<path> holds a bare state_dict of N tensors"
  ckpt_safetensors              [fixed: "truncated or corrupt" (checkpoint_io)] NotACheckpointError: "<path> is a
                                safetensors weights file, not a Lightning checkpoint"
  ckpt_pickled_object           [fixed: torch's UnpicklingError naming no file (checkpoint_io)] UnsafeCheckpointError:
                                "<path> holds pickled Python objects ... (... _write_marker ...); nothing in it was
                                run" -- its payload provably runs under weights_only=False, and did not run here
  ckpt_is_a_folder              [fixed: "[Errno 21] Is a directory" from torch (checkpoint_io)] IsADirectoryError:
                                "checkpoint path <path> is a folder, not a .ckpt file"
  ckpt_from_another_method      [fixed: SILENTLY TRAINED the checkpoint's method: LightningCLI copied its _class_path
                                over the config (cli_guards)] CheckpointMismatchError: "written by
                                ...ConsistencyDistillation, but the config trains lightning_modules.DMD2"
  ckpt_changed_architecture     [fixed: torch's size-mismatch list without the file (cli_guards, checkpoint_io)]
                                CheckpointMismatchError: "<path> (written by lightning_modules.DMD2) does not fit ...
                                size mismatch for student.input.weight ... [32, 66] ... [64, 66]"
  ckpt_changed_hyperparameter   [fixed: --model.init_args.guidance_scale=3 on resume was SILENTLY REPLACED by the
                                checkpoint's 1.0 (cli_guards)] warning "the config's guidance_scale=3.0 (checkpoint:
                                1.0); the config's values are used", and 3.0 is what trains
  trainer_fit_bare_state_dict   [fixed: KeyError: 'pytorch-lightning_version' (checkpoint_io: AtomicCheckpointIO, now
                                every CLI trainer's writer/reader)] Trainer.fit(ckpt_path=...): NotACheckpointError
  trainer_fit_pickled_object    [fixed: bare UnpicklingError (checkpoint_io)] Trainer.fit(ckpt_path=...):
                                UnsafeCheckpointError naming the file; the payload did not run
Export (``distill export``); the checkpoint, the target and its parent stay as they were, no staging folder is left
  export_into_non_empty_dir     FileExistsError: "export folder '<dir>' exists and is not empty; ... --overwrite true"
  export_missing_ckpt           [fixed: torch's "[Errno 2]" (export)] FileNotFoundError: "checkpoint file not found:
                                <path>"
  export_truncated_ckpt         [fixed: torch's "PytorchStreamReader failed reading zip archive", no file (export)]
                                CorruptCheckpointError naming the file
  export_bare_state_dict        [fixed: KeyError: 'state_dict' (export)] NotACheckpointError naming the file
  export_pickled_object         [fixed: UnpicklingError, no file (export)] UnsafeCheckpointError; the payload did not
                                run
  export_changed_config         [fixed: torch's load_state_dict list, no file (export)] CheckpointMismatchError:
                                "<path> (written by lightning_modules.DMD2) does not fit ... Unexpected key(s) ..."
  export_dir_under_a_file       [fixed: "[Errno 17] File exists: '<parent>'" (export)] NotADirectoryError: "export
                                folder '<dir>' cannot be created: '<parent>' is a file, not a folder"
  export_bad_flag_value         SystemExit 2: "--use_ema: expected true or false, got 'maybe'"
  export_without_ckpt_path      SystemExit 2: "the following arguments are required: --ckpt_path"
  export_toy_student            TypeError: "... must be a DiffusersUNetDenoiser, got ToyMLPDenoiser"
Runs
  checkpoint_dir_under_a_file   [fixed: failed only at the first save, after the training it would have kept
                                (callbacks/run_guard)] NotADirectoryError before the warm start: "the checkpoint folder
                                of ModelCheckpoint (dirpath) <path> cannot be written"; global_step 0
  root_dir_under_a_file         NotADirectoryError naming <path> (Lightning's config save, before anything runs)
  read_only_checkpoint_dir      (chmod 0o500; skipped as root, where chmod does not stop writes -- the case above is
                                the one root meets) PermissionError naming the folder, before training
  nan_loss                      [fixed: Lightning trained on through NaN and kept writing checkpoints
                                (callbacks/run_guard)] a learning rate of 1e10: NonFiniteTrainingError "non-finite
                                gradient at global step 2 ... 'critic.input.weight'"; last.ckpt (step 2) loads, finite
  non_finite_weights_not_saved  [fixed (callbacks/run_guard)] trainer.save_checkpoint with a NaN weight:
                                NonFiniteTrainingError naming the parameter; last.ckpt byte-identical
  disk_full_during_save         [fixed: "[Errno 28] No space left on device", no file (checkpoint_io)] OSError ENOSPC:
                                "could not write checkpoint <path> ...; the previous file ... is unchanged"; it is
                                byte-identical and no temporary is left
  kill_9_mid_run                kill -9 between batches: every checkpoint file is whole; --ckpt_path last resumes to
                                the end
  kill_9_mid_checkpoint_write   [fixed: distill fit used Lightning's non-atomic writer unless PreemptionCheckpoint was
                                configured (cli_guards)] kill -9 half-way through writing last.ckpt: last.ckpt is the
                                previous one, byte-identical; the hidden half-written temporary is refused as
                                truncated and removed by the next save; --ckpt_path last resumes to the end
Data
  corrupt_image_in_folder       ValueError naming the corrupt file (ImageFolderDataModule)
  image_folder_missing          FileNotFoundError naming the folder
  prompt_file_not_utf8          PromptFileError: "<file>, line 3: not UTF-8"
  prompt_file_empty             PromptFileError: "<file>: no prompts"
  captions_file_missing         FileNotFoundError naming the captions file (ImageTextDataModule)

Covered elsewhere, not repeated here: a damaged hpc_ckpt_* found by Slurm auto-resume and kill -9 inside
AtomicCheckpointIO (test_preemption.py); a corrupt image named with its captions line, captions rows naming missing
images (test_image_text_datamodule.py); prompt-file format errors (test_prompt_datamodules.py); bad method names and
argument values (test_cli_configs.py); export --overwrite replacing a folder (test_export.py).
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_modules.checkpoint_io import (TEMP_PREFIX, AtomicCheckpointIO, CheckpointMismatchError,
                                             CorruptCheckpointError, NotACheckpointError, UnsafeCheckpointError,
                                             check_checkpoint_file)
from lightning_modules.cli import main

ROOT = Path(__file__).resolve().parent.parent
TOY_CONFIG = "experiments/toy/ring8/dmd2.yaml"
#: ring8 DMD2, 3 batches of 32 (6 optimizer steps: critic + generator), 5 warm-start steps, no callbacks or logger
TOY = ["-c", TOY_CONFIG, "--trainer.max_steps=6", "--data.init_args.batches_per_epoch=3", "--trainer.logger=false",
       "--model.init_args.warm_start_steps=5", "--data.init_args.batch_size=32", "--trainer.enable_progress_bar=false",
       "--trainer.enable_model_summary=false", "--trainer.callbacks=[]", "--trainer.limit_val_batches=0",
       "--model.init_args.student.init_args.hidden=32"]
CASES: dict = {}


def case(name: str):
    def register(function):
        CASES[name] = function
        return function
    return register


# ---------------------------------------------------------------------------------------------------------- helpers
def snapshot(*paths) -> dict:
    """{path: sha256} of every file (hidden ones too) under the given files and folders; missing ones map to None."""
    out = {}
    for path in map(Path, paths):
        if path.is_file():
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
            out[str(path) + "/"] = "folder"
        else:
            out[str(path)] = None
    return out


def checkpoint_files(folder) -> list[str]:
    folder = Path(folder)
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(".ckpt") or p.name.startswith(TEMP_PREFIX)) \
        if folder.exists() else []


def usage_error(capsys, args) -> str:
    """stderr of a command that must exit with status 2 (argument errors)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args, run=False) if args[:1] != ["export"] else main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _write_marker(path):
    """The payload of the hostile checkpoints: runs only if a loader unpickles arbitrary objects."""
    Path(path).write_text("the checkpoint's pickled object ran")
    return path


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def hostile_copy(good: Path, target: Path, marker: Path) -> Path:
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["hyper_parameters"]["note"] = Payload(marker)
    torch.save(checkpoint, target)
    # the payload is live: an unrestricted load runs it (so its absence below means the loader refused it)
    torch.load(target, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return target


def fit(*args, run_dir, checkpoints=None, every_n_train_steps=2, extra=()):
    """``distill fit`` of the tiny toy run into ``run_dir``; with ``checkpoints``, a ModelCheckpoint writing
    last.ckpt there every ``every_n_train_steps`` optimizer steps."""
    argv = ["fit", *TOY, f"--trainer.default_root_dir={run_dir}", *args]
    if checkpoints is not None:
        argv += ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 f"--trainer.callbacks.dirpath={checkpoints}", "--trainer.callbacks.save_last=true",
                 "--trainer.callbacks.save_top_k=0", f"--trainer.callbacks.every_n_train_steps={every_n_train_steps}"]
    return main(argv + list(extra))


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory) -> Path:
    """A good checkpoint of the tiny toy run (global step 6), alone in its folder."""
    root = tmp_path_factory.mktemp("toy_good")
    fit(run_dir=root / "run", checkpoints=root / "ckpts", every_n_train_steps=6)
    path = root / "ckpts" / "last.ckpt"
    assert torch.load(path, weights_only=True)["global_step"] == 6
    return path


@pytest.fixture(scope="module")
def cd_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cd_good")
    main(["fit", *[a.replace("dmd2.yaml", "cd.yaml") for a in TOY], f"--trainer.default_root_dir={root / 'run'}",
          "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
          f"--trainer.callbacks.dirpath={root / 'ckpts'}", "--trainer.callbacks.save_last=true",
          "--trainer.callbacks.save_top_k=0"])
    return root / "ckpts" / "last.ckpt"


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory) -> tuple[Path, Path]:
    """(config, checkpoint) of the tiny diffusers-UNet DMD2 run that ``distill export`` can write."""
    from tests.test_export import CLI_CONFIG
    root = tmp_path_factory.mktemp("unet_good")
    config = root / "tiny_unet_dmd2.yaml"
    config.write_text(CLI_CONFIG.format(ckpt_dir=root / "ckpts"))
    main(["fit", "-c", str(config), "--data.init_args.batches_per_epoch=2", f"--trainer.default_root_dir={root}"])
    return config, root / "ckpts" / "last.ckpt"


class Context:
    def __init__(self, request, tmp_path, capsys, monkeypatch):
        self.request, self.tmp, self.capsys, self.monkeypatch = request, tmp_path, capsys, monkeypatch

    def fixture(self, name):
        return self.request.getfixturevalue(name)


# ---------------------------------------------------------------------------------------------------------- config
def _config_error(c: Context, *args) -> str:
    run = c.tmp / "run"
    err = usage_error(c.capsys, [*TOY, f"--trainer.default_root_dir={run}", *args])
    assert not run.exists()
    return err


@case("unknown_key_cli")
def _(c):
    assert "unrecognized arguments: --trainer.max_stepz=3" in _config_error(c, "--trainer.max_stepz=3")


@case("unknown_key_in_yaml")
def _(c):
    extra = c.tmp / "typo.yaml"
    extra.write_text("model:\n  init_args:\n    warm_start_stepz: 3\n")
    before = snapshot(extra)
    err = _config_error(c, "-c", str(extra))
    assert "lightning_modules.DMD2" in err and "Option 'warm_start_stepz' is not accepted" in err
    assert snapshot(extra) == before


@case("wrong_type_value")
def _(c):
    err = _config_error(c, "--data.init_args.batch_size=abc")
    assert 'Parser key "batch_size"' in err and "Got value: abc" in err


@case("unknown_class_path")
def _(c):
    err = _config_error(c, "--trainer.callbacks+=callbacks.NoSuchCallback")
    assert "'callbacks.NoSuchCallback'" in err and "has no attribute 'NoSuchCallback'" in err


@case("missing_config_file")
def _(c):
    missing = c.tmp / "nope.yaml"
    assert f"File does not exist: '{missing}'" in _config_error(c, "-c", str(missing))


@case("yaml_syntax_error")
def _(c):
    bad = c.tmp / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [3\n")
    before = snapshot(bad)
    assert f"config file {bad}, line 3, column 1: invalid YAML" in _config_error(c, "-c", str(bad))
    assert snapshot(bad) == before


@case("config_not_a_mapping")
def _(c):
    prompts = c.tmp / "prompts.txt"  # a prompt file passed as -c
    prompts.write_text("a red circle\n")
    assert f"config file {prompts} holds a YAML str, not a mapping of settings" in _config_error(c, "-c", str(prompts))


@case("config_not_utf8")
def _(c):
    latin = c.tmp / "latin1.yaml"
    latin.write_bytes("# réglages\ntrainer:\n  max_steps: 3\n".encode("latin-1"))
    assert f"config file {latin} is not UTF-8 text (byte 3 is b'\\xe9')" in _config_error(c, "-c", str(latin))


def _instantiation_error(c: Context, error_type, *args) -> str:
    run = c.tmp / "run"
    with pytest.raises(error_type) as error:
        main([*TOY, f"--trainer.default_root_dir={run}", *args], run=False)
    assert not run.exists()
    return str(error.value)


@case("negative_batch_size")
def _(c):
    assert "batch_size must be >= 1, got -4" in _instantiation_error(c, ValueError, "--data.init_args.batch_size=-4")


@case("unknown_toy_law")
def _(c):
    message = _instantiation_error(c, ValueError, "--data.init_args.law=spiral")
    assert "unknown toy law 'spiral'" in message and "ring8" in message


@case("negative_max_steps")
def _(c):
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    message = _instantiation_error(c, MisconfigurationException, "--trainer.max_steps=-5")
    assert "max_steps" in message and "-5" in message


@case("zero_hidden_size")
def _(c):
    message = _instantiation_error(c, ValueError, "--model.init_args.student.init_args.hidden=0")
    assert "ToyMLPDenoiser needs positive sizes, got dim=2, hidden=0" in message


@case("nonexistent_teacher_path")
def _(c):
    missing = c.tmp / "no_teacher"
    with pytest.raises(ValueError) as error:
        main(["-c", "experiments/mnist/dmd2.yaml", f"--trainer.default_root_dir={c.tmp / 'run'}",
              f"--model.init_args.teacher.init_args.pretrained_path={missing}"], run=False)
    assert f"pretrained_path '{missing}/unet' is not a diffusers model folder" in str(error.value)
    assert not missing.exists() and not (c.tmp / "run").exists()


@case("val_check_interval_too_large")
def _(c):
    args = [a for a in TOY if a != "--trainer.limit_val_batches=0"]
    assert "val_check_interval: 1000" in (ROOT / TOY_CONFIG).read_text()  # the shipped value, not overridden here
    with pytest.warns(UserWarning, match=r"val_check_interval=1000 is more than the 3 training batches of an epoch"):
        cli = main(["fit", *args, "--data.init_args.val_batches=1", f"--trainer.default_root_dir={c.tmp}"])
    assert cli.trainer.global_step == 6 and cli.trainer.val_check_batch == 3
    assert "val/generator/loss" in cli.trainer.callback_metrics  # it validated, at the end of the epoch


# ---------------------------------------------------------------------------------------------------------- resuming
def _resume_error(c: Context, bad, error_type, *extra) -> str:
    """``distill fit --ckpt_path bad``: the error, with the good checkpoint and the bad file unchanged, no .ckpt
    written."""
    good = c.fixture("toy_ckpt")
    run = c.tmp / "run"
    before = snapshot(good, bad)
    with pytest.raises(error_type) as error:
        fit(f"--ckpt_path={bad}", "--trainer.max_epochs=2", "--trainer.max_steps=-1", *extra, run_dir=run,
            checkpoints=run / "ckpts")
    assert snapshot(good, bad) == before
    assert checkpoint_files(run) == []
    return str(error.value)


def _beside_good(c: Context, name: str) -> Path:
    """A path in the good checkpoint's folder (so errors can point to the good neighbour); removed afterwards."""
    path = c.fixture("toy_ckpt").parent / name
    c.request.addfinalizer(lambda: path.unlink(missing_ok=True) if not path.is_dir() else os.rmdir(path))
    return path


@case("ckpt_missing")
def _(c):
    missing = _beside_good(c, "epoch=9.ckpt")
    message = _resume_error(c, missing, FileNotFoundError)
    assert f"--ckpt_path {missing}: no such file; checkpoints in {missing.parent}: last.ckpt" in message


@case("ckpt_zero_bytes")
def _(c):
    empty = _beside_good(c, "empty.ckpt")
    empty.write_bytes(b"")
    message = _resume_error(c, empty, CorruptCheckpointError)
    assert f"checkpoint {empty} is truncated or corrupt: the file is empty (0 bytes)" in message
    assert "last.ckpt" in message


@case("ckpt_truncated")
def _(c):
    good = c.fixture("toy_ckpt")
    cut = _beside_good(c, "cut.ckpt")
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    message = _resume_error(c, cut, CorruptCheckpointError)
    assert f"checkpoint {cut} is truncated or corrupt" in message and "last.ckpt" in message


@case("ckpt_text_file")
def _(c):
    text = c.tmp / "notes.ckpt"
    text.write_text("step 600: loss 0.12\n")
    message = _resume_error(c, text, NotACheckpointError)
    assert f"{text} is a text file (it starts with 'step 600: loss 0.12')" in message


@case("ckpt_bare_state_dict")
def _(c):
    bare = c.tmp / "weights.ckpt"
    torch.save(torch.load(c.fixture("toy_ckpt"), weights_only=True)["state_dict"], bare)
    message = _resume_error(c, bare, NotACheckpointError)
    assert f"{bare} holds a bare state_dict of" in message and "not a Lightning checkpoint" in message


@case("ckpt_safetensors")
def _(c):
    from safetensors.torch import save_file
    weights = c.tmp / "student.ckpt"
    save_file({k: v.contiguous() for k, v in torch.load(c.fixture("toy_ckpt"), weights_only=True)["state_dict"].items()
               if v.is_floating_point()}, str(weights))
    message = _resume_error(c, weights, NotACheckpointError)
    assert f"{weights} is a safetensors weights file, not a Lightning checkpoint" in message


@case("ckpt_pickled_object")
def _(c):
    marker = c.tmp / "PAYLOAD_RAN"
    hostile = hostile_copy(c.fixture("toy_ckpt"), c.tmp / "hostile.ckpt", marker)
    message = _resume_error(c, hostile, UnsafeCheckpointError)
    assert f"checkpoint {hostile} holds pickled Python objects" in message and "_write_marker" in message
    assert "nothing in it was run" in message and not marker.exists()


@case("ckpt_is_a_folder")
def _(c):
    folder = c.tmp / "export_out"
    folder.mkdir()
    message = _resume_error(c, folder, IsADirectoryError)
    assert f"checkpoint path {folder} is a folder, not a .ckpt file" in message


@case("ckpt_from_another_method")
def _(c):
    other = c.fixture("cd_ckpt")
    message = _resume_error(c, other, CheckpointMismatchError)
    assert f"checkpoint {other} was written by lightning_modules.ConsistencyDistillation, but the config trains " \
           "lightning_modules.DMD2" in message


@case("ckpt_changed_architecture")
def _(c):
    good = c.fixture("toy_ckpt")
    message = _resume_error(c, good, CheckpointMismatchError, "--model.init_args.student.init_args.hidden=64")
    assert f"checkpoint {good} (written by lightning_modules.DMD2) does not fit the DMD2" in message
    assert "size mismatch for student.input.weight" in message and "[32, 66]" in message and "[64, 66]" in message


@case("ckpt_changed_hyperparameter")
def _(c):
    good = c.fixture("toy_ckpt")
    before = snapshot(good)
    with pytest.warns(UserWarning, match="the config's values are used") as record:
        cli = fit(f"--ckpt_path={good}", "--trainer.max_epochs=2", "--trainer.max_steps=-1",
                  "--model.init_args.guidance_scale=3.0", run_dir=c.tmp / "run")
    notes = [str(w.message) for w in record if "the config's values are used" in str(w.message)]
    assert notes == [f"--ckpt_path {good}: the config's guidance_scale=3.0 (checkpoint: 1.0); the config's values "
                     "are used"]  # that value alone: the others are the checkpoint's
    assert cli.model.hparams.guidance_scale == 3.0 and cli.trainer.global_step == 12  # resumed at 6, trained on
    assert snapshot(good) == before


def _trainer_resume_error(c: Context, bad, error_type) -> str:
    """``Trainer.fit(ckpt_path=...)`` on a CLI-built trainer (Slurm auto-resume, scripts): the trainer's reader."""
    cli = main([*TOY, f"--trainer.default_root_dir={c.tmp / 'run'}"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    before = snapshot(bad)
    with pytest.raises(error_type) as error:
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(bad))
    assert snapshot(bad) == before and checkpoint_files(c.tmp / "run") == []
    return str(error.value)


@case("trainer_fit_bare_state_dict")
def _(c):
    bare = c.tmp / "weights.ckpt"
    torch.save(torch.load(c.fixture("toy_ckpt"), weights_only=True)["state_dict"], bare)
    assert f"{bare} holds a bare state_dict of" in _trainer_resume_error(c, bare, NotACheckpointError)


@case("trainer_fit_pickled_object")
def _(c):
    marker = c.tmp / "PAYLOAD_RAN"
    hostile = hostile_copy(c.fixture("toy_ckpt"), c.tmp / "hostile.ckpt", marker)
    message = _trainer_resume_error(c, hostile, UnsafeCheckpointError)
    assert f"checkpoint {hostile} holds pickled Python objects" in message and not marker.exists()


# ---------------------------------------------------------------------------------------------------------- export
def _export_error(c: Context, error_type, ckpt=None, out=None, *extra, config=None) -> tuple[str, Path]:
    unet_config, good = c.fixture("unet_run")
    ckpt, out = ckpt or good, out or c.tmp / "exported"
    watched = [good, ckpt, c.tmp]
    before = snapshot(*watched)
    with pytest.raises(error_type) as error:
        main(["export", "-c", str(config or unet_config), "--ckpt_path", str(ckpt), "--export_dir", str(out), *extra])
    assert snapshot(*watched) == before  # nothing written, nothing removed, no staging folder left
    return str(error.value), out


@case("export_into_non_empty_dir")
def _(c):
    out = c.tmp / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    message, _ = _export_error(c, FileExistsError, None, out)
    assert f"export folder '{out}' exists and is not empty" in message and "--overwrite true" in message


@case("export_missing_ckpt")
def _(c):
    missing = c.tmp / "no.ckpt"
    message, out = _export_error(c, FileNotFoundError, missing)
    assert f"checkpoint file not found: {missing}" in message and not out.exists()


@case("export_truncated_ckpt")
def _(c):
    cut = c.tmp / "cut.ckpt"
    data = c.fixture("unet_run")[1].read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 4])
    message, _ = _export_error(c, CorruptCheckpointError, cut)
    assert f"checkpoint {cut} is truncated or corrupt" in message


@case("export_bare_state_dict")
def _(c):
    bare = c.tmp / "weights.ckpt"
    torch.save(torch.load(c.fixture("unet_run")[1], weights_only=True)["state_dict"], bare)
    message, _ = _export_error(c, NotACheckpointError, bare)
    assert f"{bare} holds a bare state_dict of" in message


@case("export_pickled_object")
def _(c):
    marker = c.tmp / "PAYLOAD_RAN"
    hostile = hostile_copy(c.fixture("unet_run")[1], c.tmp / "hostile.ckpt", marker)
    message, _ = _export_error(c, UnsafeCheckpointError, hostile)
    assert f"checkpoint {hostile} holds pickled Python objects" in message and not marker.exists()


@case("export_changed_config")
def _(c):
    good = c.fixture("unet_run")[1]
    message, _ = _export_error(c, CheckpointMismatchError, None, None,
                               "--model.init_args.teacher.init_args.config.block_out_channels=[8,8]")
    assert f"checkpoint {good} (written by lightning_modules.DMD2) does not fit the DMD2" in message
    assert "Unexpected key(s)" in message and "conv_shortcut" in message


@case("export_dir_under_a_file")
def _(c):
    blocker = c.tmp / "exports"
    blocker.write_text("a file where the user expected a folder")
    out = blocker / "student"
    message, _ = _export_error(c, NotADirectoryError, None, out)
    assert f"export folder '{out}' cannot be created: '{blocker}' is a file, not a folder" in message


@case("export_bad_flag_value")
def _(c):
    config, good = c.fixture("unet_run")
    err = usage_error(c.capsys, ["export", "-c", str(config), "--ckpt_path", str(good), "--export_dir",
                                 str(c.tmp / "out"), "--use_ema", "maybe"])
    assert "--use_ema: expected true or false, got 'maybe'" in err and not (c.tmp / "out").exists()


@case("export_without_ckpt_path")
def _(c):
    config, _ = c.fixture("unet_run")
    err = usage_error(c.capsys, ["export", "-c", str(config), "--export_dir", str(c.tmp / "out")])
    assert "the following arguments are required: --ckpt_path" in err and not (c.tmp / "out").exists()


@case("export_toy_student")
def _(c):
    good = c.fixture("toy_ckpt")
    message, _ = _export_error(c, TypeError, good, None, "--model.init_args.student.init_args.hidden=32",
                               config=TOY_CONFIG)
    assert "must be a DiffusersUNetDenoiser, got ToyMLPDenoiser" in message


# ---------------------------------------------------------------------------------------------------------- runs
@case("checkpoint_dir_under_a_file")
def _(c):
    blocker = c.tmp / "checkpoints"
    blocker.write_text("a file")
    target = blocker / "run1"
    cli = main([*TOY, f"--trainer.default_root_dir={c.tmp / 'run'}", "--model.init_args.warm_start_steps=2000",
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                f"--trainer.callbacks.dirpath={target}"], run=False)
    before = snapshot(c.tmp)
    started = time.time()
    with pytest.raises(NotADirectoryError) as error:
        cli.trainer.fit(cli.model, cli.datamodule)
    assert f"the checkpoint folder of ModelCheckpoint (dirpath) {target} cannot be written" in str(error.value)
    assert cli.trainer.global_step == 0 and not bool(cli.model.warm_started)  # failed before the 2000-step warm start
    assert time.time() - started < 20
    after = snapshot(c.tmp)
    after.pop(str(c.tmp / "run" / "config.yaml"), None), after.pop(str(c.tmp / "run") + "/", None)
    assert after == before


@case("root_dir_under_a_file")
def _(c):
    blocker = c.tmp / "runs"
    blocker.write_text("a file")
    with pytest.raises(NotADirectoryError) as error:
        main(["fit", *TOY, f"--trainer.default_root_dir={blocker / 'sub'}"])
    assert str(blocker / "sub") in str(error.value) and blocker.read_text() == "a file"


@case("read_only_checkpoint_dir")
def _(c):
    locked = c.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    c.request.addfinalizer(lambda: locked.chmod(0o700))
    if os.access(locked, os.W_OK):
        pytest.skip("running as root: chmod does not stop writes (checkpoint_dir_under_a_file is root's case)")
    cli = main([*TOY, f"--trainer.default_root_dir={c.tmp / 'run'}",
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                f"--trainer.callbacks.dirpath={locked / 'ckpts'}"], run=False)
    with pytest.raises(PermissionError, match=str(locked)):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 0 and list(locked.iterdir()) == []


@case("nan_loss")
def _(c):
    ckpts = c.tmp / "ckpts"
    from callbacks.run_guard import NonFiniteTrainingError
    with pytest.raises(NonFiniteTrainingError) as error:
        fit("--model.init_args.generator_optimizer.init_args.lr=1e10",
            "--model.init_args.critic_optimizer.init_args.lr=1e10", "--trainer.max_steps=20",
            "--data.init_args.batches_per_epoch=10", run_dir=c.tmp / "run", checkpoints=ckpts)
    message = str(error.value)
    assert "non-finite gradient at global step 2" in message and "'critic.input.weight'" in message
    assert str(ckpts / "last.ckpt") in message
    assert checkpoint_files(c.tmp) == [str(ckpts / "last.ckpt")]
    checkpoint = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


@case("non_finite_weights_not_saved")
def _(c):
    from callbacks.run_guard import NonFiniteTrainingError
    ckpts = c.tmp / "ckpts"
    cli = fit(run_dir=c.tmp / "run", checkpoints=ckpts)
    before = snapshot(ckpts)
    with torch.no_grad():
        cli.model.student.input.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match=r"refusing to write a checkpoint at global step 6: "
                                                     r"'student.input.weight' holds NaN/inf values"):
        cli.trainer.save_checkpoint(ckpts / "last.ckpt")
    assert snapshot(ckpts) == before


@case("disk_full_during_save")
def _(c):
    ckpts = c.tmp / "ckpts"
    real_save, calls, seen = torch.save, [], {}

    def save(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and "state_dict" in obj:
            calls.append(obj["global_step"])
            if len(calls) == 2:
                seen.update(snapshot(ckpts / "last.ckpt"))  # what the first save left
                handle.write(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *args, **kwargs)

    c.monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError) as error:
        fit(run_dir=c.tmp / "run", checkpoints=ckpts)
    assert error.value.errno == errno.ENOSPC and calls == [2, 4]
    assert f"could not write checkpoint {ckpts / 'last.ckpt'}: No space left on device; the previous file of that " \
           "name is unchanged" in str(error.value)
    assert snapshot(ckpts / "last.ckpt") == seen and checkpoint_files(ckpts) == [str(ckpts / "last.ckpt")]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2


def _long_run(run: Path, ckpts: Path) -> list[str]:
    """``distill fit`` arguments of a 6-batch toy run (12 optimizer steps), last.ckpt every 2 batches."""
    return ["fit", *TOY, f"--trainer.default_root_dir={run}", "--trainer.max_steps=12",
            "--data.init_args.batches_per_epoch=6", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={ckpts}", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.save_top_k=0", "--trainer.callbacks.every_n_train_steps=4"]


def _distill_subprocess(run: Path, ckpts: Path, *args, **env) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lightning_modules.cli", *_long_run(run, ckpts), *args]
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **env)
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=open(run / "log.txt", "w"),
                            stderr=subprocess.STDOUT)


def _kill_when(process: subprocess.Popen, marker: Path, log: Path) -> None:
    deadline = time.time() + 240
    while not marker.exists():
        assert process.poll() is None, f"the run ended before the fault:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "the run never reached the fault"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def _resume_to_the_end(c: Context, run: Path, ckpts: Path) -> None:
    cli = main([*_long_run(run, ckpts), "--ckpt_path=last"])
    assert cli.trainer.ckpt_path == str(ckpts / "last.ckpt") and cli.trainer.global_step == 12
    assert checkpoint_files(ckpts) == [str(ckpts / "last.ckpt")]  # a dead writer's temporary was cleared
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 12


@case("kill_9_mid_run")
def _(c):
    run, ckpts = c.tmp / "run", c.tmp / "ckpts"
    # tests.slurm_probe.Probe waits at the end of batch 3 (global step 8), before that batch's checkpoint
    process = _distill_subprocess(run, ckpts, "--trainer.callbacks+=tests.slurm_probe.Probe", PROBE_DIR=str(run),
                                  PROBE_BLOCK_AT="3")
    _kill_when(process, run / "reached", run / "log.txt")
    assert checkpoint_files(ckpts) == [str(ckpts / "last.ckpt")]
    check_checkpoint_file(str(ckpts / "last.ckpt"))
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 4
    _resume_to_the_end(c, run, ckpts)


@case("kill_9_mid_checkpoint_write")
def _(c):
    run, ckpts = c.tmp / "run", c.tmp / "ckpts"
    process = _distill_subprocess(run, ckpts, "--trainer.callbacks+=tests.fault_probe.HalfWriteSave",
                                  FAULT_DIR=str(run), FAULT_SAVES_BEFORE="1")
    deadline = time.time() + 240
    while not (ckpts / "last.ckpt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    first = snapshot(ckpts / "last.ckpt")  # the first save (global step 4), before the second one starts
    _kill_when(process, run / "writing", run / "log.txt")  # killed half-way through writing global step 8
    assert (run / "writing").read_text().strip() == "8"
    assert snapshot(ckpts / "last.ckpt") == first
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 4
    leftovers = [Path(p) for p in checkpoint_files(ckpts) if Path(p).name.startswith(TEMP_PREFIX)]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written new checkpoint, hidden
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        AtomicCheckpointIO().load_checkpoint(leftovers[0])
    _resume_to_the_end(c, run, ckpts)


# ---------------------------------------------------------------------------------------------------------- data
def _images(folder: Path, names: list[str]) -> None:
    from PIL import Image
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(path)


@case("corrupt_image_in_folder")
def _(c):
    from datamodules import ImageFolderDataModule
    root = c.tmp / "data"
    _images(root, ["cats/a.png", "cats/b.png", "dogs/c.png", "dogs/d.png"])
    corrupt = root / "dogs" / "e.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    before = snapshot(root)
    with pytest.raises(ValueError, match=str(corrupt).replace(".", r"\.")):
        ImageFolderDataModule(str(root), image_size=8, val_fraction=0.0, test_fraction=0.0).split("train")
    assert snapshot(root) == before


@case("image_folder_missing")
def _(c):
    from datamodules import ImageFolderDataModule
    with pytest.raises(FileNotFoundError, match=str(c.tmp / "no_images")):
        ImageFolderDataModule(str(c.tmp / "no_images"))
    assert not (c.tmp / "no_images").exists()


@case("prompt_file_not_utf8")
def _(c):
    from datamodules.prompts import PromptDataModule, PromptFileError
    bad = c.tmp / "prompts.txt"
    bad.write_bytes("a red circle\na blue square\nun cercle vert fonc\xe9\n".encode("latin-1"))
    before = snapshot(bad)
    with pytest.raises(PromptFileError, match=r"prompts\.txt, line 3: not UTF-8"):
        PromptDataModule(str(bad), shape=[2])
    assert snapshot(bad) == before


@case("prompt_file_empty")
def _(c):
    from datamodules.prompts import PromptDataModule, PromptFileError
    empty = c.tmp / "prompts.txt"
    empty.write_text("")
    with pytest.raises(PromptFileError, match=r"prompts\.txt: no prompts"):
        PromptDataModule(str(empty), shape=[2])


@case("captions_file_missing")
def _(c):
    from datamodules.image_text import ImageTextDataModule
    root = c.tmp / "pairs"
    _images(root, ["images/00.png", "images/01.png"])
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        ImageTextDataModule(str(root), "metadata.jsonl", shape=[3, 8, 8], image_size=8)
    assert sorted(p.name for p in root.rglob("*")) == ["00.png", "01.png", "images"]


# ---------------------------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, request, tmp_path, capsys, monkeypatch):
    CASES[name](Context(request, tmp_path, capsys, monkeypatch))


def test_the_docstring_lists_every_case():
    listed = [line.split()[0] for line in __doc__.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert listed == list(CASES)
    assert len(CASES) >= 30
