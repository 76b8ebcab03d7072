"""Checkpoints that are either whole or absent, and a clear error for one that is not whole.

``AtomicCheckpointIO`` (a Lightning ``CheckpointIO`` plugin) writes each checkpoint to a hidden temporary file in the
destination folder, flushes and fsyncs it, checks it reads back as a complete torch archive, and only then renames
it over the destination (``os.replace``: atomic on POSIX within one file system) and fsyncs the folder. A process
killed at any moment (kill -9, node failure, Slurm's SIGKILL after the grace period) therefore leaves the previous
checkpoint of that name untouched; at worst a ``.incomplete-*.tmp`` file remains, which no checkpoint lookup matches
(Lightning's ``hpc_ckpt_N`` / ``last`` discovery included) and which the next save in that folder removes once its
writer is gone.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the system
temp folder: the final step is a copy, not a rename, whenever checkpoints live on another file system (a cluster's
shared disk), without fsync -- a kill during that copy truncates the destination.

Loading checks the archive first (zip central directory and every member's CRC) and raises
``CorruptCheckpointError`` naming the file, what is wrong and the other checkpoints beside it, instead of an
unpickling traceback. ``load_lightning_checkpoint`` (the CLI's ``--ckpt_path`` and ``distill export``) and
``AtomicCheckpointIO.load_checkpoint`` (the trainer's resume) tell apart the ways a file can fail to be a checkpoint,
each with its own ``CheckpointFileError`` naming the file: empty or truncated (``CorruptCheckpointError``); a text
file, a safetensors file, a bare ``state_dict`` or another program's pickle (``NotACheckpointError``); pickled Python
objects that ``torch.load(weights_only=True)`` refuses -- they are never run (``UnsafeCheckpointError``). A
checkpoint that loads but does not fit the model a config builds is a ``CheckpointMismatchError``.

Use: ``trainer.plugins: [{class_path: lightning_modules.checkpoint_io.AtomicCheckpointIO}]``, or let
``callbacks.preemption.PreemptionCheckpoint`` install it.
"""
from __future__ import annotations

import glob
import os
import pickle
import socket
import uuid
import zipfile
from typing import Any, Callable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckpointFileError", "CheckpointMismatchError", "CorruptCheckpointError",
           "NotACheckpointError", "UnsafeCheckpointError", "atomic_torch_save", "check_checkpoint_file",
           "load_lightning_checkpoint", "TEMP_PREFIX"]

#: temporary files start with this (hidden; contains neither "hpc_ckpt_" nor "last", so no lookup matches them)
TEMP_PREFIX = ".incomplete-"


class CheckpointFileError(RuntimeError):
    """A file given as a checkpoint cannot be used; the message names the file and what is wrong with it."""


class CorruptCheckpointError(CheckpointFileError):
    """A checkpoint file exists but is not a complete torch archive (empty, truncated, overwritten, bit rot)."""


class NotACheckpointError(CheckpointFileError):
    """A readable file that is not a Lightning checkpoint: text, safetensors weights, a bare state_dict, ..."""


class UnsafeCheckpointError(CheckpointFileError):
    """The file holds pickled Python objects that ``torch.load(weights_only=True)`` refuses; nothing in it was run."""


class CheckpointMismatchError(CheckpointFileError):
    """A valid checkpoint that does not fit the model the config builds (another method, other layer sizes)."""


def _neighbours(path: str) -> list[str]:
    folder = os.path.dirname(os.path.abspath(path))
    others = [p for p in sorted(glob.glob(os.path.join(folder, "*.ckpt")), key=os.path.getmtime, reverse=True)
              if os.path.abspath(p) != os.path.abspath(path)]
    return others


def check_checkpoint_file(path: str) -> None:
    """Raise CorruptCheckpointError unless ``path`` is a complete torch zip archive (every member's CRC is read)."""
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        _raise_not_an_archive(path, error)
    if bad is not None:
        _raise_corrupt(path, f"member {bad!r} fails its CRC check ({size} bytes)")
    if not any(name.endswith("/data.pkl") for name in names):
        _raise_corrupt(path, f"archive without a data.pkl record ({size} bytes)")


