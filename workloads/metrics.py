"""Evaluation and alignment metrics: pure functions of samples, no training loop.

Sources: DESIGN.md "Metrics the users read"; paper §5.1 (alignment metrics, Eq. 12); FID as the
Frechet distance between Gaussian fits (torchmetrics' implementation).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics.image.fid import _compute_fid

from workloads.drift import kernel_fields
from workloads.kernels import Kernel, check_tau, get_kernel

# Queries per chunk in alignment_metrics: a Q x R weight matrix in float64 stays <= 64 MiB at
# R = 16384 references.
_QUERY_CHUNK = 512


def _as_float64_2d(name: str, value: Tensor, device: torch.device | str = "cpu") -> Tensor:
    value = torch.as_tensor(value)
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D (samples x features), got shape {tuple(value.shape)}")
    return value.detach().to(device=device, dtype=torch.float64)


def sliced_wasserstein(x: Tensor, y: Tensor, num_projections: int = 200, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance: sqrt(mean over directions theta of W2^2(theta.x, theta.y)).

    Same definition as POT's `ot.sliced_wasserstein_distance(p=2)`. Directions are uniform on the
    sphere (normalized Gaussians from `seed`). Each 1-D W2 is exact for the empirical measures:
    both quantile functions are evaluated on the merged grid of cumulative probabilities, so x and
    y may have different sizes (for equal sizes this is the sorted-pairs formula).

    Args:
        x: samples (n x D).
        y: samples (m x D).
        num_projections: number of random directions.
        seed: seed of the directions.

    Returns:
        The sliced W2 distance (data units).

    Raises:
        ValueError: inputs not 2-D, different D, empty, or num_projections < 1.
    """
    x, y = _as_float64_2d("x", x), _as_float64_2d("y", y)
    if x.shape[1] != y.shape[1] or x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"x and y must be non-empty with the same D, got {tuple(x.shape)}, {tuple(y.shape)}")
    if num_projections < 1:
        raise ValueError(f"num_projections={num_projections} must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], num_projections, generator=gen, dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    xs, _ = torch.sort(x @ theta, dim=0)
    ys, _ = torch.sort(y @ theta, dim=0)
    n, m = xs.shape[0], ys.shape[0]
    cdf_x = torch.arange(1, n + 1, dtype=torch.float64) / n
    cdf_y = torch.arange(1, m + 1, dtype=torch.float64) / m
    grid, _ = torch.sort(torch.cat([cdf_x, cdf_y]))
    mass = torch.diff(grid, prepend=grid.new_zeros(1))
    # Quantile index at each interval's midpoint: robust to equal cumulative probabilities.
    mid = grid - 0.5 * mass
    ix = torch.searchsorted(cdf_x, mid).clamp_max(n - 1)
    iy = torch.searchsorted(cdf_y, mid).clamp_max(m - 1)
    w2_squared = (mass[:, None] * (xs[ix] - ys[iy]).square()).sum(dim=0)
    return float(w2_squared.mean().sqrt())


def rbf_mmd(x: Tensor, y: Tensor, bandwidths: list[float] | None = None) -> float:
    """Unbiased squared MMD with a sum of RBF kernels exp(-||a-b||^2 / (2 h^2)).

    MMD^2_u = mean_{i!=j} k(x_i,x_j) + mean_{i!=j} k(y_i,y_j) - 2 mean_{i,j} k(x_i,y_j) (Gretton et
    al. 2012, Eq. 3); it can be slightly negative when the distributions match. Default bandwidth:
    the median heuristic, h = median distance over distinct pairs of the pooled sample.

    Args:
        x: samples (n x D), n >= 2.
        y: samples (m x D), m >= 2.
        bandwidths: RBF bandwidths h (data units); None = [median heuristic].

    Returns:
        The unbiased MMD^2 estimate.

    Raises:
        ValueError: fewer than 2 samples, different D, or a bandwidth <= 0.
    """
    x, y = _as_float64_2d("x", x), _as_float64_2d("y", y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y need >= 2 samples and the same D, got {tuple(x.shape)}, {tuple(y.shape)}")
    pooled = torch.cat([x, y])
    sq = torch.cdist(pooled, pooled).square()
    if bandwidths is None:
        # numpy's median (mean of the two middle values), over the distinct pairs i < j.
        rows, cols = torch.triu_indices(n + m, n + m, offset=1)
        bandwidths = [float(np.median(sq[rows, cols].sqrt().numpy()))]
    hs = [check_tau(h, "bandwidths") for h in bandwidths]
    k = sum(torch.exp(-sq / (2.0 * h * h)) for h in hs)
    k_xx, k_yy, k_xy = k[:n, :n], k[n:, n:], k[:n, n:]
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (float64) of a feature set, the Gaussian fit of FID.

    Args:
        features: (n x D), n >= 2.

    Returns:
        (mu of shape D, sigma of shape D x D), float64 on CPU.

    Raises:
        ValueError: not 2-D or fewer than 2 samples.
    """
    f = _as_float64_2d("features", features)
    if f.shape[0] < 2:
        raise ValueError(f"features needs >= 2 samples for a covariance, got {f.shape[0]}")
    return f.mean(dim=0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet distance ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    Uses torchmetrics' FID formula (trace of the square root via the eigenvalues of
    sigma1 sigma2), evaluated in float64.

    Args:
        mu1, sigma1: mean (D) and covariance (D x D) of the first set.
        mu2, sigma2: the same for the second set.

    Returns:
        The squared Frechet distance (the number reported as FID).

    Raises:
        ValueError: shapes do not match.
    """
    mu1, mu2 = (torch.as_tensor(v, dtype=torch.float64).cpu() for v in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(v, dtype=torch.float64).cpu() for v in (sigma1, sigma2))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"mu1/mu2 must be (D,) and sigma1/sigma2 (D, D): got {tuple(mu1.shape)}, "
            f"{tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}"
        )
    return float(_compute_fid(mu1, sigma1, mu2, sigma2))


def alignment_metrics(
    queries: Tensor, ref_p: Tensor, ref_q: Tensor, kernel: str | Kernel, tau: float
) -> dict[str, float]:
    """Alignment of the drift discrepancy with the score discrepancy (paper §5.1).

    Delta_ms = m_p - m_q and Delta_s = s_p - s_q at each query (Monte Carlo fields from the
    reference sets, `workloads.drift.kernel_fields`). b_p(x), b_q(x) are the Theorem-2
    preconditioners E_w[1 / g(r)] (Laplace: tau E_w[r], Gaussian: tau^2, Cauchy: E_w[(tau^2 +
    r^2) / 2], IMQ: E_w[tau^2 + r^2]).

    Keys: "cosine" (mean over queries of cos(Delta_ms, Delta_s)), "cosine_global" (cosine of the
    flattened fields), "lambda_star" (least squares sum <Delta_ms, Delta_s> / sum ||Delta_s||^2),
    "lambda_hat" (mean of (b_p + b_q) / 2 over queries, paper Eq. 12), "lambda_ratio"
    (lambda_star / lambda_hat), "abs_error" (mean ||Delta_ms - lambda_hat Delta_s||^2),
    "rel_error" (abs_error / mean ||Delta_ms||^2), "precond_spread" (std / mean of the 2Q values
    {b_p(x_k), b_q(x_k)}, population std), "precond_gap" (mean |b_p - b_q| / lambda_hat, the
    paper's Figure 6a check that the two preconditioners coincide).

    Args:
        queries: evaluation points (Q x D).
        ref_p: reference samples of p (R x D).
        ref_q: reference samples of q (R' x D).
        kernel: registry name.
        tau: kernel temperature in data units (> 0).

    Returns:
        The metrics above as floats (float64 on the queries' device, queries in chunks).

    Raises:
        ValueError: unknown kernel, tau <= 0, or bad shapes.
    """
    kern, tau = get_kernel(kernel), check_tau(tau)
    queries = _as_float64_2d("queries", queries, queries.device)
    ref_p = _as_float64_2d("ref_p", ref_p, queries.device)
    ref_q = _as_float64_2d("ref_q", ref_q, queries.device)
    parts = []
    for start in range(0, queries.shape[0], _QUERY_CHUNK):
        x = queries[start : start + _QUERY_CHUNK]
        m_p, s_p, b_p = kernel_fields(x, ref_p, kern, tau)
        m_q, s_q, b_q = kernel_fields(x, ref_q, kern, tau)
        parts.append((m_p - m_q, s_p - s_q, b_p, b_q))
    d_ms, d_s, b_p, b_q = (torch.cat(column) for column in zip(*parts))
    per_query_cos = torch.nn.functional.cosine_similarity(d_ms, d_s, dim=1, eps=1e-300)
    global_cos = (d_ms * d_s).sum() / (d_ms.norm() * d_s.norm())
    lambda_star = (d_ms * d_s).sum() / d_s.square().sum()
    lambda_hat = 0.5 * (b_p + b_q).mean()
    abs_error = (d_ms - lambda_hat * d_s).square().sum(dim=1).mean()
    precond = torch.cat([b_p, b_q])
    return {
        "cosine": float(per_query_cos.mean()),
        "cosine_global": float(global_cos),
        "lambda_star": float(lambda_star),
        "lambda_hat": float(lambda_hat),
        "lambda_ratio": float(lambda_star / lambda_hat),
        "abs_error": float(abs_error),
        "rel_error": float(abs_error / d_ms.square().sum(dim=1).mean()),
        "precond_spread": float(precond.std(correction=0) / precond.mean()),
        "precond_gap": float((b_p - b_q).abs().mean() / lambda_hat),
    }
