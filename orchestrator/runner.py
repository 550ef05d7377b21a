"""Sweep entry points: `run_sweep` (run or resume a plan through Ray Tune) and `sweep_status`.

Order of work in `run_sweep` (nothing is recorded before the preflight passes):
1. preflight: tracking store reachable, Ray address reachable (token auth respected), the
   per-trial resources exist on some node;
2. the MLflow parent run (created, or reused on resume) and the sweep state file
   `<storage>/<plan name>/driftsweep.json` (parent run id, plan hash, finished flag);
   then the shared caches the trials need (the digits encoder) are built once, here, with a
   progress bar, instead of by every trial at once;
3. the Tuner (new, or `Tuner.restore(..., resume_errored=True)`), fit;
4. reconcile MLflow with Tune's final trial states (no child left RUNNING), tag the best child.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import Callback
from ray.tune.experiment import Trial as TuneTrial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from orchestrator.budget import GpuHoursStopper
from orchestrator.errors import ClusterUnreachableError, DriftsweepError, TrackingUnreachableError
from orchestrator.plan import (
    expand_trials,
    mask_uri,
    optuna_space,
    resolve_experiment,
    resolve_ray_address,
    resolve_storage_path,
    resolve_tracking_uri,
    trial_id_for,
)
from orchestrator.pruning import (
    OPTUNA_PRUNERS,
    STEP_KEY,
    OptunaPruningScheduler,
    PrunableOptunaSearch,
    build_optuna_pruner,
)
from orchestrator.tracking import (
    PLAN_HASH_TAG,
    ChildRun,
    RetryingClient,
    child_runs,
    create_parent_run,
    end_run,
    ensure_experiment,
    flatten,
    git_commit,
    is_finite,
    package_versions,
    preflight_tracking,
    ui_hint,
)
from orchestrator.trainable import (
    TRIAL_INDEX_KEY,
    SweepContext,
    resolve_trial,
    run_trial,
    sampled_trial_index,
    sampled_trial_name,
    trial_params_and_tags,
)

STATE_FILE = "driftsweep.json"
RAY_CONNECT_TIMEOUT_S = 5.0
PROGRESS_REFRESH_S = 1.0
# Tune keeps this many trial checkpoints (each a copy of the workload's latest.pt). With a limit set,
# Tune snapshots its experiment state every CHECKPOINTS_KEPT checkpoints so the state always points at
# a checkpoint that still exists (what resume needs); its "excessive sync" warning about it is muted.
CHECKPOINTS_KEPT = 2
SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "random": optuna.samplers.RandomSampler,
}
# What the driver-side callback needs but must not hold: the console of the progress display and the
# tracking URI (which may carry credentials). Set by run_sweep for the length of one fit; the Tune
# callback is pickled into Tune's experiment state on disk (tuner.pkl), so it keeps neither.
_ACTIVE: dict[str, Any] = {"console": None, "tracking_uri": None}


@dataclass
class SweepSummary:
    """What a sweep did (or is doing): counts, the best trial, where to look.

    Attributes:
        n_total: trials the sweep will run (grid/ofat: the expansion; optuna: design.n_trials).
        n_completed: trials that ran to the end.
        n_pruned: trials stopped early by the pruner/scheduler.
        n_failed: trials that raised or produced NaN (after retries).
        n_running: trials still running (status of a live sweep).
        best: {trial, params, metric, value, run_id} of the best completed trial, or None.
        parent_run_id: the MLflow parent run.
        tracking_uri: the tracking URI, credentials masked.
        experiment_name: the MLflow experiment.
        stopped_reason: why a budget stopped the sweep early, or None.
        message: a one-line note for the user (e.g. "already finished: nothing to resume").
        ui: where to look at the runs (server address, or the `mlflow ui` command for a local store).
        extras: measurements of this call, e.g. {"elapsed_s": wall seconds of the Tune fit}.
    """

    n_total: int
    n_completed: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    n_running: int = 0
    best: dict | None = None
    parent_run_id: str | None = None
    tracking_uri: str = ""
    experiment_name: str = ""
    stopped_reason: str | None = None
    message: str | None = None
    ui: str = ""
    extras: dict = field(default_factory=dict)


# ---------------------------------------------------------------- plan-derived settings


def experiment_dir_of(plan) -> Path:
    """Where Tune keeps this sweep's state: <storage_path>/<plan name> (absolute)."""
    return Path(resolve_storage_path(plan)).expanduser().resolve() / plan.name


