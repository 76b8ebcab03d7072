"""Consistency distillation (Song et al., ICML 2023, arXiv:2303.01469), Algorithm 2.

  x ~ data; n ~ U{1, ..., N-1} on a Karras grid (rho = 7);  x_{t_{n+1}} = x + t_{n+1} z
  x^_{t_n} = one teacher Heun step of the probability-flow ODE from t_{n+1} to t_n            (Eq. 7)
  L = lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), sg f_theta-(x^_{t_n}, t_n)),  lambda = 1
  theta- <- theta at the start, then theta- <- sg(mu theta- + (1 - mu) theta) after every generator update (mu = 0.95
  in the paper's CD runs): the first update is an EMA step too -- torch's AveragedModel would copy the online
  weights on its first update, so the target starts as already averaged once
The online and target calls share one dropout mask (same RNG state), as the reference implementation does.
The student should satisfy the boundary condition f(x, t_min) = x (``boundary_condition: true`` on EDM-preconditioned
networks, Appendix C); a student that does not gets a warning naming it when the module is built. d defaults to L2; LPIPS is unavailable offline, pseudo-Huber (iCT) is the alternative.
No critic: this method stretches the base class toward target networks and trajectory (ODE) targets.
"""
from __future__ import annotations

import warnings

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..base import DistillationModule
from ..diffusion.samplers import heun_step
from ..diffusion.time_samplers import KarrasIndexTime
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
                      "true", stacklevel=3)


class ConsistencyDistillation(DistillationModule):
    uses_critic = False
    needs_real_data = True
    real_data_reason = "its target is a teacher ODE step from noised real samples"

    def __init__(self, *args, num_discretization_steps: int = 18, target_ema_decay: float = 0.95,
                 distance_metric: str = "l2", huber_c: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= target_ema_decay < 1.0:
            raise ValueError(f"target_ema_decay must be in [0, 1), got {target_ema_decay}")
        self.discretization = KarrasIndexTime(num_discretization_steps)
        self.distance_metric, self.huber_c = distance_metric, huber_c
        distance(torch.zeros(1, 1), torch.zeros(1, 1), distance_metric, huber_c)  # fail early on unknown metric
        self.target_student = AveragedModel(self.student, multi_avg_fn=get_ema_multi_avg_fn(target_ema_decay),
                                            use_buffers=True).requires_grad_(False)
        self.target_student.n_averaged.fill_(1)  # theta- = theta already: the first update averages, not copies
        warn_if_boundary_condition_breaks(self.student, self.schedule)

    def on_warm_start_end(self):
        self.target_student.module.load_state_dict(self.student.state_dict())
        self.target_student.n_averaged.fill_(1)

    def consistency_pair(self, batch):
        """(x_{t_{n+1}}, t_{n+1}, x^_{t_n}, t_n) from data and one teacher Heun step."""
        x0, cond = batch["real"], batch.get("real_cond")
        t_noisy, t_clean = self.discretization.pairs(x0.shape[0], self.schedule, device=x0.device)
        x_noisy = self.schedule.add_noise(x0, self.noise_like(x0), t_noisy)
        with torch.no_grad():
            x_clean = heun_step(lambda x, t: self.teacher_x0(x, t, cond), x_noisy, t_noisy, t_clean, self.schedule)
        return x_noisy, t_noisy, x_clean, t_clean, cond

    def generator_loss(self, batch):
        x_noisy, t_noisy, x_clean, t_clean, cond = self.consistency_pair(batch)
        dropout_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
        with torch.random.fork_rng(devices=[x_noisy.device] if x_noisy.is_cuda else []):
            torch.manual_seed(dropout_seed)
            online = self.student(x_noisy, t_noisy, cond)
        with torch.no_grad(), torch.random.fork_rng(devices=[x_noisy.device] if x_noisy.is_cuda else []):
            torch.manual_seed(dropout_seed)
            self.target_student.module.train(self.student.training)
            target = self.target_student.module(x_clean, t_clean, cond)
        loss = distance(online, target, self.distance_metric, self.huber_c)
        return {"loss": loss.mean()}

    def on_generator_step_end(self):
        self.target_student.update_parameters(self.student)
