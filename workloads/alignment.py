"""Paper §5.1 "Examinations with Oracles": drift-vs-score alignment on high-dimensional mixtures.

No training: p and q are oracle samplers (Gaussian mixtures in R^d); reference sets from both and
query points from q give the Monte Carlo mean-shift and score fields, and
`workloads.metrics.alignment_metrics` compares their discrepancies.

The paper's constants were lost in the text extraction; the values below are OUR choice (named
constants), picked so that modes are well separated in d = 2 and the mismatch between p and q is
a fixed geometric offset as d grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workloads.config import WorkloadConfig
from workloads.metrics import alignment_metrics

# Ring MoG (our choice): 6 modes on a ring of radius 4 in a random 2-D plane, isotropic noise
# std 1 in all d coordinates; q is the ring rotated by pi/6 (half the mode spacing), so q's modes
# sit exactly between p's.
RING_NUM_MODES = 6
RING_RADIUS = 4.0
RING_NOISE_STD = 1.0
RING_ROTATION_RAD = math.pi / 6

# Raw MoG (our choice): p has 6 modes at radii uniform in [2, 6], q has 4 modes at radii uniform
# in [3, 8], all in independent uniformly random directions; isotropic noise std 1.
RAW_P_NUM_MODES, RAW_P_RADIUS_RANGE = 6, (2.0, 6.0)
RAW_Q_NUM_MODES, RAW_Q_RADIUS_RANGE = 4, (3.0, 8.0)
RAW_NOISE_STD = 1.0

ALIGNMENT_DATASETS = ("ring_mog_hd", "raw_mog_hd")


@dataclass(frozen=True)
class AlignmentPair:
    """Two isotropic Gaussian mixtures with uniform mode weights (float64, CPU)."""

    centers_p: Tensor
    centers_q: Tensor
    noise_std: float

    def _sample(self, centers: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        modes = torch.randint(centers.shape[0], (n,), generator=generator)
        noise = torch.randn(n, centers.shape[1], generator=generator, dtype=torch.float64)
        return centers[modes] + self.noise_std * noise

    def sample_p(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples of p (n x d, float64)."""
        return self._sample(self.centers_p, n, generator)

    def sample_q(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples of q (n x d, float64)."""
        return self._sample(self.centers_q, n, generator)


def _random_directions(count: int, dim: int, gen: torch.Generator) -> Tensor:
    directions = torch.randn(count, dim, generator=gen, dtype=torch.float64)
    return directions / directions.norm(dim=1, keepdim=True)


def make_alignment_pair(dataset: str, dim: int, seed: int) -> AlignmentPair:
    """Build the oracle pair (p, q) of paper §5.1 in R^dim.

    Args:
        dataset: "ring_mog_hd" or "raw_mog_hd".
        dim: ambient dimension d (>= 2).
        seed: seed of the random plane / directions / radii.

    Returns:
        The `AlignmentPair`.

    Raises:
        ValueError: unknown dataset or dim < 2.
    """
    if dataset not in ALIGNMENT_DATASETS:
        allowed = ", ".join(ALIGNMENT_DATASETS)
        raise ValueError(f"alignment.dataset={dataset!r} is not allowed; allowed: {allowed}")
    if dim < 2:
        raise ValueError(f"alignment.dim={dim} must be >= 2")
    gen = torch.Generator().manual_seed(seed)
    if dataset == "ring_mog_hd":
        # Orthonormal basis of a random 2-D plane of R^d.
        plane, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))
        angles = 2 * math.pi * torch.arange(RING_NUM_MODES, dtype=torch.float64) / RING_NUM_MODES

        def ring(offset: float) -> Tensor:
            circle = torch.stack([torch.cos(angles + offset), torch.sin(angles + offset)], dim=1)
            return RING_RADIUS * circle @ plane.T

        return AlignmentPair(ring(0.0), ring(RING_ROTATION_RAD), RING_NOISE_STD)

    def mixture(count: int, radius_range: tuple[float, float]) -> Tensor:
        low, high = radius_range
        radii = low + (high - low) * torch.rand(count, 1, generator=gen, dtype=torch.float64)
        return radii * _random_directions(count, dim, gen)

    return AlignmentPair(
        mixture(RAW_P_NUM_MODES, RAW_P_RADIUS_RANGE),
        mixture(RAW_Q_NUM_MODES, RAW_Q_RADIUS_RANGE),
        RAW_NOISE_STD,
    )


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def alignment_draws(config: WorkloadConfig) -> tuple[AlignmentPair, Tensor, Tensor, Tensor, float]:
    """The oracle pair and the samples one alignment trial measures on (paper §5.1).

    The pair comes from config.seed; the p and q references and the queries (drawn from q) from a
    CPU generator seeded config.seed + 1, so they do not depend on the device; tau =
    alignment.tau_scale * mean query norm (the paper's bandwidth proportional to the query norm).

    Args:
        config: the workload config (uses alignment.* and seed).

    Returns:
        (pair, references of p, references of q, queries, tau).
    """
    cfg = config.alignment
    pair = make_alignment_pair(cfg.dataset, cfg.dim, config.seed)
    gen = torch.Generator().manual_seed(config.seed + 1)
    ref_p = pair.sample_p(cfg.num_ref, gen)
    ref_q = pair.sample_q(cfg.num_ref, gen)
    queries = pair.sample_q(cfg.num_query, gen)
    return pair, ref_p, ref_q, queries, cfg.tau_scale * float(queries.norm(dim=1).mean())


def run_alignment(
    config: WorkloadConfig, report: Callable[[int, dict[str, float]], None]
) -> dict[str, Any]:
    """Measure drift/score alignment once (task = alignment), paper §5.1.

    tau = alignment.tau_scale * mean norm of the query batch (paper: bandwidth proportional to
    the mean query norm). Samples are drawn on CPU from generators seeded by config.seed (the
    pair uses seed, references and queries seed + 1), so results do not depend on the device.

    Args:
        config: the workload config (uses alignment.*, kernel, seed, device).
        report: called once as report(0, metrics) with the alignment metrics plus "tau", "dim".

    Returns:
        {"metrics": the reported dict, "seed": config.seed, "device": device name}.
    """
    device = _resolve_device(config.device)
    _, ref_p, ref_q, queries, tau = alignment_draws(config)
    metrics = alignment_metrics(
        queries.to(device), ref_p.to(device), ref_q.to(device), config.kernel, tau
    )
    metrics.update({"tau": tau, "dim": float(config.alignment.dim)})
    report(0, metrics)
    return {"metrics": metrics, "seed": config.seed, "device": str(device)}
