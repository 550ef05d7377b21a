"""Fault table of the closing note: inject each fault for real, N times, and count from MLflow.

    .venv/bin/python scripts/fault_table.py --repeats 2

Columns: fault kind | times injected | trials lost | duplicate runs | orphan RUNNING runs (counting
rules: tests/test_faults.py `outcome_counts`). Faults:
- trial exception (a trial's data set is missing at run time), NaN loss (lr 1e30, no clipping),
  driver SIGKILL + `driftsweep resume`, plan submitted twice (`run` again, then `resume` of the
  finished sweep): driven here through the CLI (embedded local Ray, SQLite store in a temp dir);
- worker node death, MLflow server restart, MLflow server down for good (then resume): the tests in
  tests/test_faults.py, run by pytest with DRIFTSWEEP_FAULT_COUNTS set so that each appends its counts.

Prints the Markdown table (and writes it to --out when given).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import TINY_WORKLOAD  # noqa: E402 - also sets Ray's loopback/tmpdir environment
from mlflow.tracking import MlflowClient  # noqa: E402
from test_faults import COUNTS_ENV, outcome_counts, run_cli, sweep_runs  # noqa: E402

from orchestrator.plan import expand_trials, load_plan  # noqa: E402

PYTEST_FAULTS = {  # test id -> its fault kind in the table (the test records it)
    "test_worker_node_death_resumes_trial_from_checkpoint_elsewhere": "worker node death",
    "test_mlflow_server_restart_mid_sweep_loses_no_metric": "MLflow server restart",
    "test_mlflow_server_down_for_good_fails_in_bounded_time_then_resumes": "MLflow server down for good, then resume",
}
ORDER = ["trial exception", "NaN loss", "worker node death", "driver SIGKILL + resume", "MLflow server restart",
         "MLflow server down for good, then resume", "plan submitted twice"]
KILL_TIMEOUT_S = 300


def write_plan(directory: Path, name: str, axes: dict, **sections) -> Path:
    """A plan on the tiny workload with the embedded defaults (SQLite store and Tune state in `directory`)."""
    plan = {"name": name, "seed": 7, "workload": dict(TINY_WORKLOAD), "axes": axes,
            "failure": {"max_retries": 1}, "resources": {"cpus_per_trial": 1, "max_concurrent": 2}, **sections}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """Wait for a CLI process: (exit code, stderr)."""
    _, stderr = process.communicate(timeout=KILL_TIMEOUT_S)
    return process.returncode, stderr


def counts_of(directory: Path, path: Path, failed=lambda trial: False) -> dict[str, int]:
    """outcome_counts of the plan's sweep, read from its SQLite store; `failed(trial)` marks the trials
    the fault makes fail for good."""
    plan = load_plan(path)
    trials = expand_trials(plan)
    client = MlflowClient(f"sqlite:///{directory / 'mlflow.db'}")
    parents, children = sweep_runs(client, plan.name)
    return outcome_counts(parents, children, {t.trial_id for t in trials},
                          frozenset(t.trial_id for t in trials if failed(t)))


def expect(condition: bool, what: str, stderr: str = "") -> None:
    """Stop the table when an injection did not behave as the tests say (the numbers would mislead)."""
    if not condition:
        raise SystemExit(f"fault_table: {what}\n{stderr[-2000:]}")


def trial_exception(directory: Path) -> dict[str, int]:
    path = write_plan(directory, "fault-exception", {"data.name": ["ring_mog", "cifar10"]})
    code, stderr = finish(run_cli("run", str(path), cwd=directory))
    expect(code == 3, f"trial exception: exit {code}, expected 3", stderr)
    return counts_of(directory, path, lambda t: t.params["data.name"] == "cifar10")


def nan_loss(directory: Path) -> dict[str, int]:
    path = write_plan(directory, "fault-nan", {"optim.lr": [1e-3, 1e30]},
                      workload={**TINY_WORKLOAD, "optim": {"grad_clip": None}})
    code, stderr = finish(run_cli("run", str(path), cwd=directory))
    expect(code == 3, f"NaN loss: exit {code}, expected 3", stderr)
    return counts_of(directory, path, lambda t: t.params["optim.lr"] == 1e30)


def driver_kill(directory: Path) -> dict[str, int]:
    path = write_plan(directory, "fault-driver-kill", {"kernel": ["laplace", "gaussian", "cauchy"]},
                      resources={"cpus_per_trial": 1, "max_concurrent": 1},
                      workload={**TINY_WORKLOAD, "total_steps": 400, "eval_every_steps": 50})
    # Own session: the driver and the local Ray it started die together, as on a lost head node.
    driver = run_cli("run", str(path), cwd=directory, start_new_session=True)
    client = MlflowClient(f"sqlite:///{directory / 'mlflow.db'}")
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.5)
        children = sweep_runs(client, "fault-driver-kill")[1] if (directory / "mlflow.db").exists() else []
        statuses = {c.info.status for c in children if int(c.data.tags.get("last_step", -1)) >= 50}
        if {"FINISHED", "RUNNING"} <= statuses:
            break
    expect(driver.poll() is None, "driver SIGKILL: the sweep ended before it could be killed")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.communicate()
    code, stderr = finish(run_cli("resume", str(path), cwd=directory))
    expect(code == 0, f"driver SIGKILL: resume exit {code}", stderr)
    return counts_of(directory, path)


def submitted_twice(directory: Path) -> dict[str, int]:
    path = write_plan(directory, "fault-twice", {"kernel": ["laplace", "gaussian"]})
    code, stderr = finish(run_cli("run", str(path), cwd=directory))
    expect(code == 0, f"plan submitted twice: first run exit {code}", stderr)
    code, stderr = finish(run_cli("run", str(path), cwd=directory))
    expect(code == 2 and "already exists" in stderr, f"plan submitted twice: second run exit {code}", stderr)
    code, stderr = finish(run_cli("resume", str(path), cwd=directory))
    expect(code == 0, f"plan submitted twice: resume of the finished sweep exit {code}", stderr)
    return counts_of(directory, path)


CLI_FAULTS = {"trial exception": trial_exception, "NaN loss": nan_loss, "driver SIGKILL + resume": driver_kill,
              "plan submitted twice": submitted_twice}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="injections per fault kind")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()

    records: list[dict] = []
    for repeat in range(args.repeats):
        for kind, inject in CLI_FAULTS.items():
            with tempfile.TemporaryDirectory(prefix="ds_fault_") as tmp:
                started = time.monotonic()
                records.append({"fault": kind, **inject(Path(tmp))})
                print(f"[{repeat + 1}/{args.repeats}] {kind}: {records[-1]} ({time.monotonic() - started:.0f} s)",
                      flush=True)
        with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as counts:
            started = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_faults.py"),
                 "-k", " or ".join(PYTEST_FAULTS)],
                cwd=REPO, env={**os.environ, COUNTS_ENV: counts.name}, capture_output=True, text=True,
            )
            expect(result.returncode == 0, "tests/test_faults.py failed", result.stdout)
            found = [json.loads(line) for line in counts.read().splitlines() if line.strip()]
            expect(sorted(r["fault"] for r in found) == sorted(PYTEST_FAULTS.values()),
                   f"tests/test_faults.py recorded {found}")
            records.extend(found)
            print(f"[{repeat + 1}/{args.repeats}] pytest faults: {found} ({time.monotonic() - started:.0f} s)",
                  flush=True)

    rows = ["| fault kind | times injected | trials lost | duplicate runs | orphan RUNNING runs |",
            "| --- | --- | --- | --- | --- |"]
    for kind in ORDER:
        mine = [r for r in records if r["fault"] == kind]
        rows.append(f"| {kind} | {len(mine)} | {sum(r['trials_lost'] for r in mine)} | "
                    f"{sum(r['duplicate_runs'] for r in mine)} | {sum(r['orphan_running'] for r in mine)} |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
