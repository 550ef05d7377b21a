"""`driftsweep report`: numbers against independent computations, rendering, and an MLflow round trip.

Expected means/CIs come from literal value lists in this file and numpy + scipy.stats.t.interval
(a different scipy entry point than the report's t.ppf), or from a t-table value worked by hand.
"""

from __future__ import annotations

import base64
import csv
import re
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from scipy import stats

from orchestrator import plots
from orchestrator.report import (
    DIM_AXIS,
    ReportError,
    TrialResult,
    build_report,
    dimension_extremes,
    level_sort_key,
    load_results,
    loglog_fit,
    mean_ci,
    render_html,
    render_markdown,
    report_table,
    scaling_fits,
    steps_to_threshold,
    summarize,
    threshold_table,
)

AXES = ["kernel", "batch_size"]
# Final swd per configuration, two replicates each. Traps for "best": laplace/256 holds the single
# lowest AND the single highest value, but neither its mean (2.55) is the min nor the max.
VALUES = {
    ("laplace", "64"): [1.0, 1.4],  # mean 1.2
    ("laplace", "256"): [0.1, 5.0],  # mean 2.55
    ("gaussian", "64"): [3.0, 3.5],  # mean 3.25 -> best for max
    ("gaussian", "256"): [0.5, 0.9],  # mean 0.7  -> best for min
}
LEVEL_VALUES = {  # written out by hand from VALUES
    ("kernel", "laplace"): [1.0, 1.4, 0.1, 5.0],
    ("kernel", "gaussian"): [3.0, 3.5, 0.5, 0.9],
    ("batch_size", "64"): [1.0, 1.4, 3.0, 3.5],
    ("batch_size", "256"): [0.1, 5.0, 0.5, 0.9],
}
ALL_VALUES = [1.0, 1.4, 0.1, 5.0, 3.0, 3.5, 0.5, 0.9]
HISTORY_STEPS = (0, 100, 200)


def _history(final: float) -> list[tuple[int, float]]:
    """A decreasing curve ending at `final` (so the final value is the step-200 value)."""
    return [(0, final + 2.0), (100, final + 1.0), (200, final)]


def fake_results() -> list[TrialResult]:
    """8 completed trials + trials that must be counted but never averaged."""
    results = [
        TrialResult(f"kernel={k},batch_size={b},rep={rep}", {"kernel": k, "batch_size": b}, "completed",
                    value, _history(value), rep)
        for (k, b), values in VALUES.items()
        for rep, value in enumerate(values)
    ]
    # Out-of-range values: if any of these entered a mean or the best config, the checks would fail.
    results += [
        TrialResult("pruned", {"kernel": "gaussian", "batch_size": "256"}, "pruned", -100.0, [(0, -100.0)], 2),
        TrialResult("failed", {"kernel": "laplace", "batch_size": "64"}, "failed", -50.0, [(0, -50.0)], 2),
        TrialResult("running", {"kernel": "laplace", "batch_size": "64"}, "running", -70.0, [(0, -70.0)], 3),
        TrialResult("nan", {"kernel": "gaussian", "batch_size": "64"}, "completed", float("nan"), [], 2),
        TrialResult("no-metric", {"kernel": "gaussian", "batch_size": "64"}, "completed", None, [], 3),
    ]
    return results


def expected_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    mean = float(np.mean(values))
    return stats.t.interval(confidence, df=len(values) - 1, loc=mean, scale=stats.sem(values))


# ---------------------------------------------------------------------------------------------
# Core numbers
# ---------------------------------------------------------------------------------------------


def test_mean_ci_matches_hand_computation():
    # values 1, 2, 3: mean 2, s = sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1, n = 3;
    # t table (two-sided 95%, 2 df) = 4.3027; half width = 4.3027 * 1 / sqrt(3) = 2.4841.
    result = mean_ci([1.0, 2.0, 3.0], 0.95)
    assert result.n == 3
    assert result.mean == pytest.approx(2.0)
    assert result.std == pytest.approx(1.0)
    assert result.ci_low == pytest.approx(2.0 - 2.4841, abs=1e-3)
    assert result.ci_high == pytest.approx(2.0 + 2.4841, abs=1e-3)
    # 90%: t table (2 df) = 2.9200 -> half width 1.6859.
    assert mean_ci([1.0, 2.0, 3.0], 0.90).ci_high == pytest.approx(2.0 + 1.6859, abs=1e-3)


