"""MLflow tracking pieces and the preflight: unreachable tracking/Ray addresses and impossible
resource requests fail with one line before anything is started or recorded."""

from __future__ import annotations

import time

import pytest
import ray
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from conftest import free_port
from orchestrator.errors import ClusterUnreachableError, TrackingUnreachableError
from orchestrator.plan import load_plan
from orchestrator.runner import experiment_dir_of, run_sweep
from orchestrator.tracking import ChildRun, ensure_experiment, flatten, preflight_tracking


def _assert_nothing_recorded(directory, plan) -> None:
    assert not (directory / "mlflow.db").exists()
    assert not experiment_dir_of(plan).exists()
    assert not ray.is_initialized()


def test_unreachable_tracking_server_fails_before_anything(write_plan, tmp_cwd):
    port = free_port()
    path = write_plan("no-mlflow", {"kernel": ["laplace"]}, tracking={"uri": f"http://127.0.0.1:{port}"})
    plan = load_plan(path)
    started = time.monotonic()
    with pytest.raises(TrackingUnreachableError) as info:
        run_sweep(plan, path)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "mlflow server" in message and "\n" not in message
    assert time.monotonic() - started < 15
    _assert_nothing_recorded(tmp_cwd, plan)


def test_unreachable_ray_address_fails_before_anything(write_plan, tmp_cwd):
    port = free_port()
    path = write_plan("no-ray", {"kernel": ["laplace"]}, cluster={"address": f"127.0.0.1:{port}"})
    plan = load_plan(path)
    with pytest.raises(ClusterUnreachableError) as info:
        run_sweep(plan, path)
    message = str(info.value)
    assert message.startswith(f"cluster.address=127.0.0.1:{port} is unreachable") and "\n" not in message
    _assert_nothing_recorded(tmp_cwd, plan)


@pytest.mark.slow
def test_more_gpus_than_any_node_fails_fast_with_numbers(write_plan, tmp_cwd):
    path = write_plan("too-many-gpus", {"kernel": ["laplace"]},
                      resources={"cpus_per_trial": 1, "gpus_per_trial": 2, "max_concurrent": 1})
    plan = load_plan(path)
    with pytest.raises(ClusterUnreachableError, match=r"resources.gpus_per_trial=2 but .* offers 0 GPUs"):
        run_sweep(plan, path)
    _assert_nothing_recorded(tmp_cwd, plan)


def test_sqlite_store_in_missing_directory_is_reported(tmp_path):
    with pytest.raises(TrackingUnreachableError, match="not writable|does not exist"):
        preflight_tracking(f"sqlite:///{tmp_path}/missing/mlflow.db", "sqlite:///.../mlflow.db")
    preflight_tracking(f"sqlite:///{tmp_path}/mlflow.db", "ok")  # writable: no error


def test_flatten_uses_dotted_keys_and_json_lists():
    assert flatten({"a": 1, "b": {"c": [0.02, 0.05], "d": {"e": None}}}) == {
        "a": "1", "b.c": "[0.02, 0.05]", "b.d.e": "None",
    }


def _store_with_parent(tmp_path, experiment: str) -> tuple[str, MlflowClient, str, str]:
    """A SQLite store with an experiment and a parent run: (uri, client, experiment id, parent run id)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, experiment)
    return uri, client, experiment_id, client.create_run(experiment_id, run_name="parent").info.run_id


def test_child_run_is_reused_and_never_logs_a_step_twice(tmp_path):
    uri, client, experiment_id, parent = _store_with_parent(tmp_path, "reuse")
    args = (uri, experiment_id, parent, "t0003", "kernel=gaussian", {"kernel": "gaussian"}, {"axis.kernel": "gaussian"})

    first = ChildRun(*args)
    assert first.log_metrics(10, {"swd": 1.0}) and first.log_metrics(20, {"swd": 0.9})
    first.fail("NonFiniteLossError: step 25: loss is not finite")
    run = client.get_run(first.run_id)
    assert run.info.status == "FAILED" and run.data.tags["last_step"] == "20"

    # A retry (same parent, same trial id) reopens the same run, RUNNING again, stale error removed.
    retry = ChildRun(*args)
    assert retry.run_id == first.run_id and retry.reused
    run = client.get_run(retry.run_id)
    assert run.info.status == "RUNNING" and "error" not in run.data.tags
    assert not retry.log_metrics(20, {"swd": 0.95})  # resumed from an older checkpoint: skipped
    assert retry.log_metrics(30, {"swd": 0.8})
    retry.finish()
    history = client.get_metric_history(retry.run_id, "swd")
    assert sorted((m.step, m.value) for m in history) == [(10, 1.0), (20, 0.9), (30, 0.8)]
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 1 and children[0].info.status == "FINISHED"


def test_reused_child_run_skips_a_step_whose_metrics_landed_without_its_tag(tmp_path):
    """MLflow's log_batch commits metrics, then tags: a trial killed between the two commits left the
    step-800 metrics with last_step still 400. The resumed trial must not log step 800 again."""
    uri, client, experiment_id, parent = _store_with_parent(tmp_path, "torn")
    args = (uri, experiment_id, parent, "t0001", "kernel=laplace", {"kernel": "laplace"}, {})
    first = ChildRun(*args)
    assert first.log_metrics(400, {"swd": 0.5, "loss": 1.0})
    # The torn write: step 800's metrics committed, the tag commit never happened; system metrics
    # (their own step count, here far ahead) are not evaluations.
    client.log_batch(first.run_id, metrics=[Metric("swd", 0.4, 0, 800), Metric("loss", 0.9, 0, 800),
                                            Metric("system/cpu_utilization_percentage", 50.0, 0, 5000)])
    assert client.get_run(first.run_id).data.tags["last_step"] == "400"

    resumed = ChildRun(*args)
    assert resumed.reused and resumed.last_logged_step == 800
    assert not resumed.log_metrics(800, {"swd": 0.4, "loss": 0.9})  # recomputed from the 400 checkpoint
    assert resumed.log_metrics(1200, {"swd": 0.3, "loss": 0.8})
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "swd")) == [400, 800, 1200]


def test_gpu_hours_stopper_sums_gpus_times_trial_seconds():
    from orchestrator.budget import GpuHoursStopper

    stopper = GpuHoursStopper(max_gpu_hours=1.0, gpus_per_trial=0.5)
    assert not stopper("a", {"time_total_s": 3600.0})  # 0.5 GPU-h
    assert not stopper("a", {"time_total_s": 5400.0})  # same trial later: 0.75 GPU-h, not 0.5 + 0.75
    assert stopper("b", {"time_total_s": 1800.0})  # 0.75 + 0.25 = 1.0 GPU-h: spent
    assert stopper.stop_all()


def test_finished_child_run_is_not_reopened(tmp_path):
    """A trial that already finished (Tune's state lagged behind a killed driver) keeps its run as is."""
    uri, client, experiment_id, parent = _store_with_parent(tmp_path, "finished")
    args = (uri, experiment_id, parent, "t0000", "baseline", {"kernel": "laplace"}, {})
    first = ChildRun(*args)
    first.log_metrics(10, {"swd": 0.7, "loss": 2.0})
    first.finish()
    end_time = client.get_run(first.run_id).info.end_time

    again = ChildRun(*args)
    assert again.run_id == first.run_id
    assert again.finished_metrics == {"swd": 0.7, "loss": 2.0} and again.last_logged_step == 10
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == end_time
