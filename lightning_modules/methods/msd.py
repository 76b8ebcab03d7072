"""MSD -- Multi-Student Distillation (Song, Lorraine, Nie, Kreis & Lucas, ICML 2025, arXiv:2410.23274).

(Only the abstract and summaries of the paper were reachable when this was written, so no equation numbers are cited;
the three-stage path for smaller students -- teacher score matching, then distribution matching, then optionally
adversarial -- and the per-subset students follow the paper's abstract and its summary.)

The conditions are partitioned, C = C_1 u ... u C_K; student G_k is a one-step generator for the conditions in C_k
only, so each student spends its capacity on a fraction of the data (same-sized students: better quality) or can be
smaller than the teacher (faster inference). Sampling a condition c runs its owner G_k(c). Here the K students live in
one ``ConditionRoutedStudents`` network and train in one run:

  partition:    every class owned by exactly one student (checked; errors name the class or student)
  smaller students, stage 1 -- teacher score matching (TSM): each G_k, as a denoiser, regresses onto the teacher's
                x0 estimate at x_t = alpha_t x0 + sigma_t eps, x0 ~ samples of its own classes (real data, the exact
                law of a toy teacher, or teacher samples), sigma log-uniform over the schedule, EDM weighting:
                L_TSM = lambda(t) ||G_k(x_t, t, c) - sg T(x_t, t, c)||^2       (``warm_start_steps`` > 0)
  stage 2 -- distribution matching, DMD2 per student (see dmd2.py): for a sample of class c the direction is
                g = (p_real - p_fake) / mean |p_real| with T(., c) and the critic at class c; each student's update is
                the mean over ITS samples of the batch, i.e. exactly its own DMD2 update on its sub-batch (weights
                B / n_k on the per-sample directions), so a class-imbalanced batch does not slow a student down.
  stage 3 (optional) -- adversarial: DMD2's GAN terms (``gan_generator_weight`` / ``gan_critic_weight``), with a shared
                critic only (a discriminator head taps one bottleneck).

Critic choice. The paper trains each student as an independent DMD2 run, with its own fake-score network. That is the
default here: with no ``critic`` in the config the critic is a copy of the router, i.e. one critic per student behind
the same class table, each trained only on its student's samples. A single class-conditional critic (``critic:`` given
explicitly, e.g. a copy of the teacher) is also supported and has the same target: conditioned on c, its DSM optimum
is E[x0 | x_t, c] under the law of G_k(c)(z, c), exactly the owning student's law for that class; it differs only in
sharing capacity (and one optimizer) across students, which is this framework's option, not the paper's.

Text-to-image (prompt-only, experiments/mnist_t2i/msd.yaml). The partition is over routing keys of the prompts
(``ConditionRoutedStudents.routing_key``, see lightning_modules/networks/routing.py): ``label`` -- the prompt's class /
concept id (``TextCondition.labels``, from the prompt datamodule's ``label_parser`` / ``label_column``; for the MNIST
captions the digit), the direct analogue of the class partition; or ``embedding_hash`` -- with no labels, a
deterministic SimHash code of the prompt embedding (random-hyperplane LSH, Charikar 2002), which keeps prompts with
similar embeddings on one student. (The paper partitions the conditioning data into subsets per student; how it
partitions text prompts could not be checked here, so no specific scheme is claimed to be the paper's.) Rows of the
TextCondition reach their student through ``select_conditions``; the per-student balance and critics work unchanged.
Same-sized students start as copies of the teacher (the pipeline loaded again per student) with
``warm_start_steps: 0``; stage 1 (TSM) for smaller students draws (image, label) pairs and so needs class labels.

Coupling that remains between the students: one optimizer (Adam is per-parameter, so no coupling there) and one
gradient clip norm over all students' parameters (``generator_clip_norm``).
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import torch
from torch import Tensor

from ..diffusion.schedules import NoiseSchedule
from ..losses import dsm_weight
from ..networks.routing import ConditionRoutedStudents
from ..warm_start import law_draw, regress_to_teacher
from .dmd2 import DMD2

PRETRAINING_SOURCES = ("auto", "law", "real", "teacher")


class MSD(DMD2):
    """DMD2 with a ``ConditionRoutedStudents`` student (see the module docstring).

    ``pretraining_source`` (stage 1, run in ``setup`` when ``warm_start_steps`` > 0, with ``warm_start_lr`` and
    ``warm_start_batch_size``): ``law`` -- exact samples of a Gaussian-mixture teacher's law; ``real`` -- the
    datamodule's training images and labels (``trainer.datamodule.split("train")``); ``teacher`` -- a pool of
    ``pretraining_pool_size`` teacher samples (``pretraining_teacher_nfe`` Heun evaluations, labels n % num_classes);
    ``auto`` -- ``law`` for an exact teacher, else ``real``. ``pretrained_students``: a safetensors file of the router's
    state dict (written by scripts/pretrain_small_students.py) loaded instead of running stage 1."""

    def __init__(self, *args, pretraining_source: str = "auto", pretrained_students: str | None = None,
                 pretraining_teacher_nfe: int = 16, pretraining_pool_size: int = 2048, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.student, ConditionRoutedStudents):
            raise ValueError(f"MSD needs a ConditionRoutedStudents student (model.init_args.student), got "
                             f"{type(self.student).__name__}")
        if pretraining_source not in PRETRAINING_SOURCES:
            raise ValueError(f"unknown pretraining_source {pretraining_source!r}; expected one of "
                             f"{PRETRAINING_SOURCES}")
        if pretraining_teacher_nfe < 1 or pretraining_pool_size < 1:
            raise ValueError(f"pretraining_teacher_nfe and pretraining_pool_size must be >= 1, got "
                             f"{pretraining_teacher_nfe}, {pretraining_pool_size}")
        if pretrained_students is not None and not os.path.isfile(pretrained_students):
            raise FileNotFoundError(f"pretrained_students {pretrained_students!r} is not a file")
        teacher_classes = getattr(self.teacher, "num_classes", 0) or 0
        if teacher_classes and teacher_classes != self.student.num_classes:
            raise ValueError(f"the students' partition covers {self.student.num_classes} classes but the teacher has "
                             f"{teacher_classes}")
        if isinstance(self.critic, ConditionRoutedStudents):
            if self.critic.owners != self.student.owners:
                raise ValueError(f"the routed critic's classes {self.critic.classes_per_student} differ from the "
                                 f"students' {self.student.classes_per_student}")
            if self.discriminator is not None:
                raise ValueError("a discriminator head needs one shared critic (it taps one bottleneck); give "
                                 "model.init_args.critic, or drop the discriminator")
        self.pretraining_source, self.pretrained_students = pretraining_source, pretrained_students
        self.pretraining_teacher_nfe, self.pretraining_pool_size = pretraining_teacher_nfe, pretraining_pool_size
        #: what stage 1 did in this process (loss, seconds, steps, source), for reports
        self.pretraining_report: dict = {}

    # ------------------------------------------------------------------ each student descends its own DMD2 gradient
    def student_balance(self, cond: Tensor) -> Tensor:
        """B / n_k(i) per sample: makes the batch mean of per-sample losses the sum over students of the mean over
        each student's own samples."""
        owners = self.student.owners_of(cond)
        counts = torch.bincount(owners, minlength=len(self.student.students))
        return len(owners) / counts[owners].to(torch.float64)

    def matching_gradient(self, x_g, x0_real, x0_fake, x_t, t, cond):
        gradient = super().matching_gradient(x_g, x0_real, x0_fake, x_t, t, cond)
        balance = self.student_balance(cond).to(gradient.dtype)
        return gradient * balance.reshape(-1, *[1] * (gradient.ndim - 1))

    def critic_loss(self, batch):
        if self.gan_critic_weight > 0:
            return super().critic_loss(batch)  # shared critic: DSM + GAN as in DMD2
        cond = batch.get("cond")
        with torch.no_grad():
            x_g = self.generator_training_sample(batch)
        denoising, _, _ = self.critic_denoising_loss(x_g, cond)
        return {"loss": (denoising * self.student_balance(cond).to(denoising.dtype)).mean()}

    # ------------------------------------------------------------------ stage 1: teacher score matching
    def setup(self, stage: str) -> None:
        """Stage 1 before distillation (skipped when resuming or already done): load ``pretrained_students`` or run
        TSM for ``warm_start_steps``; then the critic starts from the students (routed critic of the same shapes),
        or by the same regression (another router, or a toy network critic), or stays as configured."""
        resuming = self._trainer is not None and self.trainer.ckpt_path is not None
        if stage != "fit" or bool(self.warm_started) or resuming:
            return
        if self.pretrained_students is not None:
            from safetensors.torch import load_file

            self.student.load_state_dict(load_file(self.pretrained_students))
            self.pretraining_report = {"source": self.pretrained_students, "steps": 0}
        elif self.hparams.warm_start_steps > 0:
            self.pretrain_students()
        else:
            return
        self._initialise_critic()
        self.warm_started.fill_(True)
        self.on_warm_start_end()

    def pretrain_students(self, datamodule=None) -> dict:
        """Run TSM on every student at once (one batch over all classes, each sample regressing its owner)."""
        start = time.time()
        source = self._resolved_source()
        loss = regress_to_teacher(self.student, self.teacher_x0, self._pretraining_draw(source, datamodule),
                                  self.schedule, steps=self.hparams.warm_start_steps, lr=self.hparams.warm_start_lr,
                                  batch_size=self.hparams.warm_start_batch_size, seed=self.hparams.seed)
        self.pretraining_report = {"source": source, "steps": self.hparams.warm_start_steps, "loss": loss,
                                   "seconds": time.time() - start}
        return self.pretraining_report

    def _initialise_critic(self) -> None:
        critic, student = self.critic, self.student
        ours = {k: v.shape for k, v in student.state_dict().items()}
        if {k: v.shape for k, v in critic.state_dict().items()} == ours:
            critic.load_state_dict(student.state_dict())
        elif isinstance(critic, ConditionRoutedStudents):
            regress_to_teacher(critic, self.teacher_x0, self._pretraining_draw(self._resolved_source()),
                               self.schedule, steps=max(self.hparams.warm_start_steps, 1),
                               lr=self.hparams.warm_start_lr, batch_size=self.hparams.warm_start_batch_size,
                               seed=self.hparams.seed + 1)
        elif getattr(self.teacher, "law", None) is not None and self.hparams.warm_start_steps > 0:
            draw = law_draw(self.teacher.law, conditional=getattr(critic, "num_classes", 0) > 0)
            regress_to_teacher(critic, self.teacher_x0, draw, self.schedule,
                               steps=self.hparams.warm_start_steps, lr=self.hparams.warm_start_lr,
                               batch_size=self.hparams.warm_start_batch_size, seed=self.hparams.seed + 1)
        # else: a shared critic of another architecture with a network teacher stays as configured (a teacher copy)

    def _resolved_source(self) -> str:
        if self.pretraining_source != "auto":
            return self.pretraining_source
        return "law" if getattr(self.teacher, "law", None) is not None else "real"

    def _datamodule(self, datamodule):
        if datamodule is not None:
            return datamodule
        if self._trainer is not None and self.trainer.datamodule is not None:
            return self.trainer.datamodule
        raise ValueError("pretraining_source 'real' needs the datamodule (run under trainer.fit, or pass it to "
                         "pretrain_students)")

    def _pretraining_draw(self, source: str, datamodule=None):
        if source == "law":
            law = getattr(self.teacher, "law", None)
            if law is None:
                raise ValueError("pretraining_source 'law' needs an exact Gaussian-mixture teacher")

            def draw(n, generator):
                x0, component = law.sample(n, generator)
                return x0, law.component_classes[component]
            return draw
        if source == "real":
            dm = self._datamodule(datamodule)
            if not hasattr(dm, "split"):
                raise ValueError(f"pretraining_source 'real' needs a datamodule with split('train') -> (images, "
                                 f"labels); {type(dm).__name__} has none")
            images, labels = dm.split("train")
            return self._pool_draw(images, labels)
        if source == "teacher":
            return self._pool_draw(*self._teacher_pool())
        raise ValueError(f"unknown pretraining_source {source!r}; expected one of {PRETRAINING_SOURCES}")

    @staticmethod
    def _pool_draw(images: Tensor, labels: Tensor):
        def draw(n, generator):
            index = torch.randint(len(images), (n,), generator=generator)
            return images[index], labels[index]
        return draw

    def _teacher_pool(self) -> tuple[Tensor, Tensor]:
        shape = self.teacher.data_shape
        if shape is None:
            raise ValueError("pretraining_source 'teacher' needs a teacher that knows its data_shape")
        generator = torch.Generator().manual_seed(self.hparams.seed + 7)
        count = self.pretraining_pool_size
        labels = torch.arange(count) % self.student.num_classes
        noise = torch.randn((count, *shape), generator=generator)
        chunks = []
        for start in range(0, count, 256):
            part = noise[start:start + 256].to(self.device)
            chunks.append(self.sample_teacher(part, labels[start:start + 256].to(self.device),
                                              nfe=self.pretraining_teacher_nfe).cpu())
        return torch.cat(chunks), labels


