"""`driftsweep report`: the ablation summary of one sweep (main effects, CIs, best config, plots).

Two layers:
- a pure core (`TrialResult`, `summarize`) that knows nothing of MLflow, so the numbers can be
  checked against a hand computation;
- the edges: `load_results` reads a sweep from MLflow in the tracking layout (one parent run per
  plan, one nested child per trial, axes as `axis.<name>` tags), `render_markdown`/`render_html`
  write the report, `attach_to_parent` logs it on the parent run, and `build_report` does it all.

Statistics (stated once, used everywhere):
- A trial's value is the *last* logged value (largest step) of the objective metric.
- Only completed trials with a finite value enter the means; pruned, failed and running trials are
  counted separately (a pruned trial stopped early, so its last value is not comparable).
- Level mean: mean of the values of every completed trial at that level, pooled over replicates and
  over the levels of the other axes. One-factor-at-a-time (ofat) designs are not balanced: there a
  level pools only the trials whose other axes sit at the baseline (each axis's most frequent level
  among the configurations, which is the baseline level in an ofat expansion), so that a level is
  never mixed with the other axes' variations.
- Main effect of a level = level mean - grand mean, the grand mean being the mean over all completed
  trials (the effects model tau_i = ybar_i - ybar, Montgomery, *Design and Analysis of Experiments*,
  §5.3; exact for a balanced grid, approximate for optuna designs whose levels are not balanced).
- Confidence interval of a mean (Student t, NIST/SEMATECH e-Handbook §7.2.2.1):
  mean +/- t_{(1+c)/2, n-1} * s / sqrt(n), with s the sample standard deviation (ddof = 1). It treats
  the pooled trials as independent draws; variation from the other axes widens it. With n = 1 there
  is no interval (shown "n/a"), never a zero-width one. The CI of an effect is the level's CI shifted
  by the grand mean (the grand mean treated as fixed).
- Steps to threshold (annealing plans; the threshold comes from `--threshold` or the plan's
  objective.threshold): for each completed trial, the first logged step (in step order) whose value
  is <= threshold (mode min) or >= threshold (mode max); a trial that never gets there is "not
  reached". Per configuration: reached k of n, and mean (with CI) of the steps over the k trials
  that reached it (the others are not averaged in, so always read k/n next to the mean).
- Scaling with dimension (alignment plans, an `alignment.dim` axis): for each configuration of the
  other axes and each error metric, the least-squares line log10(error) = slope * log10(d) + b
  through the final values of every completed trial (replicates are separate points; values <= 0
  are left out), with the slope's Student-t CI on n - 2 degrees of freedom
  (scipy.stats.linregress's standard error). Paper §5.1 annotates Figure 5 with this slope.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import json
import math
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table
from scipy import stats

from orchestrator.errors import DriftsweepError, TrackingUnreachableError

TrialStatus = Literal["completed", "pruned", "failed", "running"]
Mode = Literal["min", "max"]
STATUSES: tuple[TrialStatus, ...] = ("completed", "pruned", "failed", "running")

# Tracking layout (contract with orchestrator/tracking.py). Where the brief and the runner spell a
# tag differently (replicate), or the runner omits it (plan name = parent run name; objective =
# the plan artifact's), both are read.
TAG_PARENT = "mlflow.parentRunId"
TAG_PLAN_NAME = "driftsweep.plan_name"
TAG_PLAN_HASH = "driftsweep.plan_hash"
TAG_DESIGN = "driftsweep.design"
TAG_METRIC = "driftsweep.objective_metric"
TAG_MODE = "driftsweep.objective_mode"
TAGS_REPLICATE = ("driftsweep.replicate", "replicate")
TAG_PRUNED = "pruned"
AXIS_TAG_PREFIX = "axis."
PLAN_ARTIFACT = "plan.yaml"
REPORT_ARTIFACT_DIR = "report"
TOP_CONFIGS = 10  # rows of the best-configurations table
MLFLOW_PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # mlflow.environment_variables
# Alignment plans (paper §5.1): the dimension axis, the errors whose log-log slope over d is fitted,
# and the diagnostics shown at the smallest and largest d (names as workloads.metrics reports them).
DIM_AXIS = "alignment.dim"
SCALING_METRICS = ("abs_error", "rel_error")
ALIGNMENT_DIAGNOSTICS = ("cosine", "lambda_hat", "lambda_star", "lambda_ratio", "precond_spread")
# Sample-quality metrics (workloads.train) shown per configuration next to the objective when logged.
QUALITY_METRICS = ("swd", "mmd", "fd", "fid")


class ReportError(DriftsweepError, ValueError):
    """The sweep cannot be summarized (unknown run, no completed trial, bad argument)."""


@dataclass(frozen=True)
class TrialResult:
    """One trial as the report sees it.

    Attributes:
        name: run name of the trial.
        axes: axis name -> level, as the string stored in the `axis.<name>` tag.
        status: completed, pruned, failed or running.
        final_value: last logged value of the objective metric; None if never logged.
        history: (step, value) pairs of the objective metric, sorted by step.
        replicate: replicate index of this configuration.
        metrics: every metric the trial logged -> its last value (the alignment report reads
            the metrics other than the objective here).
    """

    name: str
    axes: dict[str, str]
    status: TrialStatus
    final_value: float | None
    history: list[tuple[int, float]] = field(default_factory=list)
    replicate: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """Whether the trial enters the means: completed with a finite final value."""
        return (
            self.status == "completed"
            and self.final_value is not None
            and math.isfinite(self.final_value)
        )


@dataclass(frozen=True)
class MeanStats:
    """Mean of n values with its Student-t confidence interval (None when n = 1)."""

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def ci_half_width(self) -> float | None:
        """Half the CI width, in metric units; None without a CI."""
        return None if self.ci_high is None else self.ci_high - self.mean


@dataclass(frozen=True)
class LevelStats:
    """One level of one axis: pooled statistics and its main effect (mean - grand mean)."""

    axis: str
    level: str
    stats: MeanStats
    effect: float


ConfigKey = tuple[tuple[str, str], ...]  # ((axis, level), ...) in axis order


def config_label(pairs: Iterable[tuple[str, str]]) -> str:
    """`axis=level,...` in the given order, e.g. `kernel=gaussian,batch_size=64` ("" for none)."""
    return ",".join(f"{axis}={level}" for axis, level in pairs)


def by_configuration(results: Iterable[TrialResult], axes: Sequence[str]) -> dict[ConfigKey, list[TrialResult]]:
    """Trials grouped by their levels of `axes` (a missing axis tag counts as level ""), the
    configurations in natural level order."""
    groups: dict[ConfigKey, list[TrialResult]] = defaultdict(list)
    for r in results:
        groups[tuple((axis, r.axes.get(axis, "")) for axis in axes)].append(r)
    return {key: groups[key] for key in sorted(groups, key=lambda k: [level_sort_key(v) for _, v in k])}


@dataclass(frozen=True)
class ConfigStats:
    """One full configuration (every axis fixed), pooled over its replicates."""

    axes: dict[str, str]
    stats: MeanStats

    @property
    def label(self) -> str:
        """`axis=level,...` in axis order, e.g. `kernel=gaussian,batch_size=64`."""
        return config_label(self.axes.items())


@dataclass(frozen=True)
class ThresholdRow:
    """Steps to threshold of one configuration (see the module docstring for the rule).

    Attributes:
        axes: axis -> level of the configuration.
        n: completed trials of the configuration.
        reached: how many of them reached the threshold.
        steps: mean/CI of the first step at threshold over the trials that reached it; None if none did.
        final: mean/CI of the final value over all n trials.
    """

    axes: dict[str, str]
    n: int
    reached: int
    steps: MeanStats | None
    final: MeanStats

    @property
    def label(self) -> str:
        """`axis=level,...` in axis order."""
        return config_label(self.axes.items())


@dataclass(frozen=True)
class ScalingFit:
    """Log-log fit of one error metric against the dimension for one configuration of the other axes.

    Attributes:
        group: the other axes' levels, e.g. {"kernel": "laplace", "alignment.dataset": "ring_mog_hd"}.
        metric: the error metric (abs_error or rel_error).
        dims: the dimensions with a positive value, ascending.
        means: mean value over replicates at each of dims.
        n_points: trials in the fit.
        slope: fitted d-exponent (log10 error per log10 d); None with fewer than 2 distinct dims.
        slope_ci: Student-t CI of the slope; None with fewer than 3 points.
        intercept: log10 error at d = 1 of the fitted line; None when slope is None.
    """

    group: dict[str, str]
    metric: str
    dims: list[float]
    means: list[float]
    n_points: int
    slope: float | None
    slope_ci: tuple[float, float] | None
    intercept: float | None

    @property
    def label(self) -> str:
        """`axis=level,...` of the group ("all" when the dimension is the only axis)."""
        return config_label(self.group.items()) or "all"


@dataclass(frozen=True)
class AblationSummary:
    """Everything the report shows (see the module docstring for the statistics)."""

    metric: str
    mode: Mode
    confidence: float
    axes: list[str]
    grand_mean: float
    levels: dict[str, list[LevelStats]]
    configs: list[ConfigStats]  # best first
    counts: dict[str, int]  # per status, plus "no_metric" (completed without a finite value)
    importances: dict[str, float] | None
    design: str = "grid"
    baseline: dict[str, str] = field(default_factory=dict)  # ofat only: axis -> baseline level
    threshold: float | None = None  # steps-to-threshold level, None = not requested
    threshold_rows: list[ThresholdRow] = field(default_factory=list)  # per configuration
    scaling: list[ScalingFit] = field(default_factory=list)  # alignment plans: error vs d fits
    diagnostics: list[tuple[str, dict[str, float], dict[str, float]]] = field(default_factory=list)
    # alignment plans: (group label, metric -> mean at the smallest d, metric -> mean at the largest d)
    quality: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    # per configuration (natural order): quality metric -> mean final value over its usable trials

    @property
    def best(self) -> ConfigStats:
        """The configuration with the best mean over its replicates."""
        return self.configs[0]

    def level_trials(self, results: Sequence[TrialResult], axis: str) -> dict[str, list[TrialResult]]:
        """The usable trials each level of `axis` pools (the populations of the level statistics)."""
        return _group_by_level(results, axis, self.baseline)


def _group_by_level(
    results: Sequence[TrialResult], axis: str, baseline: Mapping[str, str]
) -> dict[str, list[TrialResult]]:
    """Usable trials per level of `axis`, levels in natural order.

    A trial without this axis tag cannot be placed at a level: it is left out of this axis only.
    With a baseline (ofat), only trials whose other axes are at their baseline level count.
    """
    groups: dict[str, list[TrialResult]] = defaultdict(list)
    for r in results:
        at_baseline = all(r.axes.get(other) == level for other, level in baseline.items() if other != axis)
        if r.usable and axis in r.axes and at_baseline:
            groups[r.axes[axis]].append(r)
    return {level: groups[level] for level in sorted(groups, key=level_sort_key)}


def ofat_baseline(results: Sequence[TrialResult], axes: Sequence[str]) -> dict[str, str]:
    """Each axis's most frequent level over the distinct configurations (ties: first in natural order).

    In a one-factor-at-a-time expansion every configuration but those varying axis A has A at its
    baseline, so this recovers the baseline from the trials alone.

    Args:
        results: trials of any status (a failed baseline trial still names the baseline).
        axes: axis names.

    Returns:
        axis -> baseline level (axes no trial carries are left out).
    """
    configs = {tuple(r.axes.get(axis) for axis in axes) for r in results}
    baseline = {}
    for i, axis in enumerate(axes):
        counts = Counter(config[i] for config in configs if config[i] is not None)
        if counts:
            baseline[axis] = min(counts, key=lambda level: (-counts[level], level_sort_key(level)))
    return baseline


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanStats:
    """Mean, sample std and Student-t CI of the mean (NIST e-Handbook §7.2.2.1).

    Args:
        values: at least one finite value.
        confidence: coverage of the interval, in (0, 1).

    Returns:
        MeanStats; std and CI are None when there is a single value.

    Raises:
        ReportError: no values, or confidence outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ReportError(f"confidence={confidence} is invalid; use a value in (0, 1), e.g. 0.95")
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ReportError("cannot average zero values")
    mean = float(array.mean())
    if array.size == 1:
        return MeanStats(n=1, mean=mean, std=None, ci_low=None, ci_high=None)
    std = float(array.std(ddof=1))
    half_width = float(stats.t.ppf((1 + confidence) / 2, df=array.size - 1)) * std / math.sqrt(array.size)
    return MeanStats(
        n=int(array.size), mean=mean, std=std, ci_low=mean - half_width, ci_high=mean + half_width
    )


