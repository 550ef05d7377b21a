"""Errors the CLI turns into one-line messages (no traceback) and an exit code."""

from __future__ import annotations

# Exit codes, documented in README: 0 ok; 1 unexpected internal error; 2 bad input (plan, address,
# arguments); 3 the sweep ran but some trials failed; 4 a budget stopped the sweep early.
EXIT_BAD_INPUT = 2
EXIT_TRIALS_FAILED = 3
EXIT_BUDGET_STOPPED = 4


class DriftsweepError(Exception):
    """A user-facing error. Its message is one line naming the field/address and the fix."""

    exit_code = EXIT_BAD_INPUT


class PlanError(DriftsweepError):
    """The plan file is malformed or invalid."""


class TrackingUnreachableError(DriftsweepError):
    """The MLflow tracking URI cannot be reached."""


class ClusterUnreachableError(DriftsweepError):
    """The Ray address cannot be reached, or the cluster lacks the requested resources."""


class K8sError(DriftsweepError):
    """A Kubernetes API call failed (no cluster, no KubeRay CRDs, forbidden...)."""