def test_mean_ci_single_value_has_no_interval():
    result = mean_ci([4.2])
    assert (result.n, result.mean) == (1, 4.2)
    assert result.std is None and result.ci_low is None and result.ci_high is None
    assert result.ci_half_width is None


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1])
def test_mean_ci_rejects_bad_confidence(confidence):
    with pytest.raises(ReportError, match="confidence"):
        mean_ci([1.0, 2.0], confidence)


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_level_means_cis_and_effects_match_scipy(confidence):
    summary = summarize(fake_results(), AXES, "swd", "min", confidence)
    grand_mean = float(np.mean(ALL_VALUES))
    assert summary.grand_mean == pytest.approx(grand_mean)
    assert summary.axes == AXES
    seen = set()
    for axis in AXES:
        for level in summary.levels[axis]:
            values = LEVEL_VALUES[(axis, level.level)]
            low, high = expected_ci(values, confidence)
            assert level.stats.n == len(values)
            assert level.stats.mean == pytest.approx(np.mean(values))
            assert level.stats.std == pytest.approx(np.std(values, ddof=1))
            assert level.stats.ci_low == pytest.approx(low)
            assert level.stats.ci_high == pytest.approx(high)
            assert level.effect == pytest.approx(np.mean(values) - grand_mean)
            seen.add((axis, level.level))
    assert seen == set(LEVEL_VALUES)


def test_pruned_failed_running_are_counted_not_averaged():
    summary = summarize(fake_results(), AXES, "swd", "min")
    assert summary.counts == {"completed": 10, "pruned": 1, "failed": 1, "running": 1, "no_metric": 2}
    assert sum(level.stats.n for level in summary.levels["kernel"]) == 8
    assert sum(config.stats.n for config in summary.configs) == 8


@pytest.mark.parametrize(
    ("mode", "best", "best_mean", "order"),
    [
        ("min", {"kernel": "gaussian", "batch_size": "256"}, 0.7, [0.7, 1.2, 2.55, 3.25]),
        ("max", {"kernel": "gaussian", "batch_size": "64"}, 3.25, [3.25, 2.55, 1.2, 0.7]),
    ],
)
def test_best_configuration_by_mean_over_replicates(mode, best, best_mean, order):
    summary = summarize(fake_results(), AXES, "swd", mode)
    assert summary.best.axes == best
    assert summary.best.stats.mean == pytest.approx(best_mean)
    assert summary.best.stats.n == 2
    assert [c.stats.mean for c in summary.configs] == pytest.approx(order)
    assert summary.best.label == f"kernel={best['kernel']},batch_size={best['batch_size']}"


def test_single_trial_level_has_no_ci():
    results = [
        TrialResult(f"t{i}", {"feature_map": "identity"}, "completed", v)
        for i, v in enumerate([1.0, 2.0, 4.0])
    ]
    results.append(TrialResult("rp", {"feature_map": "random_projection"}, "completed", 3.0))
    summary = summarize(results, ["feature_map"], "swd", "min")
    single = next(level for level in summary.levels["feature_map"] if level.level == "random_projection")
    assert single.stats.n == 1 and single.stats.ci_low is None and single.stats.std is None
    assert single.effect == pytest.approx(3.0 - 2.5)  # grand mean (1 + 2 + 4 + 3) / 4 = 2.5
    row = next(line for line in _markdown(summary).splitlines() if "| random_projection |" in line)
    assert row.count("n/a") == 3  # std, CI, effect CI


def test_ofat_levels_pool_only_trials_at_the_baseline(tmp_path):
    # Baseline laplace/[0.05]; one axis varied at a time, two replicates each.
    ofat = {
        ("laplace", "[0.05]"): [1.0, 1.2],  # baseline
        ("gaussian", "[0.05]"): [2.0, 2.2],
        ("laplace", "[0.2]"): [10.0, 10.2],
    }
    results = [
        TrialResult(f"{k},{t},{rep}", {"kernel": k, "temperatures": t}, "completed", v, _history(v), rep)
        for (k, t), values in ofat.items()
        for rep, v in enumerate(values)
    ]
    summary = summarize(results, ["kernel", "temperatures"], "swd", "min", design="ofat")
    assert summary.baseline == {"kernel": "laplace", "temperatures": "[0.05]"}
    means = {(lv.axis, lv.level): (lv.stats.n, lv.stats.mean) for a in summary.axes for lv in summary.levels[a]}
    # kernel=laplace holds the baseline only, not the temperature=[0.2] trials (mean would be 5.6).
    assert means == {
        ("kernel", "gaussian"): (2, pytest.approx(2.1)),
        ("kernel", "laplace"): (2, pytest.approx(1.1)),
        ("temperatures", "[0.05]"): (2, pytest.approx(1.1)),
        ("temperatures", "[0.2]"): (2, pytest.approx(10.1)),
    }
    assert summary.grand_mean == pytest.approx((1.0 + 1.2 + 2.0 + 2.2 + 10.0 + 10.2) / 6)
    assert summary.level_trials(results, "kernel")["laplace"] == results[:2]
    assert summarize(results, ["kernel", "temperatures"], "swd", "min").levels["kernel"][1].stats.n == 4  # grid
    assert "baseline kernel=laplace,temperatures=[0.05]" in _markdown(summary)


