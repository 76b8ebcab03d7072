"""Two time-scale update rule (Heusel et al. 2017; DMD2 Sec. 4.2): several critic updates per generator update and
separate learning rates. The phase counter is part of the checkpoint, so a resumed run keeps the same rhythm."""
from __future__ import annotations

from lightning.pytorch import Callback


class TwoTimeScaleUpdate(Callback):
    def __init__(self, critic_steps_per_generator_step: int = 5, generator_lr: float | None = None,
                 critic_lr: float | None = None):
        if critic_steps_per_generator_step < 1:
            raise ValueError(f"critic_steps_per_generator_step must be >= 1, got {critic_steps_per_generator_step}")
        self.ratio = critic_steps_per_generator_step
        self.generator_lr, self.critic_lr = generator_lr, critic_lr
        self.batches_seen = 0

    def on_fit_start(self, trainer, pl_module):
        if not pl_module.uses_critic:
            raise ValueError(f"TwoTimeScaleUpdate needs a method with a critic; {type(pl_module).__name__} has none")
        if trainer.ckpt_path is not None:
            return  # the restored optimizers (and schedulers) already carry their learning rates
        for name, lr in [("generator", self.generator_lr), ("critic", self.critic_lr)]:
            if lr is not None:
                for group in pl_module._optimizer(name).param_groups:
                    group["lr"] = lr

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # the generator updates on the first batch of every cycle of `ratio` critic updates (DMD2's step % ratio == 0)
        pl_module.update_generator_now = self.batches_seen % self.ratio == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches_seen += 1

    def state_dict(self):
        return {"batches_seen": self.batches_seen}

    def load_state_dict(self, state_dict):
        self.batches_seen = state_dict["batches_seen"]
