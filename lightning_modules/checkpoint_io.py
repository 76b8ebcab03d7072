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
unpickling traceback.

Use: ``trainer.plugins: [{class_path: lightning_modules.checkpoint_io.AtomicCheckpointIO}]``, or let
``callbacks.preemption.PreemptionCheckpoint`` install it.
"""
from __future__ import annotations

import glob
import os
import socket
import uuid
import zipfile
from typing import Any, Callable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CorruptCheckpointError", "atomic_torch_save", "check_checkpoint_file",
           "TEMP_PREFIX"]

#: temporary files start with this (hidden; contains neither "hpc_ckpt_" nor "last", so no lookup matches them)
TEMP_PREFIX = ".incomplete-"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but is not a complete torch archive (truncated, overwritten, bit rot)."""


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
        if isinstance(error, FileNotFoundError):
            raise
        _raise_corrupt(path, f"not a complete torch archive ({type(error).__name__}: {error}; {size_of(path)})")
    if bad is not None:
        _raise_corrupt(path, f"member {bad!r} fails its CRC check ({size} bytes)")
    if not any(name.endswith("/data.pkl") for name in names):
        _raise_corrupt(path, f"archive without a data.pkl record ({size} bytes)")


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

    ``write(obj, file)`` replaces ``torch.save`` (tests use it to simulate a kill mid-write)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
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
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


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
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (EOFError, zipfile.BadZipFile) as error:
            _raise_corrupt(path, f"{type(error).__name__}: {error}")
        except RuntimeError as error:
            if "PytorchStreamReader" in str(error) or "zip archive" in str(error):
                _raise_corrupt(path, str(error).splitlines()[0])
            raise

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