def level_sort_key(level: str) -> tuple:
    """Sort key ordering levels naturally: numbers by value, then numeric lists ("[0.02, 0.05]"), then text.

    Args:
        level: a level as stored in an `axis.<name>` tag.

    Returns:
        A tuple comparable across all levels.
    """
    try:
        return (0, float(level), level)
    except ValueError:
        pass
    try:
        parsed = json.loads(level)
    except ValueError:
        return (2, (), level)
    if isinstance(parsed, list) and all(isinstance(x, int | float) for x in parsed):
        return (1, tuple(float(x) for x in parsed), level)
    return (2, (), level)


def summarize(
    results: Sequence[TrialResult],
    axes: Sequence[str],
    metric: str,
    mode: Mode,
    confidence: float = 0.95,
    *,
    design: str = "grid",
    threshold: float | None = None,
) -> AblationSummary:
    """Compute the ablation summary of a sweep (statistics as in the module docstring).

    Args:
        results: every trial of the sweep, in any status.
        axes: axis names, in display order (a plan's axes dict works too).
        metric: objective metric name (for display).
        mode: "min" if lower is better, "max" otherwise.
        confidence: CI coverage, in (0, 1).
        design: plan design type; "optuna" adds fANOVA parameter importances, "ofat" restricts
            each axis's levels to trials with the other axes at the baseline.
        threshold: if given, the steps-to-threshold table per configuration is computed.

    Returns:
        AblationSummary (with the error-vs-d fits when `alignment.dim` is an axis).

    Raises:
        ReportError: bad mode/confidence, no axes, or no completed trial with a finite metric value.
    """
    if mode not in ("min", "max"):
        raise ReportError(f"mode={mode!r} is invalid; use 'min' or 'max'")
    axes = list(axes)
    if not axes:
        raise ReportError("axes is empty; a sweep needs at least one axis (axis.<name> tags on its trials)")
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    usable = [r for r in results if r.usable]
    counts["no_metric"] = counts["completed"] - len(usable)
    if not usable:
        raise ReportError(
            f"no completed trial has a finite value of metric {metric!r} "
            f"({', '.join(f'{k}={v}' for k, v in counts.items())}); nothing to summarize"
        )
    grand_mean = float(np.mean([r.final_value for r in usable]))
    baseline = ofat_baseline(results, axes) if design == "ofat" else {}  # all statuses: robust to failures

    levels: dict[str, list[LevelStats]] = {}
    for axis in axes:
        levels[axis] = []
        for level, trials in _group_by_level(usable, axis, baseline).items():
            level_stats = mean_ci([r.final_value for r in trials], confidence)
            levels[axis].append(LevelStats(axis, level, level_stats, level_stats.mean - grand_mean))

    sign = 1.0 if mode == "min" else -1.0
    configs = sorted(
        (ConfigStats(dict(key), mean_ci([r.final_value for r in trials], confidence))
         for key, trials in by_configuration(usable, axes).items()),
        key=lambda c: (sign * c.stats.mean, c.label),
    )
    importances = param_importances(usable, axes, mode) if design == "optuna" else None
    scaling, diagnostics = [], []
    if DIM_AXIS in axes:
        scaling = scaling_fits(usable, axes, SCALING_METRICS, confidence)
        diagnostics = dimension_extremes(usable, axes, ALIGNMENT_DIAGNOSTICS)
    return AblationSummary(
        metric=metric,
        mode=mode,
        confidence=confidence,
        axes=axes,
        grand_mean=grand_mean,
        levels=levels,
        configs=configs,
        counts=counts,
        importances=importances,
        design=design,
        baseline=baseline,
        threshold=threshold,
        threshold_rows=[] if threshold is None else threshold_table(usable, axes, threshold, mode, confidence),
        scaling=scaling,
        diagnostics=diagnostics,
        quality=quality_table(usable, axes),
    )