def plan_hash(plan) -> str:
    """sha256 of the validated plan (JSON, sorted keys): identifies the sweep's content."""
    text = json.dumps(plan.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_state(experiment_dir: Path) -> dict | None:
    path = experiment_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _write_state(experiment_dir: Path, state: dict) -> None:
    experiment_dir.mkdir(parents=True, exist_ok=True)
    tmp = experiment_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, experiment_dir / STATE_FILE)


# ---------------------------------------------------------------- Ray connection and preflight


def _check_tcp(address: str, what: str) -> None:
    """Bounded-time TCP check of host:port so an unreachable address fails fast, not after retries."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachableError(
            f"{what}={address!r} is not an address; use 'auto', 'host:port' or 'ray://host:port'"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ClusterUnreachableError(
            f"{what}={address} is unreachable ({exc.strerror or exc}); start the cluster "
            "(`ray start --head`) or fix the address, or leave cluster.address empty for a local Ray"
        ) from None


def connect_ray(plan) -> bool:
    """Connect to the plan's Ray cluster, or start an embedded local one.

    cluster.address (else $RAY_ADDRESS) names an existing cluster ('auto', 'host:port',
    'ray://host:port'). Ray 2.60 token authentication stays on: the token is read by Ray from
    $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token` on the head).

    Returns:
        True when this call started Ray (the caller shuts it down), False when already connected.

    Raises:
        ClusterUnreachableError: the address does not answer, or authentication failed.
    """
    if ray.is_initialized():
        return False
    address = resolve_ray_address(plan)
    what = "cluster.address" if plan.cluster.address else "RAY_ADDRESS"
    if not address:
        # Embedded local Ray: worker output goes to the session logs, not over the progress display.
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        return True
    if address != "auto":
        _check_tcp(address, what)
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, AuthenticationError, RuntimeError...
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token (`ray get-auth-token` on the head)"
            if "auth" in message.lower() or "token" in message.lower()
            else "start the cluster (`ray start --head`) or fix the address"
        )
        raise ClusterUnreachableError(f"{what}={address}: cannot connect ({message}); {hint}") from None
    return True


def check_resources(plan) -> None:
    """Fail fast when no alive node offers the per-trial CPUs/GPUs (a trial would wait forever).

    Raises:
        ClusterUnreachableError: with the requested and the largest offered numbers.
    """
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    for key, name, unit in (("GPU", "gpus_per_trial", "GPUs"), ("CPU", "cpus_per_trial", "CPUs")):
        requested = getattr(plan.resources, name)
        largest = max((node["Resources"].get(key, 0.0) for node in nodes), default=0.0)
        if requested and requested > largest:
            raise ClusterUnreachableError(
                f"resources.{name}={requested:g} but the largest of {len(nodes)} Ray node(s) offers "
                f"{largest:g} {unit}; lower resources.{name} or add nodes with more {unit}"
            )


# ---------------------------------------------------------------- search, scheduler, stoppers


def _pruning_settings(plan) -> tuple[str, dict]:
    settings = plan.pruning.model_dump(exclude={"type"}, exclude_none=True)
    return plan.pruning.type, settings


def _sampler(plan) -> optuna.samplers.BaseSampler:
    seed = plan.design.seed if plan.design.seed is not None else plan.seed
    return SAMPLERS[plan.design.sampler](seed=seed)


def _search_and_scheduler(plan, trials: list, experiment_dir: Path):
    """(param_space, num_samples, search_alg, scheduler, pruning scheduler or None) for the design."""
    metric, mode = plan.objective.metric, plan.objective.direction
    kind, settings = _pruning_settings(plan)
    optuna_pruner = build_optuna_pruner(kind, settings) if kind in OPTUNA_PRUNERS else None
    pruning_scheduler = None
    if plan.design.type == "optuna":
        search_kwargs = dict(space=optuna_space(plan), metric=metric, mode=mode, sampler=_sampler(plan))
        if optuna_pruner is not None:
            searcher = PrunableOptunaSearch(optuna_pruner, **search_kwargs)
            pruning_scheduler = OptunaPruningScheduler(optuna_pruner, metric, mode, searcher=searcher)
        else:
            searcher = OptunaSearch(**search_kwargs)
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=plan.resources.max_concurrent)
        param_space: dict = {}
        num_samples = plan.design.n_trials
    else:
        search_alg = None
        param_space = {TRIAL_INDEX_KEY: tune.grid_search(list(range(len(trials))))}
        num_samples = 1
        if optuna_pruner is not None:
            pruning_scheduler = OptunaPruningScheduler(
                optuna_pruner, metric, mode, journal_path=experiment_dir / "pruning-study.log"
            )
    if kind == "asha":
        settings.setdefault("max_t", plan.workload.total_steps)
        scheduler = ASHAScheduler(time_attr=STEP_KEY, metric=metric, mode=mode, **settings)
    else:
        scheduler = pruning_scheduler
    return param_space, num_samples, search_alg, scheduler, pruning_scheduler


def _planned_trials(plan) -> list:
    """grid/ofat: the expanded trial list; optuna: [] (the sampler proposes them).

    budget.max_trials needs no cap here: the plan is rejected when the design exceeds it.
    """
    return [] if plan.design.type == "optuna" else expand_trials(plan)


def _trial_record(trial) -> dict:
    return {
        "index": trial.index, "trial_id": trial.trial_id, "name": trial.name,
        "params": trial.params, "replicate": trial.replicate, "seed": trial.seed,
    }


# ---------------------------------------------------------------- progress + MLflow callback


class SweepCallback(Callback):
    """Driver-side Tune callback: live progress line and timely MLflow status of stopped trials.

    Args:
        n_total: trials the sweep will run.
        metric: objective metric; mode: "min"/"max".
        experiment_id, parent_run_id: where the child runs live (the URI comes from _ACTIVE).
        ui: the MLflow UI address shown in the display (credentials masked).
    """

    def __init__(self, n_total: int, metric: str, mode: str, experiment_id: str, parent_run_id: str, ui: str):
        self.n_total, self.metric, self.mode = n_total, metric, mode
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.ui = ui
        self._live = None
        self._started = time.monotonic()
        self._last_refresh = 0.0
        self._best: tuple[float, str] | None = None  # (objective value, trial label)
        self._stopped_early: set[str] = set()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_live"] = None
        return state

    def setup(self, **info):
        self._started = time.monotonic()
        console = _ACTIVE["console"]
        if console is not None:
            from rich.live import Live

            self._live = Live(console=console, refresh_per_second=2, transient=False)
            self._live.start()

    def _child(self, trial: TuneTrial):
        client = RetryingClient(_ACTIVE["tracking_uri"])
        try:
            found = client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' "
                f"and tags.ray_trial_id = '{trial.trial_id}'",
                max_results=1,
            )
        except TrackingUnreachableError:
            # Raising in a callback aborts Tune with a traceback; _reconcile sets the status at the end
            # (or reports the outage in one line).
            return client, None
        return client, (found[0] if found else None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if is_finite(value):
            better = self._best is None or (value < self._best[0] if self.mode == "min" else value > self._best[0])
            if better:
                # grid/ofat trial names say what differs; sampled trials also show their parameters.
                label = str(trial) if TRIAL_INDEX_KEY in trial.config else f"{trial} {dict(trial.config)}"
                self._best = (value, label)
        self._refresh(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        # A trial that ran to the end ended its own run FINISHED; one still RUNNING was stopped
        # early by the scheduler (the pruner or ASHA). Budget stops are corrected in _reconcile.
        client, run = self._child(trial)
        if run is not None and run.info.status == "RUNNING":
            end_run(client, run.info.run_id, "KILLED", {"pruned": "true"})
            self._stopped_early.add(trial.trial_id)
        self._refresh(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        client, run = self._child(trial)
        if run is not None and run.info.status == "RUNNING":
            # The trial process died before it could end its run (node lost, OOM kill...).
            end_run(client, run.info.run_id, "FAILED", {"error": f"trial process lost: {trial.error_file}"})
        self._refresh(trials, force=True)

    def on_step_end(self, iteration, trials, **info):
        self._refresh(trials)

    def on_experiment_end(self, trials, **info):
        self._refresh(trials, force=True)
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _refresh(self, trials, force: bool = False) -> None:
        now = time.monotonic()
        if self._live is None or (not force and now - self._last_refresh < PROGRESS_REFRESH_S):
            return
        self._last_refresh = now
        from rich.console import Group
        from rich.text import Text

        counts = _count(trials, self._stopped_early)
        lines = [Text(
            f"trials {counts['done']}/{self.n_total} done, {counts['running']} running, {counts['pruned']} pruned, "
            f"{counts['failed']} failed; elapsed {now - self._started:.0f} s"
        )]
        if self._best is not None:
            lines.append(Text(f"best {self.metric}={self._best[0]:.4g}: {self._best[1]}"))
        lines.append(Text(f"MLflow: {self.ui}"))
        self._live.update(Group(*lines))


def _count(trials, stopped_early: set[str]) -> dict[str, int]:
    counts = {"done": 0, "running": 0, "pruned": 0, "failed": 0}
    for trial in trials:
        if trial.status == TuneTrial.RUNNING:
            counts["running"] += 1
        elif trial.status == TuneTrial.ERROR:
            counts["failed"] += 1
        elif trial.status == TuneTrial.TERMINATED:
            counts["pruned" if trial.trial_id in stopped_early else "done"] += 1
    return counts


# ---------------------------------------------------------------- the sweep


def _ensure_parent(plan, plan_path: Path, client: MlflowClient, experiment_id: str, trials: list,
                   masked_uri: str, state: dict | None) -> str:
    if state and state.get("parent_run_id"):
        return state["parent_run_id"]
    params = flatten(plan.model_dump(mode="json", exclude={"tracking", "cluster"}), "plan.")
    params["plan.tracking.uri"] = masked_uri
    params["plan.n_trials_planned"] = str(len(trials) or plan.design.n_trials)
    tags = {
        PLAN_HASH_TAG: plan_hash(plan),
        "driftsweep.plan_name": plan.name,
        "driftsweep.design": plan.design.type,
        "driftsweep.objective_metric": plan.objective.metric,
        "driftsweep.objective_mode": plan.objective.direction,
        **{f"driftsweep.version.{name}": version for name, version in package_versions().items()},
    }
    commit = git_commit(Path(__file__).resolve().parent)
    if commit:
        tags["driftsweep.git_commit"] = commit
    with tempfile.TemporaryDirectory(prefix="ds_parent_") as tmp:
        trials_json = Path(tmp) / "trials.json"
        trials_json.write_text(json.dumps([_trial_record(t) for t in trials], indent=2, default=str))
        return create_parent_run(client, experiment_id, plan.name, params, tags, [plan_path, trials_json])


def _cache_configs(plan, trials: list) -> list:
    """Workload configs whose shared caches to build: every planned trial; optuna designs: the base
    workload (a cache needed only by a sampled axis level is built by the first trial needing it)."""
    return [trial.config for trial in trials] if trials else [plan.workload.with_absolute_paths(plan.base_dir)]


def warm_caches(configs, console=None) -> list[str]:
    """Build on the driver, once, the cache files trials would otherwise each build on first use.

    Today that is the digits encoder (`workloads.features.load_digits_encoder`), used by
    feature_map=digits_encoder and by FID on digits; its training shows a tqdm progress bar when a
    console is given. On a multi-node cluster the file is on the driver's node only: workers on
    other nodes still build their own copy the first time.

    Args:
        configs: workload configs of the sweep's trials.
        console: a rich Console for the progress display (None = silent).

    Returns:
        The cache files that were built or found (for the message and tests).
    """
    from workloads.features import DEFAULT_ENCODER_CACHE, load_digits_encoder

    paths = {
        config.features.encoder_cache or str(DEFAULT_ENCODER_CACHE)
        for config in configs
        if config.task == "train" and config.data.name == "digits"
        and (config.feature_map == "digits_encoder" or config.eval.fid)
    }
    for path in sorted(paths):
        if console is not None and not Path(path).exists():
            console.print(f"building the digits encoder once, cached at {path}", highlight=False)
        load_digits_encoder(path, progress=console is not None)
    return sorted(paths)


def _tuner(plan, context: SweepContext, trials: list, experiment_dir: Path, callback: SweepCallback,
           resume: bool):
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        {"cpu": plan.resources.cpus_per_trial, "gpu": plan.resources.gpus_per_trial},
    )
    if resume:
        tuner = tune.Tuner.restore(str(experiment_dir), trainable, resume_errored=True)
        return tuner, None, None
    param_space, num_samples, search_alg, scheduler, pruning = _search_and_scheduler(plan, trials, experiment_dir)
    gpu_stopper = None
    if plan.budget.max_gpu_hours and plan.resources.gpus_per_trial:
        gpu_stopper = GpuHoursStopper(plan.budget.max_gpu_hours, plan.resources.gpus_per_trial)
    name_of = (lambda t: trials[t.config[TRIAL_INDEX_KEY]].name) if trials else sampled_trial_name
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=plan.objective.metric if scheduler is None and search_alg is None else None,
            mode=plan.objective.direction if scheduler is None and search_alg is None else None,
            num_samples=num_samples,
            max_concurrent_trials=plan.resources.max_concurrent,
            # Reuse trial actors: a fresh actor costs seconds of imports (torch, mlflow) and MLflow
            # client start-up per trial (benchmarks/bench_overhead.py).
            reuse_actors=True,
            search_alg=search_alg,
            scheduler=scheduler,
            time_budget_s=plan.budget.max_wall_time_s,
            trial_name_creator=name_of,
            trial_dirname_creator=name_of,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=str(experiment_dir.parent),
            failure_config=tune.FailureConfig(max_failures=plan.failure.max_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            stop=gpu_stopper,
            callbacks=[callback],
            verbose=0,
        ),
    )
    return tuner, pruning, gpu_stopper


def run_sweep(plan, plan_path: str | os.PathLike, *, resume: bool = False, console=None) -> SweepSummary:
    """Run (or resume) a plan's sweep through Ray Tune, tracked in MLflow.

    Args:
        plan: the validated Plan.
        plan_path: the plan file (logged as an artifact of the parent run).
        resume: continue the sweep kept at <storage_path>/<plan name>.
        console: a rich Console for the live progress display (None = no display).

    Returns:
        The SweepSummary (message says when nothing was done).

    Raises:
        TrackingUnreachableError, ClusterUnreachableError: preflight failed (nothing recorded).
        DriftsweepError: `run` on an existing sweep, or `resume` with no sweep to resume.
    """
    plan_path = Path(plan_path)
    tracking_uri = resolve_tracking_uri(plan)
    masked_uri = mask_uri(tracking_uri)
    experiment_dir = experiment_dir_of(plan)
    state = _read_state(experiment_dir)
    exists = state is not None or tune.Tuner.can_restore(str(experiment_dir))
    if not resume and exists:
        raise DriftsweepError(
            f"a sweep named {plan.name!r} already exists at {experiment_dir}; continue it with "
            "`driftsweep resume PLAN`, or change the plan's name or cluster.storage_path"
        )
    if resume and not tune.Tuner.can_restore(str(experiment_dir)):
        raise DriftsweepError(
            f"no sweep to resume at {experiment_dir} (plan name {plan.name!r}); start it with `driftsweep run PLAN`"
        )
    if resume and state and state.get("finished"):
        summary = sweep_status(plan)
        summary.message = f"sweep {plan.name!r} already finished: nothing to resume"
        return summary

    # -- 1. preflight: nothing is recorded or started before these pass.
    preflight_tracking(tracking_uri, masked_uri)
    started_ray = connect_ray(plan)
    try:
        check_resources(plan)
        # -- 2. parent run and sweep state.
        client = RetryingClient(tracking_uri)
        experiment_id = ensure_experiment(client, resolve_experiment(plan))
        trials = _planned_trials(plan)
        n_total = len(trials) or plan.design.n_trials
        parent_run_id = _ensure_parent(plan, plan_path, client, experiment_id, trials, masked_uri, state)
        client.update_run(parent_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        state = {"parent_run_id": parent_run_id, "experiment_id": experiment_id,
                 "plan_hash": plan_hash(plan), "n_total": n_total, "finished": False}
        _write_state(experiment_dir, state)
        warm_caches(_cache_configs(plan, trials), console)

        # -- 3. Tune.
        ui = ui_hint(masked_uri)
        context = SweepContext(plan, tuple(trials), tracking_uri, experiment_id, parent_run_id,
                               retry_window_s=client.window_s)
        callback = SweepCallback(n_total, plan.objective.metric, plan.objective.direction, experiment_id,
                                 parent_run_id, ui)
        tuner, pruning, gpu_stopper = _tuner(plan, context, trials, experiment_dir, callback, resume)
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        started = time.monotonic()
        _ACTIVE.update(console=console, tracking_uri=tracking_uri)
        try:
            tuner.fit()
        finally:
            _ACTIVE.update(console=None, tracking_uri=None)
        elapsed_s = time.monotonic() - started

        # -- 4. reconcile MLflow with Tune's final states; best child; finished flag.
        analysis = tune.ExperimentAnalysis(str(experiment_dir))
        unfinished = [t for t in analysis.trials if t.status not in (TuneTrial.TERMINATED, TuneTrial.ERROR)]
        stopped_reason = None
        if gpu_stopper is not None and gpu_stopper.reached:
            stopped_reason = f"budget.max_gpu_hours={plan.budget.max_gpu_hours:g} reached"
        elif plan.budget.max_wall_time_s and elapsed_s >= plan.budget.max_wall_time_s:
            stopped_reason = f"budget.max_wall_time_s={plan.budget.max_wall_time_s:g} reached"
        interrupted = bool(unfinished) and stopped_reason is None
        pruned_ids = pruning.pruned_trial_ids if pruning is not None else None
        _reconcile(client, experiment_id, parent_run_id, analysis.trials, pruned_ids, stopped_reason)
        _record_unreached(context, analysis.trials, client)
        summary = _summary_from_runs(plan, client, experiment_id, parent_run_id, n_total, masked_uri)
        summary.stopped_reason = stopped_reason
        parent_tags = {"stopped_reason": stopped_reason} if stopped_reason else {}
        if summary.best is not None:
            parent_tags.update(best_run_id=summary.best["run_id"], best_value=str(summary.best["value"]),
                               best_trial=summary.best["trial"])
        if interrupted:
            summary.message = f"sweep interrupted: continue with `driftsweep resume {plan_path}`"
            end_run(client, parent_run_id, "KILLED", parent_tags)
        else:
            end_run(client, parent_run_id, "FINISHED", parent_tags)
            state.update(finished=True, stopped_reason=stopped_reason)
            _write_state(experiment_dir, state)
        summary.extras["elapsed_s"] = elapsed_s
        return summary
    finally:
        if started_ray:
            ray.shutdown()


def _reconcile(client: MlflowClient, experiment_id: str, parent_run_id: str, trials: list,
               pruned_ids: set[str] | None, stopped_reason: str | None) -> None:
    """Make every child's MLflow status match Tune's final trial state; none stays RUNNING.

    A TERMINATED trial whose run is not FINISHED was stopped early: pruned (by the Optuna bridge,
    whose ids are known, or by ASHA), or stopped by a budget when `stopped_reason` is set.
    """
    by_ray_id = {t.trial_id: t for t in trials}
    for run in child_runs(client, experiment_id, parent_run_id):
        trial = by_ray_id.get(run.data.tags.get("ray_trial_id"))
        status, tags = run.info.status, {}
        if trial is None or trial.status not in (TuneTrial.TERMINATED, TuneTrial.ERROR):
            if status == "RUNNING":
                # Interrupted (resume reopens it) or a trial Tune no longer knows.
                status, tags = "KILLED", {"stopped_reason": stopped_reason or "sweep interrupted"}
        elif trial.status == TuneTrial.ERROR:
            if status != "FAILED":
                status = "FAILED"
                if "error" not in run.data.tags:
                    tags["error"] = f"trial failed: see {trial.error_file}"
        elif status != "FINISHED":
            status = "KILLED"
            pruned = (trial.trial_id in pruned_ids) if pruned_ids is not None else stopped_reason is None
            if pruned:
                tags["pruned"] = "true"
            else:
                tags["stopped_reason"] = stopped_reason or "stopped early"
                if "pruned" in run.data.tags:
                    client.delete_tag(run.info.run_id, "pruned")
        if status != run.info.status or tags:
            end_run(client, run.info.run_id, status, tags)


def _error_line(trial: TuneTrial) -> str:
    """The last line of a failed Tune trial's error file (the exception), or where to find it."""
    try:
        lines = [line.strip() for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        lines = []
    return lines[-1][:500] if lines else f"see {trial.error_file}"


def _record_unreached(context: SweepContext, trials: list, client: MlflowClient) -> None:
    """Record FAILED every trial Tune ended in ERROR that never made its child run.

    A trial process can fail before it reaches MLflow (it cannot reach the store, it crashed while
    starting, an optuna-sampled combination the workload rejects): its run is then made here, on
    the driver, so the summary, the exit code and the MLflow UI count it instead of losing it.

    Args:
        context: the sweep context (plan, planned trials, tracking URI, experiment, parent run).
        trials: Tune's final trials.
        client: a client of the tracking store.
    """
    recorded = {run.data.tags.get("ray_trial_id")
                for run in child_runs(client, context.experiment_id, context.parent_run_id)}
    for trial in trials:
        if trial.status != TuneTrial.ERROR or trial.trial_id in recorded:
            continue
        name = sampled_trial_name(trial) if TRIAL_INDEX_KEY not in trial.config else ""
        try:
            planned = resolve_trial(context, trial.config, name)
            params, tags = trial_params_and_tags(planned)
            trial_id, run_name = planned.trial_id, planned.name
        except Exception:  # noqa: BLE001 - a sampled combination the workload rejects: record what Tune holds
            params = {f"axis.{key}": str(value) for key, value in trial.config.items()}
            tags = dict(params)
            trial_id, run_name = trial_id_for(sampled_trial_index(name)), name
        tags["ray_trial_id"] = trial.trial_id
        child = ChildRun(context.tracking_uri, context.experiment_id, context.parent_run_id, trial_id, run_name,
                         params, tags, window_s=context.retry_window_s)
        if child.finished_metrics is None:
            child.fail(f"trial failed before it reached MLflow: {_error_line(trial)}")


def _tag_value(text: str):
    """An axis tag back to its value: numbers and sets are JSON ("0.0", "[0.02, 0.05]"), names are text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _summary_from_runs(plan, client: MlflowClient, experiment_id: str, parent_run_id: str, n_total: int,
                       masked_uri: str) -> SweepSummary:
    """Counts and the best completed trial, read from the MLflow child runs."""
    metric, mode = plan.objective.metric, plan.objective.direction
    summary = SweepSummary(n_total=n_total, parent_run_id=parent_run_id, tracking_uri=masked_uri,
                           experiment_name=resolve_experiment(plan), ui=ui_hint(masked_uri))
    best_value = None
    for run in child_runs(client, experiment_id, parent_run_id):
        tags = run.data.tags
        if run.info.status == "RUNNING":
            summary.n_running += 1
        elif run.info.status == "FAILED":
            summary.n_failed += 1
        elif run.info.status == "KILLED" and tags.get("pruned") == "true":
            summary.n_pruned += 1
        elif run.info.status == "FINISHED":
            summary.n_completed += 1
            value = run.data.metrics.get(metric)
            if is_finite(value) and (best_value is None or (value < best_value if mode == "min" else value > best_value)):
                best_value = value
                summary.best = {
                    "trial": run.info.run_name,
                    "params": {k.removeprefix("axis."): _tag_value(v) for k, v in tags.items() if k.startswith("axis.")},
                    "metric": metric,
                    "value": value,
                    "run_id": run.info.run_id,
                }
    return summary


def sweep_status(plan) -> SweepSummary:
    """Status of a plan's sweep (live or finished), read from MLflow and the sweep state file.

    Args:
        plan: the validated Plan.

    Returns:
        The SweepSummary; n_total 0 and message set when the sweep was never started.

    Raises:
        TrackingUnreachableError: the tracking store cannot be reached.
    """
    tracking_uri = resolve_tracking_uri(plan)
    masked_uri = mask_uri(tracking_uri)
    state = _read_state(experiment_dir_of(plan))
    if state is None:
        return SweepSummary(n_total=0, tracking_uri=masked_uri, experiment_name=resolve_experiment(plan),
                            message=f"no sweep named {plan.name!r} has been started")
    preflight_tracking(tracking_uri, masked_uri)
    client = RetryingClient(tracking_uri)
    summary = _summary_from_runs(plan, client, state["experiment_id"], state["parent_run_id"],
                                 state["n_total"], masked_uri)
    summary.stopped_reason = state.get("stopped_reason")
    return summary


def summary_dict(summary: SweepSummary) -> dict:
    """The summary as a JSON-able dict (for `--json` output)."""
    return asdict(summary)