def test_bad_arguments_and_nothing_completed():
    with pytest.raises(ReportError, match="mode"):
        summarize(fake_results(), AXES, "swd", "minimize")
    with pytest.raises(ReportError, match="axes"):
        summarize(fake_results(), [], "swd", "min")
    failed = [TrialResult("f", {"kernel": "laplace"}, "failed", None)]
    with pytest.raises(ReportError, match="failed=1"):
        summarize(failed, ["kernel"], "swd", "min")


def test_levels_sorted_naturally():
    levels = ["256", "1024", "64", "[0.2]", "[0.02,0.05,0.2]", "[0.05]", "gaussian"]
    expected = ["64", "256", "1024", "[0.02,0.05,0.2]", "[0.05]", "[0.2]", "gaussian"]
    assert sorted(levels, key=level_sort_key) == expected


def test_optuna_importances_rank_the_axis_that_matters():
    # kernel moves the value by 5, batch_size by 0.1: kernel must dominate.
    rng = np.random.default_rng(0)
    results = [
        TrialResult(f"t{i}", {"kernel": k, "batch_size": b}, "completed",
                    (5.0 if k == "gaussian" else 0.0) + (0.1 if b == "64" else 0.0) + 0.01 * rng.normal())
        for i, (k, b) in enumerate([(k, b) for k in ("laplace", "gaussian") for b in ("64", "256")] * 4)
    ]
    importances = summarize(results, AXES, "swd", "min", design="optuna").importances
    assert set(importances) == set(AXES)
    assert sum(importances.values()) == pytest.approx(1.0)
    assert importances["kernel"] > 0.9
    assert summarize(results, AXES, "swd", "min", design="grid").importances is None


def test_optuna_importances_with_a_numeric_range_axis():
    # An optuna range axis: every trial has its own lr. The value is a parabola in log10(lr) with
    # an amplitude ~1, kernel only adds 0.05: lr must dominate.
    rng = np.random.default_rng(1)
    results = []
    for i in range(30):
        lr, kernel = 10 ** rng.uniform(-4, -2), ("laplace", "gaussian")[i % 2]
        value = (np.log10(lr) + 3) ** 2 + (0.05 if kernel == "gaussian" else 0.0) + 0.01 * rng.normal()
        results.append(TrialResult(f"t{i}", {"optim.lr": repr(lr), "kernel": kernel}, "completed", value))
    importances = summarize(results, ["optim.lr", "kernel"], "swd", "min", design="optuna").importances
    assert importances["optim.lr"] > 0.9


def test_mean_curve_over_runs():
    steps, mean, std = plots._mean_curve([[(0, 1.0), (10, 2.0)], [(0, 3.0)]])
    assert steps.tolist() == [0, 10]
    assert mean.tolist() == pytest.approx([2.0, 2.0])
    assert std[0] == pytest.approx(np.sqrt(2.0)) and np.isnan(std[1])


def test_kernel_pairs_match_config_means():
    summary = summarize(fake_results(), AXES, "swd", "min")
    pairs = dict(plots.kernel_pairs(summary))
    assert list(pairs) == ["batch_size=64", "batch_size=256"]  # natural level order
    for b in ("64", "256"):
        for k in ("laplace", "gaussian"):
            assert pairs[f"batch_size={b}"][k].stats.mean == pytest.approx(np.mean(VALUES[(k, b)]))
    only_laplace = [r for r in fake_results() if r.axes["kernel"] == "laplace"]
    assert plots.kernel_pairs(summarize(only_laplace, AXES, "swd", "min")) == []


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _markdown(summary, figures=None, tmp_dir: Path | None = None) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return render_markdown(summary, figures or {}, Path(tmp_dir or tmp) / "r.md", "t").read_text()


