"""End to end: a shrunken quick plan through real Ray Tune (embedded local Ray) into real MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.errors import DriftsweepError
from orchestrator.plan import expand_trials, load_plan, resolve_tracking_uri
from orchestrator.runner import _record_unreached, run_sweep, sweep_status
from orchestrator.trainable import SweepContext
from orchestrator.tracking import flatten
from conftest import EVAL_STEPS, TINY_WORKLOAD

def children_of(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.mark.slow
def test_relative_store_and_paths_resolve_where_the_plan_was_loaded(tmp_cwd, write_plan):
    """Each trial runs in a Tune directory of its own: a relative sqlite URI in the plan must still be the
    driver's store (not a missing file in every trial's directory), and a relative path field must reach
    the trial absolute."""
    (tmp_cwd / "stores").mkdir()
    path = write_plan("relative", {"kernel": ["laplace", "gaussian"]}, tracking={"uri": "sqlite:///stores/m.db"},
                      workload={**TINY_WORKLOAD, "features": {"encoder_cache": "cache/enc.pt"}})
    summary = run_sweep(load_plan(path), path)
    client = MlflowClient(f"sqlite:///{tmp_cwd}/stores/m.db")
    experiment = client.get_experiment_by_name("relative")
    children = children_of(client, experiment.experiment_id, summary.parent_run_id)
    assert summary.n_completed == 2 and len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        assert child.data.params["features.encoder_cache"] == str(tmp_cwd / "cache" / "enc.pt")


@pytest.mark.slow
def test_quick_plan_end_to_end_embedded_default(tmp_cwd, write_plan):
    """1 parent + 4 nested children with the trial's params/tags and per-step metrics."""
    path = write_plan("quick-e2e", {"kernel": ["laplace", "gaussian"], "anneal_rate": [0.0, 3.0]})
    plan = load_plan(path)
    summary = run_sweep(plan, path)

    uri = resolve_tracking_uri(plan)
    assert uri == f"sqlite:///{tmp_cwd / 'mlflow.db'}"  # the embedded default store
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quick-e2e")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 5
    parent = parents[0]
    assert parent.info.run_id == summary.parent_run_id and parent.info.status == "FINISHED"
    assert parent.info.run_name == "quick-e2e"
    assert parent.data.params["plan.seed"] == "7"
    assert parent.data.params["plan.design.type"] == "grid"
    assert len(parent.data.tags["driftsweep.plan_hash"]) == 64
    for package in ("torch", "ray", "optuna", "mlflow", "driftsweep"):
        assert parent.data.tags[f"driftsweep.version.{package}"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"quick-e2e.yaml", "trials.json"} <= artifacts
    trials_json = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json")).read_text())
    assert [t["trial_id"] for t in trials_json] == [t.trial_id for t in expand_trials(plan)]

    children = children_of(client, experiment.experiment_id, parent.info.run_id)
    assert len(children) == 4
    expected = {t.trial_id: t for t in expand_trials(plan)}
    final_swd = {}
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        trial = expected[child.data.tags["trial_id"]]
        assert child.info.run_name == trial.name
        # Full resolved config as dotted params, plus the axes under stable names.
        for key, value in flatten(trial.config.model_dump()).items():
            assert child.data.params[key] == value, key
        assert child.data.params["axis.kernel"] == trial.params["kernel"]
        assert child.data.tags["axis.anneal_rate"] == str(trial.params["anneal_rate"])
        assert child.data.tags["seed"] == str(trial.seed) and child.data.tags["replicate"] == "0"
        assert child.data.tags["fid_extractor"] == "raw"
        history = client.get_metric_history(child.info.run_id, "swd")
        assert sorted(m.step for m in history) == EVAL_STEPS
        for name in ("loss", "mmd", "fd", "samples_per_s", "drift_rms/k0", "tau/k2"):
            assert len(client.get_metric_history(child.info.run_id, name)) == len(EVAL_STEPS), name
        final_swd[child.info.run_id] = max(history, key=lambda m: m.step).value

    best_run = min(final_swd, key=final_swd.get)
    assert summary.n_completed == 4 and summary.n_failed == 0 and summary.n_pruned == 0
    assert summary.best["run_id"] == best_run
    assert summary.best["value"] == pytest.approx(final_swd[best_run])
    assert parent.data.tags["best_run_id"] == best_run

    # The same plan again: refused with a hint to resume, nothing duplicated.
    with pytest.raises(DriftsweepError, match="already exists.*resume"):
        run_sweep(plan, path)
    # resume on a finished sweep: nothing done, and it says so.
    again = run_sweep(plan, path, resume=True)
    assert "already finished" in again.message and again.n_completed == 4
    assert len(client.search_runs([experiment.experiment_id])) == 5
    status = sweep_status(plan)
    assert (status.n_completed, status.n_running, status.parent_run_id) == (4, 0, parent.info.run_id)


