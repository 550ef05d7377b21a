"""Paper §5.1 alignment: Theorem 1 (Gaussian, exact), Laplace error falling with d, oracle pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workloads.alignment import (
    RAW_P_RADIUS_RANGE,
    RAW_Q_RADIUS_RANGE,
    RING_RADIUS,
    RING_ROTATION_RAD,
    make_alignment_pair,
    run_alignment,
)
from workloads.config import WorkloadConfig
from workloads.drift import mean_shift
from workloads.metrics import alignment_metrics


def _autograd_score(x: torch.Tensor, refs: torch.Tensor, tau: float) -> torch.Tensor:
    """grad_x log sum_i exp(-||x - y_i||^2 / (2 tau^2)) by autograd (independent of kernel_score)."""
    xr = x.clone().requires_grad_(True)
    sq = (xr[:, None, :] - refs[None, :, :]).square().sum(-1)
    (grad,) = torch.autograd.grad(torch.logsumexp(-sq / (2 * tau**2), dim=1).sum(), xr)
    return grad


@pytest.mark.parametrize("dataset", ["ring_mog_hd", "raw_mog_hd"])
def test_theorem1_gaussian_mean_shift_equals_tau2_score_difference(dataset):
    pair = make_alignment_pair(dataset, dim=16, seed=0)
    gen = torch.Generator().manual_seed(1)
    ref_p, ref_q, queries = pair.sample_p(300, gen), pair.sample_q(300, gen), pair.sample_q(40, gen)
    tau = 3.0
    delta_ms = mean_shift(queries, ref_p, "gaussian", tau) - mean_shift(queries, ref_q, "gaussian", tau)
    delta_s = _autograd_score(queries, ref_p, tau) - _autograd_score(queries, ref_q, tau)
    rel = (delta_ms - tau**2 * delta_s).norm() / delta_ms.norm()
    assert float(rel) <= 1e-6


def test_laplace_alignment_improves_with_dimension():
    dims = [2, 8, 32, 128, 512]
    rel, cos, ratio = [], [], []
    for dim in dims:
        pair = make_alignment_pair("ring_mog_hd", dim, seed=0)
        gen = torch.Generator().manual_seed(1)
        ref_p, ref_q, queries = pair.sample_p(2048, gen), pair.sample_q(2048, gen), pair.sample_q(256, gen)
        tau = float(queries.norm(dim=1).mean())
        metrics = alignment_metrics(queries, ref_p, ref_q, "laplace", tau)
        rel.append(metrics["rel_error"])
        cos.append(metrics["cosine"])
        ratio.append(metrics["lambda_ratio"])
    slope = np.polyfit(np.log(dims), np.log(rel), 1)[0]
    print(f"laplace ring_mog_hd rel_error {rel} cosine {cos} lambda_ratio {ratio} log-log slope {slope:.2f}")
    assert slope < 0
    assert all(b < a for a, b in zip(rel, rel[1:])), rel
    assert all(b > a for a, b in zip(cos, cos[1:])), cos
    assert cos[-1] > 0.99 and abs(ratio[-1] - 1) < 0.05


def test_ring_pair_geometry():
    pair = make_alignment_pair("ring_mog_hd", dim=10, seed=3)
    p, q = pair.centers_p, pair.centers_q
    torch.testing.assert_close(p.norm(dim=1), torch.full((6,), RING_RADIUS, dtype=torch.float64))
    torch.testing.assert_close(q.norm(dim=1), torch.full((6,), RING_RADIUS, dtype=torch.float64))
    # All 12 centers lie in one 2-D plane, and q's mode k is p's mode k rotated by the angle.
    assert torch.linalg.matrix_rank(torch.cat([p, q])).item() == 2
    cosines = (p * q).sum(1) / RING_RADIUS**2
    torch.testing.assert_close(cosines, torch.full((6,), math.cos(RING_ROTATION_RAD), dtype=torch.float64))
    samples = pair.sample_p(5000, torch.Generator().manual_seed(0))
    assert samples.shape == (5000, 10)
    # Noise std 1 per coordinate: the residual to the nearest center has variance ~ 1 (modes are
    # RING_RADIUS = 4 apart, so nearest-center assignment is almost always the true one).
    resid = samples[:, None, :] - p[None]
    nearest = resid.norm(dim=-1).argmin(1)
    noise = resid[torch.arange(5000), nearest]
    assert float(noise.var()) == pytest.approx(1.0, rel=0.1)


def test_raw_pair_radii_and_errors():
    pair = make_alignment_pair("raw_mog_hd", dim=20, seed=0)
    rp, rq = pair.centers_p.norm(dim=1), pair.centers_q.norm(dim=1)
    assert pair.centers_p.shape == (6, 20) and pair.centers_q.shape == (4, 20)
    assert RAW_P_RADIUS_RANGE[0] <= float(rp.min()) and float(rp.max()) <= RAW_P_RADIUS_RANGE[1]
    assert RAW_Q_RADIUS_RANGE[0] <= float(rq.min()) and float(rq.max()) <= RAW_Q_RADIUS_RANGE[1]
    with pytest.raises(ValueError, match="alignment.dataset='moons'"):
        make_alignment_pair("moons", 4, 0)
    with pytest.raises(ValueError, match="alignment.dim=1"):
        make_alignment_pair("ring_mog_hd", 1, 0)


def test_run_alignment_reports_once_and_is_deterministic():
    config = WorkloadConfig(
        task="alignment",
        kernel="laplace",
        seed=5,
        device="cpu",
        alignment={"dataset": "raw_mog_hd", "dim": 32, "num_ref": 256, "num_query": 64, "tau_scale": 0.5},
    )
    calls = []
    summary = run_alignment(config, lambda step, metrics: calls.append((step, dict(metrics))))
    assert len(calls) == 1 and calls[0][0] == 0
    reported = calls[0][1]
    assert {"cosine", "rel_error", "lambda_hat", "tau", "dim"} <= set(reported)
    assert reported["dim"] == 32.0
    assert summary == {"metrics": reported, "seed": 5, "device": "cpu"}
    # tau = tau_scale * mean query norm, recomputed from the documented seeding.
    pair = make_alignment_pair("raw_mog_hd", 32, 5)
    gen = torch.Generator().manual_seed(6)
    pair.sample_p(256, gen), pair.sample_q(256, gen)
    queries = pair.sample_q(64, gen)
    assert reported["tau"] == pytest.approx(0.5 * float(queries.norm(dim=1).mean()), rel=1e-12)
    again = run_alignment(config, lambda step, metrics: None)
    assert again["metrics"] == reported
