"""StudentEMA: the average ticks on generator updates only, with a fixed decay or diffusers' warm-up
min(decay, (1 + n) / (10 + n)); checked against an average computed by hand from the student's recorded weights."""
import copy

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from callbacks import StudentEMA, TwoTimeScaleUpdate
from datamodules.noise import NoiseDataModule
from lightning_modules import DMD2
from lightning_modules.diffusion import EDMSchedule
from lightning_modules.networks import GaussianMixtureTeacher, ToyMLPDenoiser


class RecordStudent(Callback):
    """The student's weights after every batch, with whether the generator stepped."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((bool(getattr(pl_module, "generator_stepped", True)),
                           copy.deepcopy(pl_module.student.state_dict())))


def hand_average(steps, decay, warmup):
    """AveragedModel's convention: the first update copies the student; the n-th later one (n >= 1 averaged so far)
    mixes with decay d_n = decay, or min(decay, (1 + n) / (10 + n)) with warm-up."""
    average, n = None, 0
    for stepped, state in steps:
        if not stepped:
            continue
        if average is None:
            average = {k: v.double().clone() for k, v in state.items()}
        else:
            d = min(decay, (1 + n) / (10 + n)) if warmup else decay
            average = {k: d * average[k] + (1 - d) * state[k].double() for k in average}
        n += 1
    return average


@pytest.mark.parametrize("warmup", [False, True])
def test_average_matches_the_hand_computed_one_on_generator_updates_only(warmup):
    seed_everything(0)
    teacher = GaussianMixtureTeacher("ring8", EDMSchedule())
    module = DMD2(teacher=teacher, student=ToyMLPDenoiser(2, hidden=32, depth=2), warm_start_steps=20,
                  generator_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
                  critic_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    ema, recorder = StudentEMA(decay=0.9, warmup=warmup), RecordStudent()
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[TwoTimeScaleUpdate(2), recorder, ema])
    trainer.fit(module, NoiseDataModule(shape=[2], batch_size=16, batches_per_epoch=12))
    assert sum(stepped for stepped, _ in recorder.steps) == 6 == ema.generator_updates
    expected = hand_average(recorder.steps, 0.9, warmup)
    averaged = ema.average.module.state_dict()
    worst = max((averaged[k].double() - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-6, worst
    # the two schedules really differ
    other = hand_average(recorder.steps, 0.9, not warmup)
    assert max((other[k] - expected[k]).abs().max().item() for k in expected) > 1e-3


class RecordPhase(Callback):
    """The method's averaging phase after every batch (beside RecordStudent)."""

    def __init__(self):
        self.phases = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.phases.append(pl_module.averaging_phase())


@pytest.mark.parametrize("restart", [True, False])
def test_average_restarts_from_the_student_when_progressive_distillation_halves_its_steps(restart):
    """PD 4 -> 2 -> 1 steps, 5 updates a stage: with the restart, the average after the run is the hand average of
    the last stage's updates alone (its first update a copy); without it, of all 15 (the two differ)."""
    from callbacks import ConsistencyCurriculum
    from datamodules.toy import ToyMixtureDataModule
    from lightning_modules.methods.progressive import ProgressiveDistillation

    seed_everything(0)
    module = ProgressiveDistillation(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()),
                                     student=ToyMLPDenoiser(2, hidden=16, depth=2), initial_steps=4, final_steps=1,
                                     steps_per_stage=5, generator_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    ema, recorder, phases = StudentEMA(decay=0.9, restart_at_stage_change=restart), RecordStudent(), RecordPhase()
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[ConsistencyCurriculum(), recorder, phases, ema])
    trainer.fit(module, ToyMixtureDataModule(law="ring8", batch_size=16, batches_per_epoch=15, conditional=False))
    assert phases.phases == [0] * 5 + [1] * 5 + [2] * 5 and int(module.stage) == 2
    last_stage = hand_average(recorder.steps[10:], 0.9, False)
    whole_run = hand_average(recorder.steps, 0.9, False)
    expected, other = (last_stage, whole_run) if restart else (whole_run, last_stage)
    averaged = ema.average.module.state_dict()
    assert max((averaged[k].double() - expected[k]).abs().max().item() for k in expected) < 1e-6
    assert max((averaged[k].double() - other[k]).abs().max().item() for k in other) > 1e-3
    assert ema.state_dict()["phase"] == 2
