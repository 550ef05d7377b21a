"""End to end: a shrunken quick plan through real Ray Tune (embedded local Ray) into real MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.errors import DriftsweepError
from orchestrator.plan import expand_trials, load_plan, resolve_tracking_uri
from orchestrator.runner import run_sweep, sweep_status
from orchestrator.tracking import flatten
from conftest import EVAL_STEPS, TINY_WORKLOAD

def children_of(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


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
