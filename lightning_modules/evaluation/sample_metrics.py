"""Ground-truth sample metrics against an exactly known Gaussian-mixture law.

Every function takes torch tensors, computes in float64 and returns python
floats (or dicts of floats); nothing here has side effects.  The law is used
only through duck typing, i.e. through these attributes / methods:

* ``law.weights``            (K,)      mixture weights pi_k, summing to 1
* ``law.means``              (K, D)    component means mu_k
* ``law.covariances``        (K, D, D) component covariances Sigma_k
* ``law.sample(n, generator=None)`` -> (x (N, D), component index (N,))
* optional ``law.eigenvalues`` (K, D) / ``law.eigenvectors`` (K, D, D):
  Sigma_k = U_k diag(lam_k) U_k^T; used for the Mahalanobis distances when
  present, otherwise the covariances are Cholesky-factored
* ``law.log_prob(x)``        (N,)      only for :func:`low_density_mass`

Metrics
-------
sliced_wasserstein2   sliced 2-Wasserstein distance (random unit directions)
mmd_rbf               unbiased MMD^2 with a sum of RBF kernels
mode_assignment       most responsible component of each sample
modes_covered         number of components holding >= min_fraction of their mass
modes_dropped         number of components holding < min_fraction of their mass
mode_weight_tv        total variation between assignment histogram and weights
per_mode_moment_kl    weighted KL of per-component Gaussian moment fits
off_manifold_mass     fraction whose nearest component (Mahalanobis) is beyond
                      the chi-square(D) quantile
low_density_mass      fraction below a low log-density quantile of a reference
knn_precision_recall  improved precision / recall (Kynkaanniemi et al., 2019)
ground_truth_metrics  all of the above, against several exact reference sets,
                      with finite-sample floors and their spread

Definitions shared by every path
--------------------------------
* Mode assignment: argmax_k of log pi_k + log N(x; mu_k, Sigma_k) (the MAP
  component), computed from the Mahalanobis distances below.
* A component k is *dropped* when its assigned fraction p_hat_k is below
  ``min_fraction * pi_k`` (default 10% of its expected mass).  The same
  threshold drives ``modes_covered`` / ``modes_dropped`` and the per-mode KL
  penalty, so a mode counted as missing is always penalised, whether it
  received no sample or a few strays.
* Per-mode KL: sum_k pi_k KL( N(m_hat_k, S_hat_k) || N(mu_k, Sigma_k) ) over
  the MAP split.  A component that is dropped or has fewer than D + 2 assigned
  samples (too few for a covariance fit) is scored with one fixed penalty:
  m_hat_k = mean of all samples, S_hat_k = covariance of all samples + Sigma_k,
  its own assigned samples ignored (see :func:`per_mode_moment_kl`).  The
  floors use the very same function and threshold on exact sets.
* Off-manifold: d2_min(x) = min_k (x - mu_k)^T Sigma_k^-1 (x - mu_k); x is
  off-manifold when d2_min exceeds the chi-square(D) ``quantile`` (default
  0.995), which is the exact quantile of the squared Mahalanobis distance of a
  sample to its own component.  Exact samples therefore score at most
  1 - quantile (a little less: the min over components can only shrink d2);
  samples between or beyond the modes (blur, hallucination) score more.  This
  is the parametric analogue of the "outside the real manifold" test of
  Kynkaanniemi et al. (2019), with the exact law in place of k-NN balls.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
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


def _sort_rows(p: Tensor) -> Tensor:
    """Each row sorted ascending.  On CPU numpy's sort is used: it is 2x faster than torch.sort here (vectorised
    sort kernels), and the sorts are the bulk of the sliced-W2 cost."""
    if p.device.type == "cpu":
        return torch.from_numpy(np.sort(p.numpy(), axis=1))
    return torch.sort(p, dim=1).values


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
    return float(sliced_wasserstein2_matrix([x], [y], directions)[0, 0])


def sliced_wasserstein2_matrix(queries: Sequence[Tensor], references: Sequence[Tensor], directions: Tensor) -> Tensor:
    """(Q, R) float64 tensor of SW2(queries[i], references[j]) on shared ``directions`` (P, D).

    Same estimator as :func:`sliced_wasserstein2`, but every set is projected
    and sorted once per chunk of directions instead of once per pair, so the
    Q x R table costs Q + R sorts (the sorts dominate the cost).
    """
    queries = [_f64(q) for q in queries]
    dev = queries[0].device
    references = [_f64(r).to(dev) for r in references]
    directions = _f64(directions).to(dev)
    dims = {s.shape[1] for s in (*queries, *references)}
    if dims != {directions.shape[1]}:
        raise ValueError(f"sets and directions must share one dimension, got {sorted(dims)} / {directions.shape[1]}")
    grids: Dict[tuple, tuple] = {}
    for q in queries:
        for r in references:
            n, m = q.shape[0], r.shape[0]
            if n != m and (n, m) not in grids:
                grids[(n, m)] = _merged_quantile_grid(n, m, dev)
    total = torch.zeros(len(queries), len(references), dtype=torch.float64, device=dev)
    for chunk in directions.split(_PROJ_CHUNK):
        sorted_refs = [_sort_rows(chunk @ r.T) for r in references]  # (P_chunk, m), contiguous rows
        for i, q in enumerate(queries):
            pq = _sort_rows(chunk @ q.T)
            for j, pr in enumerate(sorted_refs):
                total[i, j] += _w2_squared_sorted(pq, pr, grids.get((pq.shape[1], pr.shape[1]))).sum()
    return (total / directions.shape[0]).clamp_min(0.0).sqrt()


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
# 3. component geometry: Mahalanobis distances and MAP assignment
# --------------------------------------------------------------------------- #
def _component_whitening(law, device) -> tuple:
    """(means (K, D), whitening (K, D, D), log|Sigma_k| (K,)) with |W_k (x - mu_k)|^2 the squared Mahalanobis distance.

    Uses the law's eigen-decomposition when it carries one (W_k = diag(lam_k^-1/2) U_k^T), otherwise the Cholesky
    factor (W_k = L_k^-1); both give the same distances, the eigen route just skips a factorisation.
    """
    means = torch.as_tensor(law.means, dtype=torch.float64).to(device)
    lam = getattr(law, "eigenvalues", None)
    vecs = getattr(law, "eigenvectors", None)
    if lam is not None and vecs is not None:
        lam = torch.as_tensor(lam, dtype=torch.float64).to(device)
        vecs = torch.as_tensor(vecs, dtype=torch.float64).to(device)
        whitening = vecs.transpose(1, 2) / lam.sqrt()[:, :, None]
        return means, whitening, torch.log(lam).sum(1)
    covs = torch.as_tensor(law.covariances, dtype=torch.float64).to(device)
    chol = torch.stack([_chol_with_jitter(c) for c in covs])
    eye = torch.eye(means.shape[1], dtype=torch.float64, device=device).expand_as(chol)
    whitening = torch.linalg.solve_triangular(chol, eye, upper=False)
    return means, whitening, 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def component_mahalanobis_sq(x: Tensor, law) -> Tensor:
    """(N, K) float64: (x - mu_k)^T Sigma_k^-1 (x - mu_k) for every sample and component."""
    dev = _law_device(law)
    x = _f64(x).to(dev)
    means, whitening, _ = _component_whitening(law, dev)
    out = torch.empty(x.shape[0], means.shape[0], dtype=torch.float64, device=dev)
    for k in range(means.shape[0]):  # one component at a time keeps memory at N x D
        z = (x - means[k]) @ whitening[k].T
        out[:, k] = (z * z).sum(1)
    return out


def _assignment_from_mahalanobis(d2: Tensor, law) -> Tensor:
    """argmax_k log pi_k - 1/2 log|Sigma_k| - 1/2 d2_k, i.e. the argmax of log pi_k N(x; mu_k, Sigma_k)."""
    dev = d2.device
    _, _, logdet = _component_whitening(law, dev)
    log_pi = torch.log(torch.as_tensor(law.weights, dtype=torch.float64).to(dev))  # -inf for weightless components
    return (log_pi[None] - 0.5 * logdet[None] - 0.5 * d2).argmax(dim=1)


def mode_assignment(x: Tensor, law) -> Tensor:
    """(N,) long: argmax_k of the responsibility pi_k N(x; mu_k, Sigma_k) (MAP component)."""
    return _assignment_from_mahalanobis(component_mahalanobis_sq(x, law), law)


# --------------------------------------------------------------------------- #
# 4. mode statistics
# --------------------------------------------------------------------------- #
def _mode_fractions(x: Tensor, law, assignment: Optional[Tensor] = None) -> Tensor:
    k = torch.as_tensor(law.weights).numel()
    a = mode_assignment(x, law) if assignment is None else assignment
    counts = torch.bincount(a.cpu(), minlength=k).to(torch.float64)
    return counts / max(a.numel(), 1)


def _dropped_components(p_hat: Tensor, law, min_fraction: float) -> Tensor:
    """(K,) bool: p_hat_k < min_fraction * pi_k -- the one definition of a dropped mode (weightless ones never are)."""
    pi = torch.as_tensor(law.weights, dtype=torch.float64).to(p_hat.device)
    return p_hat < float(min_fraction) * pi


def lightest_mode_weight(x: Tensor, law, assignment: Optional[Tensor] = None) -> Dict[str, float]:
    """The sample fraction MAP-assigned to the law's lightest component, next to its true weight: the number a
    mode-seeking (reverse-KL) student drops first on an unequal-weight mixture."""
    pi = torch.as_tensor(law.weights, dtype=torch.float64)
    lightest = int(pi.argmin())
    p_hat = _mode_fractions(x, law, assignment)
    return {"lightest_mode_weight": float(p_hat[lightest]), "lightest_mode_true_weight": float(pi[lightest])}


def modes_covered(x: Tensor, law, min_fraction: float = 0.1, assignment: Optional[Tensor] = None) -> int:
    """Number of components k with assigned fraction p_hat_k >= min_fraction * pi_k (K minus :func:`modes_dropped`).

    ``assignment``: optional precomputed ``mode_assignment(x, law)`` (saves a law evaluation).
    """
    k = torch.as_tensor(law.weights).numel()
    return k - modes_dropped(x, law, min_fraction=min_fraction, assignment=assignment)


def modes_dropped(x: Tensor, law, min_fraction: float = 0.1, assignment: Optional[Tensor] = None) -> int:
    """Number of components k with assigned fraction p_hat_k < min_fraction * pi_k (the per-mode KL penalises each)."""
    return int(_dropped_components(_mode_fractions(x, law, assignment), law, min_fraction).sum())


def mode_weight_tv(x: Tensor, law, assignment: Optional[Tensor] = None) -> float:
    """Total variation 1/2 sum_k |p_hat_k - pi_k| between the MAP-assignment histogram and the weights.

    ``assignment``: optional precomputed ``mode_assignment(x, law)``.
    """
    p_hat = _mode_fractions(x, law, assignment)
    pi = torch.as_tensor(law.weights, dtype=torch.float64).to(p_hat.device)
    return float(0.5 * (p_hat - pi).abs().sum())


# --------------------------------------------------------------------------- #
# 5. per-mode moment KL
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


def per_mode_moment_kls(
    x: Tensor, law, assignment: Optional[Tensor] = None, min_fraction: float = 0.1
) -> Dict[str, Tensor]:
    """Per-component moment-fit KLs; see :func:`per_mode_moment_kl` for the definition and the penalty.

    Returns ``{"kl": (K,) float64, "counts": (K,) long, "dropped": (K,) bool (p_hat_k < min_fraction pi_k),
    "underpopulated": (K,) bool (fewer than D + 2 samples), "penalised": (K,) bool (dropped or underpopulated)}``.
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
    dropped = _dropped_components(counts.to(torch.float64) / max(x.shape[0], 1), law, min_fraction)
    under = counts < d + 2
    penalised = dropped | under
    kls = torch.empty(k, dtype=torch.float64)
    for j in range(k):
        if bool(penalised[j]):
            m_fit, s_fit = global_mean, global_cov + covs[j]
        else:
            xj = x[assign == j]
            m_fit, s_fit = xj.mean(0), _cov(xj, unbiased=True)
        kls[j] = gaussian_kl(m_fit, s_fit, means[j], covs[j])
    return {"kl": kls, "counts": counts.cpu(), "dropped": dropped.cpu(), "underpopulated": under.cpu(),
            "penalised": penalised.cpu()}