def test_html_is_self_contained_and_complete(tmp_path):
    results = fake_results()
    summary = summarize(results, AXES, "swd", "min")
    figures = plots.render_figures(summary, results, tmp_path)
    names = ["metric_vs_step.png", "main_effects.png", "laplace_vs_gaussian.png"]
    assert [p.name for p in figures.values()] == names
    page = render_html(summary, figures, tmp_path / "report.html", "driftsweep report: demo").read_text()

    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == len(figures) == 3
    for data, path in zip(images, figures.values(), strict=True):
        assert base64.b64decode(data) == path.read_bytes()
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for (axis, level) in LEVEL_VALUES:
        assert f"<td>{axis}</td><td>{level}</td>" in page
    assert "kernel=gaussian,batch_size=256" in page  # the best configuration


def test_markdown_links_figures_and_lists_axes(tmp_path):
    results = fake_results()
    summary = summarize(results, AXES, "swd", "min")
    figures = plots.render_figures(summary, results, tmp_path)
    text = _markdown(summary, figures, tmp_path)
    for path in figures.values():
        assert f"]({path.name})" in text and path.exists()
    for axis, level in LEVEL_VALUES:
        assert f"| {axis} | {level} |" in text
    assert "| 10 | 1 | 1 | 1 | 2 |" in text  # completed, pruned, failed, running, no_metric


def test_no_kernel_figure_when_one_kernel_ran(tmp_path):
    results = [r for r in fake_results() if r.axes["kernel"] == "gaussian"]
    figures = plots.render_figures(summarize(results, AXES, "swd", "min"), results, tmp_path)
    assert [p.name for p in figures.values()] == ["metric_vs_step.png", "main_effects.png"]
    assert not (tmp_path / "laplace_vs_gaussian.png").exists()


def test_terminal_table():
    summary = summarize(fake_results(), AXES, "swd", "min")
    table = report_table(summary)
    assert table.row_count == len(LEVEL_VALUES)
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "kernel=gaussian,batch_size=256" in text and "pruned 1" in text


# ---------------------------------------------------------------------------------------------
# MLflow round trip in a real sqlite store. Two layouts of one parent per plan + one nested child
# per trial with axis.<name> tags:
# - "brief": the report contract (driftsweep.plan_name/objective_* tags, plan.yaml artifact,
#   driftsweep.replicate);
# - "runner": what orchestrator/runner.py + trainable.py write today (parent run name = plan name,
#   no objective tags, the plan file under its own name with objective.mode omitted, `replicate`).
# ---------------------------------------------------------------------------------------------

PLANS = {
    "brief": "name: brief-demo\nobjective: {metric: swd, mode: min}\n"
    "axes:\n  kernel: [laplace, gaussian]\n  batch_size: [64, 256]\nreplicates: 2\n",
    "runner": "name: runner-demo\nobjective: {metric: swd}\n"
    "axes:\n  kernel: [laplace, gaussian]\n  batch_size: [64, 256]\nreplicates: 2\n",
}


