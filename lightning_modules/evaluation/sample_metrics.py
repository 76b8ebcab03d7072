"""Ground-truth sample metrics against an exactly known Gaussian-mixture law.

Every function takes torch tensors, computes in float64 and returns python
floats (or dicts of floats); nothing here has side effects.  The law is used
only through duck typing, i.e. through these attributes / methods:

* ``law.weights``            (K,)      mixture weights pi_k, summing to 1
* ``law.means``              (K, D)    component means mu_k
* ``law.covariances``        (K, D, D) component covariances Sigma_k
* ``law.log_prob(x)``        (N,)      log-density of the full mixture
* ``law.component_log_prob(x)`` (N, K) log pi_k + log N(x; mu_k, Sigma_k)
* ``law.sample(n, generator=None)`` -> (x (N, D), component index (N,))

Metrics
-------
sliced_wasserstein2   sliced 2-Wasserstein distance (random unit directions)
mmd_rbf               unbiased MMD^2 with a sum of RBF kernels
mode_assignment       most responsible component of each sample
modes_covered         number of components holding >= min_fraction of their mass
mode_weight_tv        total variation between assignment histogram and weights
per_mode_moment_kl    weighted KL of per-component Gaussian moment fits
off_manifold_mass     mass below a low log-density quantile of the law
knn_precision_recall  improved precision / recall (Kynkaanniemi et al., 2019)
ground_truth_metrics  all of the above plus finite-sample floors
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

Tensor = torch.Tensor

DEFAULT_MAX_POINTS = 4000
DEFAULT_BANDWIDTH_FACTORS = (0.1, 0.3, 1.0, 3.0)
_ROW_CHUNK = 1024
_PROJ_CHUNK = 128


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _f64(x: Tensor) -> Tensor:
    """Detached float64 copy of ``x`` shaped (N, D) (a 1-D input becomes (N, 1))."""
    x = torch.as_tensor(x).detach()
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2:
        raise ValueError(f"expected samples shaped (N, D), got {tuple(x.shape)}")
    return x.to(torch.float64)


def _law_device(law) -> torch.device:
    return torch.as_tensor(law.means).device


def _subsample(x: Tensor, max_points: Optional[int], generator: Optional[torch.Generator]) -> Tensor:
    """Random subset of at most ``max_points`` rows (no copy when already small enough)."""
    if max_points is None or x.shape[0] <= max_points:
        return x
    idx = torch.randperm(x.shape[0], generator=generator)[:max_points]
    return x[idx.to(x.device)]


def _sample_law(law, n: int, generator: Optional[torch.Generator], device) -> Tensor:
    out = law.sample(n, generator=generator)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return _f64(out).to(device)


def _sq_dists(a: Tensor, b: Tensor, a_sq: Optional[Tensor] = None, b_sq: Optional[Tensor] = None) -> Tensor:
    """Squared Euclidean distances (|a|^2 + |b|^2 - 2 a.b, clamped at 0)."""
    if a_sq is None:
        a_sq = (a * a).sum(1)
    if b_sq is None:
        b_sq = (b * b).sum(1)
    d2 = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_min_(0.0)


def random_directions(
    dim: int,
    num_projections: int = 512,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> Tensor:
    """(num_projections, dim) float64 unit vectors drawn uniformly on the sphere."""
    d = torch.randn(num_projections, dim, generator=generator, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return d.to(device) if device is not None else d


# --------------------------------------------------------------------------- #
# 1. sliced Wasserstein-2
# --------------------------------------------------------------------------- #
def _merged_quantile_grid(n: int, m: int, device=None):
    """Interval weights and order-statistic indices of the merged quantile grid.

    The empirical quantile functions of n and m points are piecewise constant
    with breaks at i/n and j/m; on the merged grid (integer units 1/(n m)) the
    interval starting at s uses order statistic s // m of the first set and
    s // n of the second.  Returns (weights, ix, iy).
    """
    grid = torch.unique(
        torch.cat([torch.arange(n + 1, device=device) * m, torch.arange(m + 1, device=device) * n])
    )  # sorted, from 0 to n*m
    starts = grid[:-1]
    w = (grid[1:] - starts).to(torch.float64) / float(n * m)
    ix = torch.div(starts, m, rounding_mode="floor")
    iy = torch.div(starts, n, rounding_mode="floor")
    return w, ix, iy


def _w2_squared_sorted(xs: Tensor, ys: Tensor, grid=None) -> Tensor:
    """Exact squared 1-D W2 between empirical measures, row-wise.

    ``xs`` (P, n) and ``ys`` (P, m) are sorted along dim 1 (one row per
    direction).  W2^2 is the integral over t in (0, 1) of
    (F_x^{-1}(t) - F_y^{-1}(t))^2: the mean squared difference of order
    statistics when n == m, otherwise evaluated exactly on the merged quantile
    grid (:func:`_merged_quantile_grid`).
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return ((xs - ys) ** 2).mean(1)
    w, ix, iy = grid if grid is not None else _merged_quantile_grid(n, m, xs.device)
    return ((xs[:, ix] - ys[:, iy]) ** 2 @ w)