@pytest.mark.slow
def test_failing_trial_recorded_failed_others_finish(write_plan):
    """A trial whose loss turns non-finite is retried, then FAILED with its error; one child run only."""
    path = write_plan("nan-trial", {"optim.lr": [1e-3, 1e30]},
                      failure={"max_retries": 1}, workload={**TINY_WORKLOAD, "optim": {"grad_clip": None}})
    plan = load_plan(path)
    summary = run_sweep(plan, path)
    client = MlflowClient(resolve_tracking_uri(plan))
    experiment = client.get_experiment_by_name("nan-trial")
    children = children_of(client, experiment.experiment_id, summary.parent_run_id)
    assert len(children) == 2  # the retry reused its run
    by_lr = {c.data.params["axis.optim.lr"]: c for c in children}
    assert by_lr["0.001"].info.status == "FINISHED"
    failed = by_lr["1e+30"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"].startswith("NonFiniteLossError")
    assert "last_step" in failed.data.tags
    assert (summary.n_completed, summary.n_failed) == (1, 1)


@pytest.mark.slow
def test_trial_that_fails_before_reaching_mlflow_is_recorded_failed(write_plan):
    """An optuna-sampled combination the workload rejects fails in the trial process before its child
    run exists: the driver records it FAILED with the reason, and the sweep counts it (exit 3)."""
    path = write_plan("unreached", {"total_steps": [20], "eval_every_steps": [30]}, failure={"max_retries": 0},
                      design={"type": "optuna", "sampler": "random", "n_trials": 2, "seed": 1})
    plan = load_plan(path)  # each level alone is valid against the base workload: validation passes
    summary = run_sweep(plan, path)
    assert summary.n_failed == 2 and summary.n_completed == 0
    client = MlflowClient(resolve_tracking_uri(plan))
    experiment = client.get_experiment_by_name("unreached")
    children = children_of(client, experiment.experiment_id, summary.parent_run_id)
    assert sorted((c.data.tags["trial_id"], c.info.run_name) for c in children) == [
        ("t0000", "sampled-0000"), ("t0001", "sampled-0001")]
    for child in children:
        assert child.info.status == "FAILED"
        error = child.data.tags["error"]
        assert error.startswith("trial failed before it reached MLflow:") and "exceeds total_steps=20" in error
        assert child.data.params["axis.eval_every_steps"] == "30" and child.data.tags["ray_trial_id"]


def test_record_unreached_uses_the_planned_trial(tmp_cwd, write_plan):
    """Grid trials in ERROR with no run get the planned trial's run (name, params, tags); a trial that has
    a run, or did not fail, is left alone. Tune's trials are stood in by objects with the same fields."""
    path = write_plan("unreached-grid", {"kernel": ["laplace", "gaussian"]})
    plan = load_plan(path)
    planned = expand_trials(plan)
    uri = resolve_tracking_uri(plan)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("unreached-grid")
    parent = client.create_run(experiment_id, run_name="parent").info.run_id
    context = SweepContext(plan, tuple(planned), uri, experiment_id, parent)
    error_file = tmp_cwd / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  ...\nOSError: [Errno 28] No space left on device\n")
    tune_trials = [
        SimpleNamespace(status="ERROR", trial_id="ray_a", config={"trial_index": 1}, error_file=str(error_file)),
        SimpleNamespace(status="TERMINATED", trial_id="ray_b", config={"trial_index": 0}, error_file=None),
    ]
    _record_unreached(context, tune_trials, client)
    _record_unreached(context, tune_trials, client)  # again (a resumed sweep): nothing new
    (run,) = children_of(client, experiment_id, parent)
    assert run.info.status == "FAILED" and run.info.run_name == planned[1].name
    assert run.data.tags["trial_id"] == "t0001" and run.data.tags["ray_trial_id"] == "ray_a"
    assert run.data.tags["error"] == ("trial failed before it reached MLflow: "
                                      "OSError: [Errno 28] No space left on device")
    assert run.data.params["kernel"] == "gaussian" and run.data.params["axis.kernel"] == "gaussian"


@pytest.mark.slow
def test_optuna_design_runs_sampled_trials(write_plan):
    """design optuna: OptunaSearch proposes n_trials; each is a child run named by the plan."""
    path = write_plan("optuna-e2e", {"kernel": ["laplace", "gaussian"], "anneal_rate": {"low": 0.0, "high": 5.0}},
                      design={"type": "optuna", "sampler": "random", "n_trials": 3, "seed": 1})
    plan = load_plan(path)
    summary = run_sweep(plan, path)
    client = MlflowClient(resolve_tracking_uri(plan))
    experiment = client.get_experiment_by_name("optuna-e2e")
    children = children_of(client, experiment.experiment_id, summary.parent_run_id)
    assert len(children) == 3 and summary.n_completed == 3
    assert sorted(c.data.tags["trial_id"] for c in children) == ["t0000", "t0001", "t0002"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["axis.kernel"] in ("laplace", "gaussian")
        assert 0.0 <= float(child.data.params["axis.anneal_rate"]) <= 5.0
        assert child.data.params["anneal_rate"] == child.data.params["axis.anneal_rate"]
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "swd")) == EVAL_STEPS