def _write_sweep(client, root: Path, layout: str) -> dict:
    """A fake sweep in `layout`. Returns plan path, parent id, a child id."""
    from mlflow.entities import Metric, RunStatus

    from orchestrator.plan import load_plan
    from orchestrator.runner import plan_hash

    plan_file = root / ("plan.yaml" if layout == "brief" else "runner-demo.yaml")
    plan_file.write_text(PLANS[layout])
    plan = load_plan(plan_file)
    experiment_id = client.create_experiment(plan.name, artifact_location=(root / layout).as_uri())
    parent_tags = {"driftsweep.plan_hash": plan_hash(plan), "driftsweep.design": "grid"}
    if layout == "brief":
        parent_tags |= {"driftsweep.plan_name": plan.name, "driftsweep.objective_metric": "swd",
                        "driftsweep.objective_mode": "min"}
    now_ms = int(time.time() * 1000)
    # Decoys: an older sweep of the same content, and a newer one of other content (edited plan).
    # A plan-file lookup must pick the latest sweep with the file's hash: the real parent.
    client.create_run(experiment_id, start_time=now_ms - 60_000, run_name=plan.name, tags=parent_tags)
    stale_tags = {**parent_tags, "driftsweep.plan_hash": "stale"}
    client.create_run(experiment_id, start_time=now_ms + 60_000, run_name=plan.name, tags=stale_tags)
    parent = client.create_run(experiment_id, start_time=now_ms, run_name=plan.name, tags=parent_tags)
    parent_id = parent.info.run_id
    client.log_artifact(parent_id, str(plan_file))
    replicate_tag = "driftsweep.replicate" if layout == "brief" else "replicate"

    def child(name, axes, status, final, replicate, extra_tags=None):
        tags = {"mlflow.parentRunId": parent_id, "trial_id": name, replicate_tag: str(replicate), "seed": "7",
                **{f"axis.{a}": v for a, v in axes.items()}, **(extra_tags or {})}
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        if final is not None:
            # Logged out of step order (step 200 first) on purpose: the final value is by step.
            history = _history(final)
            metrics = [Metric("swd", history[2][1], now_ms, 200)]
            metrics += [Metric("swd", v, now_ms, s) for s, v in history[:2]]
            metrics.append(Metric("loss", 1.0, now_ms, 200))
            client.log_batch(run_id, metrics=metrics)
        client.set_terminated(run_id, RunStatus.to_string(status))
        return run_id

    child_id = None
    for (kernel, batch), values in VALUES.items():
        for rep, value in enumerate(values):
            name = f"kernel={kernel},batch_size={batch},rep={rep}"
            child_id = child(name, {"kernel": kernel, "batch_size": batch}, RunStatus.FINISHED, value, rep)
    pruned_tags = {"pruned": "true"}
    child("pruned", {"kernel": "gaussian", "batch_size": "256"}, RunStatus.KILLED, -100.0, 2, pruned_tags)
    child("failed", {"kernel": "laplace", "batch_size": "64"}, RunStatus.FAILED, -50.0, 2)
    child("killed", {"kernel": "laplace", "batch_size": "256"}, RunStatus.KILLED, None, 3)
    return {"plan": plan_file, "parent": parent_id, "child": child_id}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store (its migrations take ~10 s) holding a sweep in each layout."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, {layout: _write_sweep(client, root, layout) for layout in PLANS}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(PLANS))
def test_load_results_reads_the_layout(store, layout):
    uri, sweeps = store
    parent, results = load_results(uri, sweeps[layout]["parent"])
    assert parent.info.run_id == sweeps[layout]["parent"]
    by_name = {r.name: r for r in results}
    assert len(results) == 11
    trial = by_name["kernel=laplace,batch_size=256,rep=1"]
    assert trial.axes == {"kernel": "laplace", "batch_size": "256"}
    assert (trial.status, trial.final_value, trial.replicate) == ("completed", 5.0, 1)
    assert trial.history == _history(5.0)
    assert trial.metrics == {"swd": 5.0, "loss": 1.0}  # every metric's value at the largest step
    assert by_name["pruned"].status == "pruned"
    assert by_name["failed"].status == "failed" and by_name["killed"].status == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(PLANS))
def test_plan_file_finds_the_latest_sweep_of_that_content(store, layout):
    uri, sweeps = store
    parent, _ = load_results(uri, str(sweeps[layout]["plan"]))
    assert parent.info.run_id == sweeps[layout]["parent"]


