"""The shipped paper-reproduction plans (examples/paper/): they validate, fit their budgets, and shrunken
versions of plans 1-4 show the papers' qualitative results.

Shrinking: the shipped YAML is loaded, a few sizes are overridden (fewer dims/steps/samples, one
replicate), the plan is validated again and expanded with `expand_trials`, and every trial config runs
through `workloads.run_workload` directly (no Ray): the same configs `driftsweep run` would schedule.

"Untrained generator": scripts/make_results.py's `untrained_metrics` (the generator at its initial
weights, evaluated on the trained run's evaluation set).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.plan import count_trials, expand_trials, load_plan, parse_plan
from orchestrator.report import loglog_fit, steps_to_threshold
from workloads import run_workload

# The untrained-generator evaluation lives in the results script (docs/results/*/untrained.csv); the
# tests use the same function.
_spec = importlib.util.spec_from_file_location(
    "make_results", Path(__file__).resolve().parent.parent / "scripts" / "make_results.py")
make_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_results)
untrained = make_results.untrained_metrics

PAPER_DIR = Path(__file__).resolve().parent.parent / "examples" / "paper"
PLAN_NAMES = ("alignment", "toys", "annealing", "sinkhorn", "digits")


def shrunken_plan(name: str, workload: dict | None = None, **top: object):
    """The shipped plan `name` with workload fields merged in and top-level sections replaced."""
    data = yaml.safe_load((PAPER_DIR / f"{name}.yaml").read_text())
    base = data["workload"]
    for key, value in (workload or {}).items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    data.update(copy.deepcopy(top))
    data["replicates"] = top.get("replicates", 1)
    return parse_plan(yaml.safe_dump(data, sort_keys=False), source=f"{name}.yaml (shrunken)")


def final_metrics(config) -> dict[str, float]:
    """Run one workload and return the metrics of its last report."""
    reports: list[dict[str, float]] = []
    run_workload(config, lambda step, metrics: reports.append(dict(metrics, step=step)))
    return reports[-1]


def history(config, metric: str) -> list[tuple[int, float]]:
    """(step, value) of one metric over a run."""
    points: list[tuple[int, float]] = []
    run_workload(config, lambda step, metrics: points.append((step, metrics[metric])))
    return points


# ---------------------------------------------------------------------------------------------
# Every shipped plan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_shipped_plan_validates_and_fits_its_budget(name):
    path = PAPER_DIR / f"{name}.yaml"
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    plan = load_plan(path)
    count = count_trials(plan)
    assert f"ok: {count} trials" in result.output
    assert count <= plan.budget.max_trials
    assert plan.budget.max_wall_time_s is not None  # a CPU run always stops on its own
    assert plan.resources.gpus_per_trial == 0 and plan.workload.device == "cpu"  # runs here as shipped
    text = path.read_text()
    # The comments tell what differs from the paper and how to run the full size on a cluster.
    assert "What differs from the paper" in text
    assert f"driftsweep submit examples/paper/{name}.yaml --k8s" in text


def test_annealing_plan_carries_its_threshold():
    plan = load_plan(PAPER_DIR / "annealing.yaml")
    assert plan.objective.threshold is not None and plan.objective.metric == "swd"
    assert sorted(plan.axes["anneal_rate"]) == [0, 1, 3, 5]


# ---------------------------------------------------------------------------------------------
# 1. Alignment (§5.1): Gaussian exact, Laplace error falls with d
# ---------------------------------------------------------------------------------------------


def test_alignment_gaussian_exact_and_laplace_slope_negative():
    plan = shrunken_plan(
        "alignment",
        {"alignment": {"num_ref": 1024, "num_query": 128}},
        axes={"kernel": ["laplace", "gaussian"], "alignment.dataset": ["ring_mog_hd", "raw_mog_hd"],
              "alignment.dim": [4, 32, 256]},
    )
    trials = expand_trials(plan)
    assert len(trials) == 12
    by_group: dict[tuple[str, str], list[tuple[int, dict[str, float]]]] = {}
    for trial in trials:
        metrics = final_metrics(trial.config)
        key = (trial.config.kernel, trial.config.alignment.dataset)
        by_group.setdefault(key, []).append((trial.config.alignment.dim, metrics))
    for dataset in ("ring_mog_hd", "raw_mog_hd"):
        for _, m in by_group[("gaussian", dataset)]:
            # Theorem 1: m_p - m_q = tau^2 (s_p - s_q) exactly; float64 round-off is ~1e-30 relative.
            assert m["rel_error"] < 1e-20
            assert m["lambda_ratio"] == pytest.approx(1.0, abs=1e-9)
            assert m["cosine"] == pytest.approx(1.0, abs=1e-9)
        laplace = sorted(by_group[("laplace", dataset)], key=lambda point: point[0])
        slope, _, _ = loglog_fit([d for d, _ in laplace], [m["rel_error"] for _, m in laplace])
        # Theorem 4: the error falls with d. This shrunken run measured -1.08 (ring) and -0.86 (raw);
        # the full plan -1.36 (ring) and -0.99 (raw) over d = 2..2048. -0.5 keeps a margin for the
        # Monte Carlo noise of 1024 references on another platform; a d-independent error gives ~0.
        assert slope < -0.5, (dataset, slope)
        assert laplace[-1][1]["cosine"] > laplace[0][1]["cosine"]
        assert laplace[-1][1]["cosine"] > 0.99


# ---------------------------------------------------------------------------------------------
# 2. Toys (§5.2) and 4. Sinkhorn: every kernel trains well past the untrained generator
# ---------------------------------------------------------------------------------------------

TOY_SHRINK = {"total_steps": 100, "eval_every_steps": 100, "batch_size": 128, "eval": {"num_samples": 500}}
# Trained SWD must be below this fraction of the untrained generator's SWD on the same evaluation
# set. Measured with these sizes (100 steps, batch 128, 500 samples):
# Laplace 0.14-0.32, Gaussian 0.20-0.43 (ring_mog), Sinkhorn 0.13 (checkerboard) and 0.23 (ring_mog);
# the annealing test's Gaussian runs are below 0.5 too. Seeds are fixed and CPU runs deterministic, so
# the bound only absorbs platform float differences; a zero or wrong-sign drift leaves the ratio
# near or above 1. The full plans reach far lower (docs/results.md).
TRAINED_TO_UNTRAINED_MAX = 0.6


def _check_trains(plan, kernels: tuple[str, ...]) -> dict[tuple[str, str], float]:
    ratios = {}
    for trial in expand_trials(plan):
        assert trial.config.kernel in kernels
        trained, initial = final_metrics(trial.config), untrained(trial.config)
        ratios[(trial.config.data.name, trial.config.kernel)] = trained["swd"] / initial["swd"]
        assert trained["mmd"] < initial["mmd"]
    assert max(ratios.values()) < TRAINED_TO_UNTRAINED_MAX, ratios
    return ratios


@pytest.mark.slow
def test_toys_laplace_and_gaussian_both_train():
    ratios = _check_trains(shrunken_plan("toys", TOY_SHRINK), ("laplace", "gaussian"))
    assert len(ratios) == 8  # 4 targets x 2 kernels


@pytest.mark.slow
def test_sinkhorn_trains_too():
    plan = shrunken_plan("sinkhorn", TOY_SHRINK,
                         axes={"data.name": ["ring_mog", "checkerboard"], "kernel": ["sinkhorn"]})
    assert len(_check_trains(plan, ("sinkhorn",))) == 2


# ---------------------------------------------------------------------------------------------
# 3. Annealing: every rate trains; steps-to-threshold is defined on the real curves
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_annealing_rates_train_and_anneal_on_schedule():
    plan = shrunken_plan(
        "annealing",
        {"total_steps": 100, "eval_every_steps": 25, "batch_size": 256, "eval": {"num_samples": 1000}},
        axes={"anneal_rate": [0, 5], "kernel": ["gaussian"]},
    )
    tau0 = plan.workload.temperatures[0]
    for trial in expand_trials(plan):
        reports: list[tuple[int, dict[str, float]]] = []
        run_workload(trial.config, lambda step, metrics: reports.append((step, dict(metrics))))
        assert [step for step, _ in reports] == [25, 50, 75, 100]
        # tau(t) = tau0 exp(-r t) with t = step / total_steps (workloads/config.py): at the end t = 1.
        rate = trial.config.anneal_rate
        assert reports[-1][1]["tau/k0"] == pytest.approx(tau0 * math.exp(-rate))
        initial = untrained(trial.config)["swd"]
        assert reports[-1][1]["swd"] < TRAINED_TO_UNTRAINED_MAX * initial
        # Steps to threshold is defined on the real curve: half the untrained SWD is reached.
        curve = [(step, metrics["swd"]) for step, metrics in reports]
        assert steps_to_threshold(curve, TRAINED_TO_UNTRAINED_MAX * initial, "min") is not None


# ---------------------------------------------------------------------------------------------
# One shrunken plan end to end: driftsweep run, then driftsweep report
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_alignment_plan_end_to_end_through_run_and_report(tmp_path):
    data = yaml.safe_load((PAPER_DIR / "alignment.yaml").read_text())
    data["workload"]["alignment"].update(num_ref=256, num_query=64)
    data["axes"]["alignment.dim"] = [8, 128]
    data["replicates"] = 1
    (tmp_path / "alignment.yaml").write_text(yaml.safe_dump(data, sort_keys=False))  # keep the axis order

    def driftsweep(*args: str) -> subprocess.CompletedProcess:
        # A separate process, as a user runs it (the embedded Ray starts and stops with it); the
        # environment carries conftest's loopback-only Ray settings and temporary RAY_TMPDIR.
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path, env=os.environ.copy(),
                              capture_output=True, text=True, timeout=300)

    run = driftsweep("run", "alignment.yaml")
    assert run.returncode == 0, run.stderr[-2000:]
    report = driftsweep("report", "alignment.yaml", "--out", "rep")
    assert report.returncode == 0, report.stderr[-2000:]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| 8 | 0 | 0 | 0 | 0 |" in text  # 8 completed, none pruned/failed/running/without metric
    assert (tmp_path / "rep" / "error_vs_dim.png").is_file()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[1] == "rel_error":
            rows[cells[0]] = float(cells[6])
    # The slope the report prints: negative for Laplace on both data sets (Theorem 4).
    assert rows["kernel=laplace,alignment.dataset=ring_mog_hd"] < 0
    assert rows["kernel=laplace,alignment.dataset=raw_mog_hd"] < 0
    assert len(rows) == 4
