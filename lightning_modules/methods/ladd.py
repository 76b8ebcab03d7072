"""LADD -- Latent Adversarial Diffusion Distillation (Sauer, Boesel, Dockhorn, Blattmann, Esser & Rombach 2024,
"Fast high-resolution image synthesis with latent adversarial diffusion distillation", arXiv:2403.12015).

The student is trained adversarially only; the discriminator is the FROZEN teacher's features ("generative
features", Sec. 3.1) at re-noised inputs, read by small trainable heads conditioned on the noise level (Sec. 3.2).

Algorithm (per batch; ``callbacks.TwoTimeScaleUpdate`` sets the discriminator : generator update ratio):
  real / synthetic x:  ``real_data: data``    -- batch["real"] (data samples, with their labels);
                       ``real_data: teacher`` -- teacher samples ODE_T(z, c), LADD's synthetic data (Sec. 3.3):
                       a pair file's ``pair_target`` when the datamodule serves one (``datamodules.pairs``), else
                       the teacher's ``teacher_nfe``-step ODE solved on the batch's own noise and labels.
  discriminator:  x_g = sg G(z)   (K-step students: backward simulation, base.generator_training_sample)
                  s ~ p(s);  x_s = alpha_s x + sigma_s n,  x^_s = alpha_s x_g + sigma_s n'
                  L_D = relu(1 - D(x_s)) + relu(1 + D(x^_s)) + gamma R1(x_s)           (hinge; R1 optional)
  generator:      L_G = -D(alpha_s G(z) + sigma_s n)                       (hinge generator, gradient through T)
                      [+ lambda_d d(G(z), ODE_T(z))  with real_data: teacher, ``distillation_weight`` > 0: an optional
                       regression onto the teacher's own sample of the same noise, off by default -- the paper trains
                       adversarially only]
D(x, s) = heads(T_features(x, s, c)) (``networks.TeacherFeatureDiscriminator``); the game itself, with the R1 choices
(exact, or the approximated R1 ||D(x) - D(x + eps n)||^2 of Lin et al. 2025), is ``adversarial.TeacherFeatureGAN``.
p(s): rectified-flow logit-normal (m, s) = (1, 1) (``FlowLogitNormalTime``; the paper's bias toward high noise).

Conditioning: as in the paper, the heads read the noise level and, with prompts, the pooled text embedding
(``prompt_dim``; experiments/mnist_t2i/ladd.yaml); for class labels a class-projection term (``num_classes``).
Deviations, kept on purpose: the paper's heads read the tokens of every transformer block; here they read the layers
named in ``feature_layers`` (for the exact Gaussian-mixture teacher, which has no layers, its posterior mean and mode
responsibilities). LADD also
trains multi-step students on noised synthetic data at the student's timesteps; here a K-step student follows DMD2's
backward simulation, the framework's shared K-step training sample.
"""
from __future__ import annotations

import torch

from ..adversarial import TeacherFeatureGAN
from ..base import DistillationModule
from ..diffusion.time_samplers import TimeSampler
from ..losses import distance

REAL_DATA = ("data", "teacher")


def check_feature_discriminator(module, name: str) -> None:
    """A clear error when the module has no heads, or heads whose widths do not match the teacher's features."""
    from ..networks.feature_discriminator import TeacherFeatureDiscriminator

    if not isinstance(module.discriminator, TeacherFeatureDiscriminator):
        raise ValueError(f"{name} needs discriminator heads on the teacher's features: model.init_args.discriminator "
                         "with class_path lightning_modules.networks.feature_discriminator.TeacherFeatureDiscriminator"
                         f", got {type(module.discriminator).__name__}")
    shape = module.teacher.data_shape
    if shape is not None and module.teacher.text_conditioned is False:
        x = torch.zeros(2, *shape)
        parameter = next(module.teacher.parameters(), None)
        if parameter is not None:
            x = x.to(parameter)
        t = torch.full((2,), float(module.student_times[0]), dtype=torch.float64)
        module.discriminator.check_features(module.teacher, x, t.to(x.device))


class LADD(DistillationModule):
    uses_critic = True            # the critic optimizer trains the discriminator heads ...
    uses_critic_network = False   # ... on the frozen teacher: no critic network

    def __init__(self, *args, real_data: str = "data", gan_loss: str = "hinge",
                 discriminator_time_sampler: TimeSampler | None = None, r1_weight: float = 0.0,
                 r1_mode: str = "approximate", r1_noise_std: float = 0.01, teacher_nfe: int = 32,
                 teacher_sampler: str = "heun", distillation_weight: float = 0.0, distance_metric: str = "l2",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if real_data not in REAL_DATA:
            raise ValueError(f"unknown real_data {real_data!r}; expected one of {REAL_DATA}")
        if teacher_nfe < 1:
            raise ValueError(f"teacher_nfe must be >= 1, got {teacher_nfe}")
        if not distillation_weight >= 0:
            raise ValueError(f"distillation_weight must be >= 0, got {distillation_weight}")
        if distillation_weight > 0 and real_data != "teacher":
            raise ValueError(f"distillation_weight {distillation_weight} regresses onto the teacher's samples of the "
                             "batch's noise: it needs real_data: teacher")
        distance(torch.zeros(1, 1), torch.zeros(1, 1), distance_metric)  # fail early on an unknown metric
        check_feature_discriminator(self, "LADD")
        self.distillation_weight, self.distance_metric = float(distillation_weight), distance_metric
        self.real_data, self.teacher_nfe, self.teacher_sampler = real_data, teacher_nfe, teacher_sampler
        self.adversary = TeacherFeatureGAN(discriminator_time_sampler, gan_loss, r1_weight, r1_mode, r1_noise_std)
        self.needs_real_data = real_data == "data"
        self.real_data_reason = "its discriminator compares real and generated samples (real_data: data)"

    def teacher_pairs(self, batch: dict):
        """(z, labels, ODE_T(z)): a pair file's pairs, else the teacher's ODE on the batch's own noise, solved once
        per batch (kept in the batch, so the discriminator and generator steps of a batch share it)."""
        if batch.get("pair_target") is None:
            with torch.no_grad():
                batch["pair_target"] = self.sample_teacher(batch["noise"], batch.get("cond"), nfe=self.teacher_nfe,
                                                           method=self.teacher_sampler)
            batch["pair_noise"], batch["pair_cond"] = batch["noise"], batch.get("cond")
        return batch.get("pair_noise", batch["noise"]), batch.get("pair_cond"), batch["pair_target"]

    def real_samples(self, batch: dict):
        """(x, labels) the discriminator calls real: data, or the teacher's samples (module docstring)."""
        if self.real_data == "data":
            return batch["real"], batch.get("real_cond")
        _, cond, target = self.teacher_pairs(batch)
        return target, cond

    def generator_loss(self, batch):
        x_g = self.generator_training_sample(batch)
        adversarial = self.adversary.generator_loss(self, x_g, batch.get("cond"))
        if self.distillation_weight == 0:
            return {"loss": adversarial}
        noise, cond, target = self.teacher_pairs(batch)
        regression = distance(self.generate(noise, cond), target.to(x_g.dtype), self.distance_metric).mean()
        return {"loss": adversarial + self.distillation_weight * regression, "adversarial": adversarial,
                "distillation": regression}

    def critic_loss(self, batch):
        with torch.no_grad():
            x_g = self.generator_training_sample(batch)
            x_real, real_cond = self.real_samples(batch)
        return self.adversary.discriminator_loss(self, x_real, real_cond, x_g, batch.get("cond"))