@pytest.mark.slow
def test_bad_run_ids_give_one_line_errors(store, tmp_path):
    uri, sweeps = store
    with pytest.raises(ReportError, match="not found") as unknown:
        load_results(uri, "0123456789abcdef0123456789abcdef")
    assert "\n" not in str(unknown.value)
    with pytest.raises(ReportError, match=sweeps["brief"]["parent"]):
        load_results(uri, sweeps["brief"]["child"])
    with pytest.raises(ReportError, match="does not exist"):
        load_results(uri, str(tmp_path / "missing.yaml"))
    other_plan = tmp_path / "never-run.yaml"
    other_plan.write_text(PLANS["brief"].replace("brief-demo", "never-run"))
    with pytest.raises(ReportError, match="no sweep of plan 'never-run'"):
        load_results(uri, str(other_plan))


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(PLANS))
def test_build_report_end_to_end(store, layout, tmp_path):
    from mlflow import MlflowClient

    uri, sweeps = store
    parent_id = sweeps[layout]["parent"]
    console = Console(record=True, width=200)
    html_path = build_report(str(sweeps[layout]["plan"]), tracking_uri=uri, out_dir=tmp_path / "out",
                             attach=True, console=console)
    assert html_path == tmp_path / "out" / "report.html" and html_path.exists()
    assert "kernel=gaussian,batch_size=256" in console.export_text()  # best for min

    client = MlflowClient(uri)
    attached = {a.path for a in client.list_artifacts(parent_id, "report")}
    expected = {"report.html", "report.md", "main_effects.csv", "metric_vs_step.png", "main_effects.png",
                "laplace_vs_gaussian.png"}
    assert attached == {f"report/{name}" for name in expected}

    # The attached table, read back from the artifact store, against the independent numbers,
    # in the plan's axis order (kernel before batch_size, not alphabetical).
    csv_path = Path(client.download_artifacts(parent_id, "report/main_effects.csv", str(tmp_path)))
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["axis"], r["level"]) for r in rows] == [
        ("kernel", "gaussian"), ("kernel", "laplace"), ("batch_size", "64"), ("batch_size", "256")
    ]
    for row in rows:
        values = LEVEL_VALUES[(row["axis"], row["level"])]
        low, high = expected_ci(values)
        assert int(row["n"]) == len(values)
        assert float(row["mean"]) == pytest.approx(np.mean(values), rel=1e-3)
        ci_low, ci_high = (float(x) for x in row["95% CI"].strip("[]").split(","))
        assert (ci_low, ci_high) == pytest.approx((low, high), rel=1e-3)


@pytest.mark.slow
def test_build_report_threshold_from_the_command(store, tmp_path):
    uri, sweeps = store
    # Histories are (0, f+2), (100, f+1), (200, f) with every f >= 0.1, so f + 1 > 1.05: only finals
    # f <= 1.05 reach 1.05, at step 200: 0.5 and 0.9 (gaussian/256), 1.0 (laplace/64), 0.1 (laplace/256).
    build_report(str(sweeps["brief"]["plan"]), tracking_uri=uri, out_dir=tmp_path, attach=False, threshold=1.05)
    text = (tmp_path / "report.md").read_text()
    assert "Steps to swd <= 1.05" in text
    assert "| kernel=gaussian,batch_size=256 | 2/2 | 200 |" in text
    assert "| kernel=laplace,batch_size=64 | 1/2 | 200 |" in text  # 1.0 reaches, 1.4 does not
    assert "| kernel=gaussian,batch_size=64 | 0/2 | not reached |" in text  # 3.0, 3.5


# ---------------------------------------------------------------------------------------------
# Steps to threshold (annealing plans) and error-vs-dimension fits (alignment plans)
# ---------------------------------------------------------------------------------------------

FAKE_HISTORY = [(400, 0.12), (100, 0.5), (300, 0.09), (200, 0.2), (500, 0.05)]  # out of step order


def test_steps_to_threshold_on_a_fake_history():
    # Sorted by step: 0.5, 0.2, 0.09 (step 300, first <= 0.1), 0.12, 0.05.
    assert steps_to_threshold(FAKE_HISTORY, 0.1, "min") == 300
    assert steps_to_threshold(FAKE_HISTORY, 0.09, "min") == 300  # <= includes equality
    assert steps_to_threshold(FAKE_HISTORY, 0.01, "min") is None  # never reached
    assert steps_to_threshold(FAKE_HISTORY, 0.2, "max") == 100  # 0.5 >= 0.2 at the first step
    assert steps_to_threshold(FAKE_HISTORY, 0.6, "max") is None
    with pytest.raises(ReportError, match="mode"):
        steps_to_threshold(FAKE_HISTORY, 0.1, "lower")


def _curve_trial(name: str, rate: str, history: list[tuple[int, float]], status: str = "completed"):
    return TrialResult(name, {"anneal_rate": rate}, status, history[-1][1], history)


