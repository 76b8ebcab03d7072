"""RG-LCD -- Reward Guided Latent Consistency Distillation (Li, Feng, Chen & Wang 2024, arXiv:2403.11027), on the
consistency family's mechanism (CD's target, ``consistency.py``; the loss, ``consistency_family.py``).

The LCD loss plus a reward on the student's single-step generation, taken at the online call of the same pair:

  x ~ data; (t, r) adjacent on CD's Karras grid; x_t = alpha_t x + sigma_t z; x^_r = one (guided) teacher Heun step
  x0_theta = f_theta(x_t, t, c)                                         (the one-step output of the online call)
  L_G = d(x0_theta, sg f_theta-(x^_r, r)) - beta R(x0_theta, c)         (Sec. 4.1: reward maximisation)

R is differentiable (``lightning_modules.methods.rewards``): the exact mixture's log-density of the requested class on the
toy suite, the MNIST classifier's log-probability of the requested digit, or the CLIP score for text-to-image; a
reward that reads images gets a latent teacher's x0 decoded by its VAE, with gradient. beta = ``reward_weight``.

Latent proxy reward model (Sec. 4.2; ``latent_reward_model``): R is replaced in L_G by a small network R_phi on
latents, trained as the module's critic (its own optimizer; ``callbacks.TwoTimeScaleUpdate`` sets the ratio) to match
the expert reward on the student's one-step outputs sg(x0_theta) and on the real samples of the same pairs:
  ``lrm_loss: regression``  L_phi = mean (R_phi(x) - R(x))^2 over both sets;
  ``lrm_loss: preference``  L_phi = KL(P_R || P_phi), P = softmax((R(x0_theta), R(x_real)) / tau) per pair
                             (``rewards.lrm_preference_loss``).
The expert is then queried only on the critic side, without gradient, so it needs no differentiability there.

Prompt-only data (``teacher_data_nfe``): LCD's pairs start from real latents; a prompt-only batch has none, and with
``teacher_data_nfe: N`` the teacher's own N-step Heun samples of the batch's noise and conditions stand in for them
(no gradient; a deviation from the paper, which uses LAION latents). Without it, real data are required.

Not reproduced: LCD's skipping-step DDIM solver, guidance-scale embedding and LCM's c_skip / c_out parameterisation
(the LCM members of the family); CD's Heun target with the teacher's CFG (``guidance_scale``) stands in.
"""
from __future__ import annotations

import torch
from torch import nn

from .rewards import lrm_preference_loss, lrm_regression_loss
from .consistency import ConsistencyDistillation

LRM_LOSSES = ("regression", "preference")


