"""Jacobian-vector products of a network's forward: the tangents of continuous-time consistency models.

sCM (Lu & Song 2024, arXiv:2410.11081, Sec. 4 and Eq. 7) needs the total time derivative dF/dt = grad_x F . dx/dt +
d_t F along the probability-flow ODE, and MeanFlow (Geng et al. 2025, arXiv:2505.13447, Eq. 8) the derivative
du/dt = v . grad_z u + d_t u; both are one JVP of the network's forward along the tangent (dx/dt, 1) (MeanFlow:
(v, 0, 1) for the inputs (z, r, t)). ``jvp`` computes it by forward-mode AD (``torch.func.jvp``), or by a central
difference for networks whose operators have no forward-mode formula (some fused attention kernels, custom CUDA
ops): ``method="auto"`` tries forward mode and falls back on the error forward mode raises.

Central difference (``method="finite_difference"``):

  J(p) . v ~ (f(p + h v) - f(p - h v)) / (2 h),   error O(h^2 |f'''|) + O(eps_machine |f| / h),

minimised near h = eps_machine^(1/3): ``step`` defaults to that of the lowest-precision floating primal (6.1e-6 in
float64, 4.9e-3 in float32, 0.1 in bfloat16), scaled by 1 / max(1, max |v|) so the perturbation itself stays h-sized.
Every one of the three calls sees the same RNG state (the same dropout mask), so the difference is of one function.

Where float64 is needed: (i) finite differences in float32 keep only ~eps^(2/3) ~ 1e-5 relative accuracy, and less
where f is large against its derivative, so a check of the forward-mode tangent against finite differences (the
tests) runs the network in float64; (ii) the time derivative of TrigFlow's coefficients near the ends -- dF/dt of
F = (cos t x - f) / (sigma_d sin t) divides by sin t -> 0 as t -> 0, and sigma_d tan t (the EDM noise level behind a
TrigFlow time) blows up as t -> pi/2 -- so the time arithmetic (and its tangent) stays in float64, as every schedule
here computes it, and only the network runs in the data's dtype.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["jvp", "default_step", "FORWARD_AD_ERRORS"]

#: fragments of the messages torch raises when an operator has no forward-mode derivative
FORWARD_AD_ERRORS = ("forward ad", "forward-mode", "forward mode", "jvp", "not implemented for", "derivative for",
                     "dual", "functorch", "vmap")


def default_step(primals: Sequence, tangents: Sequence) -> float:
    """eps^(1/3) of the lowest-precision floating primal, over max(1, max |tangent|)."""
    eps = max(torch.finfo(p.dtype).eps for p in primals if torch.is_tensor(p) and p.is_floating_point())
    scale = max([1.0] + [float(v.abs().max()) for v in tangents if torch.is_tensor(v) and v.numel()])
    return eps ** (1.0 / 3.0) / scale


def _devices(primals) -> list:
    return sorted({p.device.index or 0 for p in primals if torch.is_tensor(p) and p.is_cuda})


def _finite_difference(fn, primals, tangents, step):
    h = default_step(primals, tangents) if step is None else float(step)
    devices = _devices(primals)
    # one seed for all three calls, so a stochastic fn (dropout) sees the same mask; torch.manual_seed seeds every
    # device's generator, which keeps this free of accelerator-specific RNG calls
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())

    def call(*args):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return fn(*args)

    def shifted(sign):
        return [p + sign * h * v if torch.is_tensor(v) else p for p, v in zip(primals, tangents)]

    output = call(*primals)
    difference = (call(*shifted(1.0)) - call(*shifted(-1.0))) / (2.0 * h)
    return output, difference.to(output.dtype)


def jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor | None],
        method: str = "auto", step: float | None = None) -> tuple[Tensor, Tensor]:
    """(fn(*primals), J_fn(primals) . tangents) for a function of tensors returning one tensor.

    ``method``: "forward" (``torch.func.jvp``; errors propagate), "finite_difference" (central difference, ``step``
    h as in the module docstring), or "auto" (forward mode, falling back with a warning on the error forward mode
    raises for an operator without a forward-mode formula). A ``None`` tangent is a zero tangent (an input held fixed).
    Works under ``torch.no_grad()`` (forward mode does not need the backward graph)."""
    if method not in ("auto", "forward", "finite_difference"):
        raise ValueError(f"unknown jvp method {method!r}; expected 'auto', 'forward' or 'finite_difference'")
    primals = tuple(primals)
    tangents = tuple(torch.zeros_like(p) if v is None else v.to(p.dtype) for p, v in zip(primals, tangents))
    if len(primals) != len(tangents):
        raise ValueError(f"jvp needs one tangent per primal, got {len(primals)} primals and {len(tangents)} tangents")
    if method == "finite_difference":
        return _finite_difference(fn, primals, tangents, step)
    try:
        return torch.func.jvp(fn, primals, tangents)
    except (RuntimeError, NotImplementedError) as error:
        message = str(error).lower()
        if method == "forward" or not any(fragment in message for fragment in FORWARD_AD_ERRORS):
            raise
        warnings.warn(f"forward-mode JVP failed ({str(error).splitlines()[0][:200]}); using a central finite "
                      "difference instead", stacklevel=2)
        return _finite_difference(fn, primals, tangents, step)
