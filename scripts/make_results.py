"""Run the paper-reproduction plans (examples/paper/*.yaml) and collect their reports for docs/.

Two phases, so the (cheap) reports can be rebuilt without re-running the (expensive) sweeps:

  python scripts/make_results.py run [PLAN_NAME ...]     # driftsweep run, one plan after another
  python scripts/make_results.py report [PLAN_NAME ...]  # driftsweep report -> docs/results/<name>/

Every sweep runs in its own scratch directory <workdir>/<name> (default /tmp/paper_runs, outside the
repository): its mlflow.db and ray_results stay there. `report` copies report.md, main_effects.csv
and the PNGs (not the self-contained report.html, whose inline images would double the size) into
docs/results/<name>/. The wall time of each run is written to <workdir>/<name>/wall_time_s.txt and
printed. docs/results.md is written by hand from these reports.
"""

from __future__ import annotations

import argparse
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
        args = ["report", str(PLAN_DIR / f"{name}.yaml"), "--out", str(out)]
        if threshold is not None:
            args += ["--threshold", str(threshold)]
        if _driftsweep(args, cwd) != 0:
            print(f"{name}: report failed", flush=True)
            continue
        target = DOCS_DIR / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for path in sorted(out.iterdir()):
            if path.suffix in COPIED_SUFFIXES:
                shutil.copy2(path, target / path.name)
        print(f"{name}: report copied to {target.relative_to(REPO)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("run", "report"))
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
    else:
        collect_reports(names, args.workdir, args.threshold)


if __name__ == "__main__":
    main()
