"""Kernels, mean shift, kernel score and the training drift against independent computations.

References written here on purpose independently of workloads/: explicit kernel formulas,
python loops, torch.autograd on log-sum-exp, full-matrix float64 drift, POT's Sinkhorn.
"""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from workloads.drift import anneal_temperatures, drift_field, kernel_score, mean_shift
from workloads.kernels import KERNELS, get_kernel

# Independent kernel formulas k(r; tau) (DESIGN.md kernel axis).
NAIVE_KERNELS = {
    "laplace": lambda r, tau: math.exp(-r / tau),
    "gaussian": lambda r, tau: math.exp(-(r**2) / (2 * tau**2)),
    "cauchy": lambda r, tau: 1.0 / (1.0 + r**2 / tau**2),
    "imq": lambda r, tau: (1.0 + r**2 / tau**2) ** -0.5,
    "sinkhorn": lambda r, tau: math.exp(-r / tau),  # Laplace cost
}
LOG_KERNELS_TORCH = {
    "laplace": lambda r, tau: -r / tau,
    "gaussian": lambda r, tau: -(r**2) / (2 * tau**2),
    "cauchy": lambda r, tau: -torch.log(1 + r**2 / tau**2),
    "imq": lambda r, tau: -0.5 * torch.log(1 + r**2 / tau**2),
    "sinkhorn": lambda r, tau: -r / tau,
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_holds_exactly_the_configured_kernels():
    assert sorted(KERNELS) == ["cauchy", "gaussian", "imq", "laplace", "sinkhorn"]


def test_unknown_kernel_names_field_and_allowed_values():
    msg = "kernel='foo' is not registered; allowed: cauchy, gaussian, imq, laplace, sinkhorn"
    with pytest.raises(ValueError, match=msg):
        get_kernel("foo")
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="kernel='foo'"):
        mean_shift(x, x, "foo", 1.0)
    with pytest.raises(ValueError, match="kernel='foo'"):
        drift_field(x, x, kernel="foo")


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_nonpositive_tau_rejected(tau):
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="tau="):
        mean_shift(x, x, "laplace", tau)
    with pytest.raises(ValueError, match="tau="):
        kernel_score(x, x, "gaussian", tau)
    with pytest.raises(ValueError, match="temperatures="):
        drift_field(x, x, temperatures=[0.05, tau])


def test_bad_affinity_norm_rejected():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="affinity_norm='cols'.*both, row, none"):
        drift_field(x, x, affinity_norm="cols")


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_radial_derivative_and_score_weight_closed_forms(name):
    kern = get_kernel(name)
    tau = 0.7
    r = (torch.rand(50, dtype=torch.float64, generator=_gen(0)) * 3 + 0.01).requires_grad_(True)
    (grad,) = torch.autograd.grad(LOG_KERNELS_TORCH[name](r, tau).sum(), r)
    rd = r.detach()
    torch.testing.assert_close(kern.log_k(rd, tau), LOG_KERNELS_TORCH[name](rd, tau))
    torch.testing.assert_close(kern.dlog_k(rd, tau), grad)
    torch.testing.assert_close(kern.score_weight(rd, tau), -grad / rd)
    torch.testing.assert_close(kern.preconditioner(rd, tau) * kern.score_weight(rd, tau), torch.ones_like(rd))


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_score_matches_autograd_of_log_sum_exp(name):
    gen = _gen(1)
    x = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    y = torch.randn(40, 5, dtype=torch.float64, generator=gen) * 1.5
    tau = 0.8
    xr = x.clone().requires_grad_(True)
    r = (xr[:, None, :] - y[None, :, :]).norm(dim=-1)
    log_density = torch.logsumexp(LOG_KERNELS_TORCH[name](r, tau), dim=1)
    (expected,) = torch.autograd.grad(log_density.sum(), xr)
    torch.testing.assert_close(kernel_score(x, y, name, tau), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_mean_shift_matches_naive_loops(name):
    gen = _gen(2)
    x = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    y = torch.randn(25, 3, dtype=torch.float64, generator=gen) + 0.5
    tau = 0.6
    expected = torch.zeros_like(x)
    for q in range(x.shape[0]):
        num, den = torch.zeros(3, dtype=torch.float64), 0.0
        for i in range(y.shape[0]):
            k = NAIVE_KERNELS[name](float((x[q] - y[i]).norm()), tau)
            num += k * (y[i] - x[q])
            den += k
        expected[q] = num / den
    torch.testing.assert_close(mean_shift(x, y, name, tau), expected, rtol=1e-10, atol=1e-12)


def test_mean_shift_is_stable_at_tiny_tau_and_keeps_dtype():
    # exp(-d / tau) underflows to 0 for every reference at tau = 1e-3; the softmax must not.
    x = torch.tensor([[0.0, 0.0]])
    y = torch.tensor([[3.0, 0.0], [0.0, 5.0]])
    m = mean_shift(x, y, "laplace", 1e-3)
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, torch.tensor([[3.0, 0.0]]))  # all weight on the nearest
    assert mean_shift(x.double(), y.double(), "gaussian", 1.0).dtype == torch.float64