def per_mode_moment_kl(x: Tensor, law, assignment: Optional[Tensor] = None, min_fraction: float = 0.1) -> float:
    """Weighted moment-fit KL:  sum_k pi_k KL( N(m_hat_k, S_hat_k) || N(mu_k, Sigma_k) ).

    Samples are split by MAP component (:func:`mode_assignment`); m_hat_k and
    S_hat_k are the sample mean and unbiased covariance of those assigned to k.

    Penalty, the one rule every caller (floors included) goes through: a
    component is *penalised* when it is dropped -- assigned fraction below
    ``min_fraction * pi_k``, the threshold of :func:`modes_covered` -- or has
    fewer than D + 2 assigned samples (too few for a usable covariance fit).
    A penalised component is scored as if the model had spread it like the
    whole sample set: m_hat_k = mean of all of x and S_hat_k = population
    covariance of all of x + Sigma_k (the + Sigma_k keeps it non-singular);
    its own assigned samples are ignored, so a mode that received no sample
    and one that received a few strays cost the same, and the penalty does not
    jump with stray samples.  It is >= 0.15 D whenever x is at least as spread
    as Sigma_k and grows with the distance between the modes, so dropping a
    well-separated mode costs much more than mis-shaping one.  The weight in
    the sum is the true pi_k, never p_hat_k, so a dropped mode counts in full.
    Note the MAP split truncates overlapping components, and the covariance
    fit is biased by about D (D + 1) / (4 n_k), so even exact samples give a
    positive value (see the floor in :func:`ground_truth_metrics`).
    ``assignment``: optional precomputed ``mode_assignment(x, law)``.
    """
    res = per_mode_moment_kls(x, law, assignment, min_fraction=min_fraction)
    pi = torch.as_tensor(law.weights, dtype=torch.float64).cpu()
    return float((pi * res["kl"]).sum())


