"""driftsweep workloads: kernels, drift fields, generators, data, feature maps, metrics, training.

Pure torch: this package never imports ray or mlflow, so a workload runs alone
(`python -m workloads CONFIG.yaml key=value ...`) on CPU or GPU.
"""

from workloads.config import WorkloadConfig
from workloads.drift import anneal_temperatures, drift_field, kernel_score, mean_shift
from workloads.train import NonFiniteLossError, run_workload, train

__all__ = [
    "WorkloadConfig",
    "anneal_temperatures",
    "drift_field",
    "kernel_score",
    "mean_shift",
    "NonFiniteLossError",
    "run_workload",
    "train",
]
