"""The ablation plan: a validated YAML file that expands into trials.

A plan names a base workload (`workloads.config.WorkloadConfig`), the axes to ablate (any workload
field by its dotted name, each a list of levels or a numeric range), a design (grid = full factorial,
ofat = one factor at a time around a baseline, optuna = sampled), replicates, exactly one pruning
component, resources, a budget, retries, tracking (MLflow) and the cluster (Ray).

Plans are data: YAML is read with `yaml.safe_load` (no tags, no code) and every component is a
registry name. Every failure becomes one `PlanError` line "<file>: <field.path>: <message>; <fix>".

This module imports only `workloads.config` from the workloads package, and optuna lazily, so that
the CLI starts fast.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import PlanError
from workloads.config import IMAGE_DATASETS, TOY_DATASETS, WorkloadConfig

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

# Fields that are not sweepable: trial seeds derive from plan.seed (use `replicates` for more seeds).
UNSWEEPABLE_FIELDS = ("seed",)
# A safety cap on grid/ofat expansion when no budget.max_trials is given (a typo like num: 1000000).
MAX_EXPANDED_TRIALS = 100_000
# Trial seeds lie in [0, 2**32): accepted by torch, numpy's legacy and new generators, and Python.
SEED_SPACE = 2**32

# Metrics the workload reports (workloads/train.py Evaluator + training window; alignment task:
# workloads.metrics.alignment_metrics, paper §5.1). drift_rms/k{i} and tau/k{i} are per temperature index.
TRAIN_METRICS = ("loss", "grad_norm", "step_time_s", "samples_per_s", "lr", "swd", "mmd", "fd", "fid")
ALIGNMENT_METRICS = ("rel_error", "abs_error", "cosine", "cosine_global", "lambda_ratio", "lambda_star",
                     "lambda_hat", "precond_spread", "precond_gap")
# Metrics where larger is better; every other metric is minimized unless objective.mode says otherwise.
MAXIMIZED_METRICS = ("cosine", "cosine_global", "samples_per_s")
_PER_TEMPERATURE_METRIC = re.compile(r"^(drift_rms|tau)/k\d+$")

# MLflow store schemes accepted in tracking.uri (a driver suffix like postgresql+psycopg2 is allowed).
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
_RAY_ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9._-]+:\d{1,5})$")
_SLUG = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/]*):(?P<pw>[^@/]*)@")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlanFieldError(PlanError):
    """A semantic plan error at a known field path (raised from validators, prefixed with the file).

    Args:
        path: dotted field path in the plan, e.g. "axes.optim.lr".
        message: what is wrong.
        fix: what to do instead.
    """

    def __init__(self, path: str, message: str, fix: str):
        self.path, self.message, self.fix = path, message, fix
        super().__init__(f"{path}: {message}; {fix}")

    def __reduce__(self):
        # Picklable with its three arguments: raised in a trial process, Ray sends it to the driver.
        return type(self), (self.path, self.message, self.fix)


# ---------------------------------------------------------------------------------------------
# Axes
# ---------------------------------------------------------------------------------------------


class RangeAxis(_Strict):
    """A numeric range. Grid/ofat need `num` (grid points) or `step`; optuna samples it directly."""

    low: float | int = Field(description="lower bound (inclusive)")
    high: float | int = Field(description="upper bound (inclusive)")
    log: bool = Field(False, description="log scale (grid: geometric spacing; optuna: log-uniform)")
    step: float | int | None = Field(None, gt=0, description="spacing of levels; not with log")
    num: int | None = Field(None, ge=2, description="grid/ofat: number of grid points from low to high")

    @model_validator(mode="after")
    def _check_bounds(self) -> RangeAxis:
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be < high={self.high}; swap or widen the bounds")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, got low={self.low}; use a positive low or log: false")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined; drop step or set log: false")
        if self.step is not None and self.num is not None:
            raise ValueError("give either step or num, not both")
        return self


def _axis_kind(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, (dict, RangeAxis)):
        return "range"
    return None


Axis = Annotated[
    Annotated[list[Any], Tag("list")] | Annotated[RangeAxis, Tag("range")],
    Discriminator(
        _axis_kind,
        custom_error_type="axis_type",
        custom_error_message="an axis is a list of levels or a range {low, high, log, step, num}",
    ),
]


# ---------------------------------------------------------------------------------------------
# Design, pruning, resources, budget, failure, tracking, cluster
# ---------------------------------------------------------------------------------------------


class GridDesign(_Strict):
    """Full factorial over all axes' levels."""

    type: Literal["grid"]


class OfatDesign(_Strict):
    """One factor at a time: the baseline, then each axis varied alone over its other levels."""

    type: Literal["ofat"]
    baseline: dict[str, Any] = Field(
        default_factory=dict,
        description="axis -> baseline level; a missing axis uses the workload's value (must be a level)",
    )


