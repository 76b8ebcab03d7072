"""A callback the fault catalogue adds to fits it kills mid-checkpoint-write (``tests/test_fault_catalogue.py``).

``--trainer.callbacks+=tests.fault_probe.HalfWriteSave`` with FAULT_DIR set: the first FAULT_SAVES_BEFORE (default 1)
checkpoint saves are ordinary; at the next one ``torch.save`` writes half of the checkpoint's bytes, flushes them,
creates FAULT_DIR/writing and sleeps, so that the test can kill -9 the process in the middle of the write.
"""
from __future__ import annotations

import io
import os
import time

import torch
from lightning.pytorch import Callback


class HalfWriteSave(Callback):
    def __init__(self):
        self.out = os.environ["FAULT_DIR"]
        self.before = int(os.environ.get("FAULT_SAVES_BEFORE", "1"))
        self.saves = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves += 1
        if self.saves != self.before + 1:
            return
        real_save, marker = torch.save, os.path.join(self.out, "writing")

        def half_save(obj, handle, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            with open(marker, "w") as note:
                note.write(f"{trainer.global_step}\n")
            time.sleep(600)  # killed here, half written

        torch.save = half_save