# --------------------------------------------------------------------------- #
# 6. off-manifold mass
# --------------------------------------------------------------------------- #
def chi2_quantile(q: float, dof: int) -> float:
    """The ``q`` quantile of the chi-square law with ``dof`` degrees of freedom.

    Bisection on the CDF P(dof/2, t/2) (regularised lower incomplete gamma, torch.special.gammainc) in float64;
    agrees with scipy.stats.chi2.ppf to ~1e-10 relative without depending on scipy.
    """
    if not 0.0 < q < 1.0 or dof < 1:
        raise ValueError(f"need 0 < q < 1 and dof >= 1, got {q}, {dof}")
    a = torch.tensor(0.5 * dof, dtype=torch.float64)

    def cdf(t: float) -> float:
        return float(torch.special.gammainc(a, torch.tensor(0.5 * t, dtype=torch.float64)))

    lo, hi = 0.0, 2.0 * dof + 10.0
    while cdf(hi) < q:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return 0.5 * (lo + hi)


def off_manifold_mass(x: Tensor, law, quantile: float = 0.995) -> float:
    """Fraction of x whose best component is further than the exact ``quantile`` of Mahalanobis distances.

    d2_min(x) = min_k (x - mu_k)^T Sigma_k^-1 (x - mu_k); for a sample of component k, (x - mu_k)^T Sigma_k^-1
    (x - mu_k) is chi-square(D), so the threshold chi2_quantile(quantile, D) leaves 1 - quantile of each component's
    mass outside.  Exact samples give <= 1 - quantile (the min over components can only shrink d2); blurred samples
    and samples between modes give more, shrunk (over-sharp) samples less -- read it next to the per-mode KL.
    """
    d = torch.as_tensor(law.means).shape[1]
    return _fraction_beyond(component_mahalanobis_sq(x, law), chi2_quantile(quantile, d))