def test_threshold_table_counts_reached_and_averages_only_those():
    results = [
        _curve_trial("a0", "0", [(25, 0.3), (50, 0.2), (75, 0.15)]),  # never <= 0.1
        _curve_trial("a1", "0", [(25, 0.3), (50, 0.09), (75, 0.11)]),  # 50
        _curve_trial("b0", "3", [(25, 0.1), (50, 0.08), (75, 0.07)]),  # 25
        _curve_trial("b1", "3", [(25, 0.2), (50, 0.12), (75, 0.06)]),  # 75
        _curve_trial("b2", "3", [(25, 0.01)], status="pruned"),  # not completed: not counted
    ]
    rows = threshold_table(results, ["anneal_rate"], 0.1, "min")
    assert [row.label for row in rows] == ["anneal_rate=0", "anneal_rate=3"]
    slow, fast = rows
    assert (slow.n, slow.reached, slow.steps.n, slow.steps.mean) == (2, 1, 1, 50.0)
    assert slow.steps.ci_low is None  # one trial: no interval
    assert slow.final.mean == pytest.approx((0.15 + 0.11) / 2)
    assert (fast.n, fast.reached, fast.steps.mean) == (2, 2, 50.0)  # (25 + 75) / 2
    assert (fast.steps.ci_low, fast.steps.ci_high) == pytest.approx(expected_ci([25.0, 75.0]))
    none_reached = threshold_table(results, ["anneal_rate"], 0.001, "min")
    assert [row.steps for row in none_reached] == [None, None]
    with pytest.raises(ReportError, match="threshold"):
        threshold_table(results, ["anneal_rate"], float("nan"), "min")


def test_threshold_in_the_summary_and_the_markdown(tmp_path):
    results = [_curve_trial(f"r{i}", str(rate), [(25, 0.3), (50, 0.05 * (1 + rate))])
               for i, rate in enumerate((0, 1, 3))]
    summary = summarize(results, ["anneal_rate"], "swd", "min", threshold=0.1)
    assert summary.threshold == 0.1 and len(summary.threshold_rows) == 3
    figures = plots.render_figures(summary, results, tmp_path)
    text = render_markdown(summary, figures, tmp_path / "r.md", "t").read_text()
    assert "| anneal_rate=0 | 1/1 | 50 |" in text  # 0.05 <= 0.1 at step 50
    assert "| anneal_rate=3 | 0/1 | not reached |" in text  # 0.2 never <= 0.1
    assert summarize(results, ["anneal_rate"], "swd", "min").threshold_rows == []


# Made-up errors falling roughly like d^-1 with a wobble, two replicates (the second 1.3x the first).
DIMS = [2, 8, 32, 128, 512]
ERRORS = [3.0, 0.9, 0.2, 0.06, 0.013]


def test_loglog_fit_matches_numpy_polyfit():
    dims = DIMS + DIMS
    values = ERRORS + [1.3 * e for e in ERRORS]
    slope, intercept, ci = loglog_fit(dims, values)
    expected_slope, expected_intercept = np.polyfit(np.log10(dims), np.log10(values), 1)
    assert (slope, intercept) == pytest.approx((expected_slope, expected_intercept), rel=1e-10)
    # Slope standard error by hand: sqrt(SSR / (n - 2) / Sxx), t quantile from scipy's interval.
    x, y = np.log10(dims), np.log10(values)
    residuals = y - (expected_slope * x + expected_intercept)
    stderr = np.sqrt(residuals @ residuals / (len(x) - 2) / ((x - x.mean()) @ (x - x.mean())))
    low, high = stats.t.interval(0.95, len(x) - 2, loc=expected_slope, scale=stderr)
    assert ci == pytest.approx((low, high), rel=1e-8)
    assert loglog_fit([2, 8], [1.0, 0.25])[2] is None  # two points: no interval
    assert loglog_fit([2, 8], [1.0, 0.25])[0] == pytest.approx(-1.0)  # exactly d^-1
    for bad_dims, bad_values in (([2, 2], [1.0, 2.0]), ([2, 8], [1.0, 0.0]), ([2, 8], [1.0])):
        with pytest.raises(ReportError, match="log-log"):
            loglog_fit(bad_dims, bad_values)


def _alignment_trial(kernel: str, dim: int, rep: int, rel_error: float, cosine: float) -> TrialResult:
    metrics = {"rel_error": rel_error, "cosine": cosine, "abs_error": 2.0 * rel_error}
    return TrialResult(f"{kernel}-{dim}-{rep}", {"kernel": kernel, DIM_AXIS: str(dim)}, "completed",
                       rel_error, [(0, rel_error)], rep, metrics)


def alignment_results() -> list[TrialResult]:
    results = []
    for rep, factor in enumerate((1.0, 1.3)):
        for dim, error in zip(DIMS, ERRORS):
            results.append(_alignment_trial("laplace", dim, rep, factor * error, 1 - error / 10))
            # Gaussian: exact up to round-off; one exact zero that a log fit must leave out.
            results.append(_alignment_trial("gaussian", dim, rep, 0.0 if dim == 2 else 1e-30, 1.0))
    return results