class RewardGuidedLCD(ConsistencyDistillation):
    needs_real_data = True
    real_data_reason = "its pairs are noised real samples (or set teacher_data_nfe for the teacher's own samples)"

    def __init__(self, *args, reward: nn.Module, reward_weight: float = 1.0,
                 latent_reward_model: nn.Module | None = None, lrm_loss: str = "regression",
                 lrm_temperature: float = 1.0, teacher_data_nfe: int | None = None, **kwargs):
        if not reward_weight >= 0:
            raise ValueError(f"reward_weight (beta) must be >= 0, got {reward_weight}")
        if lrm_loss not in LRM_LOSSES:
            raise ValueError(f"unknown lrm_loss {lrm_loss!r}; expected one of {LRM_LOSSES}")
        if not lrm_temperature > 0:
            raise ValueError(f"lrm_temperature must be > 0, got {lrm_temperature}")
        if teacher_data_nfe is not None and teacher_data_nfe < 1:
            raise ValueError(f"teacher_data_nfe must be >= 1 or null, got {teacher_data_nfe}")
        super().__init__(*args, **kwargs)
        for key in ("reward", "latent_reward_model"):  # networks: in the state dict, not the hyperparameters
            for store in (self.hparams, getattr(self, "_hparams_initial", None) or {}):
                if isinstance(store.get(key), nn.Module):
                    store.pop(key)
        self.reward = reward.requires_grad_(False).eval()
        self.reward_weight = float(reward_weight)
        self.latent_reward_model = latent_reward_model
        self.lrm_loss, self.lrm_temperature = lrm_loss, float(lrm_temperature)
        self.teacher_data_nfe = teacher_data_nfe
        # the LRM is the module's critic: its own optimizer and update (DistillationModule's critic path)
        self.uses_critic = latent_reward_model is not None
        self.needs_real_data = teacher_data_nfe is None

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "reward", None) is not None:
            self.reward.eval()
        return self

    def critic_parameters(self):
        if self.latent_reward_model is None:
            return []
        return [p for p in self.latent_reward_model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ data
    def with_real_data(self, batch: dict) -> dict:
        """The batch with ``real`` / ``real_cond``: the teacher's own samples when it has none (teacher_data_nfe)."""
        if batch.get("real") is not None or self.teacher_data_nfe is None:
            return batch
        cache = batch.get("_teacher_data")
        if cache is None:
            cache = self.sample_teacher(batch["noise"], batch.get("cond"), nfe=self.teacher_data_nfe)
            batch["_teacher_data"] = cache  # one teacher sampling per batch, shared by the critic and generator
        return {**batch, "real": cache, "real_cond": batch.get("cond"), "real_prompts": batch.get("prompts")}

    def consistency_pair(self, batch):
        return super().consistency_pair(self.with_real_data(batch))

    # ------------------------------------------------------------------ rewards
    def expert_reward(self, x0, cond, prompts=None):
        """R(x0, c): decoded by the autoencoder first (with gradient) for an image reward on a latent teacher."""
        if getattr(self.reward, "reads_images", False) and self.autoencoder is not None:
            ae = self.autoencoder
            scaled = x0.to(ae.vae.dtype) / ae.scaling_factor + ae.shift_factor
            x0 = ae.vae.decode(scaled).sample.float().clamp(-1, 1)
        return self.reward(x0, cond, prompts)

    def student_reward(self, x0, cond, prompts=None):
        """The reward in the student's loss: the latent proxy when there is one, else the expert."""
        if self.latent_reward_model is not None:
            return self.latent_reward_model(x0, cond, prompts)
        return self.expert_reward(x0, cond, prompts)

    @staticmethod
    def pair_prompts(batch):
        return batch.get("real_prompts", batch.get("prompts"))

    # ------------------------------------------------------------------ the two losses
    def generator_loss(self, batch):
        batch = self.with_real_data(batch)
        terms = self.consistency_terms(batch)
        losses = {"consistency": terms["loss"], "distance": terms["distance"]}
        loss = terms["loss"]
        if self.reward_weight > 0:
            reward = self.student_reward(terms["online"], terms["cond"], self.pair_prompts(batch)).mean()
            losses["reward"] = reward.detach()
            loss = loss - self.reward_weight * reward
        losses["loss"] = loss
        return losses

    def critic_loss(self, batch):
        if self.latent_reward_model is None:
            raise NotImplementedError("RewardGuidedLCD trains a critic only with a latent_reward_model")
        batch = self.with_real_data(batch)
        x0, cond = batch["real"], batch.get("real_cond")
        prompts = self.pair_prompts(batch)
        t, _ = self.time_pairs(x0.shape[0], x0.device)
        with torch.no_grad():
            generated = self.student(self.schedule.add_noise(x0, self.noise_like(x0), t), t, cond)
            expert_gen = self.expert_reward(generated, cond, prompts).float()
            expert_real = self.expert_reward(x0, cond, prompts).float()
        proxy_gen = self.latent_reward_model(generated, cond, prompts).float()
        proxy_real = self.latent_reward_model(x0, cond, prompts).float()
        if self.lrm_loss == "regression":
            loss = lrm_regression_loss(torch.cat([proxy_gen, proxy_real]), torch.cat([expert_gen, expert_real]))
        else:
            loss = lrm_preference_loss(proxy_gen, proxy_real, expert_gen, expert_real, self.lrm_temperature)
        return {"loss": loss, "expert_reward": expert_gen.mean(), "proxy_reward": proxy_gen.detach().mean()}
