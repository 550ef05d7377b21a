"""Metrics against independent computations: POT, numpy, scipy.linalg.sqrtm, naive loops."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import scipy.linalg
import torch

from workloads.metrics import (
    alignment_metrics,
    frechet_distance,
    gaussian_stats,
    rbf_mmd,
    sliced_wasserstein,
)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _directions(dim: int, num: int, seed: int) -> np.ndarray:
    # The documented direction law (normalized Gaussians from torch's generator with `seed`).
    theta = torch.randn(dim, num, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (theta / theta.norm(dim=0, keepdim=True)).numpy()


@pytest.mark.parametrize("sizes", [(300, 300), (300, 170)])
def test_sliced_wasserstein_matches_pot(sizes):
    rng = _rng(0)
    x = rng.normal(size=(sizes[0], 5))
    y = rng.normal(size=(sizes[1], 5)) * 1.3 + 0.4
    theta = _directions(5, 50, seed=4)
    expected = ot.sliced_wasserstein_distance(x, y, n_projections=50, p=2, projections=theta)
    got = sliced_wasserstein(torch.from_numpy(x), torch.from_numpy(y), num_projections=50, seed=4)
    assert got == pytest.approx(float(expected), rel=1e-10)


def test_sliced_wasserstein_one_projection_matches_pot_1d_and_basic_properties():
    rng = _rng(1)
    x = rng.normal(size=(120, 1))
    y = rng.exponential(size=(77, 1))
    # In 1-D every direction is +-1, so SWD = W2 exactly.
    expected = math.sqrt(ot.wasserstein_1d(x[:, 0], y[:, 0], p=2))
    got = sliced_wasserstein(torch.from_numpy(x), torch.from_numpy(y), 10)
    assert got == pytest.approx(expected, rel=1e-10)
    xt = torch.from_numpy(rng.normal(size=(200, 3)))
    assert sliced_wasserstein(xt, xt) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(xt, xt + torch.tensor([3.0, 0.0, 0.0])) > 1.0
    with pytest.raises(ValueError, match="num_projections=0"):
        sliced_wasserstein(xt, xt, num_projections=0)


def _numpy_mmd2_unbiased(x: np.ndarray, y: np.ndarray, hs: list[float]) -> float:
    def gram(a, b):
        sq = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-sq / (2 * h * h)) for h in hs)

    n, m = len(x), len(y)
    kxx, kyy, kxy = gram(x, x), gram(y, y), gram(x, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def test_rbf_mmd_matches_numpy_unbiased_estimate():
    rng = _rng(2)
    x = rng.normal(size=(60, 3))
    y = rng.normal(size=(45, 3)) + 0.5
    hs = [0.5, 1.0, 2.0]
    got = rbf_mmd(torch.from_numpy(x), torch.from_numpy(y), bandwidths=hs)
    assert got == pytest.approx(_numpy_mmd2_unbiased(x, y, hs), rel=1e-10)
    # Median heuristic: median of the pooled off-diagonal pairwise distances.
    pooled = np.concatenate([x, y])
    dists = np.sqrt(((pooled[:, None] - pooled[None]) ** 2).sum(-1))
    median = float(np.median(dists[~np.eye(len(pooled), dtype=bool)]))
    got_default = rbf_mmd(torch.from_numpy(x), torch.from_numpy(y))
    assert got_default == pytest.approx(_numpy_mmd2_unbiased(x, y, [median]), rel=1e-10)


def test_rbf_mmd_separates_and_rejects_bad_bandwidth():
    rng = _rng(3)
    x, x2 = (torch.from_numpy(rng.normal(size=(200, 2))) for _ in range(2))
    same, shifted = rbf_mmd(x, x2), rbf_mmd(x, x2 + 1.0)
    assert abs(same) < 0.01 < shifted
    with pytest.raises(ValueError, match="bandwidths="):
        rbf_mmd(x, x2, bandwidths=[1.0, 0.0])


def test_gaussian_stats_match_numpy():
    f = _rng(4).normal(size=(50, 4))
    mu, sigma = gaussian_stats(torch.from_numpy(f).float())
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), f.astype(np.float32).mean(0), rtol=1e-6)
    expected_cov = np.cov(f.astype(np.float32), rowvar=False)
    np.testing.assert_allclose(sigma.numpy(), expected_cov, rtol=1e-5, atol=1e-7)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = _rng(5)
    a = rng.normal(size=(400, 8))
    b = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 1.0
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    got = frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2)))
    assert got == pytest.approx(expected, rel=1e-6)
    same = frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu1, s1)))
    assert same == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="mu1/mu2"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))


def _naive_laplace_fields(x: np.ndarray, refs: np.ndarray, tau: float):
    """Paper §5.1 estimators with explicit loops: m, s = sum w (y-x)/(tau r), b = tau E_w[r]."""
    m, s, b = [], [], []
    for q in x:
        diff = refs - q
        r = np.sqrt((diff**2).sum(1))
        logits = -r / tau
        w = np.exp(logits - logits.max())
        w /= w.sum()
        m.append((w[:, None] * diff).sum(0))
        s.append((w[:, None] * diff / (tau * r[:, None])).sum(0))
        b.append(tau * (w * r).sum())
    return np.array(m), np.array(s), np.array(b)


def test_alignment_metrics_match_naive_definitions():
    rng = _rng(6)
    queries = rng.normal(size=(20, 4))
    ref_p = rng.normal(size=(80, 4)) + 0.7
    ref_q = rng.normal(size=(70, 4))
    tau = 1.3
    m_p, s_p, b_p = _naive_laplace_fields(queries, ref_p, tau)
    m_q, s_q, b_q = _naive_laplace_fields(queries, ref_q, tau)
    dm, ds = m_p - m_q, s_p - s_q
    cos = (dm * ds).sum(1) / (np.linalg.norm(dm, axis=1) * np.linalg.norm(ds, axis=1))
    lam_hat = 0.5 * (b_p + b_q).mean()
    lam_star = (dm * ds).sum() / (ds**2).sum()
    abs_err = ((dm - lam_hat * ds) ** 2).sum(1).mean()
    precond = np.concatenate([b_p, b_q])
    expected = {
        "cosine": cos.mean(),
        "cosine_global": (dm * ds).sum() / (np.linalg.norm(dm) * np.linalg.norm(ds)),
        "lambda_star": lam_star,
        "lambda_hat": lam_hat,
        "lambda_ratio": lam_star / lam_hat,
        "abs_error": abs_err,
        "rel_error": abs_err / (dm**2).sum(1).mean(),
        "precond_spread": precond.std() / precond.mean(),
        "precond_gap": np.abs(b_p - b_q).mean() / lam_hat,
    }
    got = alignment_metrics(*(torch.from_numpy(v) for v in (queries, ref_p, ref_q)), "laplace", tau)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_alignment_metrics_gaussian_is_exact_and_rejects_bad_input():
    rng = _rng(7)
    q, p, r = (torch.from_numpy(rng.normal(size=(30, 3)) + shift) for shift in (0.0, 1.0, -0.5))
    got = alignment_metrics(q, p, r, "gaussian", 0.9)
    # Theorem 1: Delta_ms = tau^2 Delta_s, so the fitted scale is tau^2 and the residual vanishes.
    assert got["lambda_hat"] == pytest.approx(0.81, rel=1e-14)
    assert got["lambda_star"] == pytest.approx(0.81, rel=1e-10)
    assert got["rel_error"] < 1e-20 and got["precond_spread"] < 1e-12
    assert got["cosine"] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="tau=0"):
        alignment_metrics(q, p, r, "laplace", 0.0)
    with pytest.raises(ValueError, match="kernel='rbf'"):
        alignment_metrics(q, p, r, "rbf", 1.0)