def sliced_wasserstein2(
    x: Tensor,
    y: Tensor,
    num_projections: int = 512,
    generator: Optional[torch.Generator] = None,
    directions: Optional[Tensor] = None,
) -> float:
    """Sliced 2-Wasserstein distance SW2(x, y).

    SW2^2 = E_theta[ W2^2(theta.x, theta.y) ] with theta uniform on the unit
    sphere, estimated with ``num_projections`` random directions (or the given
    ``directions`` (P, D), e.g. to share directions between calls).  The 1-D
    W2 is exact for the two empirical measures: order statistics for equal
    sample counts, merged quantile grid otherwise.  Returns sqrt(SW2^2)
    (a distance, not squared).  For x ~ N(0, I), y ~ N(m, I) in D dims the
    population value is |m| / sqrt(D).
    """
    x = _f64(x)
    y = _f64(y).to(x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError("x and y must have the same dimension")
    if directions is None:
        directions = random_directions(x.shape[1], num_projections, generator, x.device)
    else:
        directions = _f64(directions).to(x.device)
    n, m = x.shape[0], y.shape[0]
    grid = _merged_quantile_grid(n, m, x.device) if n != m else None
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for chunk in directions.split(_PROJ_CHUNK):
        px = torch.sort(chunk @ x.T, dim=1).values  # (P_chunk, n), contiguous rows
        py = torch.sort(chunk @ y.T, dim=1).values
        total = total + _w2_squared_sorted(px, py, grid).sum()
    return math.sqrt(max(float(total) / directions.shape[0], 0.0))


# --------------------------------------------------------------------------- #
# 2. MMD
# --------------------------------------------------------------------------- #
def median_pairwise_distance(
    x: Tensor,
    y: Optional[Tensor] = None,
    max_points: int = 1000,
    generator: Optional[torch.Generator] = None,
) -> float:
    """Median Euclidean distance between distinct points of x (pooled with y), on <= max_points points."""
    x = _f64(x)
    z = x if y is None else torch.cat([x, _f64(y).to(x.device)])
    z = _subsample(z, max_points, generator)
    d2 = _sq_dists(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    return float(d2[iu[0], iu[1]].median().sqrt())


def default_bandwidths(
    x: Tensor,
    y: Optional[Tensor] = None,
    factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS,
    generator: Optional[torch.Generator] = None,
) -> List[float]:
    """Median pairwise distance times ``factors`` (default 0.1, 0.3, 1, 3)."""
    med = median_pairwise_distance(x, y, generator=generator)
    med = med if med > 0 else 1.0
    return [med * float(f) for f in factors]


def _rbf_kernel_sum(a: Tensor, b: Tensor, coefs: Tensor, same: bool) -> float:
    """sum_{i,j} sum_h exp(-coef_h |a_i - b_j|^2), excluding i == j when ``same``.

    With ``same`` (b is a) only the blocks on or above the diagonal are
    evaluated and the off-diagonal ones counted twice.
    """
    a_sq = (a * a).sum(1)
    b_sq = (b * b).sum(1)
    neg = [-c for c in coefs.tolist()]
    total = 0.0
    for start in range(0, a.shape[0], _ROW_CHUNK):
        stop = start + _ROW_CHUNK
        ac = a[start:stop]
        if same:
            d2 = _sq_dists(ac, b[start:], a_sq[start:stop], b_sq[start:])
            r = torch.arange(ac.shape[0], device=a.device)
            d2[r, r] = float("inf")  # exp(-inf) = 0 removes the diagonal
            diag_cols = ac.shape[0]
        else:
            d2 = _sq_dists(ac, b, a_sq[start:stop], b_sq)
        buf = torch.empty_like(d2)
        for c in neg:
            torch.mul(d2, c, out=buf).exp_()
            if same:
                total += float(buf[:, :diag_cols].sum()) + 2.0 * float(buf[:, diag_cols:].sum())
            else:
                total += float(buf.sum())
    return total


def mmd_rbf(
    x: Tensor,
    y: Tensor,
    bandwidths: Optional[Sequence[float]] = None,
    max_points: int = DEFAULT_MAX_POINTS,
    generator: Optional[torch.Generator] = None,
) -> float:
    """Unbiased MMD^2 (Gretton et al., 2012) with k(a, b) = sum_h exp(-|a-b|^2 / (2 h^2)).

    Default bandwidths: median pairwise distance of the pooled sample times
    (0.1, 0.3, 1, 3), so the small ones resolve single modes and the large
    ones the global layout.  Each set is randomly subsampled to at most
    ``max_points`` points (memory / time bound); kernel matrices are built in
    row chunks.  The estimate can be slightly negative when x and y share a law.
    """
    x = _f64(x)
    y = _f64(y).to(x.device)
    x = _subsample(x, max_points, generator)
    y = _subsample(y, max_points, generator)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("mmd_rbf needs at least 2 samples in each set")
    if bandwidths is None:
        bandwidths = default_bandwidths(x, y, generator=generator)
    return _mmd_unbiased(x, y, _rbf_coefs(bandwidths))


def _rbf_coefs(bandwidths: Sequence[float]) -> Tensor:
    h = torch.as_tensor(list(bandwidths), dtype=torch.float64)
    return 1.0 / (2.0 * h * h)


def _mean_offdiag_kernel(z: Tensor, coefs: Tensor) -> float:
    n = z.shape[0]
    return _rbf_kernel_sum(z, z, coefs, same=True) / (n * (n - 1))


def _mmd_unbiased(x: Tensor, y: Tensor, coefs: Tensor, kyy: Optional[float] = None) -> float:
    """Unbiased MMD^2 of x, y (no subsampling); ``kyy`` may be precomputed for a reused y."""
    n, m = x.shape[0], y.shape[0]
    kxx = _mean_offdiag_kernel(x, coefs)
    if kyy is None:
        kyy = _mean_offdiag_kernel(y, coefs)
    kxy = _rbf_kernel_sum(x, y, coefs, same=False) / (n * m)
    return float(kxx + kyy - 2.0 * kxy)


# --------------------------------------------------------------------------- #
# 3. mode statistics
# --------------------------------------------------------------------------- #
def mode_assignment(x: Tensor, law) -> Tensor:
    """(N,) long: argmax_k of the responsibility pi_k N(x; mu_k, Sigma_k) (MAP component)."""
    x = _f64(x).to(_law_device(law))
    return law.component_log_prob(x).argmax(dim=1)


def _mode_fractions(x: Tensor, law, assignment: Optional[Tensor] = None) -> Tensor:
    k = torch.as_tensor(law.weights).numel()
    a = mode_assignment(x, law) if assignment is None else assignment
    counts = torch.bincount(a, minlength=k).to(torch.float64)
    return counts / max(a.numel(), 1)


def lightest_mode_weight(x: Tensor, law, assignment: Optional[Tensor] = None) -> Dict[str, float]:
    """The sample fraction MAP-assigned to the law's lightest component, next to its true weight: the number a
    mode-seeking (reverse-KL) student drops first on an unequal-weight mixture."""
    pi = torch.as_tensor(law.weights, dtype=torch.float64)
    lightest = int(pi.argmin())
    p_hat = _mode_fractions(x, law, assignment)
    return {"lightest_mode_weight": float(p_hat[lightest]), "lightest_mode_true_weight": float(pi[lightest])}


def modes_covered(x: Tensor, law, min_fraction: float = 0.1, assignment: Optional[Tensor] = None) -> int:
    """Number of components k with assigned fraction p_hat_k >= min_fraction * pi_k.

    ``assignment``: optional precomputed ``mode_assignment(x, law)`` (saves a law evaluation).
    """
    p_hat = _mode_fractions(x, law, assignment)
    pi = torch.as_tensor(law.weights, dtype=torch.float64).to(p_hat.device)
    return int((p_hat >= min_fraction * pi).sum())


def mode_weight_tv(x: Tensor, law, assignment: Optional[Tensor] = None) -> float:
    """Total variation 1/2 sum_k |p_hat_k - pi_k| between the MAP-assignment histogram and the weights.

    ``assignment``: optional precomputed ``mode_assignment(x, law)``.
    """
    p_hat = _mode_fractions(x, law, assignment)
    pi = torch.as_tensor(law.weights, dtype=torch.float64).to(p_hat.device)
    return float(0.5 * (p_hat - pi).abs().sum())


# --------------------------------------------------------------------------- #
# 4. per-mode moment KL
# --------------------------------------------------------------------------- #
def _chol_with_jitter(s: Tensor) -> Tensor:
    """Cholesky factor; adds growing diagonal jitter if ``s`` is numerically singular."""
    chol, info = torch.linalg.cholesky_ex(s)
    if int(info) == 0:
        return chol
    d = s.shape[0]
    scale = float(torch.diagonal(s).abs().mean()) or 1.0
    eye = torch.eye(d, dtype=s.dtype, device=s.device)
    jitter = 1e-12 * scale
    while True:
        chol, info = torch.linalg.cholesky_ex(s + jitter * eye)
        if int(info) == 0:
            return chol
        jitter *= 10.0


def gaussian_kl(m0: Tensor, s0: Tensor, m1: Tensor, s1: Tensor) -> float:
    """KL( N(m0, s0) || N(m1, s1) ) = 1/2 [tr(s1^-1 s0) + (m1-m0)' s1^-1 (m1-m0) - D + log|s1| - log|s0|]."""
    d = m0.numel()
    l0 = _chol_with_jitter(s0)
    l1 = _chol_with_jitter(s1)
    a = torch.linalg.solve_triangular(l1, l0, upper=False)
    diff = torch.linalg.solve_triangular(l1, (m1 - m0).reshape(d, 1), upper=False)
    logdet0 = 2.0 * torch.log(torch.diagonal(l0)).sum()
    logdet1 = 2.0 * torch.log(torch.diagonal(l1)).sum()
    kl = 0.5 * ((a * a).sum() + (diff * diff).sum() - d + logdet1 - logdet0)
    return max(float(kl), 0.0)


def _cov(x: Tensor, unbiased: bool) -> Tensor:
    xc = x - x.mean(0, keepdim=True)
    denom = x.shape[0] - 1 if unbiased else x.shape[0]
    return xc.T @ xc / max(denom, 1)


def per_mode_moment_kls(x: Tensor, law, assignment: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Per-component moment-fit KLs; see :func:`per_mode_moment_kl`.

    Returns ``{"kl": (K,) float64, "counts": (K,) long, "underpopulated": (K,) bool}``.
    """
    dev = _law_device(law)
    x = _f64(x).to(dev)
    means = torch.as_tensor(law.means, dtype=torch.float64).to(dev)
    covs = torch.as_tensor(law.covariances, dtype=torch.float64).to(dev)
    k, d = means.shape
    assign = mode_assignment(x, law) if assignment is None else assignment.to(dev)
    counts = torch.bincount(assign, minlength=k)
    if x.shape[0] > 0:
        global_mean, global_cov = x.mean(0), _cov(x, unbiased=False)
    else:
        global_mean = torch.zeros(d, dtype=torch.float64, device=dev)
        global_cov = torch.zeros(d, d, dtype=torch.float64, device=dev)
    kls = torch.empty(k, dtype=torch.float64)
    under = counts < d + 2
    for j in range(k):
        xj = x[assign == j]
        if not bool(under[j]):
            m_fit, s_fit = xj.mean(0), _cov(xj, unbiased=True)
        else:
            m_fit, s_fit = global_mean, global_cov + covs[j]
        kls[j] = gaussian_kl(m_fit, s_fit, means[j], covs[j])
    return {"kl": kls, "counts": counts.cpu(), "underpopulated": under.cpu()}


def per_mode_moment_kl(x: Tensor, law, assignment: Optional[Tensor] = None) -> float:
    """Weighted moment-fit KL:  sum_k pi_k KL( N(m_hat_k, S_hat_k) || N(mu_k, Sigma_k) ).

    Samples are split by MAP component (:func:`mode_assignment`); m_hat_k and
    S_hat_k are the sample mean and unbiased covariance of those assigned to k.

    Penalty for under-populated components (fewer than D + 2 assigned samples,
    too few for a usable covariance fit, including dropped modes): the
    component is scored as if the model had spread it like the whole sample
    set, i.e. m_hat_k = mean of all of x and S_hat_k = population covariance
    of all of x + Sigma_k (the + Sigma_k keeps it non-singular); its few
    assigned samples are ignored, so the penalty does not jump with stray
    samples.  It is >= 0.15 D whenever x is at least as spread as Sigma_k and
    grows with the distance between the modes, so dropping a well-separated
    mode costs much more than mis-shaping one.
    Note the MAP split truncates overlapping components, and the covariance
    fit is biased by about D (D + 1) / (4 n_k), so even exact samples give a
    positive value (see the floor in :func:`ground_truth_metrics`).
    ``assignment``: optional precomputed ``mode_assignment(x, law)``.
    """
    res = per_mode_moment_kls(x, law, assignment)
    pi = torch.as_tensor(law.weights, dtype=torch.float64).cpu()
    return float((pi * res["kl"]).sum())


# --------------------------------------------------------------------------- #
# 5. off-manifold mass
# --------------------------------------------------------------------------- #
def off_manifold_mass(x: Tensor, law, reference: Tensor, quantile: float = 0.005) -> float:
    """Fraction of x with law.log_prob(x) < the ``quantile`` of law.log_prob(reference).

    With ``reference`` exact samples, exact x gives ~``quantile``; blurred or
    hallucinated samples give more.
    """
    dev = _law_device(law)
    lp_ref = law.log_prob(_f64(reference).to(dev)).to(torch.float64)
    thr = torch.quantile(lp_ref, float(quantile))
    lp_x = law.log_prob(_f64(x).to(dev)).to(torch.float64)
    return float((lp_x < thr).to(torch.float64).mean())


# --------------------------------------------------------------------------- #
# 6. improved precision / recall
# --------------------------------------------------------------------------- #
def _knn_radii_sq(z: Tensor, k: int) -> Tensor:
    """Squared distance of each point of z to its k-th nearest other point."""
    z_sq = (z * z).sum(1)
    out = []
    kk = min(k + 1, z.shape[0])  # + 1 for the point itself
    for start in range(0, z.shape[0], _ROW_CHUNK):
        d2 = _sq_dists(z[start : start + _ROW_CHUNK], z, z_sq[start : start + _ROW_CHUNK], z_sq)
        r = torch.arange(d2.shape[0], device=z.device)
        d2[r, r + start] = 0.0
        out.append(torch.topk(d2, kk, dim=1, largest=False).values[:, -1])
    return torch.cat(out)


def _coverage(q: Tensor, support: Tensor, radii_sq: Tensor) -> float:
    """Fraction of q inside the union of balls B(support_j, radius_j)."""
    s_sq = (support * support).sum(1)
    q_sq = (q * q).sum(1)
    inside = []
    for start in range(0, q.shape[0], _ROW_CHUNK):
        d2 = _sq_dists(q[start : start + _ROW_CHUNK], support, q_sq[start : start + _ROW_CHUNK], s_sq)
        inside.append((d2 <= radii_sq[None, :]).any(dim=1))
    return float(torch.cat(inside).to(torch.float64).mean())


def knn_precision_recall(
    x: Tensor,
    y: Tensor,
    k: int = 5,
    max_points: int = DEFAULT_MAX_POINTS,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, float]:
    """Improved precision / recall (Kynkaanniemi et al., 2019), x = generated, y = real.

    Each set's manifold is the union of balls around its points with radius
    the distance to the k-th nearest neighbour within the set.  precision =
    fraction of x inside the real manifold; recall = fraction of y inside the
    generated manifold.  Both sets are subsampled to at most ``max_points``.
    """
    x = _subsample(_f64(x), max_points, generator)
    y = _subsample(_f64(y).to(x.device), max_points, generator)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("knn_precision_recall needs at least 2 samples in each set")
    ry = _knn_radii_sq(y, k)
    rx = _knn_radii_sq(x, k)
    return {"precision": _coverage(x, y, ry), "recall": _coverage(y, x, rx)}


# --------------------------------------------------------------------------- #
# 7. everything, with finite-sample floors
# --------------------------------------------------------------------------- #
def ground_truth_metrics(
    x: Tensor,
    law,
    num_reference: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    num_floor_sets: int = 3,
    num_projections: int = 512,
    max_points: int = DEFAULT_MAX_POINTS,
    knn_k: int = 5,
    off_manifold_quantile: float = 0.005,
    min_mode_fraction: float = 0.1,
    floors: Optional[Dict[str, float]] = None,
) -> Dict[str, float]:
    """All ground-truth metrics of samples x (N, D) against ``law``, plus floors.

    ``floors``: the ``*_floor`` values of an earlier call with the same law, sample count and generator seed (hence
    the same reference set); given, they are reused instead of recomputed (benchmarks scoring many NFEs).

    A fresh exact reference set R (``num_reference`` points, default N) is drawn
    from the law; x is compared with R for ``sliced_w2``, ``mmd``, ``precision``
    / ``recall`` and R gives the log-density threshold of ``off_manifold``.
    ``modes_covered``, ``mode_weight_tv`` and ``per_mode_kl`` need only x.

    Floors: ``num_floor_sets`` independent exact sets E_s of size N are drawn
    and the same metrics are computed on them (E_s against R where a second set
    is needed); ``*_floor`` is the mean over s, i.e. the value expected from a
    perfect sampler at this sample size.  The unbiased MMD^2 of exact sets has
    mean 0, so ``mmd_floor`` is its noise level, the mean |MMD^2| over the E_s.

    All SW2 calls share one set of projection directions and all MMD calls
    share bandwidths (from R) and the R subsample, so x and the floors see the
    same reference noise (common random numbers); this keeps
    ``sliced_w2_ratio`` = sliced_w2 / sliced_w2_floor close to 1 for exact
    samples.
    """
    if num_floor_sets < 1:
        raise ValueError("num_floor_sets must be >= 1")
    x = _f64(x)
    n, d = x.shape
    dev = x.device
    n_ref = int(num_reference) if num_reference else n
    k_modes = torch.as_tensor(law.weights).numel()

    reference = _sample_law(law, n_ref, generator, dev)
    # drawn even when floors are given, so the generator stream (and hence the reference subsample) is identical
    floor_sets = [_sample_law(law, n, generator, dev) for _ in range(num_floor_sets)]

    directions = random_directions(d, num_projections, generator, dev)
    ref_sub = _subsample(reference, max_points, generator)
    coefs = _rbf_coefs(default_bandwidths(ref_sub, generator=generator))
    k_ref = _mean_offdiag_kernel(ref_sub, coefs)  # shared by every MMD below

    def _mmd(a: Tensor) -> float:
        return _mmd_unbiased(_subsample(a, max_points, generator), ref_sub, coefs, kyy=k_ref)

    out: Dict[str, float] = {}
    out["sliced_w2"] = sliced_wasserstein2(x, reference, directions=directions)
    out["mmd"] = _mmd(x)
    assign = mode_assignment(x, law)
    out["modes_covered"] = float(modes_covered(x, law, min_fraction=min_mode_fraction, assignment=assign))
    out["num_modes"] = float(k_modes)
    out["mode_weight_tv"] = mode_weight_tv(x, law, assignment=assign)
    out["per_mode_kl"] = per_mode_moment_kl(x, law, assignment=assign)
    out["off_manifold"] = off_manifold_mass(x, law, reference, quantile=off_manifold_quantile)
    out.update(knn_precision_recall(x, reference, k=knn_k, max_points=max_points, generator=generator))

    if floors is not None:
        out.update(floors)
        floor = out["sliced_w2_floor"]
        out["sliced_w2_ratio"] = out["sliced_w2"] / floor if floor > 0 else float("inf")
        return out
    sw, mm, tv, kl = [], [], [], []
    for e in floor_sets:
        sw.append(sliced_wasserstein2(e, reference, directions=directions))
        mm.append(_mmd(e))
        assign = mode_assignment(e, law)
        tv.append(mode_weight_tv(e, law, assignment=assign))
        kl.append(per_mode_moment_kl(e, law, assignment=assign))
    out["sliced_w2_floor"] = sum(sw) / len(sw)
    # unbiased MMD^2 of exact sets is 0 in expectation; its floor is the noise
    # magnitude, the mean |MMD^2| over the exact sets
    out["mmd_floor"] = sum(abs(v) for v in mm) / len(mm)
    out["mode_weight_tv_floor"] = sum(tv) / len(tv)
    out["per_mode_kl_floor"] = sum(kl) / len(kl)
    floor = out["sliced_w2_floor"]
    out["sliced_w2_ratio"] = out["sliced_w2"] / floor if floor > 0 else float("inf")
    return out


__all__ = [
    "random_directions",
    "sliced_wasserstein2",
    "median_pairwise_distance",
    "default_bandwidths",
    "mmd_rbf",
    "mode_assignment",
    "modes_covered",
    "mode_weight_tv",
    "gaussian_kl",
    "per_mode_moment_kls",
    "per_mode_moment_kl",
    "off_manifold_mass",
    "knn_precision_recall",
    "ground_truth_metrics",
]
