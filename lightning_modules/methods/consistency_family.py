"""The consistency family's one mechanism (Song et al., ICML 2023, arXiv:2303.01469, Eqs. 7 and 10; iCT, Song &
Dhariwal 2023, arXiv:2310.14189; ECT, Geng et al. 2024, arXiv:2406.14548). Every member minimises

  L = E[ lambda(t, r) d( f_theta(x_t, t), sg f_theta-(x^_r, r) ) ]                                  (CM Eqs. 7 / 10)

with
  (t, r)      a time pair, t > r, from a time-pair sampler (``time_pairs``);
  x_t         x + t z (in native time: alpha(t) x + sigma(t) z) from data x;
  x^_r        the target point at the earlier time (``target_point``): one teacher ODE step from x_t (CD, Eq. 7) or
              the same noise z on the same data, x + r z (CT, Eq. 10; iCT; ECT);
  f           the consistency function, whose boundary condition f(x, t_min) = x (CM Eq. 3, Appendix C) the student's
              parameterisation must satisfy (``warn_if_boundary_condition_breaks``);
  theta-      the target network: an EMA of theta (CD: theta- <- mu theta- + (1 - mu) theta, mu = 0.95) or, with
              ``target_ema_decay: null`` / 0, the online network itself under stop-gradient (iCT, ECT);
  d           L2 (mean squared error) or pseudo-Huber sqrt(||a - b||^2 + c^2) - c (iCT Sec. 3.3);
  lambda      a per-pair weight (``pair_weight``): 1 (CD), 1/(t - r) (iCT Sec. 3.2, ECT).
A curriculum (``callbacks.ConsistencyCurriculum``) moves the time-pair sampler's discretisation through
``apply_curriculum(k, K)``; the current value is a persistent buffer, so the Lightning checkpoint carries it.
The online and target calls share one dropout mask (the same RNG state), as the reference implementations do.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..base import DistillationModule
from ..losses import distance


def boundary_error(student, schedule, shape=None) -> float:
    """max |f(x, t_min) - x| / max |x| on a small random batch: 0 for a parameterisation with f(x, t_min) = x."""
    shape = tuple(shape or student.data_shape or ())
    if not shape:
        return 0.0
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    parameter = next(student.parameters(), None)
    if parameter is not None:
        x = x.to(device=parameter.device, dtype=parameter.dtype)
    t = torch.full((2,), schedule.t_min, dtype=torch.float64, device=x.device)
    x_t = schedule.add_noise(x, torch.zeros_like(x), t)  # the data end: x_t = alpha(t_min) x
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            error = (student(x_t, t, None) - x).abs().max() / x.abs().max()
    except (TypeError, ValueError, RuntimeError):  # a student that cannot run unconditioned: nothing to check here
        error = torch.zeros(())
    finally:
        student.train(was_training)
    return float(error)


def warn_if_boundary_condition_breaks(student, schedule, tolerance: float = 1e-4) -> None:
    error = boundary_error(student, schedule)
    if error > tolerance:
        warnings.warn(f"the consistency student {type(student).__name__} breaks the boundary condition f(x, t_min) = x "
                      f"(relative error {error:.2e} at t_min = {schedule.t_min}); consistency models need it (Song et "
                      "al. 2023, Eq. 3 and Appendix C): use an EDM-preconditioned student with boundary_condition: "
                      "true", stacklevel=4)


class ConsistencyTraining(DistillationModule):
    """Base of the consistency family: subclasses give ``time_pairs``, ``target_point`` and optionally
    ``pair_weight`` and ``apply_curriculum``; the loss, the target network, the shared dropout mask and the boundary
    check are here."""

    uses_critic = False
    needs_real_data = True
    real_data_reason = "its pairs are noised real samples"

    def __init__(self, *args, target_ema_decay: float | None = None, distance_metric: str = "l2",
                 huber_c: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if target_ema_decay is not None and not 0.0 <= target_ema_decay < 1.0:
            raise ValueError(f"target_ema_decay must be in [0, 1) or null, got {target_ema_decay}")
        self.distance_metric, self.huber_c = distance_metric, huber_c
        distance(torch.zeros(1, 1), torch.zeros(1, 1), distance_metric, huber_c)  # fail early on unknown metric
        self.target_student = None
        if target_ema_decay:  # an EMA target network theta- (CD); 0 / null: the online network under stop-gradient
            self.target_student = AveragedModel(self.student, multi_avg_fn=get_ema_multi_avg_fn(target_ema_decay),
                                                use_buffers=True).requires_grad_(False)
            self.target_student.n_averaged.fill_(1)  # theta- = theta already: the first update averages, not copies
        warn_if_boundary_condition_breaks(self.student, self.schedule)

    # ------------------------------------------------------------------ the hooks a member provides
    def time_pairs(self, n: int, device) -> tuple[Tensor, Tensor]:
        """(t, r) with t > r: the noisier time of the online call and the earlier time of the target."""
        raise NotImplementedError(f"{type(self).__name__} must implement time_pairs(n, device) -> (t, r)")

    def target_point(self, batch: dict, x0: Tensor, noise: Tensor, x_noisy: Tensor, t_noisy: Tensor,
                     t_clean: Tensor, cond) -> Tensor:
        """x^_r, the target network's input at the earlier time r (no gradient)."""
        raise NotImplementedError(f"{type(self).__name__} must implement target_point(...) -> x^_r")

    def pair_weight(self, t_noisy: Tensor, t_clean: Tensor) -> Tensor | None:
        """lambda(t, r) per sample; None = 1."""
        return None

    def apply_curriculum(self, step: int, total_steps: int) -> None:
        """Called by ``callbacks.ConsistencyCurriculum`` before each training batch with the generator-step count."""

    # ------------------------------------------------------------------ the shared mechanism
    @property
    def target_network(self):
        return self.student if self.target_student is None else self.target_student.module

    def on_warm_start_end(self):
        if self.target_student is not None:
            self.target_student.module.load_state_dict(self.student.state_dict())
            self.target_student.n_averaged.fill_(1)

    def consistency_pair(self, batch):
        """(x_t, t, x^_r, r, cond) from data."""
        x0, cond = batch["real"], batch.get("real_cond")
        t_noisy, t_clean = self.time_pairs(x0.shape[0], x0.device)
        noise = self.noise_like(x0)
        x_noisy = self.schedule.add_noise(x0, noise, t_noisy)
        with torch.no_grad():
            x_clean = self.target_point(batch, x0, noise, x_noisy, t_noisy, t_clean, cond)
        return x_noisy, t_noisy, x_clean, t_clean, cond

    def consistency_function(self, network, x: Tensor, t: Tensor, cond, t_online: Tensor) -> Tensor:
        """f(x, t) of ``network``; ``t_online`` is the pair's online time (multistep CD maps to its segment's edge).
        The network's own output by default; LCM / MCD wrap it (boundary scalings, a DDIM step to an edge)."""
        return network(x, t, cond)

    def consistency_terms(self, batch) -> dict:
        """The loss with its pieces kept -- {"loss", "distance", "online" (f_theta(x_t, t), with gradient),
        "x_noisy", "t_noisy", "cond"} -- so members adding a term on the online output (SCott's GAN term, RG-LCD's
        reward) cost no second student call, and a weight of 0 on that term reproduces this loss bit for bit."""
        x_noisy, t_noisy, x_clean, t_clean, cond = self.consistency_pair(batch)
        dropout_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
        devices = [x_noisy.device] if x_noisy.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(dropout_seed)
            online = self.consistency_function(self.student, x_noisy, t_noisy, cond, t_noisy)
        target_network = self.target_network
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(dropout_seed)
            was_training = target_network.training
            target_network.train(self.student.training)
            target = self.consistency_function(target_network, x_clean, t_clean, cond, t_noisy)
            target_network.train(was_training)
        per_sample = distance(online, target.detach(), self.distance_metric, self.huber_c)
        weight = self.pair_weight(t_noisy, t_clean)
        loss = per_sample.mean() if weight is None else (per_sample * weight.to(per_sample)).mean()
        return {"loss": loss, "distance": per_sample.mean().detach(), "weighted": weight is not None,
                "online": online, "x_noisy": x_noisy, "t_noisy": t_noisy, "cond": cond}

    def generator_loss(self, batch):
        terms = self.consistency_terms(batch)
        if not terms["weighted"]:
            return {"loss": terms["loss"]}
        return {"loss": terms["loss"], "distance": terms["distance"]}

    def on_generator_step_end(self):
        if self.target_student is not None:
            self.target_student.update_parameters(self.student)


class TeacherFreeConsistency(ConsistencyTraining):
    """Consistency training (CM Sec. 5, Eq. 10; Alg. 3): no teacher in the loss -- the target point is the same data
    under the same noise at the earlier time, x^_r = x + r z (alpha(r) x + sigma(r) z in native time). The teacher
    only gives the schedule (and, for toy runs, the warm start: the analogue of ECT's diffusion initialisation)."""

    needs_real_data = True
    real_data_reason = "consistency training's pairs are the same real sample under the same noise at two times"

    def target_point(self, batch, x0, noise, x_noisy, t_noisy, t_clean, cond):
        return self.schedule.add_noise(x0, noise, t_clean)

    def sigma_gap(self, t_noisy: Tensor, t_clean: Tensor) -> Tensor:
        """sigma(t) - sigma(r) in EDM noise level, float64."""
        return self.schedule.edm_sigma(t_noisy) - self.schedule.edm_sigma(t_clean)
