"""Consistency distillation (Song et al., ICML 2023, arXiv:2303.01469), Algorithm 2, on the family's mechanism
(``consistency_family.ConsistencyTraining``).

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

from ..diffusion.samplers import heun_step
from ..diffusion.time_samplers import KarrasIndexTime
from .consistency_family import ConsistencyTraining, boundary_error, warn_if_boundary_condition_breaks

__all__ = ["ConsistencyDistillation", "boundary_error", "warn_if_boundary_condition_breaks"]


class ConsistencyDistillation(ConsistencyTraining):
    needs_real_data = True
    real_data_reason = "its target is a teacher ODE step from noised real samples"

    def __init__(self, *args, num_discretization_steps: int = 18, target_ema_decay: float = 0.95,
                 distance_metric: str = "l2", huber_c: float | None = None, **kwargs):
        if not 0.0 <= target_ema_decay < 1.0:
            raise ValueError(f"target_ema_decay must be in [0, 1), got {target_ema_decay}")
        self.discretization = KarrasIndexTime(num_discretization_steps)
        super().__init__(*args, target_ema_decay=target_ema_decay, distance_metric=distance_metric,
                         huber_c=huber_c, **kwargs)

    def time_pairs(self, n, device):
        """(t_{n+1}, t_n): adjacent points of the Karras grid, n uniform (Alg. 2)."""
        return self.discretization.pairs(n, self.schedule, device=device)

    def target_point(self, batch, x0, noise, x_noisy, t_noisy, t_clean, cond):
        """x^_{t_n}: one Heun step of the teacher's PF-ODE from t_{n+1} to t_n (Eq. 7)."""
        return heun_step(lambda x, t: self.teacher_x0(x, t, cond), x_noisy, t_noisy, t_clean, self.schedule)