class OptunaDesign(_Strict):
    """Sampled search with an Optuna sampler (run through Ray Tune's OptunaSearch)."""

    type: Literal["optuna"]
    sampler: Literal["tpe", "cmaes", "gp", "random"] = "tpe"
    n_trials: PositiveInt = Field(description="number of trials the sampler proposes")
    seed: int | None = Field(None, description="sampler seed; None = derive from plan.seed")


Design = Annotated[GridDesign | OfatDesign | OptunaDesign, Field(discriminator="type")]


class _OptunaPrunerBase(_Strict):
    """Settings shared by Optuna's median/percentile pruners. Steps are the workload's training steps."""

    n_startup_trials: NonNegativeInt = Field(5, description="no pruning until this many trials finished")
    n_warmup_steps: NonNegativeInt = Field(0, description="no pruning of a trial before this training step")
    interval_steps: PositiveInt = Field(1, description="check every this many reported steps")
    n_min_trials: PositiveInt = Field(1, description="minimum trials reporting at a step to compare")


class NoPruning(_Strict):
    """Every trial runs to the end."""

    type: Literal["none"]


class MedianPruning(_OptunaPrunerBase):
    """optuna.pruners.MedianPruner: prune below the median of previous trials at the same step."""

    type: Literal["median"]


class PercentilePruning(_OptunaPrunerBase):
    """optuna.pruners.PercentilePruner: prune outside the best `percentile` % at the same step."""

    type: Literal["percentile"]
    percentile: float = Field(25.0, gt=0, lt=100, description="keep the best this-percent of trials")


class SuccessiveHalvingPruning(_Strict):
    """optuna.pruners.SuccessiveHalvingPruner (asynchronous successive halving)."""

    type: Literal["successive_halving"]
    min_resource: PositiveInt | Literal["auto"] = Field("auto", description="training steps before a rung")
    reduction_factor: int = Field(4, ge=2, description="keep 1/reduction_factor of trials per rung")
    min_early_stopping_rate: NonNegativeInt = 0
    bootstrap_count: NonNegativeInt = 0


class HyperbandPruning(_Strict):
    """optuna.pruners.HyperbandPruner."""

    type: Literal["hyperband"]
    min_resource: PositiveInt = Field(1, description="training steps of the smallest bracket")
    max_resource: PositiveInt | Literal["auto"] = Field("auto", description="auto = total_steps")
    reduction_factor: int = Field(3, ge=2)
    bootstrap_count: NonNegativeInt = 0


class WilcoxonPruning(_Strict):
    """optuna.pruners.WilcoxonPruner: paired test against the best trial at the same steps."""

    type: Literal["wilcoxon"]
    p_threshold: float = Field(0.1, gt=0, le=1, description="prune when p < this")
    n_startup_steps: NonNegativeInt = Field(2, description="reported steps before testing")


class AshaPruning(_Strict):
    """Ray Tune's ASHAScheduler decides early stops instead of an Optuna pruner."""

    type: Literal["asha"]
    grace_period: PositiveInt = Field(1, description="minimum training steps before a trial can stop")
    reduction_factor: float = Field(4.0, gt=1, description="keep 1/reduction_factor per rung")
    max_t: PositiveInt | None = Field(None, description="max training steps; None = workload.total_steps")


Pruning = Annotated[
    NoPruning
    | MedianPruning
    | PercentilePruning
    | SuccessiveHalvingPruning
    | HyperbandPruning
    | WilcoxonPruning
    | AshaPruning,
    Field(discriminator="type"),
]


class Objective(_Strict):
    """The reported metric that ranks trials (and that pruners and samplers see)."""

    metric: str = Field("swd", description="a metric the workload reports, e.g. swd, fid, rel_error")
    mode: Literal["min", "max"] | None = Field(None, description="None = max for cosine/samples_per_s, else min")
    threshold: float | None = Field(
        None, allow_inf_nan=False,
        description="report only: steps-to-threshold level in metric units (first step with metric <= it "
        "for min, >= for max); None = no such table unless `driftsweep report --threshold` gives one",
    )

    @property
    def direction(self) -> Literal["min", "max"]:
        """The resolved optimization direction."""
        if self.mode is not None:
            return self.mode
        return "max" if self.metric in MAXIMIZED_METRICS else "min"


class Resources(_Strict):
    """Per-trial resources for tune.with_resources (fractions allowed)."""

    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_concurrent: PositiveInt = Field(2, description="trials running at the same time")


class Budget(_Strict):
    """Limits that stop the sweep cleanly (the CLI exits 4)."""

    max_trials: PositiveInt | None = None
    max_wall_time_s: float | None = Field(None, gt=0, description="wall-clock seconds for the sweep")
    max_gpu_hours: float | None = Field(None, gt=0, description="sum over trials of GPUs x hours")


