"""Tests for lightning_modules.evaluation.sample_metrics (ground-truth GMM metrics).

The law is a small stand-in with the same duck-typed interface as the project's
Gaussian-mixture law (weights, means, covariances, log_prob, component_log_prob,
sample), so these tests do not depend on lightning_modules.networks.
"""

import math

import pytest
import torch

from lightning_modules.evaluation.sample_metrics import (
    gaussian_kl,
    ground_truth_metrics,
    knn_precision_recall,
    lightest_mode_weight,
    low_density_mass,
    mmd_rbf,
    mode_assignment,
    mode_weight_tv,
    modes_covered,
    off_manifold_mass,
    per_mode_moment_kl,
    per_mode_moment_kls,
    sliced_wasserstein2,
)

F64 = torch.float64


class StandInGMM:
    """Minimal exact Gaussian-mixture law with the interface the metrics use."""

    def __init__(self, weights, means, covariances):
        w = torch.as_tensor(weights, dtype=F64)
        self.weights = w / w.sum()
        self.means = torch.as_tensor(means, dtype=F64)
        self.covariances = torch.as_tensor(covariances, dtype=F64)
        self._chol = torch.linalg.cholesky(self.covariances)

    def component_log_prob(self, x):
        x = x.to(F64)
        d = self.means.shape[1]
        diff = x[:, None, :] - self.means[None]
        z = torch.linalg.solve_triangular(self._chol[None], diff[..., None], upper=False)[..., 0]
        logdet = 2.0 * torch.log(torch.diagonal(self._chol, dim1=-2, dim2=-1)).sum(-1)
        return (
            torch.log(self.weights)[None]
            - 0.5 * (z * z).sum(-1)
            - 0.5 * logdet[None]
            - 0.5 * d * math.log(2.0 * math.pi)
        )

    def log_prob(self, x):
        return torch.logsumexp(self.component_log_prob(x), dim=1)

    def sample(self, n, generator=None):
        c = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=F64)
        return self.means[c] + (self._chol[c] @ z[..., None])[..., 0], c


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def law3():
    """3 well-separated modes in 2-D with unequal weights (0.5, 0.3, 0.2)."""
    covs = torch.stack(
        [
            0.5 * torch.eye(2, dtype=F64),
            torch.tensor([[0.6, 0.2], [0.2, 0.3]], dtype=F64),
            0.3 * torch.eye(2, dtype=F64),
        ]
    )
    return StandInGMM([0.5, 0.3, 0.2], [[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]], covs)


def _inflate(x, comp, law, factor):
    """Scale each sample's deviation from its own component mean: covariance x factor."""
    mu = law.means[comp]
    return mu + math.sqrt(factor) * (x - mu)


# ----------------------------------------------------------------------------- SW2
def test_sw2_of_set_with_itself_is_zero():
    x = torch.randn(500, 5, generator=_gen(0), dtype=F64)
    assert sliced_wasserstein2(x, x, generator=_gen(1)) == pytest.approx(0.0, abs=1e-12)
    y = x + 0.1
    assert sliced_wasserstein2(x, y, generator=_gen(1)) > 1e-3


