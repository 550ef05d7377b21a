"""Run the paper-reproduction plans (examples/paper/*.yaml) and collect their reports for docs/.

Two phases, so the (cheap) reports can be rebuilt without re-running the (expensive) sweeps:

  python scripts/make_results.py run [PLAN_NAME ...]     # driftsweep run, one plan after another
  python scripts/make_results.py report [PLAN_NAME ...]  # driftsweep report -> docs/results/<name>/
  python scripts/make_results.py baseline [PLAN_NAME ...]  # untrained generator -> untrained.csv

Every sweep runs in its own scratch directory <workdir>/<name> (default /tmp/paper_runs, outside the
repository): its mlflow.db and ray_results stay there. `report` copies report.md, main_effects.csv
and the PNGs (not the self-contained report.html, whose inline images would double the size) into
docs/results/<name>/. The wall time of each run is written to <workdir>/<name>/wall_time_s.txt and
printed. `baseline` evaluates, for every trial configuration of a training plan (replicate 0), the
generator at its initial weights (`untrained_metrics`) and, on toys, the evaluation floor (two real
samples against each other, `evaluation_floor`), and writes docs/results/<name>/untrained.csv.
docs/results.md is written by hand from these files.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLAN_DIR = REPO / "examples" / "paper"
DOCS_DIR = REPO / "docs" / "results"
PLAN_NAMES = ("alignment", "toys", "annealing", "sinkhorn", "digits")
COPIED_SUFFIXES = (".md", ".csv", ".png")


def _driftsweep(args: list[str], cwd: Path) -> int:
    """Run `driftsweep ARGS` (as python -m orchestrator) in cwd; returns the exit code."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.setdefault("RAY_TMPDIR", "/tmp/rt_paper")  # short: Ray's socket paths have a length limit
    return subprocess.call([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env)


def run_plans(names: list[str], workdir: Path) -> None:
    """`driftsweep run` every named plan in <workdir>/<name>; a plan already run is skipped.

    Args:
        names: plan names (file stems under examples/paper/).
        workdir: scratch root outside the repository.
    """
    for name in names:
        cwd = workdir / name
        marker = cwd / "wall_time_s.txt"
        if marker.exists():
            print(f"{name}: already run ({marker.read_text().strip()} s), skipped", flush=True)
            continue
        cwd.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        code = _driftsweep(["run", str(PLAN_DIR / f"{name}.yaml")], cwd)
        wall_s = time.perf_counter() - started
        print(f"{name}: exit {code}, wall {wall_s:.0f} s", flush=True)
        if code == 0:
            marker.write_text(f"{wall_s:.0f}\n")


def collect_reports(names: list[str], workdir: Path, threshold: float | None) -> None:
    """`driftsweep report` every named plan and copy the files into docs/results/<name>/.

    Args:
        names: plan names.
        workdir: where `run_plans` ran them.
        threshold: passed as --threshold when given (else the plan's objective.threshold).
    """
    for name in names:
        cwd, out = workdir / name, workdir / name / "report"
        shutil.rmtree(out, ignore_errors=True)  # no stale figure of an earlier report version
        args = ["report", str(PLAN_DIR / f"{name}.yaml"), "--out", str(out)]
        if threshold is not None:
            args += ["--threshold", str(threshold)]
        if _driftsweep(args, cwd) != 0:
            print(f"{name}: report failed", flush=True)
            continue
        target = DOCS_DIR / name
        target.mkdir(parents=True, exist_ok=True)
        for stale in [*target.glob("*.png"), target / "report.md", target / "main_effects.csv"]:
            stale.unlink(missing_ok=True)  # untrained.csv (the baseline phase's) stays
        for path in sorted(out.iterdir()):
            if path.suffix in COPIED_SUFFIXES:
                shutil.copy2(path, target / path.name)
        print(f"{name}: report copied to {target.relative_to(REPO)}", flush=True)


def untrained_metrics(config) -> dict[str, float]:
    """Metrics of a training workload's generator at its initial weights.

    The same config with total_steps = 1 and optim.lr = 1e-12: its single AdamW step moves each
    weight by about 1e-12 (Adam's step is ~lr per weight), so the evaluation sees the initial
    weights of that seed on the same evaluation set as the trained run.

    Args:
        config: a WorkloadConfig with task = train.

    Returns:
        The metrics the workload reports after that step.
    """
    from workloads import run_workload

    frozen = config.model_copy(update={"total_steps": 1, "eval_every_steps": 1})
    frozen.optim = frozen.optim.model_copy(update={"lr": 1e-12})
    reports: list[dict[str, float]] = []
    run_workload(frozen, lambda step, metrics: reports.append(metrics))
    return reports[-1]


def evaluation_floor(config, draws: int = 5) -> dict[str, float]:
    """Mean SWD and MMD between two independent real samples of eval.num_samples points (toys only).

    The level a perfect generator scores on average at this evaluation size: a trained run at or
    below it is indistinguishable from the data at this sample size.

    Args:
        config: a WorkloadConfig of a toy data set.
        draws: independent pairs averaged (seeds 0 .. draws - 1).

    Returns:
        {"swd_floor": ..., "mmd_floor": ...}.
    """
    import torch

    from workloads.datasets import make_dataset
    from workloads.metrics import rbf_mmd, sliced_wasserstein

    dataset, swd, mmd = make_dataset(config), [], []
    for seed in range(draws):
        generator = torch.Generator().manual_seed(seed)
        first, second = (dataset.sample(config.eval.num_samples, generator) for _ in range(2))
        swd.append(sliced_wasserstein(first, second, num_projections=config.eval.swd_projections))
        mmd.append(rbf_mmd(first, second))
    return {"swd_floor": sum(swd) / draws, "mmd_floor": sum(mmd) / draws}


def write_baselines(names: list[str]) -> None:
    """Untrained-generator metrics of every configuration (replicate 0) of each named training plan.

    Args:
        names: plan names; alignment (no training) is skipped.
    """
    from orchestrator.plan import expand_trials, load_plan

    for name in names:
        plan = load_plan(PLAN_DIR / f"{name}.yaml")
        if plan.workload.task != "train":
            continue
        rows = []
        for trial in expand_trials(plan):
            if trial.replicate == 0:
                metrics = untrained_metrics(trial.config)
                # Labelled like the report's configurations: every axis, axis=level.
                label = ",".join(f"{axis}={json.dumps(value) if isinstance(value, list) else value}"
                                 for axis, value in trial.params.items())
                floor = {} if trial.config.is_image else evaluation_floor(trial.config)
                rows.append({"configuration": label, **{k: metrics[k] for k in ("swd", "mmd", "fd", "fid")
                                                         if k in metrics}, **floor})
        target = DOCS_DIR / name
        target.mkdir(parents=True, exist_ok=True)
        with (target / "untrained.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"{name}: untrained metrics of {len(rows)} configurations -> {target / 'untrained.csv'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("run", "report", "baseline"))
    parser.add_argument("plans", nargs="*", help=f"plan names among {', '.join(PLAN_NAMES)}; default: all")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/paper_runs"), help="scratch root")
    parser.add_argument("--threshold", type=float, default=None, help="report: steps-to-threshold level")
    args = parser.parse_args()
    unknown = sorted(set(args.plans) - set(PLAN_NAMES))
    if unknown:
        parser.error(f"unknown plan name(s) {', '.join(unknown)}; allowed: {', '.join(PLAN_NAMES)}")
    names = args.plans or list(PLAN_NAMES)
    if args.phase == "run":
        run_plans(names, args.workdir)
    elif args.phase == "report":
        collect_reports(names, args.workdir, args.threshold)
    else:
        write_baselines(names)


if __name__ == "__main__":
    main()
