"""Report figures (PNG, matplotlib Agg canvas; no pyplot, so no global backend state is touched).

- metric vs step per level of each axis: mean curve over the trials the level pools (see
  `orchestrator.report`), band = +/- 1 sample std where 2+ trials logged that step;
- main effects per axis: bars = level mean - grand mean, error bars = half-width of the level's
  Student-t CI (none when n = 1), as computed by `orchestrator.report.summarize`;
- Laplace vs Gaussian: for each configuration of the other axes where both kernels completed, paired
  bars of the mean over replicates with CI error bars;
- alignment plans (an `alignment.dim` axis): error vs d on log-log axes per configuration of the other
  axes, with the fitted slope of `orchestrator.report.scaling_fits` in the legend, and the §5.1
  diagnostics (cosine, lambda*/lambda-hat, preconditioner spread) vs d.
With a steps-to-threshold level, the metric-vs-step panels draw it as a dashed line.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orchestrator.report import (
    ALIGNMENT_DIAGNOSTICS,
    DIM_AXIS,
    AblationSummary,
    ConfigStats,
    TrialResult,
    config_label,
    dimension_groups,
    level_sort_key,
    means_by_dim,
)

DPI = 110
PANEL_INCHES = (4.8, 3.4)  # width, height of one subplot
MAX_COLUMNS = 3
LOG_SCALE_RATIO = 50.0  # a curve plot spanning more than this max/min ratio gets a log y axis
KERNEL_AXIS = "kernel"
KERNEL_PAIR = ("laplace", "gaussian")


def _panels(count: int) -> tuple[Figure, list]:
    columns = min(count, MAX_COLUMNS)
    rows = math.ceil(count / columns)
    size = (PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows)
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, axes[:count]


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, format="png")
    return path


def _mean_curve(histories: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean and std (ddof=1; NaN where a single run logged the step) over the runs."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for history in histories:
        for step, value in history:
            by_step[step].append(value)
    steps = np.array(sorted(by_step))
    values = [np.asarray(by_step[s], dtype=np.float64) for s in steps]
    mean = np.array([v.mean() for v in values])
    std = np.array([v.std(ddof=1) if v.size > 1 else np.nan for v in values])
    return steps, mean, std


def plot_metric_vs_step(summary: AblationSummary, results: Sequence[TrialResult], path: Path) -> Path:
    """One panel per axis: the objective metric vs step, one mean curve (+/- 1 std band) per level.

    Args:
        summary: gives the axes, their levels and the metric name.
        results: trials; the ones each level pools (`AblationSummary.level_trials`) are drawn.
        path: output PNG.

    Returns:
        path.
    """
    figure, panels = _panels(len(summary.axes))
    all_values = [v for r in results if r.usable for _, v in r.history]
    log_y = bool(all_values) and min(all_values) > 0 and max(all_values) / min(all_values) > LOG_SCALE_RATIO
    for axis, panel in zip(summary.axes, panels, strict=True):
        for level, trials in summary.level_trials(results, axis).items():
            steps, mean, std = _mean_curve([r.history for r in trials if r.history])
            if steps.size == 0:
                continue
            (line,) = panel.plot(steps, mean, label=f"{level} (n={len(trials)})")
            panel.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        panel.set(title=axis, xlabel="step", ylabel=summary.metric)
        if summary.threshold is not None:
            panel.axhline(summary.threshold, color="black", linestyle="--", linewidth=0.8, label="threshold")
        if log_y:
            panel.set_yscale("log")
        panel.legend(fontsize="small")
    figure.suptitle(f"{summary.metric} vs step per level (mean +/- 1 std over the other trials)")
    return _save(figure, path)


def plot_main_effects(summary: AblationSummary, path: Path) -> Path:
    """One panel per axis: bars of level mean - grand mean with CI error bars (none when n = 1).

    Args:
        summary: from `orchestrator.report.summarize`.
        path: output PNG.

    Returns:
        path.
    """
    figure, panels = _panels(len(summary.axes))
    for axis, panel in zip(summary.axes, panels, strict=True):
        levels = summary.levels[axis]
        half_widths = [np.nan if lv.stats.ci_half_width is None else lv.stats.ci_half_width for lv in levels]
        positions = np.arange(len(levels))
        panel.bar(positions, [lv.effect for lv in levels], yerr=half_widths, capsize=4, color="tab:blue")
        panel.set_xticks(positions, [lv.level for lv in levels], rotation=20, fontsize="small")
        panel.axhline(0.0, color="black", linewidth=0.8)
        panel.set(title=axis, ylabel=f"{summary.metric} - grand mean")
    figure.suptitle(
        f"Main effects on {summary.metric} ({summary.confidence:.0%} Student-t CI; "
        f"{'lower' if summary.mode == 'min' else 'higher'} is better)"
    )
    return _save(figure, path)


def kernel_pairs(summary: AblationSummary) -> list[tuple[str, dict[str, ConfigStats]]]:
    """Configurations of the other axes where both Laplace and Gaussian completed.

    Returns:
        (label of the other axes, {kernel: ConfigStats}) per configuration, levels in natural order;
        empty if the sweep has no kernel axis or never ran both kernels in one configuration.
    """
    paired: dict[tuple[tuple[str, str], ...], dict[str, ConfigStats]] = defaultdict(dict)
    for config in summary.configs:
        kernel = config.axes.get(KERNEL_AXIS)
        if kernel in KERNEL_PAIR:
            paired[tuple((a, v) for a, v in config.axes.items() if a != KERNEL_AXIS)][kernel] = config
    ordered = sorted(paired, key=lambda others: [level_sort_key(v) for _, v in others])
    return [
        (config_label(others) or "all", paired[others])
        for others in ordered
        if len(paired[others]) == 2
    ]


def plot_kernel_comparison(summary: AblationSummary, path: Path) -> Path | None:
    """Paired bars Laplace vs Gaussian per configuration of the other axes (mean, CI error bars).

    Args:
        summary: from `orchestrator.report.summarize`.
        path: output PNG.

    Returns:
        path, or None when no configuration ran both kernels (nothing is written).
    """
    pairs = kernel_pairs(summary)
    if not pairs:
        return None
    width = 0.38  # bar width, in units of the gap between configurations
    figure = Figure(figsize=(max(5.0, 1.2 * len(pairs) + 2), 4.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    panel = figure.subplots()
    positions = np.arange(len(pairs))
    for offset, kernel in zip((-width / 2, width / 2), KERNEL_PAIR, strict=True):
        stats = [by_kernel[kernel].stats for _, by_kernel in pairs]
        errors = [np.nan if s.ci_half_width is None else s.ci_half_width for s in stats]
        panel.bar(positions + offset, [s.mean for s in stats], width, yerr=errors, capsize=4, label=kernel)
    panel.set_xticks(positions, [label for label, _ in pairs], rotation=20, fontsize="small", ha="right")
    title = f"Laplace vs Gaussian: {summary.metric} (mean, {summary.confidence:.0%} CI)"
    panel.set(ylabel=summary.metric, title=title)
    panel.legend()
    return _save(figure, path)


def plot_scaling(summary: AblationSummary, path: Path) -> Path | None:
    """One log-log panel per error metric: mean over replicates vs d per group, fitted line dashed.

    Args:
        summary: from `orchestrator.report.summarize` (its `scaling` fits).
        path: output PNG.

    Returns:
        path, or None when the summary has no fits (nothing is written).
    """
    metrics = list(dict.fromkeys(fit.metric for fit in summary.scaling))
    if not metrics:
        return None
    figure, panels = _panels(len(metrics))
    for metric, panel in zip(metrics, panels, strict=True):
        for fit in (f for f in summary.scaling if f.metric == metric):
            slope = "n/a" if fit.slope is None else f"{fit.slope:.2f}"
            (line,) = panel.plot(fit.dims, fit.means, marker="o", label=f"{fit.label} (slope {slope})")
            if fit.slope is not None:
                dims = np.asarray(fit.dims)
                panel.plot(dims, 10 ** (fit.intercept + fit.slope * np.log10(dims)), linestyle="--",
                           color=line.get_color(), linewidth=0.8)
        panel.set(xscale="log", yscale="log", xlabel="dimension d", ylabel=metric, title=f"{metric} vs d")
        panel.legend(fontsize="x-small")
    figure.suptitle("Alignment error vs dimension (log-log; dashed = least-squares fit)")
    return _save(figure, path)


def plot_alignment_diagnostics(
    summary: AblationSummary, results: Sequence[TrialResult], path: Path
) -> Path | None:
    """Panels of the §5.1 diagnostics vs d (log x axis), one line per configuration of the other axes.

    Args:
        summary: from `orchestrator.report.summarize` (gives the axes).
        results: trials whose `metrics` hold cosine, lambda_ratio, precond_spread.
        path: output PNG.

    Returns:
        path, or None without an alignment.dim axis or any diagnostic value (nothing is written).
    """
    if DIM_AXIS not in summary.axes:
        return None
    groups = dimension_groups(results, summary.axes)
    names = [m for m in ALIGNMENT_DIAGNOSTICS if m in ("cosine", "lambda_ratio", "precond_spread")
             and any(m in r.metrics for trials in groups.values() for r in trials)]
    if not names:
        return None
    figure, panels = _panels(len(names))
    for name, panel in zip(names, panels, strict=True):
        for key, trials in groups.items():
            means = means_by_dim(trials, name)
            panel.plot(list(means), list(means.values()), marker="o", label=config_label(key) or "all")
        if name in ("cosine", "lambda_ratio"):
            panel.axhline(1.0, color="black", linestyle="--", linewidth=0.8)  # the theory's limit
        panel.set(xscale="log", xlabel="dimension d", ylabel=name, title=name)
        panel.legend(fontsize="x-small")
    figure.suptitle("Alignment diagnostics vs dimension (mean over replicates)")
    return _save(figure, path)


def render_figures(
    summary: AblationSummary, results: Sequence[TrialResult], out_dir: Path
) -> dict[str, Path]:
    """Write every report figure into out_dir.

    Args:
        summary: from `orchestrator.report.summarize`.
        results: the trials (for the per-step curves).
        out_dir: existing output directory.

    Returns:
        caption -> PNG path, in display order (the curves only when some trial logged 2+ steps,
        the kernel comparison only when both kernels ran, the alignment figures only for alignment
        plans).
    """
    figures = {}
    if any(len(r.history) > 1 for r in results):  # a one-shot measurement (alignment) has no curve
        figures[f"{summary.metric} vs step per axis level"] = plot_metric_vs_step(
            summary, results, out_dir / "metric_vs_step.png"
        )
    figures["Main effects with confidence intervals"] = plot_main_effects(summary, out_dir / "main_effects.png")
    kernels = plot_kernel_comparison(summary, out_dir / "laplace_vs_gaussian.png")
    if kernels is not None:
        figures["Laplace vs Gaussian"] = kernels
    scaling = plot_scaling(summary, out_dir / "error_vs_dim.png")
    if scaling is not None:
        figures["Alignment error vs dimension (log-log, fitted slopes)"] = scaling
    diagnostics = plot_alignment_diagnostics(summary, results, out_dir / "alignment_diagnostics.png")
    if diagnostics is not None:
        figures["Alignment diagnostics vs dimension"] = diagnostics
    return figures