def quality_table(results: Sequence[TrialResult], axes: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
    """Mean final value of each logged sample-quality metric (QUALITY_METRICS) per configuration.

    Args:
        results: usable trials (their `metrics` hold the last value of every logged metric).
        axes: axis names.

    Returns:
        (configuration label, metric -> mean over the trials that logged it) in natural level
        order; empty when no trial logged any quality metric (e.g. alignment sweeps).
    """
    rows = []
    for key, trials in by_configuration(results, axes).items():
        means = {}
        for metric in QUALITY_METRICS:
            values = [r.metrics[metric] for r in trials if math.isfinite(r.metrics.get(metric, math.nan))]
            if values:
                means[metric] = float(np.mean(values))
        if means:
            rows.append((config_label(key), means))
    return rows


def steps_to_threshold(history: Sequence[tuple[int, float]], threshold: float, mode: Mode) -> int | None:
    """The first step whose value is at the threshold: <= threshold for mode min, >= for max.

    Args:
        history: (step, value) pairs in any order (sorted by step here).
        threshold: the level, in metric units.
        mode: "min" or "max".

    Returns:
        That step, or None if no logged value reaches the threshold.

    Raises:
        ReportError: bad mode.
    """
    if mode not in ("min", "max"):
        raise ReportError(f"mode={mode!r} is invalid; use 'min' or 'max'")
    for step, value in sorted(history):
        if (value <= threshold) if mode == "min" else (value >= threshold):
            return step
    return None


def threshold_table(
    results: Sequence[TrialResult], axes: Sequence[str], threshold: float, mode: Mode, confidence: float = 0.95
) -> list[ThresholdRow]:
    """Steps to threshold and final value per configuration (module docstring rule), in natural order.

    Args:
        results: trials; only usable ones (completed, finite final value) are counted.
        axes: axis names.
        threshold: the level, in metric units.
        mode: "min" or "max".
        confidence: CI coverage.

    Returns:
        One ThresholdRow per configuration, sorted by the axes' levels in natural order.
    """
    if not math.isfinite(threshold):
        raise ReportError(f"threshold={threshold} is invalid; use a finite number in the metric's units")
    rows = []
    for key, trials in by_configuration((r for r in results if r.usable), axes).items():
        steps = [s for s in (steps_to_threshold(r.history, threshold, mode) for r in trials) if s is not None]
        rows.append(
            ThresholdRow(
                axes=dict(key),
                n=len(trials),
                reached=len(steps),
                steps=mean_ci(steps, confidence) if steps else None,
                final=mean_ci([r.final_value for r in trials], confidence),
            )
        )
    return rows


def loglog_fit(dims: Sequence[float], values: Sequence[float], confidence: float = 0.95):
    """Least-squares line log10(value) = slope * log10(dim) + intercept (paper §5.1, Figure 5).

    Args:
        dims: positive dimensions, at least 2 distinct.
        values: positive values, one per dim.
        confidence: coverage of the slope's Student-t CI.

    Returns:
        (slope, intercept, (ci_low, ci_high) or None with fewer than 3 points).

    Raises:
        ReportError: fewer than 2 distinct dims, lengths differ, or a non-positive value.
    """
    x, y = np.asarray(dims, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or np.unique(x).size < 2 or (x <= 0).any() or (y <= 0).any():
        raise ReportError("a log-log fit needs >= 2 distinct positive dims and one positive value per dim")
    fit = stats.linregress(np.log10(x), np.log10(y))
    ci = None
    if x.size > 2:
        half = float(stats.t.ppf((1 + confidence) / 2, df=x.size - 2)) * float(fit.stderr)
        ci = (float(fit.slope) - half, float(fit.slope) + half)
    return float(fit.slope), float(fit.intercept), ci


def dimension_groups(
    results: Sequence[TrialResult], axes: Sequence[str]
) -> dict[ConfigKey, list[TrialResult]]:
    """Usable trials carrying the dimension axis, grouped by the other axes' levels.

    Args:
        results: trials of any status (only usable ones are kept).
        axes: axis names (alignment.dim among them).

    Returns:
        ((axis, level) of the other axes, ...) -> trials, groups in natural level order.
    """
    others = [a for a in axes if a != DIM_AXIS]
    return by_configuration((r for r in results if r.usable and DIM_AXIS in r.axes), others)


def means_by_dim(trials: Sequence[TrialResult], metric: str) -> dict[float, float]:
    """Mean of a metric's final values per dimension.

    Args:
        trials: trials with an alignment.dim axis.
        metric: a key of TrialResult.metrics.

    Returns:
        dim -> mean over the trials at that dim (missing or non-finite values skipped), dims ascending.
    """
    by_dim: dict[float, list[float]] = defaultdict(list)
    for r in trials:
        value = r.metrics.get(metric)
        if value is not None and math.isfinite(value):
            by_dim[float(r.axes[DIM_AXIS])].append(value)
    return {dim: float(np.mean(by_dim[dim])) for dim in sorted(by_dim)}


def scaling_fits(
    results: Sequence[TrialResult], axes: Sequence[str], metrics: Sequence[str], confidence: float = 0.95
) -> list[ScalingFit]:
    """Error-vs-dimension log-log fits per configuration of the other axes (module docstring rule).

    Args:
        results: trials whose `metrics` hold the error metrics and whose axes include alignment.dim.
        axes: axis names (alignment.dim among them).
        metrics: error metrics to fit, e.g. ("abs_error", "rel_error").
        confidence: coverage of the slope CI.

    Returns:
        One ScalingFit per (group, metric) with at least one positive value.
    """
    fits = []
    for key, trials in dimension_groups(results, axes).items():
        for metric in metrics:
            points = [
                (float(r.axes[DIM_AXIS]), r.metrics[metric])
                for r in trials
                if metric in r.metrics and math.isfinite(r.metrics[metric]) and r.metrics[metric] > 0
            ]
            if not points:
                continue
            means = {d: m for d, m in means_by_dim(trials, metric).items() if m > 0}
            slope = intercept = ci = None
            if len({d for d, _ in points}) >= 2:
                slope, intercept, ci = loglog_fit(*zip(*points), confidence=confidence)
            fits.append(
                ScalingFit(dict(key), metric, list(means), list(means.values()), len(points), slope, ci, intercept)
            )
    return fits


def dimension_extremes(
    results: Sequence[TrialResult], axes: Sequence[str], metrics: Sequence[str]
) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """Per configuration of the other axes: the metrics' means at the smallest and the largest d.

    Args:
        results: trials with `metrics` and an alignment.dim axis.
        axes: axis names.
        metrics: metric names to show (missing ones are left out).

    Returns:
        (group label, metric -> mean at the smallest d, metric -> mean at the largest d) per group.
    """
    rows = []
    for key, trials in dimension_groups(results, axes).items():
        low, high = {}, {}
        for metric in metrics:
            means = means_by_dim(trials, metric)
            if means:
                low[metric], high[metric] = means[min(means)], means[max(means)]
        rows.append((config_label(key) or "all", low, high))
    return rows


def param_importances(
    results: Sequence[TrialResult], axes: Sequence[str], mode: Mode
) -> dict[str, float] | None:
    """fANOVA importances of the axes, from an Optuna study rebuilt from the trials.

    The default evaluator of Optuna 5 (PED-ANOVA) compares the top quantile of trials with the rest
    and degenerates with the few dozen trials of a sweep (equal importances); fANOVA (random forest,
    fixed seed) does not.

    Args:
        results: completed trials with finite values.
        axes: axis names; an axis whose levels are all numbers becomes a float parameter over
            [min, max] (optuna ranges), any other a categorical one.
        mode: "min" or "max" (the study direction).

    Returns:
        axis -> importance (summing to 1), most important first; None with fewer than 2 trials or
        no axis with 2+ levels.
    """
    import optuna  # imported here: only optuna designs need it, and it is slow to import

    varying = [
        a for a in axes if all(a in r.axes for r in results) and len({r.axes[a] for r in results}) > 1
    ]
    if len(results) < 2 or not varying:
        return None
    distributions, to_param = {}, {}
    for axis in varying:
        levels = sorted({r.axes[axis] for r in results}, key=level_sort_key)
        if all(level_sort_key(level)[0] == 0 for level in levels):  # all plain numbers
            numbers = [float(level) for level in levels]
            distributions[axis] = optuna.distributions.FloatDistribution(min(numbers), max(numbers))
            to_param[axis] = float
        else:
            distributions[axis] = optuna.distributions.CategoricalDistribution(levels)
            to_param[axis] = str
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line in the report output
    try:
        study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for r in results:
        params = {axis: to_param[axis](r.axes[axis]) for axis in varying}
        trial = optuna.trial.create_trial(params=params, distributions=distributions, value=r.final_value)
        study.add_trial(trial)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {axis: float(value) for axis, value in importances.items()}


# ---------------------------------------------------------------------------------------------
# Reading a sweep from MLflow
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sweep:
    parent: object  # mlflow.entities.Run
    metric: str
    mode: Mode
    design: str
    axes: list[str]  # plan order, then any other axis tag alphabetically
    results: list[TrialResult]
    threshold: float | None = None  # the plan's objective.threshold


def _tag(tags: Mapping[str, str], *names: str) -> str | None:
    """The first of several tag names present (the tracking layout spells a few both ways)."""
    return next((tags[name] for name in names if name in tags), None)


def _trial_status(run) -> TrialStatus:
    if run.data.tags.get(TAG_PRUNED, "").lower() == "true":
        return "pruned"
    return {"FINISHED": "completed", "FAILED": "failed", "KILLED": "failed"}.get(run.info.status, "running")


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _mlflow_call(tracking_uri: str, what: str, fn, *args):
    """Call an MlflowClient method; a missing resource -> ReportError, anything else -> unreachable."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args)
    except MlflowException as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ReportError(
                f"{what} not found at tracking URI {tracking_uri}; "
                "pass a plan file (.yaml) or a parent run id"
            ) from None
        raise TrackingUnreachableError(
            f"cannot read {what} from tracking URI {tracking_uri}: {first_line}"
        ) from None


def _find_parent(client, tracking_uri: str, plan_or_run_id: str):
    """The parent run named by a run id, or the latest sweep of a plan file.

    For a plan file: among the parent runs of the plan's experiment named after the plan (tag or
    run name), the latest one whose plan-hash tag matches the file's content; else the latest.
    """
    path = Path(plan_or_run_id)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ReportError(
                f"plan file {plan_or_run_id} does not exist; pass a plan file or a parent run id"
            )
        from orchestrator.plan import load_plan, resolve_experiment
        from orchestrator.runner import plan_hash  # imports ray: only the plan-file lookup pays it

        plan = load_plan(path)
        missing = (
            f"no sweep of plan {plan.name!r} at tracking URI {tracking_uri}; run `driftsweep run {path}` first"
        )
        experiment_name = resolve_experiment(plan)
        experiment = _mlflow_call(
            tracking_uri, f"experiment {experiment_name!r}", client.get_experiment_by_name, experiment_name
        )
        if experiment is None:
            raise ReportError(missing)
        ids = [experiment.experiment_id]
        # Children may carry the plan-name tag too, hence the parent-tag filter below.
        candidates = _search_all(client, ids, f"tags.`{TAG_PLAN_NAME}` = '{plan.name}'")
        candidates += _search_all(client, ids, f"attributes.run_name = '{plan.name}'")
        parents = [run for run in candidates if TAG_PARENT not in run.data.tags]
        if not parents:
            raise ReportError(missing)
        same_content = [run for run in parents if run.data.tags.get(TAG_PLAN_HASH) == plan_hash(plan)]
        return max(same_content or parents, key=lambda run: run.info.start_time)
    run = _mlflow_call(tracking_uri, f"run {plan_or_run_id!r}", client.get_run, plan_or_run_id)
    if TAG_PARENT in run.data.tags:
        raise ReportError(
            f"run {plan_or_run_id} is a trial; "
            f"pass its parent run id {run.data.tags[TAG_PARENT]} or the plan file"
        )
    return run


@contextlib.contextmanager
def _no_progress_bar():
    """MLflow draws a tqdm bar per artifact download unless this variable (read per call) is false."""
    previous = os.environ.get(MLFLOW_PROGRESS_BAR_ENV)
    os.environ[MLFLOW_PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[MLFLOW_PROGRESS_BAR_ENV]
        else:
            os.environ[MLFLOW_PROGRESS_BAR_ENV] = previous


def _parent_plan(client, parent) -> dict:
    """The plan file logged on the parent run (plan.yaml, else the first root .yaml), parsed; {} if none."""
    run_id = parent.info.run_id
    names = [a.path for a in client.list_artifacts(run_id) if a.path.endswith((".yaml", ".yml"))]
    if not names:
        return {}
    name = PLAN_ARTIFACT if PLAN_ARTIFACT in names else names[0]
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
        plan = yaml.safe_load(Path(client.download_artifacts(run_id, name, tmp)).read_text())
    return plan if isinstance(plan, dict) else {}


def _load(tracking_uri: str, plan_or_run_id: str) -> _Sweep:
    """Read the parent, its plan and every child of a sweep (see `load_results`)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = _find_parent(client, tracking_uri, plan_or_run_id)
    parent_id = parent.info.run_id
    plan = _mlflow_call(tracking_uri, f"artifacts of run {parent_id}", _parent_plan, client, parent)
    metric, mode = parent.data.tags.get(TAG_METRIC), parent.data.tags.get(TAG_MODE)
    threshold = None
    if "objective" in plan:
        from orchestrator.plan import Objective

        # The plan's own rule resolves an omitted mode (max for cosine/samples_per_s, else min).
        objective = Objective.model_validate(plan["objective"])
        threshold = objective.threshold
        if not metric or mode not in ("min", "max"):
            metric, mode = objective.metric, objective.direction
    if not metric or mode not in ("min", "max"):
        raise ReportError(
            f"run {parent_id} has no objective: neither tags {TAG_METRIC} and {TAG_MODE} (min|max) "
            "nor a plan artifact with an objective; it is not a driftsweep parent run"
        )
    design = parent.data.tags.get(TAG_DESIGN) or (plan.get("design") or {}).get("type", "grid")

    children = _search_all(client, [parent.info.experiment_id], f"tags.`{TAG_PARENT}` = '{parent_id}'")
    if not children:
        raise ReportError(f"parent run {parent_id} has no trial (child) runs yet; nothing to report")
    results = []
    for run in children:
        # Sort by (step, timestamp): the final value is the last one logged at the largest step.
        metrics = client.get_metric_history(run.info.run_id, metric)
        history = sorted((m.step, m.timestamp, m.value) for m in metrics)
        tags = run.data.tags
        results.append(
            TrialResult(
                name=run.info.run_name or run.info.run_id,
                axes={k[len(AXIS_TAG_PREFIX) :]: v for k, v in tags.items() if k.startswith(AXIS_TAG_PREFIX)},
                status=_trial_status(run),
                final_value=history[-1][2] if history else None,
                history=[(step, value) for step, _, value in history],
                replicate=int(_tag(tags, *TAGS_REPLICATE) or 0),
                metrics=dict(run.data.metrics),
            )
        )
    names = {axis for r in results for axis in r.axes}
    planned = [axis for axis in (plan.get("axes") or {}) if axis in names]
    axes = planned + sorted(names - set(planned))
    return _Sweep(parent, metric, mode, str(design), axes, sorted(results, key=lambda r: r.name), threshold)


def load_results(tracking_uri: str, plan_or_run_id: str) -> tuple[object, list[TrialResult]]:
    """Read a sweep from MLflow: its parent run and one TrialResult per child run.

    Args:
        tracking_uri: MLflow tracking URI (e.g. sqlite:///mlflow.db, http://127.0.0.1:5000).
        plan_or_run_id: a plan file path (the latest sweep of that plan, preferring one whose
            `driftsweep.plan_hash` matches the file) or a parent run id.

    Returns:
        (parent run as an mlflow.entities.Run, trials sorted by run name).

    Raises:
        ReportError: unknown run/plan, a child run id, a parent without objective or children.
        TrackingUnreachableError: the tracking store cannot be read.
    """
    sweep = _load(tracking_uri, plan_or_run_id)
    return sweep.parent, sweep.results



# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TableData:
    title: str
    headers: list[str]
    rows: list[list[str]]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _fmt_ci(s: MeanStats, shift: float = 0.0) -> str:
    """`[low, high]` (shifted, e.g. by minus the grand mean for an effect's CI), or n/a."""
    return "n/a" if s.ci_low is None else f"[{_fmt(s.ci_low + shift)}, {_fmt(s.ci_high + shift)}]"


def _tables(summary: AblationSummary) -> list[_TableData]:
    """The report's tables as strings; Markdown, HTML, CSV and the terminal all render these."""
    ci = f"{summary.confidence:.0%} CI"
    effects = _TableData(
        f"Main effects on {summary.metric} (effect = level mean - grand mean {_fmt(summary.grand_mean)})",
        ["axis", "level", "n", "mean", "std", ci, "effect", f"effect {ci}"],
        [
            [
                lv.axis,
                lv.level,
                str(lv.stats.n),
                _fmt(lv.stats.mean),
                _fmt(lv.stats.std),
                _fmt_ci(lv.stats),
                f"{lv.effect:+.4g}",
                _fmt_ci(lv.stats, shift=-summary.grand_mean),
            ]
            for axis in summary.axes
            for lv in summary.levels[axis]
        ],
    )
    direction = "lower" if summary.mode == "min" else "higher"
    configs = _TableData(
        f"Best configurations ({direction} {summary.metric} is better; mean over replicates)",
        ["rank", "configuration", "n", "mean", ci],
        [
            [str(i + 1), c.label, str(c.stats.n), _fmt(c.stats.mean), _fmt_ci(c.stats)]
            for i, c in enumerate(summary.configs[:TOP_CONFIGS])
        ],
    )
    counts = _TableData(
        "Trials (only completed trials with a metric value enter the means)",
        list(summary.counts),
        [[str(v) for v in summary.counts.values()]],
    )
    importances = []
    if summary.importances:
        importances.append(
            _TableData(
                "Optuna parameter importances (fANOVA, normalized to sum 1)",
                ["axis", "importance"],
                [[axis, f"{value:.3f}"] for axis, value in summary.importances.items()],
            )
        )
    return [effects, configs, counts, *_experiment_tables(summary), *importances]


def _experiment_tables(summary: AblationSummary) -> list[_TableData]:
    """The steps-to-threshold, sample-quality and alignment tables, when the summary has them."""
    ci = f"{summary.confidence:.0%} CI"
    tables = []
    if summary.threshold is not None:
        better = "<=" if summary.mode == "min" else ">="
        tables.append(
            _TableData(
                f"Steps to {summary.metric} {better} {summary.threshold:g} (first logged step at the "
                "threshold; mean over the trials that reached it) and final value",
                ["configuration", "reached", "mean steps", f"steps {ci}", f"final {summary.metric}",
                 f"final {ci}"],
                [
                    [
                        row.label,
                        f"{row.reached}/{row.n}",
                        "not reached" if row.steps is None else _fmt(row.steps.mean),
                        "n/a" if row.steps is None else _fmt_ci(row.steps),
                        _fmt(row.final.mean),
                        _fmt_ci(row.final),
                    ]
                    for row in summary.threshold_rows
                ],
            )
        )
    if summary.scaling:
        tables.append(
            _TableData(
                "Error vs dimension: log-log slope of the final values over d (least squares on every "
                "trial; paper §5.1 Figure 5)",
                ["group", "metric", "d range", "mean at smallest d", "mean at largest d", "points", "slope",
                 f"slope {ci}"],
                [
                    [
                        fit.label,
                        fit.metric,
                        f"{fit.dims[0]:g}-{fit.dims[-1]:g}",
                        _fmt(fit.means[0]),
                        _fmt(fit.means[-1]),
                        str(fit.n_points),
                        "n/a" if fit.slope is None else f"{fit.slope:.3f}",
                        "n/a" if fit.slope_ci is None else f"[{fit.slope_ci[0]:.3f}, {fit.slope_ci[1]:.3f}]",
                    ]
                    for fit in summary.scaling
                ],
            )
        )
    if summary.quality:
        names = [m for m in QUALITY_METRICS if any(m in means for _, means in summary.quality)]
        tables.append(
            _TableData(
                "Sample-quality metrics per configuration (mean of the final values over replicates)",
                ["configuration", *names],
                [[label, *(_fmt(means.get(m)) for m in names)] for label, means in summary.quality],
            )
        )
    if summary.diagnostics:
        names = sorted({m for _, low, high in summary.diagnostics for m in (*low, *high)},
                       key=ALIGNMENT_DIAGNOSTICS.index)
        tables.append(
            _TableData(
                "Alignment diagnostics at the smallest / largest d (mean over replicates; "
                "lambda_ratio = lambda* / lambda-hat, 1 = the predicted scale)",
                ["group", *names],
                [
                    [label, *(f"{_fmt(low.get(m))} / {_fmt(high.get(m))}" for m in names)]
                    for label, low, high in summary.diagnostics
                ],
            )
        )
    return tables


def report_table(summary: AblationSummary) -> Table:
    """The terminal view: main effects, with the best configuration and trial counts as caption.

    Args:
        summary: from `summarize`.

    Returns:
        A rich Table (print it with rich.console.Console().print).
    """
    effects = _tables(summary)[0]
    # std and the effect's CI stay in the files: without them the table fits 80 columns.
    keep = [i for i, h in enumerate(effects.headers) if h != "std" and not h.startswith("effect ")]
    table = Table(title=effects.title)
    for i in keep:
        header = effects.headers[i]
        table.add_column(header, justify="left" if header in ("axis", "level") else "right")
    for row in effects.rows:
        table.add_row(*(row[i] for i in keep))
    counts = ", ".join(f"{k} {v}" for k, v in summary.counts.items())
    caption = f"best: {summary.best.label} ({summary.metric} {_fmt(summary.best.stats.mean)}) | {counts}"
    if summary.importances:
        caption += " | importance: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.importances.items())
    table.caption = caption
    return table


def experiment_tables(summary: AblationSummary) -> list[Table]:
    """The terminal view of the steps-to-threshold, sample-quality and error-vs-dimension tables (if any).

    Args:
        summary: from `summarize`.

    Returns:
        rich Tables (empty when the summary has none of them).
    """
    tables = []
    for data in _experiment_tables(summary):
        table = Table(title=data.title)
        for header in data.headers:
            table.add_column(header)
        for row in data.rows:
            table.add_row(*row)
        tables.append(table)
    return tables


def _intro(summary: AblationSummary) -> list[str]:
    """Heading paragraphs shared by Markdown and HTML (plain text)."""
    return [
        f"Design: {summary.design}. Objective: {summary.mode} {summary.metric} "
        "(last logged value of each trial).",
        f"Best configuration: {summary.best.label}, mean {_fmt(summary.best.stats.mean)} over "
        f"{summary.best.stats.n} replicate(s), {summary.confidence:.0%} CI {_fmt_ci(summary.best.stats)}.",
        "Means pool replicates and the other axes' levels; CIs are Student-t intervals of the mean "
        "(n/a with a single trial); pruned and failed trials are counted, not averaged.",
    ] + (
        [
            "One factor at a time: each axis's levels pool only the trials with the other axes at the "
            "baseline " + config_label(summary.baseline.items()) + "."
        ]
        if summary.baseline
        else []
    )


def render_markdown(summary: AblationSummary, figures: Mapping[str, Path], path: Path, title: str) -> Path:
    """Write the report as Markdown; figures are linked by file name (keep them next to it).

    Args:
        summary: from `summarize`.
        figures: caption -> PNG path, in display order.
        path: output .md file.
        title: page heading (the plan name).

    Returns:
        path.
    """
    lines = [f"# {title}", "", *(f"{p}\n" for p in _intro(summary))]
    for table in _tables(summary):
        lines += [f"## {table.title}", "", "| " + " | ".join(table.headers) + " |"]
        lines.append("|" + "---|" * len(table.headers))
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        lines.append("")
    for caption, figure in figures.items():
        lines += [f"## {caption}", "", f"![{caption}]({Path(figure).name})", ""]
    path.write_text("\n".join(lines))
    return path


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f0f0f0}td:nth-child(-n+2){text-align:left}img{max-width:100%}"
)