class Failure(_Strict):
    """Retries of a failed trial (Ray Tune FailureConfig.max_failures), resuming from its checkpoint."""

    max_retries: NonNegativeInt = 1


class Tracking(_Strict):
    """MLflow tracking. Default: the embedded local store sqlite:///<cwd>/mlflow.db."""

    uri: str | None = Field(None, min_length=1, description="None = env MLFLOW_TRACKING_URI, else local")
    experiment: str | None = Field(None, min_length=1, description="None = the plan name")

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str | None) -> str | None:
        scheme = uri.split("://", 1)[0].lower() if uri and "://" in uri else None
        if scheme is not None and scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
            raise ValueError(f"unsupported scheme {scheme!r} in {mask_uri(uri)}; use one of "
                             f"{', '.join(TRACKING_SCHEMES)} (or a local path)")
        return uri


class Cluster(_Strict):
    """Ray. Default: an embedded local Ray started by the run."""

    address: str | None = Field(None, description='None = env RAY_ADDRESS, else local; "auto", "ray://host:port"')
    storage_path: str | None = Field(None, min_length=1, description="Tune state; None = <cwd>/ray_results")

    @field_validator("address")
    @classmethod
    def _check_address(cls, address: str | None) -> str | None:
        if address is not None and not _RAY_ADDRESS.match(address):
            raise ValueError(f"{address!r} is not a Ray address; use auto, ray://host:port or host:port "
                             "(or leave it out for a local Ray)")
        return address


