"""DistillationModule: the shared machinery every distillation method stands on.

It owns the frozen teacher T (held once, never in an optimizer), the student generator G, optional critic F and
discriminator head, their optimizers and LR schedulers (manual optimization, one clip norm per network), the student's
K-step sampler with DMD2's backward simulation, and evaluation sampling. A method subclass only answers the question
"which loss from (T, F, G, x_g, x_t)?" by implementing ``generator_loss`` and, if it trains a critic, ``critic_loss``.

Batch contract (see ``datamodules``): ``{"noise": (B, *shape), "cond": (B,) long or None,
"real": optional (B, *shape) data samples, "real_cond": their labels}``.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from .conditioning.condition import carries_own_null, unconditional
from .data_regime import check_data_regime, derive_sigma_data
from .diffusion.guidance import classifier_free_guidance
from .diffusion.samplers import hybrid_sample, prior_sample, sampler_times, student_sample, teacher_sample
from .networks.denoiser import Denoiser
from .warm_start import law_draw, regress_to_teacher

log = logging.getLogger(__name__)


class EvaluationNetworkMixin:
    """``evaluation_student``: the network sampled for evaluation (an EMA average when a callback registers one).
    Held outside nn.Module's registry so the average is neither a parameter of the module, nor in its state dict
    (the EMA callback checkpoints it), nor broadcast by DDP."""

    @property
    def evaluation_student(self):
        return self.__dict__.get("_evaluation_network")

    @evaluation_student.setter
    def evaluation_student(self, network):
        self.__dict__["_evaluation_network"] = network

    def set_evaluation_network(self, network) -> None:
        self.__dict__["_evaluation_network"] = network


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


class DistillationModule(EvaluationNetworkMixin, LightningModule):
    #: methods that train a critic (fake-score network) set this
    uses_critic: bool = False
    #: False for methods whose critic optimizer trains only the discriminator heads (LADD: heads on the frozen
    #: teacher's features), so no critic network is made
    uses_critic_network: bool = True
    #: methods whose generator step needs real data samples in the batch, and what for (named in the error a
    #: noise- or prompt-only datamodule gets before training)
    needs_real_data: bool = False
    real_data_reason: str = ""

    def __init__(
        self,
        teacher: Denoiser,
        student: Denoiser | None = None,
        critic: Denoiser | None = None,
        discriminator: nn.Module | None = None,
        autoencoder: nn.Module | None = None,
        student_timesteps: Sequence[float] | None = None,
        student_sigmas: Sequence[float] | None = None,
        backward_simulation: bool = True,
        guidance_scale: float = 1.0,
        generator_optimizer: OptimizerCallable | None = None,
        critic_optimizer: OptimizerCallable | None = None,
        generator_lr_scheduler: LRSchedulerCallable | None = None,
        critic_lr_scheduler: LRSchedulerCallable | None = None,
        generator_clip_norm: float | None = 10.0,
        critic_clip_norm: float | None = 10.0,
        warm_start_steps: int = 0,
        warm_start_lr: float = 2e-3,
        warm_start_batch_size: int = 256,
        eval_nfe: Sequence[int] = (1,),
        seed: int = 0,
        student_lora: dict | None = None,
        gradient_checkpointing: bool = False,
        attention_backend: str = "auto",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["teacher", "student", "critic", "discriminator", "autoencoder", "generator_optimizer",
                                          "critic_optimizer", "generator_lr_scheduler", "critic_lr_scheduler"])
        self.automatic_optimization = False
        if teacher.schedule is None:
            raise ValueError("the teacher needs a noise schedule (teacher.init_args.schedule)")
        for name, value in [("warm_start_steps", warm_start_steps), ("warm_start_batch_size", warm_start_batch_size)]:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if any(n < 1 for n in eval_nfe):
            raise ValueError(f"eval_nfe entries must be >= 1, got {list(eval_nfe)}")

        self.teacher = teacher.requires_grad_(False).eval()
        self.schedule = teacher.schedule
        # Networks that start from the teacher are explicit copies (DMD2/SiD initialise G and F from T), or, with
        # ``student_lora``, low-rank adapters on a frozen base (LoRA students, Hu et al. 2022): the shared teacher
        # when no student network is given, else the given network, then owned and frozen (a distilled generator
        # to adapt; on the toy suite the network the warm start fits to the exact teacher, which has no weights).
        # Every method builds its critic, targets and EMA copies from ``self.student``, so this is "LoRA for any
        # method": only the adapters (and their optimizer state) are trained.
        if student_lora is not None:
            if student is not None:   # the base gets the teacher's schedule and law-derived scale before wrapping
                self._share_schedule(student, "student")
                derive_sigma_data(student, getattr(teacher, "law", None))
            self.student = self._lora_student(teacher if student is None else student, student_lora,
                                              own_base=student is not None)
        else:
            self.student = copy.deepcopy(teacher).requires_grad_(True) if student is None else student
        self._share_schedule(self.student, "student")
        self._check_shapes(self.student, "student")
        derive_sigma_data(self.student, getattr(teacher, "law", None))
        self.critic = None
        if self.uses_critic and not self.uses_critic_network and critic is not None:
            raise ValueError(f"{type(self).__name__} trains discriminator heads only; it takes no critic network")
        if self.uses_critic and self.uses_critic_network:
            self.critic = copy.deepcopy(self.student) if critic is None else critic
            self._share_schedule(self.critic, "critic")
            self._check_shapes(self.critic, "critic")
            derive_sigma_data(self.critic, getattr(teacher, "law", None))
        self.discriminator = discriminator
        # Latent teachers: the frozen VAE that maps images <-> the teacher's latents (never in an optimizer).
        self.autoencoder = None if autoencoder is None else autoencoder.requires_grad_(False).eval()
        self.student_times = self._resolve_student_times(student_timesteps, student_sigmas)
        self._apply_memory_options(gradient_checkpointing, attention_backend)
        # unset -> AdamW(1e-4, weight decay 0.01); a function default would reach the CLI as its import-path string
        self.generator_optimizer_factory = generator_optimizer or _adamw
        self.critic_optimizer_factory = critic_optimizer or _adamw
        self.generator_scheduler_factory, self.critic_scheduler_factory = generator_lr_scheduler, critic_lr_scheduler
        self.register_buffer("warm_started", torch.tensor(False), persistent=True)
        #: set each batch by the TwoTimeScaleUpdate callback; without it every batch updates the generator
        self.update_generator_now = True

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _lora_student(base: Denoiser, options: dict, own_base: bool = False):
        from .networks.lora import LoRACritic

        allowed = {"rank", "alpha", "target_modules", "dropout"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"unknown student_lora option(s) {unknown}; expected some of {sorted(allowed)}")
        if not any(True for _ in base.parameters()):
            raise ValueError(f"student_lora needs a network with weights to adapt; {type(base).__name__} has none "
                             "(for the exact Gaussian-mixture teacher give a student network as the LoRA base)")
        return LoRACritic(base, adapter_name="student", own_base=own_base, **options)

    def trainable_parameter_fraction(self) -> float:
        """Trained student parameters / all student parameters (a LoRA student's base counted; HiPA reports it)."""
        network = self.student
        base = getattr(network, "base_network", None)
        trained_params = self.generator_parameters()
        trained = sum(p.numel() for p in trained_params)
        total = sum(p.numel() for p in network.parameters())
        if base is not None and not getattr(network, "own_base", True):
            total += sum(p.numel() for p in base.parameters())  # the shared teacher is held outside the student
        in_student = {id(p) for p in network.parameters()}     # trained weights beside the student (NCT's adapter)
        total += sum(p.numel() for p in trained_params if id(p) not in in_student)
        return trained / max(total, 1)

    def _apply_memory_options(self, gradient_checkpointing: bool, attention_backend: str) -> None:
        """Gradient checkpointing on the trained networks; xformers attention when CUDA is present, else torch SDPA."""
        from .networks.memory import apply_memory_options

        trained = [n for n in (self.student, self.critic) if n is not None]
        backends = {apply_memory_options(network, gradient_checkpointing=gradient_checkpointing and network is not self.teacher,
                                         attention=attention_backend) for network in [self.teacher, *trained]}
        backends.discard(None)
        if backends:
            log.info("attention: %s%s", " + ".join(sorted(backends)),
                     "; gradient checkpointing on the trained networks" if gradient_checkpointing else "")

    def _share_schedule(self, network: Denoiser, name: str) -> None:
        if network.schedule is None:
            network.schedule = self.schedule
        elif network.schedule.describe() != self.schedule.describe():
            raise ValueError(f"{name} schedule {network.schedule.describe()} differs from the teacher's "
                             f"{self.schedule.describe()}; omit it to share the teacher's")

    def _check_shapes(self, network: Denoiser, name: str) -> None:
        ours, theirs = network.data_shape, self.teacher.data_shape
        if ours is not None and theirs is not None and tuple(ours) != tuple(theirs):
            raise ValueError(f"{name} data shape {tuple(ours)} does not match the teacher's {tuple(theirs)}")

    def _resolve_student_times(self, timesteps, sigmas) -> Tensor:
        if timesteps is not None and sigmas is not None:
            raise ValueError("give student_timesteps or student_sigmas, not both")
        if sigmas is not None:
            times = self.schedule.time_from_edm_sigma(torch.tensor(list(sigmas), dtype=torch.float64))
        elif timesteps is not None:
            times = torch.tensor(list(timesteps), dtype=torch.float64)
        else:
            times = torch.tensor([self.schedule.t_max], dtype=torch.float64)
        if len(times) == 0 or (times < self.schedule.t_min).any() or (times > self.schedule.t_max).any():
            raise ValueError(f"student times {times.tolist()} must be non-empty and inside "
                             f"[{self.schedule.t_min}, {self.schedule.t_max}]")
        if (times[1:] >= times[:-1]).any():
            raise ValueError(f"student times must be strictly decreasing, got {times.tolist()}")
        return times

    def on_train_start(self) -> None:
        # Lightning keeps each submodule's mode; the student and critic were copied from the eval-mode teacher
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the frozen teacher never runs in training mode (dropout, batch statistics)
        if self.autoencoder is not None:
            self.autoencoder.eval()
        return self

    # ------------------------------------------------------------------ latent teachers
    def to_images(self, samples: Tensor) -> Tensor:
        """Samples in image space ([-1, 1]): decoded by the autoencoder for latent teachers, as they are otherwise."""
        if self.autoencoder is None:
            return samples
        with torch.no_grad():
            return self.autoencoder.decode(samples)

    def prepare_batch(self, batch: dict) -> dict:
        """Image-text pair batches carry ``real_images``; a latent teacher's methods see them as latents ``real``."""
        if batch.get("real") is None and batch.get("real_images") is not None:
            if self.autoencoder is None:
                batch["real"] = batch["real_images"]
            else:
                with torch.no_grad():
                    batch["real"] = self.autoencoder.encode(batch["real_images"])
        return batch

    # ------------------------------------------------------------------ networks as the methods see them
    def teacher_x0(self, x_t: Tensor, t: Tensor, cond: Tensor | None, guidance_scale: Tensor | float | None = None) -> Tensor:
        """The teacher's x0 estimate, with classifier-free guidance on the teacher only (DMD2 Sec. 4.2)."""
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        guided = cond is not None and (torch.is_tensor(scale) or scale != 1.0)
        null = self.unconditional(cond) if guided else None
        return classifier_free_guidance(self.teacher, x_t, t, cond, null, scale)

    def unconditional(self, cond):
        """CFG's unconditional branch: the null label (class labels), the empty / negative prompt (prompts) or the
        blank image (restoration)."""
        null_label = None if carries_own_null(cond) else self._null_label()
        return unconditional(cond, null_label)

    def _null_label(self) -> int:
        classes = getattr(self.teacher, "num_classes", None)
        if not classes:
            raise ValueError("guidance_scale != 1 needs a class-conditional teacher with num_classes "
                             "(or prompts encoded with their empty-prompt embedding)")
        return classes

    def sample_times(self, sampler, n: int) -> Tensor:
        return sampler(n, self.schedule, device=self.device)

    def noise_like(self, x: Tensor) -> Tensor:
        return torch.randn_like(x)

    def generate(self, noise: Tensor, cond: Tensor | None = None, nfe: int | None = None,
                 network: nn.Module | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Student samples in ``nfe`` steps (default: its training steps). Gradients flow if enabled by the caller."""
        network = self.student if network is None else network
        times = self.evaluation_times(nfe)
        return student_sample(lambda x, t: network(x, t, cond), noise, times, self.schedule, generator)

    def evaluation_times(self, nfe: int | None) -> Tensor:
        if nfe is None or nfe == len(self.student_times):
            return self.student_times
        start = self.schedule.edm_sigma(self.student_times[:1]).item()
        return sampler_times(self.schedule, nfe, "student", edm_sigma_max=start)

    def averaged_network(self) -> nn.Module:
        """The network an EMA callback follows."""
        return self.student

    def averaging_phase(self) -> int:
        """The method's stage counter; an EMA callback restarts its average when it changes. Staged methods override
        it: a new stage trains the student for another task (PD's halved step count, TCM's truncated range), so an
        average that reached back into the previous stage would sample with a blend of two models."""
        return 0

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Tensor | None = None, nfe: int | None = None,
               generator: torch.Generator | None = None, teacher_steps: int = 0,
               teacher_method: str = "heun") -> Tensor:
        """Evaluation samples from the EMA student when one is tracked, else from the raw student. ``teacher_steps``
        > 0: diversity distillation's hybrid sampler (``samplers.hybrid_sample``) -- the first steps of the student's
        ``nfe``-step grid are teacher ODE steps, the student does the rest."""
        network = self.evaluation_student if self.evaluation_student is not None else self.student
        was_training = network.training
        network.eval()
        try:
            if teacher_steps:
                return hybrid_sample(lambda x, t: self.teacher_x0(x, t, cond), lambda x, t: network(x, t, cond),
                                     noise, self.evaluation_times(nfe), self.schedule, teacher_steps, teacher_method,
                                     generator)
            return self.generate(noise, cond, nfe, network, generator)
        finally:
            network.train(was_training)

    @torch.no_grad()
    def sample_teacher(self, noise: Tensor, cond: Tensor | None = None, nfe: int = 32, method: str = "heun") -> Tensor:
        times = sampler_times(self.schedule, nfe, method)
        return teacher_sample(lambda x, t: self.teacher_x0(x, t, cond), noise, times, self.schedule, method)

    def generator_training_sample(self, batch: dict) -> Tensor:
        """x_g for the generator loss, with gradient. For a K-step student, DMD2's backward simulation (Sec. 4.5):
        run k ~ U{0..K-1} student steps without gradient (k drawn on rank 0 and broadcast), then the k-th with it."""
        noise, cond = batch["noise"], batch.get("cond")
        times = self.student_times
        k = 0
        if len(times) > 1 and self.hparams.backward_simulation:
            k = int(torch.randint(0, len(times), (1,)).item())
            if self._trainer is not None and self.trainer.world_size > 1:
                k = int(self.trainer.strategy.broadcast(k, src=0))
        with torch.no_grad():
            x_t = self._simulate(noise, cond, k)
        t = torch.full((noise.shape[0],), float(times[k]), dtype=torch.float64, device=noise.device)
        return self.student(x_t, t, cond)

    def _prior(self, noise: Tensor) -> Tensor:
        return prior_sample(noise, self.student_times[0], self.schedule)

    def _simulate(self, noise: Tensor, cond: Tensor | None, k: int) -> Tensor:
        """x_{t_k} reached by k student steps from noise (no gradient), ready for the k-th step."""
        x = self._prior(noise)
        for i in range(k):
            t = torch.full((noise.shape[0],), float(self.student_times[i]), dtype=torch.float64, device=noise.device)
            x0 = self.student(x, t, cond)
            t_next = torch.full_like(t, float(self.student_times[i + 1]))
            x = self.schedule.add_noise(x0, self.noise_like(x0), t_next)
        return x

    # ------------------------------------------------------------------ the two losses a method provides
    def generator_loss(self, batch: dict) -> dict[str, Tensor]:
        """Return {"loss": scalar, ...logged extras}."""
        raise NotImplementedError(f"{type(self).__name__} must implement generator_loss(batch) -> {{'loss': ...}}")

    def critic_loss(self, batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} trains no critic")

    def on_generator_step_end(self) -> None:
        """Hook after each generator update (e.g. the consistency target's EMA)."""

    # ------------------------------------------------------------------ optimization
    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        params = list(self.critic.parameters()) if self.critic is not None else []
        if self.discriminator is not None:
            params += list(self.discriminator.parameters())
        return [p for p in params if p.requires_grad]

    def configure_optimizers(self):
        optimizers = [self.generator_optimizer_factory(self.generator_parameters())]
        factories = [self.generator_scheduler_factory]
        if self.uses_critic:
            optimizers.append(self.critic_optimizer_factory(self.critic_parameters()))
            factories.append(self.critic_scheduler_factory)
        schedulers = [{"scheduler": f(opt), "interval": "step"} for f, opt in zip(factories, optimizers) if f is not None]
        return optimizers, schedulers

    def _optimizer(self, name: str):
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        return optimizers[0 if name == "generator" else 1]

    def _scheduler(self, name: str):
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return None
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        wanted = self._optimizer(name).optimizer
        return next((s for s in schedulers if s.optimizer is wanted), None)

    def _update(self, name: str, loss_fn, batch: dict) -> dict[str, Tensor]:
        """toggle -> loss -> zero_grad -> backward -> clip -> step -> scheduler (Lightning's manual GAN recipe)."""
        optimizer = self._optimizer(name)
        with self.toggled_optimizer(optimizer):
            losses = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(losses["loss"])
            clip = self.hparams.generator_clip_norm if name == "generator" else self.hparams.critic_clip_norm
            if clip is not None:
                self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            optimizer.step()
        scheduler = self._scheduler(name)
        if scheduler is not None:
            scheduler.step()
        self.log(f"train/{name}/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)
        for key, value in losses.items():
            self.log(f"train/{name}/{key}", value.detach().float().mean(), on_step=True, on_epoch=False,
                     prog_bar=key == "loss")
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> None:
        batch = self.prepare_batch(batch)
        self._check_batch(batch)
        self.generator_stepped = False
        if self.uses_critic:
            self._update("critic", self.critic_loss, batch)
        if self.update_generator_now:
            self._update("generator", self.generator_loss, batch)
            self.generator_stepped = True
            self.on_generator_step_end()

    def _check_batch(self, batch: dict) -> None:
        if "noise" not in batch:
            raise KeyError(f"batch has keys {sorted(batch)}; a distillation batch needs 'noise'")
        if self.needs_real_data and batch.get("real") is None:
            reason = self.real_data_reason or "a real-data term"
            raise ValueError(f"{type(self).__name__} needs real data samples ({reason}): use a datamodule that provides "
                             "'real' (e.g. ToyMixtureDataModule or an image datamodule)")
        shape = self.teacher.data_shape
        if shape is not None and tuple(batch["noise"].shape[1:]) != tuple(shape):
            raise ValueError(f"noise shape {tuple(batch['noise'].shape[1:])} does not match the teacher's data shape "
                             f"{tuple(shape)}")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        batch = self.prepare_batch(batch)
        self._check_batch(batch)
        losses = self.generator_loss(batch)
        self.log("val/generator/loss", losses["loss"].detach().float(), sync_dist=True)
        if self.uses_critic:
            self.log("val/critic/loss", self.critic_loss(batch)["loss"].detach().float(), sync_dist=True)

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The methods draw noise levels and re-noising noise from the global generators, so resuming bit-for-bit
        # needs their states (Lightning restores model, optimizers, schedulers and callbacks, not RNG).
        # numpy's state is stored as tensors and numbers so checkpoints still load with weights_only=True.
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        kind, keys, position, has_gauss, cached = states.pop("numpy")
        states["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(position), int(has_gauss), float(cached)]
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            states = dict(checkpoint["rng_states"])
            kind, keys, position, has_gauss, cached = states.pop("numpy")
            states["numpy"] = (kind, keys.numpy().astype("uint32"), position, has_gauss, cached)
            _set_rng_states(states)

    # ------------------------------------------------------------------ warm start
    def setup(self, stage: str) -> None:
        """Toy students that are not teacher copies start from a network regressed onto the teacher (the analogue of
        DMD2/SiD's teacher initialisation), seeded identically on every rank; skipped when resuming."""
        if self._trainer is not None:
            check_data_regime(self, self.trainer.datamodule)
        resuming = self._trainer is not None and self.trainer.ckpt_path is not None
        if stage == "fit" and self.hparams.warm_start_steps > 0 and not bool(self.warm_started) and not resuming:
            draw = law_draw(self._warm_start_law(), conditional=getattr(self.student, "num_classes", 0) > 0)
            fitted = self._warm_start_network()
            regress_to_teacher(fitted, self.teacher_x0, draw, self.schedule,
                               steps=self.hparams.warm_start_steps, lr=self.hparams.warm_start_lr,
                               batch_size=self.hparams.warm_start_batch_size, seed=self.hparams.seed)
            if fitted is not self.student:
                fitted.requires_grad_(False).zero_grad(set_to_none=True)  # frozen again, no stale gradients held
                self.student.reset_adapters()   # ... and its adapters start at B = 0 on the fitted base
            if self.critic is not None:
                weights = self.student.state_dict()
                if set(weights) != set(self.critic.state_dict()) and fitted is not self.student:
                    weights = fitted.state_dict()  # a LoRA critic on a LoRA student's base: it starts as that base
                self.critic.load_state_dict(weights)
            self.warm_started.fill_(True)
            self.on_warm_start_end()

    def _warm_start_network(self) -> nn.Module:
        """The network the warm start fits: the student, or for a LoRA student on its own base that base (unfrozen
        for the fit), so the adapters start on a base that already denoises like the teacher."""
        base = getattr(self.student, "base_network", None)
        if base is not None and getattr(self.student, "own_base", False):
            return base.requires_grad_(True)
        return self.student

    def on_warm_start_end(self) -> None:
        """Hook for methods that keep extra copies of the student (e.g. a consistency target)."""

    def _warm_start_law(self):
        law = getattr(self.teacher, "law", None)
        if law is None:
            raise ValueError("warm_start_steps > 0 needs a teacher with a known data law (GaussianMixtureTeacher); "
                             "for network teachers leave student unset to copy the teacher instead")
        return law
