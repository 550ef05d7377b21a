"""Drift and score fields: the population forms used by the theory and the training drift.

Sources: DESIGN.md "The drift computation" steps 1-5 (training drift), paper §3.2 (mean shift
m_p(x) = E_p[k(x,y)(y-x)] / E_p[k(x,y)] and kernel-induced score s_p(x) = grad_x log E_p[k(x,y)]),
paper §4.2 Eq. 10 (score as a reweighted local displacement), and the drifting-secretly-score-matching
abstract (bandwidth annealing sigma(t) = sigma_0 exp(-r t); Sinkhorn divergence drift).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from workloads.kernels import Kernel, check_tau, get_kernel

AFFINITY_NORMS = ("both", "row", "none")

# Largest N x (N+ + N) distance matrix (bytes) kept in memory between passes; above it the
# distances are recomputed per chunk in every pass (2 passes for "both") to bound memory.
_DIST_CACHE_BYTES = 2 * 1024**3
# Auto chunk: rows per chunk such that one chunk of the affinity matrix holds about this many
# elements (32 MiB in float32): bounded memory at any N, yet few enough chunks that per-op
# overhead stays small (on a loaded 2-core CPU, 128-row chunks at N = 4096 ran 4x slower than
# whole-matrix passes, 1024-row chunks within 10% of them).
_CHUNK_ELEMENTS = 2**23
# Log-affinities are clamped to log(smallest normal) + 7 before exp: subnormal exp/mul is 4-10x
# slower on CPU, and the change per entry (< e^-80 in float32) is far below float resolution of
# any row or column that carries weight. Masked entries are then set to exactly 0.
_SUBNORMAL_MARGIN = 7.0


def _pairwise_distances(x: Tensor, y: Tensor) -> Tensor:
    # L2 distances; torch.cdist uses the matmul expansion for large inputs (the fast path).
    return torch.cdist(x, y)


def _softmax_weights(x: Tensor, y: Tensor, kernel: Kernel, tau: float) -> tuple[Tensor, Tensor]:
    """Distances r (Q x R) and normalized kernel weights w_i = k(x, y_i) / sum_j k(x, y_j)."""
    r = _pairwise_distances(x, y)
    return r, torch.softmax(kernel.log_k(r, tau), dim=1)


def _as_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be 2-D with the same feature dimension, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return x.to(dtype), y.to(device=x.device, dtype=dtype)


def mean_shift(x: Tensor, y: Tensor, kernel: str | Kernel, tau: float) -> Tensor:
    """Sample mean shift m(x) = sum_i k(x,y_i)(y_i - x) / sum_i k(x,y_i) (paper §3.2).

    Raw distances (no batch-mean normalization), no masking; weights by a stable softmax.

    Args:
        x: query points (Q x D).
        y: reference samples (R x D).
        kernel: registry name (see `workloads.kernels.KERNELS`).
        tau: kernel temperature in the units of x (> 0).

    Returns:
        The mean shift at each query (Q x D), on x's device, in float32 or wider.

    Raises:
        ValueError: unknown kernel, tau <= 0, or mismatched shapes.
    """
    kern, tau = get_kernel(kernel), check_tau(tau)
    x, y = _as_pair(x, y)
    _, w = _softmax_weights(x, y, kern, tau)
    return w @ y - x


def kernel_score(x: Tensor, y: Tensor, kernel: str | Kernel, tau: float) -> Tensor:
    """Kernel-induced score s(x) = grad_x log sum_i k(x, y_i) in closed form (paper §4.2 Eq. 10).

    s(x) = sum_i w_i g(r_i) (y_i - x) with w the softmax weights and g = kernel.score_weight,
    e.g. g(r) = 1 / (tau r) for Laplace, 1 / tau^2 for Gaussian.

    Args:
        x: query points (Q x D).
        y: reference samples (R x D).
        kernel: registry name.
        tau: kernel temperature (> 0).

    Returns:
        The score at each query (Q x D), on x's device.

    Raises:
        ValueError: unknown kernel, tau <= 0, or mismatched shapes.
    """
    kern, tau = get_kernel(kernel), check_tau(tau)
    x, y = _as_pair(x, y)
    r, w = _softmax_weights(x, y, kern, tau)
    c = w * kern.score_weight(r, tau)
    return c @ y - c.sum(dim=1, keepdim=True) * x


def kernel_fields(
    x: Tensor, y: Tensor, kernel: str | Kernel, tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean shift, score and Theorem-2 preconditioner at the queries, from one weight matrix.

    The preconditioner is b(x) = E_w[1 / g(r)] (Theorem 2: m = b s + residual), i.e. tau E_w[r]
    for Laplace (paper Eq. 12) and tau^2 for Gaussian (Theorem 1).

    Args:
        x: query points (Q x D).
        y: reference samples (R x D).
        kernel: registry name.
        tau: kernel temperature (> 0).

    Returns:
        (mean_shift Q x D, score Q x D, preconditioner Q).

    Raises:
        ValueError: unknown kernel, tau <= 0, or mismatched shapes.
    """
    kern, tau = get_kernel(kernel), check_tau(tau)
    x, y = _as_pair(x, y)
    r, w = _softmax_weights(x, y, kern, tau)
    c = w * kern.score_weight(r, tau)
    m = w @ y - x
    s = c @ y - c.sum(dim=1, keepdim=True) * x
    b = (w * kern.preconditioner(r, tau)).sum(dim=1)
    return m, s, b


