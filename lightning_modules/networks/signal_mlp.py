"""BOOT's student network for vector data (Gu et al. 2023, arXiv:2306.05544, Sec. 3): y_theta(eps, t), the signal of
the teacher's ODE solution at time t started from the unit noise eps, as a plain MLP of (eps, c_noise(t), class).

EDM preconditioning (``ToyMLPDenoiser``) assumes its input is a noisy sample at noise level t and puts a skip
connection c_skip(t) x on it; BOOT's input is the same noise at every t and the output at t -> 0 is data, so the skip
would be wrong (c_out -> 0 leaves no room for the data). ``SignalMLP`` keeps ToyMLPDenoiser's layers (class
embedding, Fourier features of c_noise = ln(edm_sigma) / 4) and drops the preconditioning: predict(eps, t, cond) =
F(eps, c_noise(t), cond). Its ``prediction_type`` is x0, so ``forward`` returns y as is.
"""
from __future__ import annotations

from .mlp import ToyMLPDenoiser


class SignalMLP(ToyMLPDenoiser):
    def predict(self, x_t, t, cond):
        c_noise = (self.schedule.edm_sigma(t.double()).log() / 4).to(x_t.dtype)
        return self.backbone(x_t, c_noise, cond)