def test_anneal_temperatures_exact():
    base = [0.02, 0.05, 0.2]
    assert anneal_temperatures(base, 0.0, 0.7) == base
    assert anneal_temperatures(base, 3.0, 0.0) == base
    got = anneal_temperatures(base, 3.0, 0.5)
    assert got == pytest.approx([t * math.exp(-1.5) for t in base], rel=1e-15)
    assert anneal_temperatures([0.1], 5.0, 1.0) == pytest.approx([0.1 * math.exp(-5.0)], rel=1e-15)
    with pytest.raises(ValueError, match="anneal_rate=-1"):
        anneal_temperatures(base, -1.0, 0.5)
    for t in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"t={t}"):
            anneal_temperatures(base, 1.0, t)


# ---------------------------------------------------------------------------------------------
# Training drift
# ---------------------------------------------------------------------------------------------


def reference_drift(x, positives, negatives, self_mask, kernel, temperatures, affinity_norm, normalize=True):
    """DESIGN.md steps 1-5 with full float64 matrices and two separate softmaxes."""
    x, yp, yn = (t.double() for t in (x, positives, negatives))
    n, n_pos = x.shape[0], yp.shape[0]
    d = torch.cat([torch.cdist(x, yp), torch.cdist(x, yn)], dim=1)
    mask = torch.zeros_like(d, dtype=torch.bool)
    if self_mask:
        mask[torch.arange(n), n_pos + torch.arange(n)] = True
    dn = d / d[~mask].mean()
    total = torch.zeros_like(x)
    for tau in temperatures:
        logit = LOG_KERNELS_TORCH[kernel](dn, tau).masked_fill(mask, -math.inf)
        if affinity_norm == "both":
            a = (torch.softmax(logit, dim=1) * torch.softmax(logit, dim=0)).sqrt()
        elif affinity_norm == "row":
            a = torch.softmax(logit, dim=1)
        else:
            a = logit.exp()
        a_pos, a_neg = a[:, :n_pos], a[:, n_pos:]
        v = (a_pos * a_neg.sum(1, keepdim=True)) @ yp - (a_neg * a_pos.sum(1, keepdim=True)) @ yn
        total += v / v.square().mean().sqrt() if normalize else v
    return total


def _batch(n=48, n_pos=40, dim=6, seed=3, dtype=torch.float64):
    gen = _gen(seed)
    x = torch.randn(n, dim, dtype=dtype, generator=gen)
    pos = (torch.randn(n_pos, dim, dtype=dtype, generator=gen) * 0.8 + 1.0)
    return x, pos