def test_sw2_gaussian_shift_matches_closed_form():
    # x ~ N(0, I), y ~ N(m, I) in D dims: SW2^2 = E[(theta . m)^2] = |m|^2 / D.
    d, n = 4, 10000
    g = _gen(2)
    m = torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randn(n, d, generator=g, dtype=F64) + m
    expected = m.norm().item() / math.sqrt(d)
    got = sliced_wasserstein2(x, y, num_projections=1000, generator=g)
    assert got == pytest.approx(expected, rel=0.10)
    # unequal sample counts take the quantile-grid path; same answer
    got_uneq = sliced_wasserstein2(x, y[: n // 2 + 17], num_projections=1000, generator=g)
    assert got_uneq == pytest.approx(expected, rel=0.10)


def test_sw2_unequal_sizes_is_exact():
    # 1-D: W2^2({0, 1}, {0, 0.5, 1}) = (1/6)(0.25) + (1/6)(0.25) = 1/12 on every direction.
    x = torch.tensor([[0.0], [1.0]], dtype=F64)
    y = torch.tensor([[0.0], [0.5], [1.0]], dtype=F64)
    assert sliced_wasserstein2(x, y, num_projections=8) == pytest.approx(math.sqrt(1.0 / 12.0), rel=1e-12)
    # duplicating every point of y does not change its empirical measure
    a = torch.randn(300, 3, generator=_gen(3), dtype=F64)
    b = torch.randn(200, 3, generator=_gen(4), dtype=F64) + 0.3
    v1 = sliced_wasserstein2(a, b, generator=_gen(5))
    v2 = sliced_wasserstein2(a, torch.cat([b, b]), generator=_gen(5))
    assert v1 > 0.05
    assert v2 == pytest.approx(v1, rel=1e-10)


# ----------------------------------------------------------------------------- modes
def test_mode_weight_tv_detects_moved_mass(law3):
    x, comp = law3.sample(20000, generator=_gen(10))
    assert torch.equal(mode_assignment(x, law3)[:2000], comp[:2000])  # well separated modes
    tv_exact = mode_weight_tv(x, law3)
    assert tv_exact < 0.02

    # move 40% of the lightest mode's (k=2) samples onto mode 0: TV ~ 0.4 * 0.2 = 0.08
    idx = torch.nonzero(comp == 2).squeeze(1)
    moved = idx[: int(0.4 * idx.numel())]
    x_bad = x.clone()
    x_bad[moved] = x[moved] - law3.means[2] + law3.means[0]
    tv_bad = mode_weight_tv(x_bad, law3)
    assert tv_bad == pytest.approx(0.4 * (comp == 2).double().mean().item(), abs=0.015)
    assert tv_bad > 3.0 * tv_exact


def test_modes_covered_counts_dropped_mode(law3):
    x, comp = law3.sample(20000, generator=_gen(11))
    assert modes_covered(x, law3) == 3
    assert modes_covered(x[comp != 2], law3) == 2
    # keep 5% of mode 2: p_hat ~ 0.01 < 0.1 * 0.2  -> not covered
    idx2 = torch.nonzero(comp == 2).squeeze(1)
    keep = torch.cat([torch.nonzero(comp != 2).squeeze(1), idx2[: int(0.05 * idx2.numel())]])
    assert modes_covered(x[keep], law3) == 2
    # keep 30%: p_hat ~ 0.05 >= 0.02 -> covered
    keep = torch.cat([torch.nonzero(comp != 2).squeeze(1), idx2[: int(0.3 * idx2.numel())]])
    assert modes_covered(x[keep], law3) == 3


def test_lightest_mode_weight_tracks_the_light_mode(law3):
    x, comp = law3.sample(20000, generator=_gen(12))
    exact = lightest_mode_weight(x, law3)
    assert exact["lightest_mode_true_weight"] == pytest.approx(float(law3.weights.min()))
    assert exact["lightest_mode_weight"] == pytest.approx((comp == int(law3.weights.argmin())).double().mean().item())
    assert exact["lightest_mode_weight"] == pytest.approx(exact["lightest_mode_true_weight"], abs=0.01)
    dropped = lightest_mode_weight(x[comp != int(law3.weights.argmin())], law3)
    assert dropped["lightest_mode_weight"] == 0.0


# ----------------------------------------------------------------------------- per-mode KL
def test_gaussian_kl_matches_torch_distributions():
    g = _gen(12)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    b = torch.randn(3, 3, generator=g, dtype=F64)
    s0, s1 = a @ a.T + 0.5 * torch.eye(3, dtype=F64), b @ b.T + 0.5 * torch.eye(3, dtype=F64)
    m0, m1 = torch.randn(3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(m0, s0), torch.distributions.MultivariateNormal(m1, s1)
    )
    assert gaussian_kl(m0, s0, m1, s1) == pytest.approx(float(ref), rel=1e-9)


def test_per_mode_kl_exact_small_inflated_large(law3):
    x, comp = law3.sample(20000, generator=_gen(13))
    kl_exact = per_mode_moment_kl(x, law3)
    assert kl_exact < 0.01
    kl_infl = per_mode_moment_kl(_inflate(x, comp, law3, 1.5), law3)
    # closed form for every component: 0.5 * D * (1.5 - 1 - log 1.5) = 0.0945 (D = 2)
    # (the reverse KL would be 0.072, outside the tolerance)
    assert kl_infl == pytest.approx(0.5 * 2 * (0.5 - math.log(1.5)), rel=0.1)
    assert kl_infl > 5.0 * kl_exact
    # a dropped mode is penalised (scored with the whole-set spread), far above a mis-shaped one
    res = per_mode_moment_kls(x[comp != 2], law3)
    assert res["underpopulated"].tolist() == [False, False, True]
    assert per_mode_moment_kl(x[comp != 2], law3) > 5.0 * kl_infl


def test_per_mode_kl_high_dim_underpopulated_is_finite():
    g = _gen(14)
    d, k = 16, 4
    means = 4.0 * torch.randn(k, d, generator=g, dtype=F64)
    a = torch.randn(k, d, d, generator=g, dtype=F64) / math.sqrt(d)
    covs = a @ a.transpose(1, 2) + 0.2 * torch.eye(d, dtype=F64)
    law = StandInGMM([0.45, 0.45, 0.05, 0.05], means, covs)
    x, _ = law.sample(200, generator=g)  # ~10 samples in each light mode < D + 2
    res = per_mode_moment_kls(x, law)
    assert res["underpopulated"][2:].all() and not res["underpopulated"][:2].any()
    val = per_mode_moment_kl(x, law)
    assert math.isfinite(val) and val > 0
    # a point-collapsed sample set (singular covariances) gives a finite, huge KL
    collapsed = law.means[torch.tensor([0, 1])].repeat_interleave(100, dim=0)
    assert per_mode_moment_kl(collapsed, law) > 10.0 * val


# ----------------------------------------------------------------------------- off-manifold
def test_low_density_mass(law3):
    g = _gen(15)
    ref, _ = law3.sample(20000, generator=g)
    x, _ = law3.sample(20000, generator=g)
    q = 0.01
    exact = low_density_mass(x, law3, ref, quantile=q)
    assert abs(exact - q) < 0.003
    blurred = x + 0.5 * torch.randn(x.shape, generator=g, dtype=F64)
    assert low_density_mass(blurred, law3, ref, quantile=q) > 3.0 * q


def test_off_manifold_mass_exact_and_blurred(law3):
    g = _gen(15)
    x, _ = law3.sample(20000, generator=g)
    exact = off_manifold_mass(x, law3, quantile=0.99)
    assert 0.008 < exact <= 0.0115  # <= 1 - q up to sampling noise (sd ~0.0007)
    blurred = x + 0.5 * torch.randn(x.shape, generator=g, dtype=F64)
    assert off_manifold_mass(blurred, law3, quantile=0.99) > 3.0 * 0.01
    # a non-finite sample is off-manifold, not silently on it
    assert off_manifold_mass(torch.full((4, 2), float("nan"), dtype=F64), law3) == 1.0


# ----------------------------------------------------------------------------- precision / recall
def test_knn_precision_recall(law3):
    g = _gen(16)
    real, _ = law3.sample(3000, generator=g)
    fake, _ = law3.sample(3000, generator=g)
    pr = knn_precision_recall(fake, real, k=5)
    assert pr["precision"] > 0.9 and pr["recall"] > 0.9

    collapsed = law3.means[0] + torch.randn(3000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(
        law3.covariances[0]
    ).T
    pr_c = knn_precision_recall(collapsed, real, k=5)
    assert pr_c["precision"] > 0.9
    assert pr_c["recall"] < 0.6  # only mode 0 (weight 0.5) is recalled

    far = fake + torch.tensor([20.0, 20.0], dtype=F64)
    assert knn_precision_recall(far, real, k=5)["precision"] < 0.05


# ----------------------------------------------------------------------------- MMD
def test_mmd_matches_bruteforce_unbiased_estimate():
    g = _gen(20)
    x = torch.randn(1500, 3, generator=g, dtype=F64)  # > one row chunk
    y = 1.3 * torch.randn(1100, 3, generator=g, dtype=F64) + 0.2
    bw = [0.5, 2.0]

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bw)

    n, m = x.shape[0], y.shape[0]
    kxx, kyy = k(x, x), k(y, y)
    ref = (
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * k(x, y).mean()
    )
    got = mmd_rbf(x, y, bandwidths=bw)
    assert got == pytest.approx(float(ref), rel=1e-8)
    assert got > 0.01


def test_mmd_detects_covariance_inflation(law3):
    g = _gen(17)
    n = 3000
    y, _ = law3.sample(n, generator=g)
    x, comp = law3.sample(n, generator=g)
    mmd_exact = mmd_rbf(x, y, generator=g)
    mmd_infl = mmd_rbf(_inflate(x, comp, law3, 1.5), y, generator=g)
    assert mmd_infl > 0
    assert mmd_infl > 3.0 * abs(mmd_exact)
    # subsampling path (> max_points) runs and stays near zero for exact sets
    assert abs(mmd_rbf(x, y, max_points=1000, generator=g)) < mmd_infl


# ----------------------------------------------------------------------------- all together
EXPECTED_KEYS = {
    "sliced_w2",
    "sliced_w2_std",
    "mmd",
    "mmd_floor_std",
    "modes_covered",
    "modes_dropped",
    "num_modes",
    "mode_weight_tv",
    "per_mode_kl",
    "off_manifold",
    "off_manifold_exact",
    "precision",
    "recall",
    "sliced_w2_floor",
    "sliced_w2_floor_std",
    *(f"sliced_w2_floor_ref{j}" for j in range(4)),
    "mmd_floor",
    "mode_weight_tv_floor",
    "per_mode_kl_floor",
    "sliced_w2_ratio",
    "sliced_w2_ratio_std",
}


def test_ground_truth_metrics_exact_and_collapsed(law3):
    g = _gen(18)
    n = 3000
    x, _ = law3.sample(n, generator=g)
    out = ground_truth_metrics(x, law3, generator=_gen(19))
    assert set(out) == EXPECTED_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    for key in ("sliced_w2_floor", "mmd_floor", "mode_weight_tv_floor", "per_mode_kl_floor"):
        assert out[key] > 0, key
    assert 0.5 < out["sliced_w2_ratio"] < 2.0
    assert out["modes_covered"] == 3.0 and out["num_modes"] == 3.0
    assert out["precision"] > 0.9 and out["recall"] > 0.9

    # a sampler that drops the lightest mode: everything must look clearly worse
    x_bad, comp = law3.sample(n, generator=g)
    x_bad = torch.where((comp == 2)[:, None], x_bad - law3.means[2] + law3.means[0], x_bad)
    bad = ground_truth_metrics(x_bad, law3, generator=_gen(19))
    assert bad["sliced_w2_ratio"] > 3.0
    assert bad["modes_covered"] == 2.0 and bad["modes_dropped"] == 1.0
    assert bad["mode_weight_tv"] > 0.15
    assert bad["per_mode_kl"] > 10.0 * bad["per_mode_kl_floor"]
    assert bad["mmd"] > 10.0 * bad["mmd_floor"]
    assert bad["recall"] < 0.9
