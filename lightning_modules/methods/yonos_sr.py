"""YONOS-SR -- You Only Need One Step: Fast Super-Resolution with Stable Diffusion via Scale Distillation (Noroozi,
Hadji, Martinez, Bulat & Tzimiropoulos, WACV 2024, arXiv:2401.17258).

Scale distillation (Sec. 3.2): the SR problem at a large magnification is made easier by supervising it with a
model solving a SMALLER magnification of the same HQ image. With x the HQ image, y_s its LQ version at factor s, a
teacher T_prev at factor s_prev < s and the student G at factor s, on the SAME noised HQ image:

    x_t = alpha_t x + sigma_t eps,  t ~ p(t) (the teacher's training law)
    L_scale = lambda(t) || G(x_t, t; y_s) - sg(T_prev(x_t, t; y_{s_prev})) ||^2

instead of the ground truth x as target: the teacher's prediction is adapted to the noise level and, its task
being easier, closer to the truth than the student could get alone. Progressive (Sec. 3.2): along a scale path
s_0 < s_1 < ... (e.g. x2 -> x4 -> x8), stage k's student learns s_k from a frozen copy of stage k - 1's student at
s_{k-1} (stage 1's teacher is the given one at s_0).

One step (Sec. 3.3): the scale-distilled model is good at one DDIM step from pure noise, x^ = G(sigma_T z, T; y),
so the last stage fine-tunes for that single step against the HQ image, L_one = || x^ - x ||^2. (The paper freezes
the latent U-Net and fine-tunes the VAE decoder on this one-step output; a pixel-space student has no decoder, so
the student itself is fine-tuned -- the deviation is named here.)

Stages are counted in generator updates: ``scale_steps`` per scale-distillation stage, then ``one_step_steps`` of the
one-step fine-tune (0 = none). The LQ image at each factor is made from the batch's HQ image by the restoration
regime's degradation (area downsampling, then back to the HQ grid by ``upsample``), as the paper makes its LR images
from HR ones; the batch's own condition is used for the student whenever its rows are already at the student's
factor. Defaults: EDM DSM weighting and the lognormal(-1.2, 1.2) noise levels of the SR teacher's training.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from datamodules.restoration import UPSAMPLE_MODES, downsample, upsample
from ..base import DistillationModule
from ..conditioning.condition import ImageCondition
from ..diffusion.time_samplers import LogNormalTime, TimeSampler
from ..losses import denoising_score_matching, dsm_weight, per_sample_mean


def degraded_condition(hq: torch.Tensor, factor: int, upsample_mode: str = "bicubic", labels=None) -> ImageCondition:
    """The ImageCondition of HQ images at downsampling ``factor``: area downsampling, back to the HQ grid."""
    image = upsample(downsample(hq, factor), hq.shape[-2:], upsample_mode)
    scale = torch.full((hq.shape[0],), int(factor), dtype=torch.long, device=hq.device)
    return ImageCondition(image, scale=scale, labels=labels)


class YONOSSR(DistillationModule):
    """YONOS-SR's scale distillation and one-step fine-tune (module docstring).

    ``scale_path``: the factors, increasing (default [2, 4]: the teacher at x2 supervises the student at x4);
    ``scale_steps``: generator updates per scale-distillation stage (len(scale_path) - 1 stages);
    ``one_step_steps``: generator updates of the final one-step fine-tune."""

    needs_real_data = True
    real_data_reason = "scale distillation noises the HQ image and makes its LQ versions at each factor"
    stage_lengths = ("scale_steps", "one_step_steps")

    def __init__(self, *args, scale_path: Sequence[int] = (2, 4), scale_steps: int = 1000, one_step_steps: int = 0,
                 time_sampler: TimeSampler | None = None, weighting: str = "edm", one_step_weight: float = 1.0,
                 upsample: str = "bicubic", **kwargs):
        super().__init__(*args, **kwargs)
        path = [int(s) for s in scale_path]
        if len(path) < 2 or any(b <= a for a, b in zip(path, path[1:])) or path[0] < 1:
            raise ValueError(f"scale_path must be >= 2 increasing factors >= 1 (teacher first), got {list(scale_path)}")
        if scale_steps < 1:
            raise ValueError(f"scale_steps must be >= 1, got {scale_steps}")
        if one_step_steps < 0:
            raise ValueError(f"one_step_steps must be >= 0, got {one_step_steps}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if one_step_steps and len(self.student_times) != 1:
            raise ValueError(f"the one-step fine-tune needs a one-step student; got student times "
                             f"{self.student_times.tolist()}")
        known = getattr(self.teacher, "scales", None)
        if known is not None and path[0] not in known:
            raise ValueError(f"the teacher knows factors {known}, not the scale path's first factor {path[0]}")
        learned = getattr(self.student, "scales", None)
        missing = [s for s in path[1:] if learned is not None and s not in learned]
        if missing:
            raise ValueError(f"the student knows factors {learned}, not {', '.join(map(str, missing))} of the scale "
                             f"path {path}")
        dsm_weight(self.schedule, torch.ones(1), weighting)  # fail early on an unknown weighting
        self.scale_path, self.scale_steps, self.one_step_steps = path, int(scale_steps), int(one_step_steps)
        self.time_sampler = time_sampler or LogNormalTime(-1.2, 1.2)
        self.weighting, self.one_step_weight, self.upsample_mode = weighting, one_step_weight, upsample
        # stage k > 1's teacher: a frozen copy of the student as stage k - 1 left it (held from the start so the
        # checkpoint always has the same keys)
        self.previous_student = (copy.deepcopy(self.student).requires_grad_(False).eval()
                                 if len(path) > 2 else None)
        self.register_buffer("generator_steps", torch.tensor(0, dtype=torch.long), persistent=True)

    # ------------------------------------------------------------------ the curriculum
    @property
    def num_scale_stages(self) -> int:
        return len(self.scale_path) - 1

    def stage(self, step: int | None = None) -> int:
        """0-based stage at a generator step: scale-distillation stages 0..S-1, then S = the one-step fine-tune."""
        step = int(self.generator_steps) if step is None else step
        last = self.num_scale_stages if self.one_step_steps else self.num_scale_stages - 1
        return min(step // self.scale_steps, last)

    def stage_teacher(self, stage: int):
        """(teacher network, its factor) of scale stage ``stage``."""
        return (self.teacher if stage == 0 else self.previous_student), self.scale_path[stage]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.previous_student is not None:
            self.previous_student.eval()
        return self

    def on_generator_step_end(self) -> None:
        self.generator_steps += 1
        step = int(self.generator_steps)
        if self.previous_student is not None and step % self.scale_steps == 0 and \
                step // self.scale_steps < self.num_scale_stages:
            # a scale stage ended: its student becomes the next stage's (frozen) teacher
            self.previous_student.load_state_dict(self.student.state_dict())

    # ------------------------------------------------------------------ the two losses
    def student_condition(self, batch: dict, factor: int) -> ImageCondition:
        cond = batch.get("cond")
        if isinstance(cond, ImageCondition) and cond.scale is not None and bool((cond.scale == factor).all()):
            return cond
        return degraded_condition(batch["real"], factor, self.upsample_mode, batch.get("labels"))

    def scale_distillation_loss(self, batch: dict, stage: int) -> torch.Tensor:
        """Per-sample L_scale of stage ``stage``: student at scale_path[stage + 1], teacher at scale_path[stage]."""
        hq = batch["real"]
        teacher, teacher_factor = self.stage_teacher(stage)
        t = self.sample_times(self.time_sampler, hq.shape[0])
        x_t = self.schedule.add_noise(hq, self.noise_like(hq), t)
        with torch.no_grad():
            target = teacher(x_t, t, degraded_condition(hq, teacher_factor, self.upsample_mode, batch.get("labels")))
        prediction = self.student(x_t, t, self.student_condition(batch, self.scale_path[stage + 1]))
        return denoising_score_matching(prediction, target, dsm_weight(self.schedule, t, self.weighting))

    def one_step_loss(self, batch: dict) -> torch.Tensor:
        """Per-sample L_one: the one-step restoration G(sigma_T z, T; y) at the final factor against the HQ image."""
        cond = self.student_condition(batch, self.scale_path[-1])
        restored = self.generator_training_sample({**batch, "cond": cond})
        return per_sample_mean((restored - batch["real"]) ** 2)

    def generator_loss(self, batch):
        stage = self.stage()
        losses = {"stage": torch.tensor(float(stage))}
        if stage < self.num_scale_stages:
            losses["scale_distillation"] = self.scale_distillation_loss(batch, stage).mean()
            losses["loss"] = losses["scale_distillation"]
        else:
            losses["one_step"] = self.one_step_loss(batch).mean()
            losses["loss"] = self.one_step_weight * losses["one_step"]
        return losses