@pytest.mark.parametrize("kernel", ["laplace", "gaussian", "cauchy", "imq"])
@pytest.mark.parametrize("affinity_norm", ["both", "row", "none"])
def test_drift_matches_float64_full_matrix_reference(kernel, affinity_norm):
    x, pos = _batch()
    # "none" leaves exp(logit) unnormalized: use temperatures where it does not underflow.
    taus = [0.3, 0.6] if affinity_norm == "none" else [0.02, 0.05, 0.2]
    got = drift_field(x, pos, kernel=kernel, temperatures=taus, affinity_norm=affinity_norm)
    expected = reference_drift(x, pos, x, True, kernel, taus, affinity_norm)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_drift_float32_agrees_with_float64_reference_and_chunking_is_exact():
    x, pos = _batch(n=200, n_pos=150, dim=16, dtype=torch.float32)
    taus = [0.02, 0.05, 0.2]
    whole = drift_field(x, pos, temperatures=taus, chunk_size=10_000)
    chunked = drift_field(x, pos, temperatures=taus, chunk_size=17)  # 200 = 11 * 17 + 13
    assert whole.dtype == torch.float32
    assert (chunked - whole).abs().max() <= 1e-5
    expected = reference_drift(x, pos, x, True, "laplace", taus, "both")
    assert (whole.double() - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_drift_uncached_distance_path_is_exact(monkeypatch):
    # Large batches recompute distances per chunk instead of caching the matrix.
    import workloads.drift as drift_module

    x, pos = _batch(n=64, n_pos=50, dim=8)
    cached = drift_field(x, pos, chunk_size=9)
    monkeypatch.setattr(drift_module, "_DIST_CACHE_BYTES", 0)
    torch.testing.assert_close(drift_field(x, pos, chunk_size=9), cached, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affinity_norm", ["both", "row", "none"])
def test_drift_zero_when_generated_samples_are_the_data_without_mask(affinity_norm):
    # positives and negatives both equal x as values and neither is the object x, so nothing is
    # masked: the target matrix is [x, x], the logits of the two halves are identical columns, so
    # A+ == A- (row and column softmaxes treat the halves symmetrically), W+ == W- and y+ == y-:
    # V = W+ y+ - W- y- is exactly 0 up to float round-off.
    x, _ = _batch(n=30)
    v = drift_field(x, x.clone(), x.clone(), temperatures=[0.3], affinity_norm=affinity_norm, normalize=False)
    scale = reference_drift(x, x + 0.3, x, True, "laplace", [0.3], affinity_norm, normalize=False)
    assert scale.abs().max() > 1e-3  # a non-equilibrium batch of the same size has a real drift
    assert v.abs().max() <= 1e-12


def test_self_mask_leaves_exactly_the_repulsion_from_the_others():
    # With negatives = x (masked) and positives = x.clone(), affinity "none", one temperature:
    # K_ij = exp(-d_ij / (mean_d tau)), s_i = sum_{j != i} K_ij. Row i of A+ is K_i (K_ii = 1),
    # row i of A- is K_i without the diagonal, so
    # V_i = s_i (x_i + sum_{j!=i} K_ij x_j) - (1 + s_i) sum_{j!=i} K_ij x_j = sum_{j!=i} K_ij (x_i - x_j):
    # the sample's attraction to its own copy has zero displacement and it does not repel itself.
    x, _ = _batch(n=25)
    n, tau = x.shape[0], 0.4
    d = torch.cdist(x, x)
    mean_d = (2 * d.sum()) / (2 * n * n - n)  # [x, x] targets, the negatives' diagonal excluded
    k = torch.exp(-d / (mean_d * tau))
    k.fill_diagonal_(0.0)
    expected = k.sum(1, keepdim=True) * x - k @ x
    got = drift_field(x, x.clone(), temperatures=[tau], affinity_norm="none", normalize=False)
    # cdist's matmul expansion leaves d(x_i, copy of x_i) ~ 1e-8 instead of 0 (sqrt of round-off),
    # so K_ii = 1 - O(1e-8): compare to 1e-6.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    same_object = drift_field(x, x.clone(), x, temperatures=[tau], affinity_norm="none", normalize=False)
    torch.testing.assert_close(same_object, got, rtol=0, atol=0)


def test_normalization_gives_unit_rms_per_temperature_and_stats_report_raw_rms():
    x, pos = _batch(n=64, n_pos=64, dim=8)
    taus = [0.02, 0.05, 0.2]
    dim = x.shape[1]
    total, stats = drift_field(x, pos, temperatures=taus, return_stats=True)
    singles = [drift_field(x, pos, temperatures=[t]) for t in taus]
    for single in singles:
        assert float(single.square().sum(1).div(dim).mean().sqrt()) == pytest.approx(1.0, rel=1e-12)
    torch.testing.assert_close(total, sum(singles))
    raw = [drift_field(x, pos, temperatures=[t], normalize=False) for t in taus]
    raw_rms = [float(v.square().mean().sqrt()) for v in raw]
    assert stats["drift_rms"] == pytest.approx(raw_rms, rel=1e-12)


def test_drift_no_gradient_and_low_precision_inputs_computed_in_float32():
    x, pos = _batch(n=40, n_pos=40, dim=8, dtype=torch.float32)
    xg = x.clone().requires_grad_(True)
    v = drift_field(xg, pos)
    assert not v.requires_grad and v.dtype == torch.float32
    v16 = drift_field(x.bfloat16(), pos.bfloat16())
    assert v16.dtype == torch.float32
    # bf16 rounds the inputs (8-bit mantissa); the drift itself is float32, so it stays close.
    expected = drift_field(x.bfloat16().float(), pos.bfloat16().float())
    torch.testing.assert_close(v16, expected)


def test_locations_each_get_their_own_kernel():
    gen = _gen(5)
    x = torch.randn(3, 20, 4, dtype=torch.float64, generator=gen)
    x[1] *= 10.0  # a location with a 10x larger distance scale
    pos = torch.randn(3, 15, 4, dtype=torch.float64, generator=gen)
    v, stats = drift_field(x, pos, return_stats=True)
    per_location = [drift_field(x[i], pos[i], return_stats=True) for i in range(3)]
    for i, (vi, _) in enumerate(per_location):
        torch.testing.assert_close(v[i], vi)
    mean_rms = np.mean([s["drift_rms"] for _, s in per_location], axis=0)
    assert stats["drift_rms"] == pytest.approx(mean_rms.tolist(), rel=1e-12)


@pytest.mark.parametrize("self_mask", [True, False])
def test_sinkhorn_drift_matches_pot_plan(self_mask):
    x, pos = _batch(n=12, n_pos=9, dim=3, seed=7)
    neg = x if self_mask else x + 0.1
    tau = 0.5
    n, n_pos = x.shape[0], pos.shape[0]
    d = torch.cat([torch.cdist(x, pos), torch.cdist(x, neg)], dim=1)
    mask = torch.zeros_like(d, dtype=torch.bool)
    if self_mask:
        mask[torch.arange(n), n_pos + torch.arange(n)] = True
    cost = (d / d[~mask].mean()).masked_fill(mask, 1e4).numpy()
    m = cost.shape[1]
    plan = ot.sinkhorn(np.full(n, 1 / n), np.full(m, 1 / m), cost, reg=tau, method="sinkhorn_log",
                       numItermax=5000, stopThr=1e-13)
    a = torch.from_numpy(plan) * n  # rows sum to 1
    a_pos, a_neg = a[:, :n_pos], a[:, n_pos:]
    expected = (a_pos * a_neg.sum(1, keepdim=True)) @ pos - (a_neg * a_pos.sum(1, keepdim=True)) @ neg
    got = drift_field(
        x, pos, neg, kernel="sinkhorn", temperatures=[tau], normalize=False, sinkhorn_iters=3000
    )
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    # Few iterations give a different (unconverged) plan: the iteration count is honoured.
    early = drift_field(x, pos, neg, kernel="sinkhorn", temperatures=[tau], normalize=False, sinkhorn_iters=1)
    assert (early - expected).abs().max() > 1e-4


@pytest.mark.parametrize("kernel", ["laplace", "gaussian", "cauchy", "imq"])
@pytest.mark.parametrize("affinity_norm", ["both", "row", "none"])
def test_batched_locations_chunked_match_float64_reference_per_location(kernel, affinity_norm):
    # Locations are computed together (batched matmuls, row chunks shared by all locations): each
    # one must still equal the independent full-matrix reference on its own samples.
    gen = _gen(11)
    x = torch.randn(4, 30, 5, dtype=torch.float64, generator=gen)
    x[2] *= 7.0  # distance scales differ per location
    pos = torch.randn(4, 22, 5, dtype=torch.float64, generator=gen) + 0.5
    taus = [0.3, 0.6] if affinity_norm == "none" else [0.02, 0.05, 0.2]
    got, stats = drift_field(x, pos, kernel=kernel, temperatures=taus, affinity_norm=affinity_norm,
                             chunk_size=7, return_stats=True)  # 30 = 4 * 7 + 2
    for i in range(4):
        expected = reference_drift(x[i], pos[i], x[i], True, kernel, taus, affinity_norm)
        torch.testing.assert_close(got[i], expected, rtol=1e-9, atol=1e-9)
    raw = [[float(reference_drift(x[i], pos[i], x[i], True, kernel, [t], affinity_norm, normalize=False)
                  .square().mean().sqrt()) for t in taus] for i in range(4)]
    assert stats["drift_rms"] == pytest.approx(np.mean(raw, axis=0).tolist(), rel=1e-9)


def test_batched_sinkhorn_locations_match_single_location_plans():
    # Each location solves its own OT problem (the single-location path is checked against POT above).
    gen = _gen(13)
    x = torch.randn(3, 12, 3, dtype=torch.float64, generator=gen)
    x[1] *= 5.0
    pos = torch.randn(3, 9, 3, dtype=torch.float64, generator=gen)
    got = drift_field(x, pos, kernel="sinkhorn", temperatures=[0.5], sinkhorn_iters=50, chunk_size=5)
    for i in range(3):
        single = drift_field(x[i], pos[i], kernel="sinkhorn", temperatures=[0.5], sinkhorn_iters=50)
        torch.testing.assert_close(got[i], single, rtol=1e-10, atol=1e-12)


def reference_drift_log_domain(x, positives, kernel, tau, affinity_norm):
    """Normalized single-temperature drift (negatives = x, masked) in float64 log space.

    An independent form of steps 3-5: with log A the log-affinities, row i's
    V_i = S+_i S-_i (softmax(log A+_i) y+ - softmax(log A-_i) y-), S = row sums, so
    log ||V_i|| = lse(log A+_i) + lse(log A-_i) + log ||difference|| never leaves float range.
    """
    x, yp = x.double(), positives.double()
    n, n_pos = x.shape[0], yp.shape[0]
    targets = torch.cat([yp, x])
    d = torch.cdist(x, targets)
    mask = torch.zeros_like(d, dtype=torch.bool)
    mask[torch.arange(n), n_pos + torch.arange(n)] = True
    logit = LOG_KERNELS_TORCH[kernel](d / d[~mask].mean(), tau).masked_fill(mask, -math.inf)
    if affinity_norm == "both":
        log_a = 0.5 * (torch.log_softmax(logit, dim=1) + torch.log_softmax(logit, dim=0))
    elif affinity_norm == "row":
        log_a = torch.log_softmax(logit, dim=1)
    else:
        log_a = logit
    lp, ln = log_a[:, :n_pos], log_a[:, n_pos:]
    diff = torch.softmax(lp, dim=1) @ yp - torch.softmax(ln, dim=1) @ x
    log_norm = torch.logsumexp(lp, dim=1) + torch.logsumexp(ln, dim=1)  # log(S+ S-)
    log_sq = 2 * log_norm + diff.square().sum(1).log()
    log_rms = 0.5 * (torch.logsumexp(log_sq, dim=0) - math.log(x.numel()))
    return diff * (log_norm - log_rms).exp()[:, None]


@pytest.mark.parametrize("affinity_norm", ["both", "row"])
def test_log_domain_reference_agrees_with_full_matrix_reference_where_both_fit(affinity_norm):
    # The log-domain reference itself is checked where the plain float64 reference is in range.
    x, pos = _batch()
    expected = reference_drift(x, pos, x, True, "gaussian", [0.2], affinity_norm)
    torch.testing.assert_close(reference_drift_log_domain(x, pos, "gaussian", 0.2, affinity_norm), expected,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affinity_norm", ["both", "row", "none"])
@pytest.mark.parametrize("tau", [0.05, 0.02])
def test_small_temperature_drift_does_not_underflow(dtype, affinity_norm, tau):
    # Data 3 std away from the generated batch, Gaussian kernel: every affinity of a row is far
    # below float range (the un-normalized field's RMS is ~1e-41 at tau 0.05 and ~1e-251 at 0.02,
    # below float32's and, at 0.02, the plain float64 reference's range), yet the normalized field
    # is well defined; it used to come out as exactly 0 in float32.
    gen = _gen(0)
    x = torch.randn(64, 16, generator=gen)
    pos = torch.randn(64, 16, generator=gen) * 0.5 + 3.0
    got, stats = drift_field(x.to(dtype), pos.to(dtype), kernel="gaussian", temperatures=[tau],
                             affinity_norm=affinity_norm, return_stats=True)
    expected = reference_drift_log_domain(x, pos, "gaussian", tau, affinity_norm)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    assert float(got.square().mean().sqrt()) == pytest.approx(1.0, rel=tol)
    if affinity_norm == "both":
        assert 0 < stats["drift_rms"][0] < 1e-30
