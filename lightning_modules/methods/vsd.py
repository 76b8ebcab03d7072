"""VSD / SwiftBrush -- variational score distillation with a LoRA critic.

Papers: ProlificDreamer (Wang et al., NeurIPS 2023, arXiv:2305.16213): the VSD gradient (Eq. 9)
    grad_theta L = E_{t, eps}[ w(t) (eps_pretrain(x_t, t, y) - eps_phi(x_t, t, y)) dx/dtheta ],
with eps_phi a LoRA on the pretrained model trained by the diffusion loss on the generated samples (Eq. 8);
SwiftBrush (Nguyen & Tran, CVPR 2024, arXiv:2312.05239, Sec. 3 / Alg. 1) uses that loss to train a one-step
text-to-image student, image-free (prompts only), with the "LoRA teacher" started at zero so F = T at the start.

Algorithm (per batch; the TwoTimeScaleUpdate callback sets how many critic updates come per generator update):
  critic F = LoRA(T):  x_g = sg(G(z, y)); t over the whole schedule; x_t = alpha_t x_g + sigma_t eps;
                       y -> null label with probability p (10%, so F's unconditional branch exists for guidance)
                       L_F = lambda(t) ||F(x_t, t, y) - x_g||^2                         (Eq. 8 in x0 space)
  generator G:         x_g = G(z, y); t ~ [0.02, 0.98] of the schedule; x_t = alpha_t x_g + sigma_t eps
                       D^w = D(., null) + w (D(., y) - D(., null))     (CFG at scale w on T and, as SwiftBrush, on F)
                       g = w_x0(t) (F^w(x_t) - T^w(x_t))                                       (Eq. 9 in x0 space)
                       L_G = 1/2 ||x_g - sg(x_g - g)||^2 / dim
In x0 space eps_T - eps_F = (alpha / sigma)(D_F - D_T), so SwiftBrush's w(t) = sigma_t^2 of a variance-preserving
schedule ("sigma_squared", the default) becomes w_x0 = alpha_t sigma_t = s / (1 + s^2) with s the EDM noise level
sigma / alpha: the same weight on every schedule at the same noise level. ``gradient_weighting: dmd`` uses DMD2's
normaliser 1 / mean|x_g - T(x_t)| instead. Everything else (time samplers, DSM critic step, K-step students with
backward simulation) is DMD2's; the difference from DMD2 is the critic: a LoRA on the frozen teacher, not a full copy,
and guided like the teacher.

Time draws and critic weighting are DMD2's defaults (dmd2.py). On discrete VP teachers (SwiftBrush's SD setting)
they are SwiftBrush's own: the generator's t ~ U{20..980} of 1000 steps, the critic's t ~ U{0..999} with the LoRA's
unweighted epsilon-MSE (ProlificDreamer Eq. 8). On EDM-type teachers their analogues: DMD2's Karras ramp [0.02, 0.98]
for the generator, the whole ramp [0, 1] with EDM's weighting for the critic.

Critic base (``critic_base``):
  * ``teacher`` (the default whenever the teacher has weights): the adapters sit on the frozen teacher itself, held
    once -- SwiftBrush's design, and the memory saving (no second copy, no optimizer state for it);
  * ``student``: a frozen copy of the student. This is the toy analogue when the teacher is the exact Gaussian
    mixture (no weights to adapt; ``auto`` picks it): the toy student is warm-started by regression onto the exact
    teacher, the analogue of "a network copied from the teacher", so a frozen copy of that same network is the
    analogue of SwiftBrush's frozen teacher network under the LoRA. The copy is synchronised with the student after
    the warm start (``LoRACritic.load_state_dict``), so F = warm-started network at the start, as F = T in SwiftBrush.
    It costs one frozen network (no gradients, no optimizer state), not the full trainable critic of DMD2.
"""
from __future__ import annotations

import torch

from ..conditioning.condition import TextCondition, drop_conditions
from ..diffusion.guidance import classifier_free_guidance
from ..diffusion.schedules import broadcast_to_data
from ..losses import dmd_gradient, surrogate_for_gradient
from ..networks.denoiser import Denoiser
from ..networks.lora import LoRACritic
from .dmd2 import DMD2

GRADIENT_WEIGHTINGS = ("sigma_squared", "dmd")
CRITIC_BASES = ("auto", "teacher", "student")


def vsd_x0_weight(schedule, t: torch.Tensor) -> torch.Tensor:
    """SwiftBrush's w(t) = sigma_t^2 (variance-preserving sigma) moved to x0 space: s / (1 + s^2), s = sigma / alpha.
    (w(t) (eps_T - eps_F) = sigma_vp^2 (alpha/sigma)(D_F - D_T) and sigma_vp^2 = s^2 / (1 + s^2), alpha/sigma = 1/s.)"""
    s = schedule.edm_sigma(t.double())
    return s / (1 + s * s)