def _raise_not_an_archive(path: str, error: BaseException) -> None:
    """Say what the file is instead: a user who passes the wrong file needs a different fix than one whose save was
    cut short."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
        size = os.path.getsize(path)
    except OSError:
        head, size = b"", -1
    if size == 0:
        _raise_corrupt(path, "the file is empty (0 bytes): a save that never wrote anything (killed, disk full)")
    if head[:2] == b"PK":
        _raise_corrupt(path, f"not a complete torch archive ({type(error).__name__}: {error}; {size} bytes)")
    header = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if 0 < header < size and head[8:9] == b"{":
        raise NotACheckpointError(
            f"{path} is a safetensors weights file, not a Lightning checkpoint (it holds no optimizer, scheduler or "
            "loop state to resume): pass a .ckpt written by distill fit, or load these weights through the network's "
            "own option (e.g. pretrained_path for a diffusers folder)")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise NotACheckpointError(
            f"{path} is a plain Python pickle (or a torch.save of the legacy non-zip format), not a Lightning "
            "checkpoint; pass a .ckpt written by distill fit")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.strip() and all(c.isprintable() or c.isspace() for c in text[:200]):
        first = text.strip().splitlines()[0][:60]
        raise NotACheckpointError(f"{path} is a text file (it starts with {first!r}), not a Lightning checkpoint; "
                                  "pass a .ckpt written by distill fit")
    _raise_corrupt(path, f"not a torch archive ({type(error).__name__}: {error}; {size} bytes, starting "
                         f"{head[:8]!r})")


def size_of(path: str) -> str:
    try:
        return f"{os.path.getsize(path)} bytes"
    except OSError:
        return "size unknown"


def _raise_corrupt(path: str, reason: str) -> None:
    others = _neighbours(path)
    hint = (f"other checkpoints in that folder, newest first: {', '.join(os.path.basename(p) for p in others[:5])}; "
            "resume from one of them with --ckpt_path, or move the bad file away") if others else \
        "there is no other checkpoint in that folder"
    raise CorruptCheckpointError(f"checkpoint {path} is truncated or corrupt: {reason}. The file was left as it is; "
                                 f"{hint}.")


def _fsync_folder(folder: str) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _temporary_name(folder: str) -> str:
    return os.path.join(folder, f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def _remove_stale_temporaries(folder: str) -> None:
    """Remove temporaries left by dead writers on this host (a killed save); others' files are left alone."""
    host = socket.gethostname()
    for stale in glob.glob(os.path.join(folder, TEMP_PREFIX + "*.tmp")):
        parts = os.path.basename(stale)[len(TEMP_PREFIX):-len(".tmp")].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if int(parts[1]) != os.getpid() and os.path.exists(f"/proc/{parts[1]}"):
            continue  # a live writer
        try:
            os.remove(stale)
        except OSError:
            pass