def anneal_temperatures(temperatures: Sequence[float], rate: float, t: float) -> list[float]:
    """Bandwidth annealing tau(t) = tau0 * exp(-rate * t) for every temperature of the set.

    Source: drifting-secretly-score-matching abstract, sigma(t) = sigma_0 e^{-r t}; here t is the
    fraction of training (step / total_steps), so a rate means the same for any run length.

    Args:
        temperatures: initial temperatures tau0 (each > 0).
        rate: annealing rate r >= 0 (0 = off).
        t: fraction of training in [0, 1].

    Returns:
        The annealed temperatures, in the input order.

    Raises:
        ValueError: rate < 0, t outside [0, 1], or a temperature <= 0.
    """
    if not rate >= 0:
        raise ValueError(f"anneal_rate={rate} must be >= 0 (0 = annealing off)")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t={t} must be the fraction of training in [0, 1]")
    factor = math.exp(-rate * t)
    return [check_tau(tau, "temperatures") * factor for tau in temperatures]


# ----------------------------------------------------------------------------------------------
# Training drift (DESIGN.md steps 1-5)
# ----------------------------------------------------------------------------------------------
# Internally every tensor carries a leading location dimension L (2-D input is L = 1): the L
# feature locations of a multi-scale feature map are independent kernels (own mean distance, own
# normalizers), computed together with batched matmuls instead of a Python loop over locations.