@pytest.mark.slow
def test_wall_time_budget_stops_cleanly_and_records_why(write_plan):
    path = write_plan("budget-stop", {"optim.lr": [1e-3, 2e-3, 3e-3, 4e-3]},
                      budget={"max_wall_time_s": 15}, resources={"cpus_per_trial": 1, "max_concurrent": 1},
                      workload={**TINY_WORKLOAD, "total_steps": 3000, "eval_every_steps": 500})
    plan = load_plan(path)
    summary = run_sweep(plan, path)
    # 4 trials x 3000 steps one at a time take well over 15 s on any machine.
    assert summary.stopped_reason == "budget.max_wall_time_s=15 reached"
    client = MlflowClient(resolve_tracking_uri(plan))
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["stopped_reason"] == summary.stopped_reason
    children = children_of(client, parent.info.experiment_id, parent.info.run_id)
    assert summary.n_completed < 4 and all(c.info.status != "RUNNING" for c in children)
    stopped = [c for c in children if c.info.status == "KILLED"]
    assert stopped and all(c.data.tags.get("stopped_reason") == summary.stopped_reason for c in stopped)
    assert all("pruned" not in c.data.tags for c in stopped)


@pytest.mark.slow
def test_driver_killed_then_resume_reuses_runs_and_skips_finished_trials(write_plan, tmp_cwd):
    """SIGKILL the driver mid-sweep; `resume` finishes it with the same parent and child runs."""
    path = write_plan("resume-kill", {"kernel": ["laplace", "gaussian"], "anneal_rate": [0.0, 3.0]},
                      resources={"cpus_per_trial": 1, "max_concurrent": 1},
                      workload={**TINY_WORKLOAD, "total_steps": 2000, "eval_every_steps": 400})
    plan = load_plan(path)
    script = ("import sys; from orchestrator.plan import load_plan; from orchestrator.runner import run_sweep; "
              "run_sweep(load_plan(sys.argv[1]), sys.argv[1])")
    # Own session: the driver and the local Ray it starts are killed together, as by a node loss.
    driver = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=tmp_cwd, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(resolve_tracking_uri(plan))
    deadline = time.monotonic() + 300
    before = {}
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            experiment = client.get_experiment_by_name("resume-kill") if (tmp_cwd / "mlflow.db").exists() else None
            if experiment is None:
                continue
            runs = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
            finished = [r for r in runs if r.info.status == "FINISHED"]
            running = [r for r in runs if r.info.status == "RUNNING" and int(r.data.tags.get("last_step", 0)) >= 400]
            if finished and running:
                before = {r.data.tags["trial_id"]: r for r in runs}
                break
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert before, "the sweep never reached the state to interrupt"
    experiment = client.get_experiment_by_name("resume-kill")

    summary = run_sweep(plan, path, resume=True)
    runs = client.search_runs([experiment.experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    children = children_of(client, experiment.experiment_id, summary.parent_run_id)
    assert len(children) == 4 and summary.n_completed == 4
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "swd")]
        assert sorted(steps) == [400, 800, 1200, 1600, 2000]  # each step once: resumed, not re-logged
        old = before.get(child.data.tags["trial_id"])
        if old is not None:
            assert old.info.run_id == child.info.run_id  # reused, not duplicated
            if old.info.status == "FINISHED":
                assert old.info.end_time == child.info.end_time  # not re-run
