"""A whole sweep from a multi-node Ray cluster (simulated on this machine) into a real
`mlflow server` on 127.0.0.1 with a PostgreSQL backend store.

The GPUs are a stand-in: each worker node DECLARES num_gpus=1 (there is no CUDA here), so the
per-trial GPU request (gpus_per_trial=1) is scheduled by Ray for real, while the workload itself
falls back to CPU (device auto). The head declares no GPU, so every trial must run on a worker.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from conftest import EVAL_STEPS
from orchestrator.plan import load_plan
from orchestrator.runner import run_sweep

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture
def ray_cluster():
    """Head (1 CPU, 0 GPU) + 2 worker nodes (1 CPU, 1 declared GPU each), all on loopback."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, {node.node_id for node in workers}
    cluster.shutdown()


def test_sweep_from_multinode_cluster_to_postgres_mlflow_server(ray_cluster, mlflow_server, write_plan, tmp_cwd):
    cluster, worker_ids = ray_cluster
    path = write_plan(
        "multinode-pg", {"kernel": ["laplace", "gaussian"], "anneal_rate": [0.0, 3.0]},
        resources={"cpus_per_trial": 1, "gpus_per_trial": 1, "max_concurrent": 2},
        tracking={"uri": mlflow_server},
        cluster={"address": cluster.address, "storage_path": str(tmp_cwd / "tune")},
    )
    plan = load_plan(path)
    summary = run_sweep(plan, path)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("multinode-pg")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == summary.parent_run_id
    assert {a.path for a in client.list_artifacts(summary.parent_run_id)} >= {"multinode-pg.yaml", "trials.json"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary.parent_run_id]
    assert len(children) == 4 and len(runs) == 5
    nodes = set()
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "swd")) == EVAL_STEPS
        nodes.add(child.data.tags["node_id"])
    # Trials asked for a GPU: only the two workers declare one, and both were used.
    assert nodes == worker_ids
    assert summary.n_completed == 4