class _Distances:
    """Row chunks of the normalized distance matrices dn = d(x, [y+; y-]) / mean_d (steps 1-2).

    Shapes: x (L x N x D), targets (L x M x D), chunks (L x rows x M); mean_d is per location.
    Masked generated-vs-generated diagonal entries are +inf, so every kernel's logit there is -inf.
    mean_d is the mean over the unmasked entries (no gradient: the whole drift runs under no_grad).
    Row and column minima of dn are kept: every registered kernel is decreasing in r, so
    log_k(min dn) is the exact max logit used to shift each softmax (no extra max pass).
    The matrices are kept whole when they fit in _DIST_CACHE_BYTES, otherwise every pass
    recomputes its chunk (exact, just slower).
    """

    def __init__(self, x: Tensor, targets: Tensor, num_pos: int, self_mask: bool, chunk: int):
        self.x, self.targets, self.num_pos, self.self_mask, self.chunk = (
            x, targets, num_pos, self_mask, chunk
        )
        locations, n, m = x.shape[0], x.shape[1], targets.shape[1]
        self.starts = range(0, n, chunk)
        self.floor = math.log(torch.finfo(x.dtype).tiny) + _SUBNORMAL_MARGIN
        cache = locations * n * m * x.element_size() <= _DIST_CACHE_BYTES
        self.full: Tensor | None = None
        total = torch.zeros(locations, dtype=torch.float64, device=x.device)
        self.row_min = torch.empty(locations, n, dtype=x.dtype, device=x.device)
        self.col_min = torch.full((locations, m), math.inf, dtype=x.dtype, device=x.device)
        if cache:
            # One cdist call over all rows: a single large matmul is faster than per-chunk ones.
            self.full = _pairwise_distances(x, targets)
        for i0 in self.starts:
            d = self._raw(i0) if self.full is None else self.full[:, i0 : i0 + chunk]
            total += d.sum(dim=(1, 2), dtype=torch.float64)
            if self.self_mask:
                total -= self._diag(d, i0).sum(dim=1, dtype=torch.float64)
                self._diag(d, i0).fill_(math.inf)
            self.row_min[:, i0 : i0 + d.shape[1]] = d.amin(dim=2)
            torch.minimum(self.col_min, d.amin(dim=1), out=self.col_min)
        count = n * m - (n if self_mask else 0)
        # 1 / mean_d per location (L x 1 x 1); a location whose distances are all 0 keeps scale 1.
        inv_mean = torch.where(total > 0, count / total, torch.ones_like(total))
        self.inv_mean = inv_mean.to(x.dtype)[:, None, None]
        self.row_min.mul_(self.inv_mean[:, :, 0])
        self.col_min.mul_(self.inv_mean[:, :, 0])
        if self.full is not None:
            self.full.mul_(self.inv_mean)

    def _diag(self, d: Tensor, i0: int) -> Tensor:
        # Entries (l, i, num_pos + i): generated sample i against itself among the negatives.
        rows = d.shape[1]
        return d[:, :, self.num_pos + i0 : self.num_pos + i0 + rows].diagonal(dim1=1, dim2=2)

    def _raw(self, i0: int) -> Tensor:
        return _pairwise_distances(self.x[:, i0 : i0 + self.chunk], self.targets)

    def __call__(self, i0: int) -> Tensor:
        """Normalized distances of rows [i0, i0 + chunk) (L x rows x M), masked."""
        if self.full is not None:
            return self.full[:, i0 : i0 + self.chunk]
        d = self._raw(i0)
        if self.self_mask:
            self._diag(d, i0).fill_(math.inf)
        return d.mul_(self.inv_mean)

    def exp_(self, logit: Tensor, i0: int) -> Tensor:
        """exp of a (shifted) logit chunk in place, subnormal-safe, masked entries exactly 0."""
        logit.clamp_min_(self.floor).exp_()
        if self.self_mask:
            self._diag(logit, i0).zero_()
        return logit


def _column_logsumexp(dist: _Distances, kernel: Kernel, tau: float) -> Tensor:
    """Column-wise logsumexp (L x M) of the logits over all generated rows, accumulated over chunks."""
    col_max = kernel.log_k(dist.col_min, tau)
    col_sum = torch.zeros_like(col_max)
    for i0 in dist.starts:
        col_sum += dist.exp_(kernel.log_k(dist(i0), tau).sub_(col_max[:, None, :]), i0).sum(dim=1)
    return col_max + col_sum.log()


