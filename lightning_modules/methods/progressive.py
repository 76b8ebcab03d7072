"""Progressive distillation (Salimans & Ho, ICLR 2022, arXiv:2202.00512) and guidance distillation (Meng et al.,
CVPR 2023, arXiv:2210.03142).

Progressive distillation, Algorithm 2. A grid of 2 N_0 DDIM levels (a Karras grid of the schedule, its last step
going to sigma = 0) is fixed; at stage s the student samples with N_s = N_0 / 2^s deterministic DDIM steps on every
2^(s+1)-th level and its teacher (the original teacher at stage 0, the frozen stage s-1 student after) with 2 N_s
steps on every 2^s-th level. Per training example (x from data, eps, level i of the student):
    z_t    = alpha_t x + sigma_t eps                                   t = t_i, t' = the teacher's level between,
    z_t'   = DDIM(z_t,  x^_eta(z_t),   t  -> t')                       t'' = t_{i+1} (sigma = 0 at the end)
    z_t''  = DDIM(z_t', x^_eta(z_t'),  t' -> t'')                      (two teacher steps, Alg. 2 lines 8-9)
    x~     = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)   (Alg. 2 line 10)
so that one student DDIM step t -> t'' with x0-prediction x~ lands exactly on z_t''. With s'' = edm sigma ratios this
is x~ = (z_t''/alpha_t'' - r z_t/alpha_t) / (1 - r), r = sigma~_t''/sigma~_t (= 0 at the end: x~ = z_t''/alpha_t'').
Loss (Sec. 4, "truncated SNR" weighting): L = max(SNR(t), 1) ||x~ - x^_theta(z_t)||^2, SNR = alpha_t^2/sigma_t^2
(``weighting: truncated_snr``; ``snr_plus_one`` = SNR + 1 is the v-loss weight; ``none`` = 1), or with
``target_space: v`` the unweighted v-prediction loss ||v(x~) - v^_theta||^2 (Sec. 4, v = alpha eps - sigma x).
Stages: ``apply_curriculum(k, K)`` (driven by ``callbacks.ConsistencyCurriculum``, the framework's curriculum
callback) sets stage = min(k // steps_per_stage, last) in the persistent buffer ``stage``; at each stage change the
student is copied into the frozen ``stage_teacher`` (a registered module, so checkpoints carry both it and the
stage). The student keeps training from where it was (Alg. 2: the student of stage s+1 starts from the student of
stage s). Sampling (``generate`` / ``sample``): the student's deterministic DDIM at its current step count.

Guidance distillation (``GuidanceDistillation``), Meng et al. Sec. 4:
  stage 1 (the first ``guidance_steps`` generator updates): a w-conditioned student x^_theta(z_t, t, c, w) regresses
    the classifier-free guided teacher x^_w = (1 + w) x^_c - w x^_u (their Eq. 1 / 5) at w ~ U[w_min, w_max] and t
    on the whole schedule, with the same truncated-SNR weight (their Eq. 6). Scales here use this framework's CFG
    convention x^_u + w (x^_c - x^_u) (w = 1: no guidance), i.e. Meng's w + 1.
  stage 2: progressive distillation of the w-conditioned student (their Sec. 4.1 "stage two"), the teacher being the
    frozen stage-1 student at the same w, the student seeing w too. Sampling uses ``sample_guidance_scale``.
The student must accept ``guidance=`` (``networks.GuidanceEmbeddedDenoiser`` wraps any Denoiser for that).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..base import DistillationModule
from ..diffusion.schedules import broadcast_to_data

WEIGHTINGS = ("truncated_snr", "snr_plus_one", "none")


def truncated_snr_weight(edm_sigma: Tensor) -> Tensor:
    """max(SNR, 1) with SNR = alpha^2 / sigma^2 = 1 / edm_sigma^2 (Salimans & Ho 2022, Sec. 4)."""
    return torch.clamp(edm_sigma.double() ** -2, min=1.0)


def loss_weight(edm_sigma: Tensor, weighting: str) -> Tensor:
    if weighting == "truncated_snr":
        return truncated_snr_weight(edm_sigma)
    if weighting == "snr_plus_one":
        return edm_sigma.double() ** -2 + 1.0
    return torch.ones_like(edm_sigma, dtype=torch.float64)


def ddim_to(x_t: Tensor, x0: Tensor, t: Tensor, s: Tensor | None, schedule) -> Tensor:
    """Deterministic DDIM step t -> s (Song et al. 2021, Eq. 12); s = None is the data end sigma = 0 (returns x0)."""
    if s is None:
        return x0
    alpha_t, sigma_t = (broadcast_to_data(c, x_t) for c in schedule.alpha_sigma(t))
    alpha_s, sigma_s = (broadcast_to_data(c, x_t) for c in schedule.alpha_sigma(s))
    epsilon = (x_t.double() - alpha_t * x0.double()) / sigma_t
    return (alpha_s * x0.double() + sigma_s * epsilon).to(x_t.dtype)


def one_step_target(z_t: Tensor, z_end: Tensor, t: Tensor, end: Tensor | None, schedule) -> Tensor:
    """x~ of Alg. 2 line 10: the x0-prediction whose single DDIM step t -> end lands on ``z_end``."""
    alpha_t = broadcast_to_data(schedule.alpha_sigma(t)[0], z_t)
    if end is None:
        return z_end
    alpha_e = broadcast_to_data(schedule.alpha_sigma(end)[0], z_t)
    ratio = broadcast_to_data(schedule.edm_sigma(end) / schedule.edm_sigma(t), z_t)
    return ((z_end.double() / alpha_e - ratio * z_t.double() / alpha_t) / (1 - ratio)).to(z_t.dtype)


class ProgressiveDistillation(DistillationModule):
    uses_critic = False
    #: attributes counted in generator updates (a benchmark that shortens the run scales them alike)
    stage_lengths = ("steps_per_stage",)
    needs_real_data = True
    real_data_reason = "Algorithm 2 noises data samples x to z_t before the two teacher steps"

    def __init__(self, *args, initial_steps: int = 8, final_steps: int = 1, steps_per_stage: int | None = None,
                 initial_stage: int = 0, weighting: str = "truncated_snr", target_space: str = "x0", **kwargs):
        if initial_steps < 1 or final_steps < 1 or initial_steps % final_steps:
            raise ValueError(f"need initial_steps a multiple of final_steps >= 1, got {initial_steps}, {final_steps}")
        ratio = initial_steps // final_steps
        if ratio & (ratio - 1):
            raise ValueError(f"initial_steps / final_steps must be a power of two (halving stages), got {ratio}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
        if target_space not in ("x0", "v"):
            raise ValueError(f"target_space must be 'x0' or 'v', got {target_space!r}")
        if steps_per_stage is not None and steps_per_stage < 1:
            raise ValueError(f"steps_per_stage must be >= 1, got {steps_per_stage}")
        self.initial_steps, self.final_steps = initial_steps, final_steps
        self.num_stages = ratio.bit_length()  # N_0, N_0/2, ..., final_steps
        self.steps_per_stage, self.weighting, self.target_space = steps_per_stage, weighting, target_space
        super().__init__(*args, **kwargs)
        if not 0 <= initial_stage < self.num_stages:
            raise ValueError(f"initial_stage must be in [0, {self.num_stages - 1}], got {initial_stage}")
        #: the 2 N_0 finest DDIM levels (descending native times); after the last, the step goes to sigma = 0
        self.register_buffer("fine_times", self.schedule.karras_times(2 * initial_steps + 1)[:2 * initial_steps].double(),
                             persistent=False)
        self.register_buffer("stage", torch.tensor(int(initial_stage), dtype=torch.long), persistent=True)
        self.stage_teacher = copy.deepcopy(self.student).requires_grad_(False).eval()

    # ------------------------------------------------------------------ the grid
    @property
    def student_times(self) -> Tensor:
        fine = self.__dict__.get("_buffers", {}).get("fine_times")
        if fine is None:  # during the base constructor
            return self.__dict__.get("_base_student_times")
        return fine[::2 ** (int(self.stage) + 1)].cpu()

    @student_times.setter
    def student_times(self, value):
        self.__dict__["_base_student_times"] = value

    def steps_at(self, stage: int) -> int:
        return self.initial_steps // 2 ** stage

    def stage_levels(self, stride: int) -> tuple[Tensor, list]:
        """Levels of a sampler using every ``stride``-th fine level: (times, next time or None for the end)."""
        times = self.fine_times[::stride]
        return times, [times[i + 1] if i + 1 < len(times) else None for i in range(len(times))]

    def evaluation_times(self, nfe):
        if nfe is None:
            return self.student_times
        if 2 * self.initial_steps % nfe == 0 and (2 * self.initial_steps // nfe) & (2 * self.initial_steps // nfe - 1) == 0:
            return self.fine_times[::2 * self.initial_steps // nfe].cpu()
        return super().evaluation_times(nfe)

    # ------------------------------------------------------------------ networks
    def student_x0(self, network, x, t, cond, guidance=None):
        return network(x, t, cond) if guidance is None else network(x, t, cond, guidance=guidance)

    def pd_teacher_x0(self, x, t, cond, guidance=None):
        """The teacher of the current stage: the original (guided) teacher at stage 0, the frozen student after."""
        if int(self.stage) == 0:
            return self.teacher_x0(x, t, cond)
        return self.student_x0(self.stage_teacher, x, t, cond, guidance)

    def generate(self, noise, cond=None, nfe=None, network=None, generator=None, guidance=None):
        """The student's deterministic DDIM sampler (Alg. 2's student sampler) at ``nfe`` steps (default: the
        current stage's N_s). Gradients flow if the caller enables them."""
        from ..diffusion.samplers import prior_sample

        network = self.student if network is None else network
        guidance = self.sampling_guidance() if guidance is None else guidance
        times = self.evaluation_times(nfe)
        x = prior_sample(noise, times[0], self.schedule)
        for i, t in enumerate(times):
            t_vec = torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)
            x0 = self.student_x0(network, x, t_vec, cond, guidance)
            if i == len(times) - 1:
                return x0
            x = ddim_to(x, x0, t_vec, torch.full_like(t_vec, float(times[i + 1])), self.schedule)
        return x

    def sampling_guidance(self):
        return None

    # ------------------------------------------------------------------ Algorithm 2
    @torch.no_grad()
    def two_step_target(self, z_t: Tensor, t: Tensor, mid: Tensor, end: Tensor | None, cond, guidance=None):
        """(z_t'', x~): two teacher DDIM steps t -> t' -> t'' and the one-step target."""
        z_mid = ddim_to(z_t, self.pd_teacher_x0(z_t, t, cond, guidance), t, mid, self.schedule)
        z_end = ddim_to(z_mid, self.pd_teacher_x0(z_mid, mid, cond, guidance), mid, end, self.schedule)
        return z_end, one_step_target(z_t, z_end, t, end, self.schedule)

    def draw_levels(self, n: int, device):
        """Per example: a student level i ~ U{0..N_s-1} -> (t, t', t'' or None); samples with the same t'' kind are
        grouped by the caller (the end level has t'' = None)."""
        stride = 2 ** int(self.stage)
        teacher_times = self.fine_times[::stride]
        levels = len(teacher_times) // 2
        index = torch.randint(0, levels, (n,), device=device)
        return index, teacher_times

    def pd_loss(self, x0: Tensor, cond, guidance=None) -> dict:
        n = x0.shape[0]
        index, teacher_times = self.draw_levels(n, x0.device)
        last = len(teacher_times) // 2 - 1
        t = teacher_times[2 * index]
        mid = teacher_times[2 * index + 1]
        noise = self.noise_like(x0)
        z_t = self.schedule.add_noise(x0, noise, t)
        target = torch.empty_like(x0)
        is_end = index == last
        for rows, at_end in ((~is_end, False), (is_end, True)):
            if not bool(rows.any()):
                continue
            end = None if at_end else teacher_times[(2 * index + 2).clamp(max=len(teacher_times) - 1)][rows]
            sub_cond = None if cond is None else cond[rows]
            sub_w = None if guidance is None else guidance[rows]
            _, target[rows] = self.two_step_target(z_t[rows], t[rows], mid[rows], end, sub_cond, sub_w)
        return self.regression(z_t, t, cond, target, guidance)

    def regression(self, z_t, t, cond, target, guidance=None) -> dict:
        """The weighted x0 regression (or the v loss) of the student at (z_t, t) onto ``target``."""
        prediction = self.student_x0(self.student, z_t, t, cond, guidance)
        if self.target_space == "v":
            v_target = self.student.convert(target, "x0", "v", z_t, t) if hasattr(self.student, "convert") else target
            v_pred = self.student.convert(prediction, "x0", "v", z_t, t)
            per_sample = ((v_pred - v_target.detach()) ** 2).flatten(1).mean(1)
            return {"loss": per_sample.mean()}
        per_sample = ((prediction - target.detach()) ** 2).flatten(1).mean(1)
        weight = loss_weight(self.schedule.edm_sigma(t), self.weighting).to(per_sample)
        return {"loss": (weight * per_sample).mean(), "distance": per_sample.mean().detach()}

    @staticmethod
    def data_conditions(batch):
        """The data samples' labels, or None for an unconditional run (toy batches always carry ``real_cond``, the
        mixture component's class; a conditional run is one whose generator batch has ``cond``)."""
        return batch.get("real_cond") if batch.get("cond") is not None else None

    def generator_loss(self, batch):
        losses = self.pd_loss(batch["real"], self.data_conditions(batch))
        losses["stage"] = self.stage.float()
        return losses

    # ------------------------------------------------------------------ the stage curriculum
    def stage_for_step(self, step: int) -> int:
        if self.steps_per_stage is None:
            return int(self.stage)
        return min(step // self.steps_per_stage, self.num_stages - 1)

    def apply_curriculum(self, step: int, total_steps: int) -> None:
        """Called before each batch by ``callbacks.ConsistencyCurriculum``: advance stages as the count passes them."""
        wanted = self.stage_for_step(step)
        while int(self.stage) < wanted:
            self.advance_stage()

    def advance_stage(self) -> None:
        """Stage s -> s + 1: the frozen stage-s student becomes the teacher (Alg. 2: eta <- theta), N halves."""
        if int(self.stage) >= self.num_stages - 1:
            raise ValueError(f"already at the last stage ({self.final_steps} steps)")
        self.stage_teacher.load_state_dict(self.student.state_dict())
        self.stage_teacher.requires_grad_(False).eval()
        self.stage += 1

    def averaging_phase(self) -> int:
        return int(self.stage)

    def train(self, mode: bool = True):
        super().train(mode)
        if "stage_teacher" in self._modules:
            self.stage_teacher.eval()
        return self

    def generator_parameters(self):
        return [p for p in self.student.parameters() if p.requires_grad]


class GuidanceDistillation(ProgressiveDistillation):
    """Meng et al. 2023: stage 1 (``guidance_steps`` updates) w-conditioned regression onto the CFG teacher, then
    progressive distillation of that student (stages 1..). ``phase`` buffer: 0 = stage 1, 1 = progressive."""
    stage_lengths = ProgressiveDistillation.stage_lengths + ("guidance_steps",)

    def __init__(self, *args, guidance_range: tuple[float, float] = (1.0, 4.0), guidance_steps: int = 1000,
                 sample_guidance_scale: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        low, high = (float(v) for v in guidance_range)
        if not 0 <= low <= high:
            raise ValueError(f"guidance_range must be 0 <= w_min <= w_max, got {guidance_range}")
        if guidance_steps < 0:
            raise ValueError(f"guidance_steps must be >= 0, got {guidance_steps}")
        self.guidance_range, self.guidance_steps = (low, high), guidance_steps
        self.sample_guidance_scale = sample_guidance_scale
        self.register_buffer("phase", torch.tensor(0 if guidance_steps > 0 else 1, dtype=torch.long), persistent=True)
        if self.phase == 1:
            self.stage_teacher.load_state_dict(self.student.state_dict())

    def sampling_guidance(self):
        return self.sample_guidance_scale

    def draw_guidance(self, n: int, device) -> Tensor:
        low, high = self.guidance_range
        return low + (high - low) * torch.rand(n, dtype=torch.float64, device=device)

    def pd_teacher_x0(self, x, t, cond, guidance=None):
        # progressive stages distil the w-conditioned stage-1 student (frozen), never the two-branch CFG teacher
        return self.student_x0(self.stage_teacher, x, t, cond, guidance)

    @torch.no_grad()
    def guided_target(self, x_t, t, cond, w):
        """Stage-1 target: the CFG teacher x^_u + w (x^_c - x^_u) at per-sample w."""
        return self.teacher_x0(x_t, t, cond, guidance_scale=w.to(x_t.dtype))

    def guidance_loss(self, x0, cond) -> dict:
        n = x0.shape[0]
        # t over the whole schedule: a uniform draw over the 2 N_0 fine levels, jittered in edm sigma between them
        u = torch.rand(n, dtype=torch.float64, device=x0.device)
        log_hi = self.schedule.edm_sigma(torch.tensor(self.schedule.t_max, dtype=torch.float64)).log()
        log_lo = self.schedule.edm_sigma(torch.tensor(self.schedule.t_min, dtype=torch.float64)).log()
        t = self.schedule.time_from_edm_sigma((log_lo + u * (log_hi - log_lo)).exp()).to(x0.device)
        w = self.draw_guidance(n, x0.device)
        x_t = self.schedule.add_noise(x0, self.noise_like(x0), t)
        return self.regression(x_t, t, cond, self.guided_target(x_t, t, cond, w), w)

    def generator_loss(self, batch):
        x0, cond = batch["real"], self.data_conditions(batch)
        if cond is None:
            raise ValueError("guidance distillation needs class-conditional data (real_cond): set conditional: true")
        if int(self.phase) == 0:
            losses = self.guidance_loss(x0, cond)
        else:
            losses = self.pd_loss(x0, cond, self.draw_guidance(x0.shape[0], x0.device))
        losses["phase"], losses["stage"] = self.phase.float(), self.stage.float()
        return losses

    def apply_curriculum(self, step, total_steps):
        if int(self.phase) == 0:
            if step < self.guidance_steps:
                return
            self.end_guidance_phase()
        step = step - self.guidance_steps
        wanted = self.stage_for_step(step)
        while int(self.stage) < wanted:
            self.advance_stage()

    def averaging_phase(self) -> int:
        return int(self.phase) * self.num_stages + int(self.stage)

    def end_guidance_phase(self) -> None:
        """Stage 1 -> stage 2: the w-conditioned student, frozen, becomes the progressive teacher (2 N_0 steps)."""
        self.stage_teacher.load_state_dict(self.student.state_dict())
        self.stage_teacher.requires_grad_(False).eval()
        self.phase.fill_(1)

    @property
    def student_times(self):
        return ProgressiveDistillation.student_times.fget(self)

    @student_times.setter
    def student_times(self, value):
        self.__dict__["_base_student_times"] = value