def atomic_torch_save(obj: Any, path: str, verify: bool = True, write: Callable[[Any, Any], None] | None = None) -> None:
    """torch.save ``obj`` to ``path`` so that ``path`` is either the old file or the complete new one.

    ``write(obj, file)`` replaces ``torch.save`` (tests use it to simulate a kill mid-write). A write that fails
    (disk full, quota, a folder that cannot be written) raises an OSError of the same kind naming ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise type(error)(error.errno, f"cannot create the checkpoint folder {folder} for {os.path.basename(path)}: "
                                       f"{error.strerror}") from error
    _remove_stale_temporaries(folder)
    temporary = _temporary_name(folder)
    try:
        with open(temporary, "wb") as handle:
            (write or torch.save)(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if verify:
            check_checkpoint_file(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        try:
            os.remove(temporary)
        except OSError:
            pass
        if isinstance(error, OSError) and error.errno is not None:
            # torch.save's own message ("[Errno 28] No space left on device") names no file
            previous = "the previous file of that name is unchanged" if os.path.exists(path) else \
                "no file of that name was written"
            raise type(error)(error.errno, f"could not write checkpoint {path}: {error.strerror}; {previous} and the "
                                           "partial temporary file was removed") from error
        raise
    _fsync_folder(folder)


def _weights_only_refusal(path: str, error: BaseException) -> UnsafeCheckpointError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
    return UnsafeCheckpointError(
        f"checkpoint {path} holds pickled Python objects that torch.load(weights_only=True) refuses to load "
        f"({detail}); nothing in it was run. Checkpoints written by distill fit hold only tensors and plain values: this file "
        "came from elsewhere or was modified. Load it with weights_only=False only if you trust its source, and "
        "re-save the weights without the object")


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
        if obj and len(tensors) == len(obj):
            return f"a bare state_dict of {len(obj)} tensors (e.g. {tensors[0]!r})"
        return f"a dict with keys {sorted(map(str, obj))[:8]}"
    return f"a {type(obj).__name__}"


def load_lightning_checkpoint(path, map_location: Any = "cpu", resume: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a Lightning checkpoint, with a ``CheckpointFileError`` naming the
    file when it is missing, damaged, not a checkpoint (a bare state_dict, safetensors, text) or holds pickled
    objects. ``resume``: also require the training state a fit resumes from (Lightning's version record)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint path {path} is a folder, not a .ckpt file (an exported diffusers folder "
                                "cannot be resumed or exported again)")
    check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise _weights_only_refusal(path, error) from None
    _check_lightning_structure(path, checkpoint, resume)
    return checkpoint


def checkpoint_mismatch(path, error: BaseException, module, checkpoint: dict | None = None,
                        part: str = "its weights") -> CheckpointMismatchError:
    """The error for torch's ``load_state_dict`` failure (which names parameters and shapes, but not the file nor the
    method that wrote it) on loading checkpoint ``path`` into ``module``."""
    lines = [line.strip() for line in str(error).split(":", 1)[-1].strip().splitlines() if line.strip()]
    detail = "; ".join(lines[:6]) + (f"; ... ({len(lines) - 6} more)" if len(lines) > 6 else "")
    writer = ((checkpoint or {}).get("hyper_parameters") or {}).get("_class_path")
    written = f" (written by {writer})" if writer else ""
    return CheckpointMismatchError(
        f"checkpoint {path}{written} does not fit the {type(module).__name__} the config builds: {part} differ -- "
        f"{detail}. Use the config of the run that wrote it (config.yaml in its run folder), or drop the override "
        "that changed the network")


def _check_lightning_structure(path: str, checkpoint: Any, resume: bool) -> None:
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise NotACheckpointError(f"{path} holds {_describe(checkpoint)}, not a Lightning checkpoint (a dict with "
                                  "'state_dict', written by distill fit / Trainer.save_checkpoint)")
    if resume and "pytorch-lightning_version" not in checkpoint:
        raise NotACheckpointError(f"{path} has a 'state_dict' but no 'pytorch-lightning_version' record, so it was not "
                                  "written by Lightning and holds no training state to resume from")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic, fsynced, verified writes; loads that fail clearly on a damaged file.

    verify: read the written archive back (every CRC) before it replaces the previous checkpoint (costs one read
        of the file; turn off for very large checkpoints on slow disks)."""

    def __init__(self, verify: bool = True):
        self.verify = verify

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if "://" in os.fspath(path):
            return super().save_checkpoint(checkpoint, path)  # remote stores: Lightning's fsspec transaction
        atomic_torch_save(checkpoint, path, verify=self.verify)

    def load_checkpoint(self, path, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        path = os.fspath(path)
        if "://" in path:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        check_checkpoint_file(path)
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as error:
            raise _weights_only_refusal(path, error) from None
        except (EOFError, zipfile.BadZipFile) as error:
            _raise_corrupt(path, f"{type(error).__name__}: {error}")
        except RuntimeError as error:
            if "PytorchStreamReader" in str(error) or "zip archive" in str(error):
                _raise_corrupt(path, str(error).splitlines()[0])
            raise
        # Lightning's own reader fails on a bare state_dict with KeyError: 'pytorch-lightning_version'
        _check_lightning_structure(path, checkpoint, resume=False)
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
