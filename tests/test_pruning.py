"""The Optuna pruning bridge inside Ray Tune: the trials that should be pruned are stopped, and the
Optuna study records them PRUNED (not COMPLETE).

The expected decisions are computed independently of the bridge from MedianPruner's documented rule
(optuna.pruners.MedianPruner: after n_startup_trials COMPLETE trials, prune a trial whose best
intermediate value is worse than the median of the COMPLETE trials' values at the same step).
"""

from __future__ import annotations

import sys

import numpy as np
import optuna
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from orchestrator.plan import load_plan, resolve_tracking_uri
from orchestrator.pruning import OptunaPruningScheduler, PrunableOptunaSearch, build_optuna_pruner
from orchestrator.runner import experiment_dir_of, run_sweep
from conftest import TINY_WORKLOAD

FAKE_STEPS = 5
METRIC = "objective"


def fake_constant_curve_trainable(config: dict) -> None:
    """FAKE trainable (no training): reports objective = config["level"] at steps 1..FAKE_STEPS,
    so every trial's curve is flat and the median rule's decision is certain."""
    for step in range(1, FAKE_STEPS + 1):
        tune.report({METRIC: float(config["level"]), "step": step})


def expected_pruned(levels_in_run_order: list[float], n_startup: int) -> list[bool]:
    """Median rule for flat curves and minimization, trials run one at a time."""
    completed, pruned = [], []
    for level in levels_in_run_order:
        prune = len(completed) >= n_startup and level > float(np.median(completed))
        pruned.append(prune)
        if not prune:
            completed.append(level)
    return pruned


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray for the fake-trainable tests of this module; yields a storage directory."""
    # Ray workers cannot import this test module: ship the fake trainable by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield tmp_path_factory.mktemp("tune")
    ray.shutdown()


def _fit(local_ray, name, param_space, scheduler, search_alg=None, num_samples=1):
    tuner = tune.Tuner(
        fake_constant_curve_trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=num_samples, max_concurrent_trials=1, scheduler=scheduler,
                                    search_alg=search_alg),
        run_config=tune.RunConfig(name=name, storage_path=str(local_ray), verbose=0),
    )
    results = tuner.fit()
    # One trial at a time, so Tune's creation index (experiment_tag "3_level=2.0") is the run order.
    return sorted(results, key=lambda r: int(r.metrics["experiment_tag"].split("_")[0]))


@pytest.mark.slow
def test_median_bridge_grid_prunes_the_worse_trials(local_ray):
    levels = [1.0, 2.0, 10.0, 1.5, 20.0]
    scheduler = OptunaPruningScheduler(build_optuna_pruner("median", {"n_startup_trials": 2}), METRIC, "min")
    results = _fit(local_ray, "grid", {"level": tune.grid_search(levels)}, scheduler)
    run_levels = [r.config["level"] for r in results]
    want = expected_pruned(run_levels, n_startup=2)
    assert any(want) and not all(want)  # the case exercises both outcomes
    assert [r.metrics["step"] < FAKE_STEPS for r in results] == want
    states = [t.state for t in scheduler.study.trials]
    assert states == [TrialState.PRUNED if p else TrialState.COMPLETE for p in want]
    assert len(scheduler.pruned_trial_ids) == sum(want)


@pytest.mark.slow
def test_median_bridge_optuna_design_records_pruned_in_searchers_study(local_ray):
    levels = [1.0, 2.0, 3.0, 8.0, 9.0]
    searcher = PrunableOptunaSearch(
        build_optuna_pruner("median", {"n_startup_trials": 2}),
        space={"level": CategoricalDistribution(levels)}, metric=METRIC, mode="min",
        sampler=optuna.samplers.RandomSampler(seed=3),
    )
    scheduler = OptunaPruningScheduler(searcher.study.pruner, METRIC, "min", searcher=searcher)
    results = _fit(local_ray, "optuna", {}, scheduler, ConcurrencyLimiter(searcher, max_concurrent=1), num_samples=8)
    want = expected_pruned([r.config["level"] for r in results], n_startup=2)
    assert any(want)
    assert [r.metrics["step"] < FAKE_STEPS for r in results] == want
    # The sampler's own study: pruned trials are PRUNED (with their intermediate value), others COMPLETE.
    study_trials = sorted(searcher.study.trials, key=lambda t: t.number)
    assert [t.state for t in study_trials] == [TrialState.PRUNED if p else TrialState.COMPLETE for p in want]
    assert all(t.intermediate_values for t in study_trials)


@pytest.mark.slow
def test_real_workload_sweep_prunes_the_stalled_trial(tmp_cwd):
    """optim.lr=1e-7 barely moves the generator: its SWD stays far above the other two trials'."""
    plan_dict = {
        "name": "prune-real", "seed": 3, "workload": dict(TINY_WORKLOAD),
        "axes": {"optim.lr": [1e-2, 3e-3, 1e-7]},
        "objective": {"metric": "swd", "mode": "min"},
        "pruning": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 10},
        "resources": {"cpus_per_trial": 1, "max_concurrent": 1},
    }
    path = tmp_cwd / "prune-real.yaml"
    path.write_text(yaml.safe_dump(plan_dict))
    plan = load_plan(path)
    summary = run_sweep(plan, path)

    client = MlflowClient(resolve_tracking_uri(plan))
    children = client.search_runs(
        [client.get_experiment_by_name("prune-real").experiment_id],
        f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'",
    )
    by_lr = {c.data.params["axis.optim.lr"]: c for c in children}
    stalled = by_lr["1e-07"]
    assert stalled.info.status == "KILLED" and stalled.data.tags["pruned"] == "true"
    assert int(stalled.data.tags["last_step"]) < TINY_WORKLOAD["total_steps"]
    for lr in ("0.01", "0.003"):
        assert by_lr[lr].info.status == "FINISHED" and "pruned" not in by_lr[lr].data.tags
    assert (summary.n_completed, summary.n_pruned) == (2, 1)
    # The bridge's study (journal next to Tune's state) shows the stalled trial PRUNED.
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(experiment_dir_of(plan) / "pruning-study.log"))
    )
    study = optuna.load_study(study_name="driftsweep-pruning", storage=storage)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "PRUNED"]


def test_asha_plan_uses_rays_scheduler_alone(tmp_path):
    """pruning.type asha: Ray's ASHAScheduler on the workload step decides; no Optuna bridge."""
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.plan import parse_plan
    from orchestrator.runner import _search_and_scheduler

    plan = parse_plan(yaml.safe_dump({
        "name": "asha", "workload": dict(TINY_WORKLOAD), "axes": {"kernel": ["laplace", "gaussian"]},
        "pruning": {"type": "asha", "grace_period": 10, "reduction_factor": 2},
    }))
    _, _, _, scheduler, bridge = _search_and_scheduler(plan, [object(), object()], tmp_path)
    assert isinstance(scheduler, ASHAScheduler) and bridge is None
    assert scheduler._time_attr == "step" and scheduler._max_t == TINY_WORKLOAD["total_steps"]