# ---------------------------------------------------------------------------------------------
# Workload field paths
# ---------------------------------------------------------------------------------------------


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths += _leaf_paths(ann, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


SWEEPABLE_PATHS: tuple[str, ...] = tuple(p for p in _leaf_paths(WorkloadConfig) if p not in UNSWEEPABLE_FIELDS)


def _did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"did you mean {' or '.join(close)}?" if close else f"allowed: {', '.join(choices)}"


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        data = data[part]
    data[leaf] = value


def _get_path(config: BaseModel, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _json_value(value: Any) -> Any:
    """JSON-normal form of a config value (so levels compare and hash the same after a reload)."""
    return json.loads(json.dumps(value))


def _with_params(base: WorkloadConfig, params: dict[str, Any], seed: int | None = None) -> WorkloadConfig:
    data = base.model_dump(mode="json")
    for path, value in params.items():
        _set_path(data, path, value)
    if seed is not None:
        data["seed"] = seed
    return WorkloadConfig.model_validate(data)


def _first_error(exc: ValidationError) -> str:
    return exc.errors()[0]["msg"].removeprefix("Value error, ")


def _check_objective(objective: Objective, config: WorkloadConfig, where: str) -> None:
    """Raise PlanFieldError if `config` does not report objective.metric (where = which config)."""
    metric = objective.metric
    if _PER_TEMPERATURE_METRIC.match(metric):
        if config.task != "train":
            raise PlanFieldError("objective.metric", f"{metric} is a training metric but {where} has task=alignment",
                                 "use one of " + ", ".join(ALIGNMENT_METRICS))
        return
    known = TRAIN_METRICS + ALIGNMENT_METRICS
    if metric not in known:
        raise PlanFieldError("objective.metric", f"unknown metric {metric!r}", _did_you_mean(metric, known))
    if config.task == "alignment":
        if metric not in ALIGNMENT_METRICS:
            raise PlanFieldError("objective.metric", f"{metric} is not reported by task=alignment ({where})",
                                 "use one of " + ", ".join(ALIGNMENT_METRICS))
        return
    if metric in ALIGNMENT_METRICS:
        raise PlanFieldError("objective.metric", f"{metric} needs workload.task=alignment ({where} trains)",
                             "set workload.task: alignment or use swd/mmd/fd/fid")
    if metric == "fid" and (config.data.name not in IMAGE_DATASETS or not config.eval.fid):
        raise PlanFieldError("objective.metric", f"fid needs an image data set with eval.fid=true "
                             f"({where} has data.name={config.data.name}, eval.fid={config.eval.fid})",
                             f"use data.name in {list(IMAGE_DATASETS)} or metric swd/mmd/fd")
    if metric == "fd" and config.data.name not in TOY_DATASETS:
        raise PlanFieldError("objective.metric", f"fd is reported for toy data sets only ({where} has "
                             f"data.name={config.data.name})", "use fid (or swd/mmd) for images")


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


class Plan(_Strict):
    """An ablation plan. See `driftsweep plan schema` and examples/*.yaml."""

    name: str = Field(pattern=_SLUG, description="slug: lowercase letters, digits, . _ - (max 63)")
    seed: int = Field(0, description="root seed; every trial seed derives from it (recorded per trial)")
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig, description="base workload config")
    objective: Objective = Field(default_factory=Objective)
    axes: dict[str, Axis] = Field(
        description="ablation axes: kernel, temperatures, anneal_rate, batch_size, feature_map or a dotted "
        "workload field (e.g. optim.lr); each a list of levels or a range"
    )
    design: Design = Field(default_factory=lambda: GridDesign(type="grid"))
    replicates: PositiveInt = Field(1, description="seeds per configuration (optuna: must be 1)")
    pruning: Pruning = Field(default_factory=lambda: NoPruning(type="none"))
    resources: Resources = Field(default_factory=Resources)
    budget: Budget = Field(default_factory=Budget)
    failure: Failure = Field(default_factory=Failure)
    tracking: Tracking = Field(default_factory=Tracking)
    cluster: Cluster = Field(default_factory=Cluster)
    # The directory the plan was loaded in (the driver's working directory). Relative local paths
    # (workloads.config.PATH_FIELDS, a relative sqlite/file tracking URI) are taken against it, because
    # Ray Tune runs each trial in a directory of its own. Travels with the plan to the trial processes.
    _base_dir: str = PrivateAttr(default_factory=os.getcwd)

    @property
    def base_dir(self) -> str:
        """The directory relative paths of this plan are taken against."""
        return self._base_dir

    @model_validator(mode="after")
    def _check_plan(self) -> Plan:
        if not self.axes:
            raise PlanFieldError("axes", "no axes given", "add at least one axis, e.g. kernel: [laplace, gaussian]")
        _check_objective(self.objective, self.workload, "the base workload")
        for path, axis in self.axes.items():
            self._check_axis(path, axis)
        if isinstance(self.design, OptunaDesign):
            if self.replicates != 1:
                raise PlanFieldError("replicates", f"optuna designs need replicates=1, got {self.replicates}",
                                     "the sampler proposes each configuration once; set replicates: 1 or use grid")
            # n_trials > budget.max_trials is allowed: the budget stops the search (exit code 4).
        else:
            for path, axis in self.axes.items():
                if isinstance(axis, RangeAxis) and axis.num is None and axis.step is None:
                    raise PlanFieldError(f"axes.{path}", f"a range needs num or step for a {self.design.type} design",
                                         "add num: <grid points> (or step), or list the levels")
            if isinstance(self.design, OfatDesign):
                self._check_baseline(self.design)
            count = count_trials(self)
            limit = self.budget.max_trials
            if limit is not None and count > limit:
                raise PlanFieldError("budget.max_trials", f"the {self.design.type} design expands to {count} "
                                     f"trials, more than budget.max_trials={limit}",
                                     "raise budget.max_trials or remove levels/replicates")
            if count > MAX_EXPANDED_TRIALS:
                raise PlanFieldError("axes", f"the {self.design.type} design expands to {count} trials "
                                     f"(limit {MAX_EXPANDED_TRIALS})", "remove levels or use design type optuna")
        return self

    def _check_axis(self, path: str, axis: list[Any] | RangeAxis) -> None:
        where = f"axes.{path}"
        if path in UNSWEEPABLE_FIELDS:
            raise PlanFieldError(where, "trial seeds derive from plan.seed", "use replicates for more seeds")
        if path not in SWEEPABLE_PATHS:
            raise PlanFieldError(where, f"unknown workload field {path!r}", _did_you_mean(path, SWEEPABLE_PATHS))
        if isinstance(axis, list):
            if not axis:
                raise PlanFieldError(where, "empty axis", "list at least one level, or remove the axis")
            values = axis
        else:
            base_value = _get_path(self.workload, path)
            if isinstance(base_value, bool) or not isinstance(base_value, (int, float)) and base_value is not None:
                raise PlanFieldError(where, f"a range needs a numeric field, {path} is not",
                                     "list the levels instead")
            values = [axis.low, axis.high]
        for i, value in enumerate(values):
            index = f"[{i}]" if isinstance(axis, list) else (".low" if i == 0 else ".high")
            try:
                config = _with_params(self.workload, {path: value})
            except ValidationError as exc:
                hint = "each level is a set of temperatures, e.g. [[0.05], [0.02, 0.05, 0.2]]" \
                    if path == "temperatures" else "use a value allowed by workloads/config.py"
                raise PlanFieldError(where + index, f"{value!r} is not a valid {path}: {_first_error(exc)}",
                                     hint) from None
            if isinstance(axis, RangeAxis) and isinstance(_get_path(config, path), int) and (
                    not float(value).is_integer() or not float(axis.step or 1).is_integer()):
                raise PlanFieldError(where, f"{path} is an integer field, got low={axis.low}, "
                                     f"high={axis.high}, step={axis.step}", "use integer bounds and step")
            _check_objective(self.objective, config, f"{path}={value!r}")
        if isinstance(axis, list):
            levels = [_json_value(_get_path(_with_params(self.workload, {path: v}), path)) for v in axis]
            dupes = [v for v in levels if levels.count(v) > 1]
            if dupes:
                raise PlanFieldError(where, f"duplicate level {dupes[0]!r}", "list each level once")

    def _check_baseline(self, design: OfatDesign) -> None:
        for path in design.baseline:
            if path not in self.axes:
                raise PlanFieldError(f"design.baseline.{path}", "not an axis of this plan",
                                     _did_you_mean(path, list(self.axes)))
        for path in self.axes:
            levels = axis_levels(self, path)
            if path in design.baseline:
                try:
                    value = _json_value(_get_path(_with_params(self.workload, {path: design.baseline[path]}), path))
                except ValidationError as exc:
                    raise PlanFieldError(f"design.baseline.{path}", _first_error(exc),
                                         f"use one of the levels {levels}") from None
                if value not in levels:
                    raise PlanFieldError(f"design.baseline.{path}", f"{design.baseline[path]!r} is not a level "
                                         f"of axes.{path}", f"use one of {levels}")
            elif _json_value(_get_path(self.workload, path)) not in levels:
                raise PlanFieldError(f"design.baseline.{path}", f"missing, and the workload's value "
                                     f"{_get_path(self.workload, path)!r} is not a level of axes.{path}",
                                     f"add baseline {path}: one of {levels}")


# ---------------------------------------------------------------------------------------------
# Expansion into trials
# ---------------------------------------------------------------------------------------------


def axis_levels(plan: Plan, path: str) -> list[Any]:
    """The levels of one axis, normalized to the workload field's JSON form.

    Args:
        plan: a plan.
        path: an axis key.

    Returns:
        The list of levels (ranges expanded with num/step; log ranges geometric).

    Raises:
        PlanFieldError: a range without num or step.
    """
    axis = plan.axes[path]
    if isinstance(axis, list):
        raw = axis
    elif axis.num is not None:
        if axis.log:
            lo, hi = math.log(axis.low), math.log(axis.high)
            raw = [math.exp(lo + (hi - lo) * i / (axis.num - 1)) for i in range(axis.num)]
        else:
            raw = [axis.low + (axis.high - axis.low) * i / (axis.num - 1) for i in range(axis.num)]
        raw[0], raw[-1] = axis.low, axis.high  # exact end points, no rounding drift
    elif axis.step is not None:
        # Levels low, low + step, ... <= high (with a relative tolerance for float steps).
        count = int(math.floor((axis.high - axis.low) / axis.step * (1 + 1e-12))) + 1
        raw = [axis.low + i * axis.step for i in range(count)]
    else:
        raise PlanFieldError(f"axes.{path}", "a range needs num or step to give levels",
                             "add num: <grid points> or step")
    is_int = isinstance(_get_path(plan.workload, path), int) or (
        not isinstance(axis, list) and isinstance(_get_path(_with_params(plan.workload, {path: axis.low}), path), int))
    levels: list[Any] = []
    for value in raw:
        if not isinstance(axis, list):
            value = int(round(value)) if is_int else float(f"{value:.12g}")  # readable levels: 0.001 not 0.00099..
        normal = _json_value(_get_path(_with_params(plan.workload, {path: value}), path))
        if normal not in levels:
            levels.append(normal)
    return levels


def count_trials(plan: Plan) -> int:
    """Number of trials the plan runs at most, without building them.

    Args:
        plan: a validated plan.

    Returns:
        The trial count (configurations x replicates; optuna: n_trials capped by budget.max_trials).
    """
    if isinstance(plan.design, OptunaDesign):
        return min(plan.design.n_trials, plan.budget.max_trials or plan.design.n_trials)
    sizes = [len(axis_levels(plan, path)) for path in plan.axes]
    configurations = math.prod(sizes) if isinstance(plan.design, GridDesign) else 1 + sum(n - 1 for n in sizes)
    return configurations * plan.replicates


def _format_value(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def trial_seed(plan: Plan, params: dict[str, Any], replicate: int) -> int:
    """Derive a trial seed from (plan.seed, params, replicate) with SHA-256 (stable across processes).

    Args:
        plan: the plan (its root seed).
        params: axis -> value of the configuration.
        replicate: replicate index from 0.

    Returns:
        An int in [0, 2**32).
    """
    key = json.dumps({"root": plan.seed, "params": params, "replicate": replicate}, sort_keys=True)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % SEED_SPACE


@dataclass(frozen=True)
class Trial:
    """One resolved trial.

    Attributes:
        index: position in the expansion (or the optuna trial number).
        trial_id: stable id "t0007".
        name: what differs from the baseline/base workload, e.g. "kernel=gaussian,rep=1"; "baseline".
        params: axis -> value (JSON-serializable).
        replicate: replicate index from 0.
        seed: the trial's seed (= config.seed).
        config: the resolved workload config.
    """

    index: int
    trial_id: str
    name: str
    params: dict[str, Any]
    replicate: int
    seed: int
    config: WorkloadConfig

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: trial_id, index, name, params, replicate, seed, config."""
        return {
            "trial_id": self.trial_id,
            "index": self.index,
            "name": self.name,
            "params": self.params,
            "replicate": self.replicate,
            "seed": self.seed,
            "config": self.config.model_dump(mode="json"),
        }


def _reference_params(plan: Plan) -> dict[str, Any]:
    """The values a trial name is compared against: the ofat baseline, else the base workload."""
    ref = {path: _json_value(_get_path(plan.workload, path)) for path in plan.axes}
    if isinstance(plan.design, OfatDesign):
        for path, value in plan.design.baseline.items():
            ref[path] = _json_value(_get_path(_with_params(plan.workload, {path: value}), path))
    return ref


def trial_id_for(index: int) -> str:
    """The stable trial id of trial number `index` ("t0007"): the lookup key of its MLflow run."""
    return f"t{index:04d}"


def _build_trial(plan: Plan, params: dict[str, Any], index: int, replicate: int, seed: int) -> Trial:
    ref = _reference_params(plan)
    parts = [f"{k}={_format_value(v)}" for k, v in params.items() if ref.get(k) != v]
    if plan.replicates > 1:
        parts.append(f"rep={replicate}")
    try:
        config = _with_params(plan.workload, params, seed=seed).with_absolute_paths(plan.base_dir)
    except ValidationError as exc:
        combo = ",".join(f"{k}={_format_value(v)}" for k, v in params.items())
        raise PlanFieldError("axes", f"the combination {combo} is invalid: {_first_error(exc)}",
                             "remove that level or use design type ofat") from None
    return Trial(index=index, trial_id=trial_id_for(index), name=",".join(parts) or "baseline",
                 params=params, replicate=replicate, seed=seed, config=config)


def _configurations(plan: Plan) -> list[dict[str, Any]]:
    levels = {path: axis_levels(plan, path) for path in plan.axes}
    if isinstance(plan.design, GridDesign):
        return [dict(zip(levels, combo)) for combo in itertools.product(*levels.values())]
    baseline = _reference_params(plan)
    configs = [dict(baseline)]
    for path, values in levels.items():
        configs += [{**baseline, path: v} for v in values if v != baseline[path]]
    return configs


def expand_trials(plan: Plan) -> list[Trial]:
    """Expand a grid or ofat plan into its trials (configuration-major, replicate-minor).

    Seeds are distinct: a rare hash collision is resolved by re-hashing with a counter, in expansion
    order, so the result is the same on every load.

    Args:
        plan: a validated grid/ofat plan.

    Returns:
        The trials; grid: prod(levels) x replicates; ofat: (1 + sum(levels - 1)) x replicates.

    Raises:
        PlanError: an optuna plan, or a combination of levels the workload rejects.
    """
    if isinstance(plan.design, OptunaDesign):
        raise PlanError("design.type: optuna plans have no fixed trial list; use optuna_space/trial_from_params")
    trials, used = [], set()
    for params in _configurations(plan):
        for replicate in range(plan.replicates):
            seed, bump = trial_seed(plan, params, replicate), 0
            while seed in used:
                bump += 1
                seed = trial_seed(plan, {**params, "__collision__": bump}, replicate)
            used.add(seed)
            trials.append(_build_trial(plan, params, len(trials), replicate, seed))
    return trials


def _encoded_choices(plan: Plan, path: str) -> dict[Any, Any]:
    """Categorical choice -> level. Lists (temperature sets) are encoded as JSON strings for Optuna."""
    return {(json.dumps(v) if isinstance(v, (list, dict)) else v): v for v in axis_levels(plan, path)}


def optuna_space(plan: Plan) -> dict[str, BaseDistribution]:
    """The Optuna search space of an optuna plan: categorical for lists, Float/Int for ranges.

    Args:
        plan: a plan (any design; ranges become distributions).

    Returns:
        axis -> optuna distribution. Set-valued levels are JSON strings ("[0.02, 0.05, 0.2]");
        trial_from_params decodes them.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space: dict[str, BaseDistribution] = {}
    for path, axis in plan.axes.items():
        if isinstance(axis, list):
            space[path] = CategoricalDistribution(list(_encoded_choices(plan, path)))
        elif isinstance(_get_path(_with_params(plan.workload, {path: axis.low}), path), int):
            step = int(axis.step) if axis.step is not None else 1
            space[path] = IntDistribution(int(axis.low), int(axis.high), log=axis.log, step=step)
        else:
            space[path] = FloatDistribution(float(axis.low), float(axis.high), log=axis.log,
                                            step=None if axis.step is None else float(axis.step))
    return space


def trial_from_params(plan: Plan, params: dict[str, Any], index: int, replicate: int = 0) -> Trial:
    """Build the trial for sampler-suggested params (optuna designs; decodes encoded set levels).

    Args:
        plan: the plan.
        params: axis -> suggested value, as produced from optuna_space (every axis present).
        index: trial number (gives trial_id t{index:04d}).
        replicate: replicate index.

    Returns:
        The resolved trial, its seed derived from (plan.seed, params, replicate).

    Raises:
        PlanError: a missing or unknown axis, or a value the workload rejects.
    """
    missing, extra = set(plan.axes) - set(params), set(params) - set(plan.axes)
    if missing or extra:
        raise PlanError(f"params: expected exactly the axes {sorted(plan.axes)}, "
                        f"missing {sorted(missing)}, unknown {sorted(extra)}")
    decoded = {}
    for path in plan.axes:  # plan order, so names and seeds do not depend on the sampler's dict order
        value = params[path]
        if isinstance(plan.axes[path], list):
            value = _encoded_choices(plan, path).get(value, value)
        decoded[path] = _json_value(value)
    return _build_trial(plan, decoded, index, replicate, trial_seed(plan, decoded, replicate))


# ---------------------------------------------------------------------------------------------
# Loading, errors, resolution of defaults
# ---------------------------------------------------------------------------------------------

_UNION_FIELDS = ("design", "pruning")
# Discriminator tag -> member model, for unknown-key hints inside design/pruning.
_UNION_MEMBERS: dict[str, dict[str, type[BaseModel]]] = {
    "design": {"grid": GridDesign, "ofat": OfatDesign, "optuna": OptunaDesign},
    "pruning": {"none": NoPruning, "median": MedianPruning, "percentile": PercentilePruning,
                "successive_halving": SuccessiveHalvingPruning, "hyperband": HyperbandPruning,
                "wilcoxon": WilcoxonPruning, "asha": AshaPruning},
}


def _loc_path(loc: tuple[Any, ...]) -> str:
    parts = list(loc)
    # Drop the discriminator tags pydantic inserts into locations ("pruning.median.x" -> "pruning.x").
    if len(parts) > 1 and parts[0] in _UNION_FIELDS and parts[1] in _UNION_MEMBERS[parts[0]]:
        del parts[1]
    if len(parts) > 2 and parts[0] == "axes" and parts[2] in ("list", "range"):
        del parts[2]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at the parent of `loc` (for unknown-key hints), best effort."""
    model: Any = Plan
    parts = list(loc[:-1])
    if len(parts) > 1 and parts[0] in _UNION_FIELDS:
        member = _UNION_MEMBERS[parts[0]].get(parts[1])
        return list(member.model_fields) if member is not None and len(parts) == 2 else []
    if len(parts) == 3 and parts[0] == "axes" and parts[2] == "range":
        return list(RangeAxis.model_fields)
    for part in parts:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return []
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(getattr(model, "model_fields", None) or [])


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line for the first pydantic error: "<source>: <field.path>: <message>; <fix>".

    Args:
        exc: the validation error.
        source: file name (or "<string>").

    Returns:
        The line, with "(and N more)" when there were several errors.
    """
    errors = exc.errors()
    err = errors[0]
    loc, kind = tuple(err["loc"]), err["type"]
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        msg = "unknown key"
        fix = "remove it; " + _did_you_mean(str(loc[-1]), allowed) if allowed else "remove it"
    elif kind == "missing":
        fix = "add it (see `driftsweep plan schema`)"
    elif kind in ("literal_error", "union_tag_invalid", "enum"):
        fix = "use one of the listed values"
    elif ";" in msg:
        fix = ""
    else:
        fix = "see `driftsweep plan schema`"
    if kind in ("union_tag_invalid", "union_tag_not_found") and loc and loc[0] in _UNION_FIELDS:
        loc = (*loc, "type")
        tags = ", ".join(_UNION_MEMBERS[loc[0]])
        if kind == "union_tag_not_found":
            msg, fix = "missing", f"add type: one of {tags}"
        else:
            msg, fix = f"unknown type {err['input'].get('type')!r}", f"use one of {tags}"
    line = f"{source}: {_loc_path(loc)}: {msg}" + (f"; {fix}" if fix else "")
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return " ".join(line.split())  # one line, whatever the message held


def parse_plan(text: str | bytes, source: str = "<string>") -> Plan:
    """Parse and validate a plan from YAML text (data only: yaml.safe_load, no tags, no code).

    Args:
        text: YAML text, or bytes that must be UTF-8.
        source: name used as the error prefix (usually the file path).

    Returns:
        The validated plan; grid/ofat plans are also expanded once so every combination is valid.

    Raises:
        PlanError: one line "<source>: <field.path>: <message>; <fix>".
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PlanError(f"{source}: (file): not UTF-8 text (byte {exc.start}); save the plan as UTF-8 YAML") from None
    if "\x00" in text:
        raise PlanError(f"{source}: (file): binary content (NUL byte); a plan is a UTF-8 YAML text file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PlanError(" ".join(f"{source}: (yaml): {problem} at {where}; fix the YAML syntax "
                                 "(plans are plain data: no !tags)".split())) from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. a date like 2024-02-30
        raise PlanError(" ".join(f"{source}: (yaml): unreadable value ({exc}); quote it or fix it".split())) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise PlanError(f"{source}: (top level): the plan is {kind}, not a mapping; "
                        "start with `name: ...`, `axes: ...` (see examples/quick.yaml)")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise PlanError(f"{source}: (top level): key {bad_keys[0]!r} is not a string; use field names "
                        f"such as name, axes (see `driftsweep plan schema`)")
    try:
        plan = Plan.model_validate(data)
        if not isinstance(plan.design, OptunaDesign):
            expand_trials(plan)
    except ValidationError as exc:
        raise PlanError(format_validation_error(exc, source)) from None
    except PlanFieldError as exc:
        raise PlanError(" ".join(f"{source}: {exc}".split())) from None
    return plan


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan file.

    Args:
        path: the YAML file.

    Returns:
        The validated plan.

    Raises:
        PlanError: missing/unreadable file or any validation failure, as one line.
    """
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise PlanError(f"{source}: (file): not found; check the path") from None
    except IsADirectoryError:
        raise PlanError(f"{source}: (file): is a directory; give a plan .yaml file") from None
    except OSError as exc:
        raise PlanError(f"{source}: (file): cannot read ({exc.strerror}); check permissions") from None
    return parse_plan(raw, source=source)


def plan_json_schema() -> dict[str, Any]:
    """The JSON Schema of a plan file (Plan.model_json_schema())."""
    return Plan.model_json_schema()


def mask_uri(uri: str | None) -> str | None:
    """Hide the password in a URI: "postgresql://u:secret@h/db" -> "postgresql://u:***@h/db".

    Args:
        uri: any URI (or None).

    Returns:
        The masked URI (unchanged when it holds no credentials).
    """
    if uri is None:
        return None
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", uri)


def resolve_tracking_uri(plan: Plan, cwd: str | os.PathLike[str] | None = None) -> str:
    """tracking.uri, else env MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (embedded local store).

    A relative local store (`sqlite:///mlflow.db`, `file:mlruns`, `mlruns`) is made absolute against
    the directory the plan was loaded in, so the driver and every trial use the same store.

    Args:
        plan: the plan.
        cwd: directory of the default and relative stores (default: plan.base_dir, where it was loaded).

    Returns:
        The tracking URI (unmasked: for mlflow, not for printing).
    """
    base = Path(cwd or plan.base_dir)
    uri = plan.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{base.resolve() / 'mlflow.db'}"
    # A relative local store would be a different file in every trial's directory: make it absolute.
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        path = Path(uri.removeprefix("sqlite:///")).expanduser()
        return f"sqlite:///{path if path.is_absolute() else _local_path(base, str(path))}"
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return f"file://{_local_path(base, uri.removeprefix('file:'))}"
    if "://" not in uri and not uri.startswith("file:"):
        return str(_local_path(base, uri))  # a bare path: MLflow's file store
    return uri


def _local_path(base: Path, text: str) -> Path:
    """`text` as a local path: `~` expanded, taken against `base` when relative, resolved."""
    return (base / Path(text).expanduser()).resolve()


def resolve_experiment(plan: Plan) -> str:
    """tracking.experiment, else the plan name."""
    return plan.tracking.experiment or plan.name


def resolve_ray_address(plan: Plan) -> str | None:
    """cluster.address, else env RAY_ADDRESS, else None (start an embedded local Ray)."""
    return plan.cluster.address or os.environ.get("RAY_ADDRESS") or None


def resolve_storage_path(plan: Plan, cwd: str | os.PathLike[str] | None = None) -> str:
    """cluster.storage_path, else <cwd>/ray_results; a local path made absolute against cwd (default:
    plan.base_dir, where the plan was loaded); a URI (s3://, gs://...) unchanged."""
    base = Path(cwd or plan.base_dir)
    storage = plan.cluster.storage_path
    if storage and "://" in storage:
        return storage
    return str(_local_path(base, storage or "ray_results"))


def is_local_tracking_uri(uri: str) -> bool:
    """True for stores on this machine (sqlite or file paths), where `mlflow ui` shows them."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri
