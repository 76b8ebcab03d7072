"""DMD -- One-step Diffusion with Distribution Matching Distillation (Yin et al., CVPR 2024, arXiv:2311.18828).

Algorithm 1 (one critic update and one generator update per iteration):
  critic F:     x_g = sg(G(z)); t over the whole schedule; L_F = lambda(t) ||F(x_t, t) - x_g||^2  (Sec. 3.2, mu_fake)
  generator G:  x_g = G(z); x_t = alpha_t x_g + sigma_t eps; D_real = T(x_t), D_fake = F(x_t)
                g = (D_fake - D_real) / mean_CHW |x_g - D_real|   (Eq. 7's score difference, Eq. 8's weight w_t)
                L_KL  = 1/2 ||x_g - sg(x_g - g)||^2
                L_reg = d(G(z_ref), y_ref) over precomputed teacher ODE pairs (z_ref, y_ref)     (Sec. 3.3)
                L_G   = L_KL + lambda_reg L_reg,  lambda_reg = 0.25                                  (Sec. 3.3)
The distribution-matching direction is DMD2's ``dmd_gradient`` (DMD2 keeps it and drops the regression), so DMD is
DMD2 plus the regression term, with DMD2's GAN term off and no TTUR in the configs. DMD has no public release; its
time draws and critic weighting are DMD2's defaults, taken from DMD2's release (see dmd2.py): the generator at
t ~ U[0.02 T, 0.98 T], the critic over every noise level.

Deviation: the paper's d is LPIPS; LPIPS weights are not available offline, so d is ``losses.distance`` -- "l2"
(per-sample mean squared error, the default) or "pseudo_huber" (iCT's sqrt(||d||^2 + c^2) - c).
Pairs come from ``lightning_modules.trajectory_pairs`` (the paper samples them with the teacher's deterministic ODE
solver) through a pairs datamodule (``datamodules.pairs``): batches carry "pair_noise", "pair_target" and, when
conditional, "pair_cond". The regression needs a one-step student: G(z) = student(sigma(t_0) z, t_0).
"""
from __future__ import annotations

import torch

from ..losses import distance
from .dmd2 import DMD2

PAIR_KEYS = ("pair_noise", "pair_target")


class DMD(DMD2):
    def __init__(self, *args, regression_weight: float = 0.25, regression_distance: str = "l2",
                 huber_c: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if regression_weight < 0:
            raise ValueError(f"regression_weight must be >= 0, got {regression_weight}")
        distance(torch.zeros(1, 1), torch.zeros(1, 1), regression_distance, huber_c)  # fail early on unknown metric
        if regression_weight > 0 and len(self.student_times) != 1:
            raise ValueError(f"DMD's regression term needs a one-step student (G(z) regressed onto ODE_T(z)); the "
                             f"student has {len(self.student_times)} steps {self.student_times.tolist()}")
        self.regression_weight = regression_weight
        self.regression_distance, self.huber_c = regression_distance, huber_c

    def _check_batch(self, batch: dict) -> None:
        super()._check_batch(batch)
        if self.regression_weight <= 0:
            return
        missing = [key for key in PAIR_KEYS if key not in batch]
        if missing:
            raise ValueError(f"DMD's regression term (regression_weight={self.regression_weight}) needs teacher pairs "
                             f"in the batch but {missing} are missing: use a pairs datamodule "
                             "(datamodules.pairs.ToyMixturePairsDataModule / MNISTPairsDataModule) or set "
                             "regression_weight: 0")
        shape = self.teacher.data_shape
        for key in PAIR_KEYS:
            if shape is not None and tuple(batch[key].shape[1:]) != tuple(shape):
                raise ValueError(f"{key} has sample shape {list(batch[key].shape[1:])}, the teacher's is {list(shape)}")

    def regression_loss(self, batch: dict) -> torch.Tensor:
        """Per-pair d(G(z_ref), y_ref) (Sec. 3.3), G the one-step student with gradient."""
        prediction = self.generate(batch["pair_noise"], batch.get("pair_cond"))
        target = batch["pair_target"].to(prediction.dtype)
        return distance(prediction, target, self.regression_distance, self.huber_c)

    def generator_loss(self, batch):
        losses = super().generator_loss(batch)
        if self.regression_weight > 0:
            regression = self.regression_loss(batch).mean()
            losses["regression"] = regression
            losses["loss"] = losses["loss"] + self.regression_weight * regression
        return losses