# --------------------------------------------------------------------------------------------------- export
def export_msd_students(module: MSD, folder: str, use_ema: bool = True, overwrite: bool = False) -> str:
    """Write each student of an MSD module as its own diffusers folder ``folder/student_<k>/`` (see
    ``lightning_modules.export``) plus ``folder/routing.json`` (the classes each student answers for). Students must
    be ``DiffusersUNetDenoiser`` networks. Each student folder is written atomically; the set is not."""
    from ..export import export_student

    folder = os.path.abspath(os.fspath(folder))
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise FileExistsError(f"export folder {folder!r} exists and is not empty; choose another folder or pass "
                              "overwrite=True")
    os.makedirs(folder, exist_ok=True)
    ema = module.evaluation_student if use_ema else None
    view_class = type(type(module).__name__, (), {})  # export records the method by its class name
    names = []
    for index, classes in enumerate(module.student.classes_per_student):
        view = view_class()
        view.student = module.student.students[index]
        view.evaluation_student = None if ema is None else ema.students[index]
        view.schedule, view.student_times = module.schedule, module.student_times
        view.teacher, view.hparams = module.teacher, module.hparams
        name = f"student_{index}"
        export_student(view, os.path.join(folder, name), use_ema=use_ema, overwrite=overwrite)
        names.append(name)
    routing = {"format": "lightning-distill-msd/1", "method": type(module).__name__,
               "routing_key": module.student.routing_key, "hash_bits": module.student.hash_bits,
               "hash_seed": module.student.hash_seed,
               "students": [{"folder": name, "classes": classes}
                            for name, classes in zip(names, module.student.classes_per_student)],
               "class_to_student": module.student.owners,
               "sampling": "for class label c, load students[class_to_student[c]] and sample it as its README says, "
                           "passing the original label c"}
    with open(os.path.join(folder, "routing.json"), "w") as handle:
        json.dump(routing, handle, indent=2)
        handle.write("\n")
    return folder
