"""Radial kernels k(x, y) = kappa(||x - y||; tau), chosen by name from the `KERNELS` registry.

Each kernel gives, in closed form (source: paper §4.2 Eq. 9-10, DESIGN.md "kernel" axis):
- `log_k(r, tau)`: log kappa(r; tau), the logit of the affinities;
- `dlog_k(r, tau)`: d/dr log kappa(r; tau), the radial derivative;
- `score_weight(r, tau)` = -dlog_k(r, tau) / r, so that grad_x log k(x, y) = score_weight(r) (y - x)
  (paper Eq. 10: the score is a local average of displacements reweighted by this factor);
- `preconditioner(r, tau)` = 1 / score_weight(r, tau). Theorem 2 writes the mean shift as
  E_w[preconditioner] * score + residual: tau^2 for Gaussian (Theorem 1), tau * r for Laplace (Eq. 12).

"sinkhorn" is a drift option, not a new kernel: it keeps the Laplace cost (so its log_k is Laplace's)
and replaces the softmax affinities of the drift by an entropic optimal-transport plan
(drifting-secretly-score-matching abstract, "Sinkhorn divergence drift"; see `workloads.drift`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

RadialFn = Callable[[Tensor, float], Tensor]


@dataclass(frozen=True)
class Kernel:
    """A radial kernel kappa(r; tau) with closed-form log, radial derivative and score weight."""

    name: str
    log_k: RadialFn
    dlog_k: RadialFn
    score_weight: RadialFn
    preconditioner: RadialFn
    sinkhorn_plan: bool = False


def _laplace_log(r: Tensor, tau: float) -> Tensor:
    return r * (-1.0 / tau)


def _laplace_dlog(r: Tensor, tau: float) -> Tensor:
    return torch.full_like(r, -1.0 / tau)


def _laplace_weight(r: Tensor, tau: float) -> Tensor:
    # grad_x ||x - y|| is undefined at r = 0; clamp to the dtype's eps (a measure-zero event).
    return 1.0 / (tau * r.clamp_min(torch.finfo(r.dtype).eps))


def _laplace_precond(r: Tensor, tau: float) -> Tensor:
    return tau * r


def _gaussian_log(r: Tensor, tau: float) -> Tensor:
    return r.square() * (-0.5 / tau**2)


def _gaussian_dlog(r: Tensor, tau: float) -> Tensor:
    return r * (-1.0 / tau**2)


def _gaussian_weight(r: Tensor, tau: float) -> Tensor:
    return torch.full_like(r, 1.0 / tau**2)


def _gaussian_precond(r: Tensor, tau: float) -> Tensor:
    return torch.full_like(r, tau**2)


def _cauchy_log(r: Tensor, tau: float) -> Tensor:
    return -torch.log1p(r.square() / tau**2)


def _cauchy_dlog(r: Tensor, tau: float) -> Tensor:
    return -2.0 * r / (tau**2 + r.square())


def _cauchy_weight(r: Tensor, tau: float) -> Tensor:
    return 2.0 / (tau**2 + r.square())


def _cauchy_precond(r: Tensor, tau: float) -> Tensor:
    return 0.5 * (tau**2 + r.square())


def _imq_log(r: Tensor, tau: float) -> Tensor:
    return -0.5 * torch.log1p(r.square() / tau**2)


def _imq_dlog(r: Tensor, tau: float) -> Tensor:
    return -r / (tau**2 + r.square())


def _imq_weight(r: Tensor, tau: float) -> Tensor:
    return 1.0 / (tau**2 + r.square())


def _imq_precond(r: Tensor, tau: float) -> Tensor:
    return tau**2 + r.square()


_LAPLACE_FNS = (_laplace_log, _laplace_dlog, _laplace_weight, _laplace_precond)

KERNELS: dict[str, Kernel] = {
    # exp(-r / tau)
    "laplace": Kernel("laplace", *_LAPLACE_FNS),
    # exp(-r^2 / (2 tau^2)): tau is the standard deviation, so Gaussian and Laplace temperatures
    # are both lengths in the same (mean-distance-normalized) unit.
    "gaussian": Kernel("gaussian", _gaussian_log, _gaussian_dlog, _gaussian_weight, _gaussian_precond),
    # 1 / (1 + r^2 / tau^2)
    "cauchy": Kernel("cauchy", _cauchy_log, _cauchy_dlog, _cauchy_weight, _cauchy_precond),
    # (1 + r^2 / tau^2)^(-1/2)
    "imq": Kernel("imq", _imq_log, _imq_dlog, _imq_weight, _imq_precond),
    # Laplace cost exp(-r / tau), affinities replaced by an entropic OT plan in the drift.
    "sinkhorn": Kernel("sinkhorn", *_LAPLACE_FNS, sinkhorn_plan=True),
}


def get_kernel(name: str | Kernel) -> Kernel:
    """Look a kernel up by registry name.

    Args:
        name: a key of `KERNELS` (or a `Kernel`, returned unchanged).

    Returns:
        The registered `Kernel`.

    Raises:
        ValueError: the name is not registered (the message lists the allowed names).
    """
    if isinstance(name, Kernel):
        return name
    if name not in KERNELS:
        allowed = ", ".join(sorted(KERNELS))
        raise ValueError(f"kernel={name!r} is not registered; allowed: {allowed}")
    return KERNELS[name]


def check_tau(tau: float, field: str = "tau") -> float:
    """Validate a kernel temperature.

    Args:
        tau: the temperature (a length, > 0).
        field: the name used in the error message.

    Returns:
        tau as a float.

    Raises:
        ValueError: tau is not a finite positive number.
    """
    tau = float(tau)
    if not (tau > 0 and tau != float("inf")):
        raise ValueError(f"{field}={tau} must be a finite number > 0")
    return tau