def render_html(summary: AblationSummary, figures: Mapping[str, Path], path: Path, title: str) -> Path:
    """Write the report as one self-contained HTML page (inline CSS, PNGs as base64 data URIs).

    Args:
        summary: from `summarize`.
        figures: caption -> PNG path, in display order.
        path: output .html file.
        title: page heading (the plan name).

    Returns:
        path.
    """
    esc = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>",
        *(f"<p>{esc(p)}</p>" for p in _intro(summary)),
    ]
    for table in _tables(summary):
        parts.append(f"<h2>{esc(table.title)}</h2><table><tr>")
        parts += [f"<th>{esc(h)}</th>" for h in table.headers]
        parts.append("</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in table.rows]
        parts.append("</table>")
    for caption, figure in figures.items():
        data = base64.b64encode(Path(figure).read_bytes()).decode("ascii")
        parts.append(f"<h2>{esc(caption)}</h2><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path


def write_effects_csv(summary: AblationSummary, path: Path) -> Path:
    """Write the main-effects table as CSV (the table artifact MLflow previews).

    Args:
        summary: from `summarize`.
        path: output .csv file.

    Returns:
        path.
    """
    effects = _tables(summary)[0]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(effects.headers)
        writer.writerows(effects.rows)
    return path


def attach_to_parent(tracking_uri: str, parent_run_id: str, paths: Sequence[Path]) -> None:
    """Log report files as artifacts of the parent run under `report/`.

    Files are logged one by one (not the whole directory) so that stale files left in a reused
    output directory by another sweep are never attached.

    Args:
        tracking_uri: MLflow tracking URI.
        parent_run_id: the sweep's parent run.
        paths: files to log.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for path in paths:
        client.log_artifact(parent_run_id, str(path), artifact_path=REPORT_ARTIFACT_DIR)


def build_report(
    plan_or_run_id: str,
    tracking_uri: str | None = None,
    out_dir: str | Path = "report",
    attach: bool = True,
    console: Console | None = None,
    threshold: float | None = None,
) -> Path:
    """Summarize a sweep, plot it, write report.html/report.md/main_effects.csv and PNGs.

    Args:
        plan_or_run_id: plan file path (latest sweep of that plan) or parent run id.
        tracking_uri: MLflow tracking URI; None = mlflow's current one (MLFLOW_TRACKING_URI).
        out_dir: output directory (created).
        attach: also log the files on the parent run under `report/`.
        console: if given, the summary table is printed on it.
        threshold: steps-to-threshold level; None = the plan's objective.threshold (if any).

    Returns:
        Path of report.html (the other files are next to it).

    Raises:
        ReportError: unknown run/plan, not a driftsweep parent, nothing completed.
        TrackingUnreachableError: the tracking store cannot be read.
    """
    import mlflow

    from orchestrator import plots  # imported here: plots imports this module

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    sweep = _load(tracking_uri, plan_or_run_id)
    parent = sweep.parent
    summary = summarize(
        sweep.results,
        sweep.axes,
        sweep.metric,
        sweep.mode,
        design=sweep.design,
        threshold=sweep.threshold if threshold is None else threshold,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"driftsweep report: {parent.data.tags.get(TAG_PLAN_NAME) or parent.info.run_name}"
    figures = plots.render_figures(summary, sweep.results, out)
    written = [
        render_html(summary, figures, out / "report.html", title),
        render_markdown(summary, figures, out / "report.md", title),
        write_effects_csv(summary, out / "main_effects.csv"),
        *figures.values(),
    ]
    if attach:
        attach_to_parent(tracking_uri, parent.info.run_id, written)
    if console is not None:
        console.print(report_table(summary))
        for table in experiment_tables(summary):
            console.print(table)
    return written[0]