def test_scaling_fits_group_by_kernel_and_match_polyfit():
    fits = {(f.group["kernel"], f.metric): f for f in scaling_fits(alignment_results(), ["kernel", DIM_AXIS],
                                                                     ("abs_error", "rel_error"))}
    laplace = fits[("laplace", "rel_error")]
    values = ERRORS + [1.3 * e for e in ERRORS]
    assert laplace.slope == pytest.approx(np.polyfit(np.log10(DIMS + DIMS), np.log10(values), 1)[0])
    assert laplace.dims == DIMS and laplace.n_points == 10
    assert laplace.means == pytest.approx([1.15 * e for e in ERRORS])  # mean of 1.0x and 1.3x
    # abs_error = 2 x rel_error: same slope, intercept shifted by log10(2).
    assert fits[("laplace", "abs_error")].slope == pytest.approx(laplace.slope)
    assert fits[("laplace", "abs_error")].intercept == pytest.approx(laplace.intercept + np.log10(2))
    gaussian = fits[("gaussian", "rel_error")]
    assert gaussian.n_points == 8 and gaussian.dims == DIMS[1:]  # the zeros at d = 2 left out
    assert gaussian.slope == pytest.approx(0.0, abs=1e-12)  # constant round-off: flat


def test_alignment_summary_tables_and_figures(tmp_path):
    results = alignment_results()
    summary = summarize(results, ["kernel", DIM_AXIS], "rel_error", "min")
    assert {(f.group["kernel"], f.metric) for f in summary.scaling} == {
        (k, m) for k in ("gaussian", "laplace") for m in ("abs_error", "rel_error")}
    extremes = dict((label, (low, high)) for label, low, high in dimension_extremes(results, ["kernel", DIM_AXIS],
                                                                                     ("cosine",)))
    low, high = extremes["kernel=laplace"]
    assert low["cosine"] == pytest.approx(1 - ERRORS[0] / 10)  # d = 2 (same cosine in both replicates)
    assert high["cosine"] == pytest.approx(1 - ERRORS[-1] / 10)  # d = 512
    figures = plots.render_figures(summary, results, tmp_path)
    assert (tmp_path / "error_vs_dim.png").exists() and (tmp_path / "alignment_diagnostics.png").exists()
    assert "metric_vs_step.png" not in {p.name for p in figures.values()}  # one step per trial: no curve
    text = render_markdown(summary, figures, tmp_path / "r.md", "t").read_text()
    slope = next(f.slope for f in summary.scaling if f.group["kernel"] == "laplace" and f.metric == "rel_error")
    assert "| kernel=laplace | rel_error | 2-512 |" in text and f"| {slope:.3f} |" in text
    assert "error_vs_dim.png" in text
    # A sweep without a dimension axis has no such tables or figures.
    plain = summarize(fake_results(), AXES, "swd", "min")
    assert plain.scaling == [] and plain.diagnostics == []
    (tmp_path / "plain").mkdir()
    plain_figures = plots.render_figures(plain, fake_results(), tmp_path / "plain")
    assert "error_vs_dim.png" not in {p.name for p in plain_figures.values()}


def test_quality_metrics_per_configuration(tmp_path):
    def trial(name, kernel, swd, mmd):
        return TrialResult(name, {"kernel": kernel}, "completed", swd, [(100, swd)], 0,
                           {"swd": swd, "mmd": mmd, "loss": 9.0})

    results = [trial("a", "laplace", 0.2, 0.01), trial("b", "laplace", 0.4, 0.03),
               trial("c", "gaussian", 0.3, 0.02),
               TrialResult("d", {"kernel": "gaussian"}, "failed", 5.0, [(100, 5.0)], 1, {"swd": 5.0, "mmd": 1.0})]
    summary = summarize(results, ["kernel"], "swd", "min")
    # Natural order (gaussian < laplace); the failed trial is not averaged; loss is not a quality metric.
    assert summary.quality == [("kernel=gaussian", {"swd": 0.3, "mmd": 0.02}),
                               ("kernel=laplace", {"swd": pytest.approx(0.3), "mmd": pytest.approx(0.02)})]
    text = render_markdown(summary, {}, tmp_path / "r.md", "t").read_text()
    assert "| configuration | swd | mmd |" in text and "| kernel=gaussian | 0.3 | 0.02 |" in text
    assert summarize(fake_results(), AXES, "swd", "min").quality == []  # no metrics logged