class VSD(DMD2):
    def __init__(self, teacher: Denoiser, *args, critic_base: str = "auto", lora_rank: int = 8,
                 lora_alpha: float | None = None, lora_target_modules: list[str] | str | None = None,
                 lora_dropout: float = 0.0, gradient_weighting: str = "sigma_squared", guide_critic: bool = True,
                 critic_label_dropout: float = 0.1, **kwargs):
        if critic_base not in CRITIC_BASES:
            raise ValueError(f"unknown critic_base {critic_base!r}; expected one of {CRITIC_BASES}")
        if gradient_weighting not in GRADIENT_WEIGHTINGS:
            raise ValueError(f"unknown gradient_weighting {gradient_weighting!r}; "
                             f"expected one of {GRADIENT_WEIGHTINGS}")
        if not 0.0 <= critic_label_dropout < 1.0:
            raise ValueError(f"critic_label_dropout must be in [0, 1), got {critic_label_dropout}")
        if kwargs.pop("critic", None) is not None:
            raise ValueError(f"{type(self).__name__} builds its own LoRA critic; choose its base with critic_base "
                             "('teacher' or 'student') instead of passing critic")
        for name in ("gan_generator_weight", "gan_critic_weight"):
            if kwargs.get(name, 0.0) != 0.0:
                raise ValueError(f"{type(self).__name__} is image-free (SwiftBrush): {name} must be 0, "
                                 f"got {kwargs[name]}")
        teacher_has_weights = any(True for _ in teacher.parameters())
        if critic_base == "auto":
            critic_base = "teacher" if teacher_has_weights else "student"
        if critic_base == "teacher" and not teacher_has_weights:
            raise ValueError(f"critic_base='teacher' needs a teacher with weights to adapt; {type(teacher).__name__} "
                             "has none (use critic_base='student', the toy analogue)")
        lora = dict(rank=lora_rank, alpha=lora_alpha, target_modules=lora_target_modules, dropout=lora_dropout)
        # Built before the base class runs, so it never makes the full critic copy that DMD2 would train.
        critic = LoRACritic(teacher, **lora) if critic_base == "teacher" else None
        super().__init__(teacher, *args, critic=critic, **kwargs)
        if critic_base == "student":
            # the base class copied the student as the critic; that copy becomes the LoRA's frozen base
            # (a LoRA student's copy carries adapters already: its merged network is the base instead)
            base = self.critic.merged_copy() if isinstance(self.critic, LoRACritic) else self.critic
            self.critic = LoRACritic(base, own_base=True, **lora)
        self.critic_base = critic_base
        self.gradient_weighting, self.guide_critic = gradient_weighting, guide_critic
        self.critic_label_dropout = critic_label_dropout

    # ------------------------------------------------------------------ guidance on both networks
    def step_guidance_scale(self) -> float:
        """The CFG scale of this generator step (fixed here; SNOOPI draws one per step)."""
        return self.hparams.guidance_scale

    def critic_x0(self, x_t, t, cond, guidance_scale):
        """The critic's x0 estimate, guided like the teacher when ``guide_critic`` (SwiftBrush), else unguided."""
        if not self.guide_critic or cond is None or guidance_scale == 1.0:
            return self.critic(x_t, t, cond)
        return classifier_free_guidance(self.critic, x_t, t, cond, self.unconditional(cond), guidance_scale)

    def matching_gradient(self, x_g, x0_real, x0_fake, x_t, t, cond):
        """g = w_x0(t) (F - T) (Eq. 9 in x0 space), or DMD2's normalised direction."""
        if self.gradient_weighting == "dmd":
            return dmd_gradient(x_g, x0_real, x0_fake)
        weight = broadcast_to_data(vsd_x0_weight(self.schedule, t).to(x_g.dtype), x_g)
        return torch.nan_to_num(weight * (x0_fake - x0_real))

    def generator_loss(self, batch):
        cond = batch.get("cond")
        scale = self.step_guidance_scale()
        x_g = self.generator_training_sample(batch)
        x_t, t = self.noised(x_g, self.generator_time_sampler)
        with torch.no_grad():
            x0_real = self.teacher_x0(x_t, t, cond, scale)
            x0_fake = self.critic_x0(x_t, t, cond, scale)
        gradient = self.matching_gradient(x_g.detach(), x0_real, x0_fake, x_t, t, cond)
        loss = surrogate_for_gradient(x_g, gradient).mean()
        return {"loss": loss, "guidance_scale": torch.as_tensor(float(scale))}

    # ------------------------------------------------------------------ critic: DSM with label dropout
    def drop_labels(self, cond):
        """Replace each label by the null label with probability ``critic_label_dropout`` (SwiftBrush trains its LoRA
        with 10% empty prompts), so the critic also learns the student's unconditional score for guidance."""
        if cond is None or self.critic_label_dropout == 0.0:
            return cond
        if not isinstance(cond, TextCondition) and not getattr(self.teacher, "num_classes", 0):
            return cond  # raw encoder states without an unconditional embedding: nothing to drop to
        drop = torch.rand(len(cond), device=cond.device) < self.critic_label_dropout
        return drop_conditions(cond, drop, None if isinstance(cond, TextCondition) else self._null_label())

    def critic_loss(self, batch):
        with torch.no_grad():
            x_g = self.generator_training_sample(batch)
        loss, _, _ = self.critic_denoising_loss(x_g, self.drop_labels(batch.get("cond")))
        return {"loss": loss.mean()}