def low_density_mass(x: Tensor, law, reference: Tensor, quantile: float = 0.005) -> float:
    """Fraction of x with law.log_prob(x) < the ``quantile`` of law.log_prob(reference) (the former off-manifold
    definition; needs an exact ``reference`` set, so its threshold carries that set's sampling noise).

    With ``reference`` exact samples, exact x gives ~``quantile``; blurred or
    hallucinated samples give more.
    """
    dev = _law_device(law)
    lp_ref = law.log_prob(_f64(reference).to(dev)).to(torch.float64)
    thr = torch.quantile(lp_ref, float(quantile))
    lp_x = law.log_prob(_f64(x).to(dev)).to(torch.float64)
    return float((lp_x < thr).to(torch.float64).mean())


# --------------------------------------------------------------------------- #
# 7. improved precision / recall
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
# 8. everything, against several reference sets, with finite-sample floors
# --------------------------------------------------------------------------- #
PER_REFERENCE_FLOOR_PREFIX = "sliced_w2_floor_ref"


def _mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (ddof = 1; 0.0 for a single value) in float64."""
    v = torch.as_tensor([float(a) for a in values], dtype=torch.float64)
    return float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0


def _independent_generators(generator: Optional[torch.Generator], count: int) -> List[torch.Generator]:
    """``count`` CPU generators seeded from ``generator`` (the global RNG when None), one draw each."""
    seeds = torch.randint(0, 2**62, (count,), generator=generator).tolist()
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _assignment_and_off_manifold(x: Tensor, law, threshold: float) -> tuple:
    """MAP assignment and off-manifold fraction from one Mahalanobis pass (the costly part in high D)."""
    d2 = component_mahalanobis_sq(x, law)
    return _assignment_from_mahalanobis(d2, law), _fraction_beyond(d2, threshold)


def _fraction_beyond(d2: Tensor, threshold: float) -> float:
    """Fraction of rows whose smallest squared distance is not within ``threshold`` (NaN / inf samples count as
    off-manifold, which a plain ``>`` would miss)."""
    within = d2.min(dim=1).values <= threshold
    return float((~within).to(torch.float64).mean())


def reusable_floors(metrics: Dict[str, float]) -> Dict[str, float]:
    """The entries of a :func:`ground_truth_metrics` result that its ``floors=`` argument takes back: every floor,
    its spread, the per-reference SW2 floors and the exact off-manifold mass."""
    return {k: v for k, v in metrics.items() if "_floor" in k or k == "off_manifold_exact"}


def ground_truth_metrics(
    x: Tensor,
    law,
    num_reference: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    num_floor_sets: int = 3,
    num_projections: int = 512,
    max_points: int = DEFAULT_MAX_POINTS,
    knn_k: int = 5,
    off_manifold_quantile: float = 0.995,
    min_mode_fraction: float = 0.1,
    floors: Optional[Dict[str, float]] = None,
    num_reference_sets: int = 4,
) -> Dict[str, float]:
    """All ground-truth metrics of samples x (N, D) against ``law``, with floors and their spread.

    Reference sets: ``num_reference_sets`` (m) independent exact sets R_1..R_m
    of ``num_reference`` points (default N).  A single reference set makes SW2
    noisy -- it is dominated by that set's mode-weight sampling noise, so one
    student sample could score ratios 2.8-7.3 depending on the reference seed
    -- hence every reference-based number is averaged over the R_j and its
    spread reported (sample standard deviation over j, ddof = 1, 0.0 when
    m = 1; divide by sqrt(m) for the standard error of the mean).

    Floors: ``num_floor_sets`` (S) independent exact sets E_s of size N, i.e.
    what a perfect sampler would score at this sample size.

    * ``sliced_w2`` / ``sliced_w2_std``: mean / spread over j of SW2(x, R_j).
    * ``sliced_w2_floor`` / ``sliced_w2_floor_std``: mean / spread over all
      (s, j) pairs of SW2(E_s, R_j); ``sliced_w2_floor_ref{j}`` is floor_j,
      the mean over s for reference j.
    * ``sliced_w2_ratio`` / ``sliced_w2_ratio_std``: mean / spread over j of
      SW2(x, R_j) / floor_j.  The per-reference ratio is taken before
      averaging because numerator and denominator then share R_j's noise
      (common random numbers): measured on ring8 at n = 5000, the spread over
      j of SW2(x, R_j) / floor_j is 2-4x smaller than that of
      SW2(x, R_j) / mean floor.  Exact x scores about 1.
      This spread is the reference sets' part of the noise only: x's own
      mode-weight sampling noise stays in every SW2(x, R_j), so an exact x
      still scatters by about ``sliced_w2_floor_std / sliced_w2_floor``
      around 1 (measured at n = 20,000 in 2-D: 0.95-1.56 over laws and seeds;
      64-D digits: 0.95-1.0).  Read a ratio against that band.
    * ``mmd``: unbiased multi-bandwidth MMD^2 of (subsampled) x against R_1
      only -- the kernel blocks are the costliest part here, and MMD is the
      least sensitive metric (see the metrics notes); ``mmd_floor``: mean
      |MMD^2(E_s, R_1)| (unbiased MMD^2 of exact sets has mean 0, so the floor
      is its noise magnitude); ``mmd_floor_std``: spread of MMD^2(E_s, R_1).
    * ``modes_covered`` / ``modes_dropped`` / ``num_modes``, ``mode_weight_tv``
      and ``per_mode_kl`` need only x; a dropped mode is p_hat_k <
      ``min_mode_fraction`` pi_k everywhere, and the per-mode KL penalises it
      (see :func:`per_mode_moment_kl`); ``mode_weight_tv_floor`` /
      ``per_mode_kl_floor`` are the same functions averaged over the E_s.
    * ``off_manifold``: :func:`off_manifold_mass` at ``off_manifold_quantile``
      (no reference needed: the chi-square threshold is exact);
      ``off_manifold_exact``: the same fraction averaged over the E_s (about,
      and at most, 1 - quantile), so reports can say "<= 2x exact".
    * ``precision`` / ``recall``: improved precision / recall (Kynkaanniemi
      et al., 2019) against R_1 only (k-NN is the costliest metric here).

    All SW2 calls share one set of projection directions and all MMD calls
    share bandwidths and the subsample of R_1 (common random numbers).

    ``floors``: :func:`reusable_floors` of an earlier call with the same law, sample count, reference and floor set
    counts and generator seed (hence the same reference sets); given, the floors are reused instead of recomputed
    (benchmarks scoring many NFEs) and the exact sets E_s are not drawn.  Each exact set has its own generator seeded
    from ``generator`` up front, so the stream -- the reference sets, directions and subsamples that x meets -- is
    identical with and without ``floors``: a reused floor gives exactly the numbers of a full call.
    """
    if num_floor_sets < 1 or num_reference_sets < 1:
        raise ValueError("num_floor_sets and num_reference_sets must be >= 1")
    x = _f64(x)
    n, d = x.shape
    dev = x.device
    n_ref = int(num_reference) if num_reference else n
    k_modes = torch.as_tensor(law.weights).numel()
    threshold = chi2_quantile(off_manifold_quantile, d)

    # each exact set gets its own generator, seeded from ``generator`` up front: the reference sets and everything
    # x meets are then the same whether or not the floor sets are drawn, so the floors= path can skip them
    reference_gens = _independent_generators(generator, num_reference_sets)
    floor_gens = _independent_generators(generator, num_floor_sets)
    references = [_sample_law(law, n_ref, g, dev) for g in reference_gens]
    directions = random_directions(d, num_projections, generator, dev)
    ref_sub = _subsample(references[0], max_points, generator)
    coefs = _rbf_coefs(default_bandwidths(ref_sub, generator=generator))
    k_ref = _mean_offdiag_kernel(ref_sub, coefs)  # shared by every MMD below

    def _mmd(a: Tensor) -> float:
        return _mmd_unbiased(_subsample(a, max_points, generator), ref_sub, coefs, kyy=k_ref)

    out: Dict[str, float] = {}
    floor_sets = [] if floors is not None else [_sample_law(law, n, g, dev) for g in floor_gens]
    sw = sliced_wasserstein2_matrix([x, *floor_sets], references, directions)  # (1 + S, m), S = 0 with floors
    out["sliced_w2"], out["sliced_w2_std"] = _mean_std(sw[0].tolist())
    out["mmd"] = _mmd(x)
    assign, out["off_manifold"] = _assignment_and_off_manifold(x, law, threshold)
    out["modes_covered"] = float(modes_covered(x, law, min_fraction=min_mode_fraction, assignment=assign))
    out["modes_dropped"] = float(k_modes) - out["modes_covered"]
    out["num_modes"] = float(k_modes)
    out["mode_weight_tv"] = mode_weight_tv(x, law, assignment=assign)
    out["per_mode_kl"] = per_mode_moment_kl(x, law, assignment=assign, min_fraction=min_mode_fraction)
    out.update(knn_precision_recall(x, references[0], k=knn_k, max_points=max_points, generator=generator))

    if floors is None:
        floors = _exact_floors(sw[1:], floor_sets, law, threshold, min_mode_fraction, _mmd)
    missing = [f"{PER_REFERENCE_FLOOR_PREFIX}{j}" for j in range(num_reference_sets)] + [
        "sliced_w2_floor", "off_manifold_exact"]
    missing = [k for k in missing if k not in floors]
    if missing or f"{PER_REFERENCE_FLOOR_PREFIX}{num_reference_sets}" in floors:
        raise ValueError(f"floors do not fit (missing {missing}): pass reusable_floors() of a call with the same "
                         f"num_reference_sets ({num_reference_sets})")
    out.update(floors)
    per_ref_floor = [floors[f"{PER_REFERENCE_FLOOR_PREFIX}{j}"] for j in range(num_reference_sets)]
    ratios = [v / f if f > 0 else float("inf") for v, f in zip(sw[0].tolist(), per_ref_floor)]
    out["sliced_w2_ratio"], out["sliced_w2_ratio_std"] = _mean_std(ratios)
    return out


def _exact_floors(sw_exact: Tensor, floor_sets, law, threshold, min_mode_fraction, mmd_fn) -> Dict[str, float]:
    """Floor entries of :func:`ground_truth_metrics` from the exact sets E_s; ``sw_exact`` (S, m) is SW2(E_s, R_j)."""
    out: Dict[str, float] = {}
    out["sliced_w2_floor"], out["sliced_w2_floor_std"] = _mean_std(sw_exact.flatten().tolist())
    for j, floor_j in enumerate(sw_exact.mean(0).tolist()):
        out[f"{PER_REFERENCE_FLOOR_PREFIX}{j}"] = floor_j
    mm, tv, kl, off = [], [], [], []
    for e in floor_sets:
        mm.append(mmd_fn(e))
        assign, off_e = _assignment_and_off_manifold(e, law, threshold)
        off.append(off_e)
        tv.append(mode_weight_tv(e, law, assignment=assign))
        kl.append(per_mode_moment_kl(e, law, assignment=assign, min_fraction=min_mode_fraction))
    # unbiased MMD^2 of exact sets is 0 in expectation: the floor is its noise magnitude (mean |MMD^2|), and the
    # spread of the exact values says how far from 0 a perfect sampler's MMD^2 typically lands
    out["mmd_floor"] = _mean_std([abs(v) for v in mm])[0]
    out["mmd_floor_std"] = _mean_std(mm)[1]
    out["mode_weight_tv_floor"] = _mean_std(tv)[0]
    out["per_mode_kl_floor"] = _mean_std(kl)[0]
    out["off_manifold_exact"] = _mean_std(off)[0]
    return out


__all__ = [
    "random_directions",
    "sliced_wasserstein2",
    "sliced_wasserstein2_matrix",
    "median_pairwise_distance",
    "default_bandwidths",
    "mmd_rbf",
    "component_mahalanobis_sq",
    "mode_assignment",
    "modes_covered",
    "modes_dropped",
    "mode_weight_tv",
    "lightest_mode_weight",
    "gaussian_kl",
    "per_mode_moment_kls",
    "per_mode_moment_kl",
    "chi2_quantile",
    "off_manifold_mass",
    "low_density_mass",
    "knn_precision_recall",
    "reusable_floors",
    "ground_truth_metrics",
]