def _sinkhorn_offsets(dist: _Distances, kernel: Kernel, tau: float, iters: int) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn potentials (f L x N, g L x M) of the entropic OT plan P = exp(logit + f_i + g_j).

    Marginals are uniform: rows 1/N, columns 1/M; logit = -cost / tau, i.e. cost = dn (Laplace)
    and entropic regularization tau. Each iteration is one pass over row chunks: the row
    potentials of a chunk use the current g, and the column update accumulates the new f.
    """
    locations, n, m = dist.x.shape[0], dist.x.shape[1], dist.targets.shape[1]
    log_a, log_b = -math.log(n), -math.log(m)
    f = torch.zeros(locations, n, dtype=dist.x.dtype, device=dist.x.device)
    g = torch.zeros(locations, m, dtype=dist.x.dtype, device=dist.x.device)
    for _ in range(iters):
        col = None
        for i0 in dist.starts:
            logit = kernel.log_k(dist(i0), tau)
            rows = slice(i0, i0 + logit.shape[1])
            f[:, rows] = log_a - torch.logsumexp(logit + g[:, None, :], dim=2)
            part = torch.logsumexp(logit + f[:, rows, None], dim=1)
            col = part if col is None else torch.logaddexp(col, part)
        g = log_b - col
    return f, g


def _drift_one_temperature(
    dist: _Distances,
    kernel: Kernel,
    tau: float,
    affinity_norm: str,
    sinkhorn_iters: int,
) -> tuple[Tensor, Tensor]:
    """Unnormalized drift V_tau, DESIGN.md steps 3-4, over row chunks, as V'_i and log scales.

    Every variant is A_ij = rho_i exp(logit_ij - shift_i + v_j) with a row factor rho_i applied
    after the matmuls (V_i is quadratic in row i of A), so no pass rescales A itself.
    With small temperatures every affinity of a row can be far below float range (e.g. Gaussian,
    when the row's nearest target is nearer to other generated samples: the column normalizer
    dwarfs the entry) although the drift direction is well defined. So the positive and the
    negative half of each row are shifted to peak at exp(0) = 1 before exp, and the row's scale is
    returned apart: V_i = exp(s_i) V'_i.

    Returns:
        (V' L x N x D, log scales s L x N).
    """
    n, num_pos = dist.x.shape[1], dist.num_pos
    y_pos, y_neg = dist.targets[:, :num_pos], dist.targets[:, num_pos:]
    sinkhorn_f: Tensor | None = None
    col_offset: Tensor | None = None
    if kernel.sinkhorn_plan:
        # A = N * P: the OT plan scaled so each generated row sums to 1 (like a row softmax).
        sinkhorn_f, col_offset = _sinkhorn_offsets(dist, kernel, tau, sinkhorn_iters)
        sinkhorn_f = sinkhorn_f + math.log(n)
    elif affinity_norm == "both":
        # A = sqrt(softmax_row * softmax_col) = exp(logit - (lse_row_i + lse_col_j) / 2).
        col_offset = -0.5 * _column_logsumexp(dist, kernel, tau)
    row_max = kernel.log_k(dist.row_min, tau)
    out = torch.empty_like(dist.x)
    log_scale = torch.zeros(dist.x.shape[:2], dtype=dist.x.dtype, device=dist.x.device)
    scratch = torch.empty(0, dtype=dist.x.dtype, device=dist.x.device)
    for i0 in dist.starts:
        a = kernel.log_k(dist(i0), tau)
        rows = slice(i0, i0 + a.shape[1])
        if sinkhorn_f is not None:
            shift = sinkhorn_f[:, rows, None].neg()
        elif affinity_norm == "none":
            shift = None
        elif affinity_norm == "row":
            # A = exp(logit - max_i) / rowsum: the 1 / rowsum factor is applied after the matmuls.
            shift = row_max[:, rows, None]
        else:
            # Row logsumexp r_i = max_i + log(sum_j exp(logit_ij - max_i)).
            r_max = row_max[:, rows, None]
            scratch = torch.sub(a, r_max, out=scratch.resize_(a.shape))
            row_sum = dist.exp_(scratch, i0).sum(dim=2, keepdim=True)
            shift = 0.5 * (r_max + row_sum.log())
        if shift is not None:
            a.sub_(shift)
        if col_offset is not None:
            a.add_(col_offset[:, None, :])
        a_pos, a_neg = a[:, :, :num_pos], a[:, :, num_pos:]
        # Both terms of V_i are (row i of A+) x (row i of A-): each half peaks at exp(0) = 1
        # and V_i = exp(peak+_i + peak-_i) V'_i. A half with no finite entry keeps shift 0.
        peaks = [half.amax(dim=2, keepdim=True) for half in (a_pos, a_neg)]
        peaks = [torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)) for peak in peaks]
        a_pos.sub_(peaks[0])
        a_neg.sub_(peaks[1])
        dist.exp_(a, i0)
        sum_pos, sum_neg = a_pos.sum(dim=2, keepdim=True), a_neg.sum(dim=2, keepdim=True)
        # Step 4: V = (A+ rowsum(A-)) y+ - (A- rowsum(A+)) y-, row factors after the matmuls.
        out[:, rows] = torch.bmm(a_pos, y_pos).mul_(sum_neg).sub_(torch.bmm(a_neg, y_neg).mul_(sum_pos))
        scale = peaks[0] + peaks[1]
        if affinity_norm == "row" and sinkhorn_f is None:
            # Row softmax A = E / S with S = rowsum(E) = e^peak+ S'+ + e^peak- S'-: V scales by 1 / S^2.
            scale = scale - 2.0 * torch.logaddexp(peaks[0] + sum_pos.log(), peaks[1] + sum_neg.log())
        log_scale[:, rows] = scale[:, :, 0]
    return out, log_scale


def _drift_batched(
    x: Tensor,
    positives: Tensor,
    negatives: Tensor,
    self_mask: bool,
    kernel: Kernel,
    taus: list[float],
    affinity_norm: str,
    normalize: bool,
    chunk_size: int | None,
    sinkhorn_iters: int,
) -> tuple[Tensor, list[float]]:
    """Steps 1-5 for L independent locations (x L x N x D). Returns (V, RMS per temperature
    averaged over locations)."""
    targets = torch.cat([positives, negatives], dim=1)
    locations, n, m = x.shape[0], x.shape[1], targets.shape[1]
    chunk = chunk_size or max(1, min(n, _CHUNK_ELEMENTS // (locations * m)))
    dist = _Distances(x, targets, positives.shape[1], self_mask, chunk)
    total = torch.zeros_like(x)
    rms_values = []
    for tau in taus:
        v, log_scale = _drift_one_temperature(dist, kernel, tau, affinity_norm, sinkhorn_iters)
        # Step 5 in the log domain: RMS per coordinate and location, sqrt(mean_i ||V_i||^2 / D)
        # with ||V_i||^2 = exp(2 s_i) ||V'_i||^2 (no underflow however small the field is).
        log_sq = v.square().sum(dim=2).log() + 2.0 * log_scale
        log_rms = 0.5 * (torch.logsumexp(log_sq, dim=1) - math.log(n * v.shape[2]))  # L
        rms_values.append(float(log_rms.double().exp().mean()))
        if normalize:
            # A location whose drift is exactly 0 (log_rms = -inf) stays 0.
            factor = torch.where(torch.isfinite(log_rms)[:, None], (log_scale - log_rms[:, None]).exp(),
                                 torch.zeros_like(log_scale))
        else:
            factor = log_scale.exp()
        total += v.mul_(factor[:, :, None])
    return total, rms_values


def drift_field(
    x: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    kernel: str | Kernel = "laplace",
    temperatures: Sequence[float] = (0.02, 0.05, 0.2),
    affinity_norm: str = "both",
    normalize: bool = True,
    chunk_size: int | None = None,
    sinkhorn_iters: int = 20,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """Training drift V (stop-gradient target), DESIGN.md "The drift computation" steps 1-5.

    Distances are L2 (not squared), divided by their batch mean over unmasked entries; the logit is
    kernel.log_k(d / mean_d, tau), e.g. -d / (mean_d tau) for Laplace and -d^2 / (2 (mean_d tau)^2)
    for Gaussian. Affinities over the concatenated targets [positives, negatives]: "both" =
    sqrt(softmax_row * softmax_col), "row" = row softmax, "none" = exp(logit). kernel="sinkhorn"
    replaces them by N times the entropic OT plan (uniform marginals, Laplace cost, regularization
    tau, `sinkhorn_iters` log-domain iterations) and ignores affinity_norm. Then
    V = W+ y+ - W- y-, W+ = A+ rowsum(A-), W- = A- rowsum(A+); each V_tau is divided by
    sqrt(mean ||V_tau||^2 / D) (normalize=True) and the fields are summed over temperatures.

    Computed in float32 or wider (bf16/fp16 inputs are upcast), without gradient, in row chunks
    (the column normalizers are accumulated over all chunks first, so chunking is exact).

    Args:
        x: generated batch (N x D), or (L x N x D) for L feature locations, each with its own
            kernel (own mean distance).
        positives: data samples (N+ x D), or (L x N+ x D).
        negatives: negatives (N- x D or L x N- x D); None means x itself. When None or the same
            tensor object as x, each generated sample's distance to itself is masked.
        kernel: registry name (laplace, gaussian, cauchy, imq, sinkhorn).
        temperatures: relative temperatures (each > 0).
        affinity_norm: "both", "row" or "none".
        normalize: divide each temperature's drift by its RMS before summing.
        chunk_size: generated rows per chunk; None picks one from the target count.
        sinkhorn_iters: Sinkhorn iterations (kernel="sinkhorn" only).
        return_stats: also return {"drift_rms": [RMS per temperature before normalization]}
            (averaged over locations for 3-D input).

    Returns:
        V with x's shape, dtype float32 or wider, on x's device; or (V, stats).

    Raises:
        ValueError: unknown kernel or affinity_norm, a temperature <= 0, bad shapes, or fewer
            than 2 generated samples with self-masking.
    """
    kern = get_kernel(kernel)
    if affinity_norm not in AFFINITY_NORMS:
        raise ValueError(f"affinity_norm={affinity_norm!r} is not allowed; allowed: both, row, none")
    taus = [check_tau(tau, "temperatures") for tau in temperatures]
    if not taus:
        raise ValueError("temperatures=[] must hold at least one temperature")
    if sinkhorn_iters < 1:
        raise ValueError(f"sinkhorn_iters={sinkhorn_iters} must be >= 1")
    self_mask = negatives is None or negatives is x
    negatives = x if negatives is None else negatives
    if x.dim() not in (2, 3) or positives.dim() != x.dim() or negatives.dim() != x.dim():
        raise ValueError(
            f"x, positives, negatives must all be 2-D (N x D) or 3-D (L x N x D), got "
            f"{tuple(x.shape)}, {tuple(positives.shape)}, {tuple(negatives.shape)}"
        )
    if positives.shape[-1] != x.shape[-1] or negatives.shape[-1] != x.shape[-1]:
        raise ValueError("positives and negatives must have x's feature dimension D")
    if x.dim() == 3 and not (positives.shape[0] == negatives.shape[0] == x.shape[0]):
        raise ValueError("3-D inputs must share the number of locations L")
    if self_mask and x.shape[-2] < 2:
        raise ValueError("x must hold at least 2 generated samples when they are their own negatives")
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.no_grad():
        xs, pos, neg = (t.detach().to(device=x.device, dtype=dtype) for t in (x, positives, negatives))
        args = (kern, taus, affinity_norm, normalize, chunk_size, sinkhorn_iters)
        if x.dim() == 2:
            xs, pos, neg = xs[None], pos[None], neg[None]
        v, rms = _drift_batched(xs, pos, neg, self_mask, *args)
        if x.dim() == 2:
            v = v[0]
    if return_stats:
        return v, {"drift_rms": rms}
    return v
