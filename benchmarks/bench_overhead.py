"""Orchestration overhead: 16 identical short trials three ways, in one run.

1. driftsweep: a plan (one configuration x 16 replicates) through `run_sweep` (embedded Ray Tune,
   2 concurrent trials, MLflow child runs, checkpoints) -- wall time from the call to its return;
2. Optuna's own `study.optimize(objective, n_trials=16, n_jobs=2)` (threads, no tracking);
3. a bare sequential loop over the same 16 workloads: its per-trial times give the trial compute.

Overhead ratio = wall / (sum of trial compute / concurrency) with concurrency 2 for paths 1 and 2
(1.0 = no overhead). Every path runs torch with 1 thread per trial (Ray sets OMP_NUM_THREADS from
cpus_per_trial=1), so the compute is comparable. Also reported: seconds from the `run_sweep` call
to the first metric visible in MLflow.

Usage:
    python benchmarks/bench_overhead.py [--total-steps 200] [--trials 16] [--workdir /tmp/bench]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import optuna
import torch
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.plan import expand_trials, load_plan, resolve_tracking_uri
from orchestrator.runner import run_sweep
from workloads.train import run_workload

CONCURRENCY = 2


def bench_plan(name: str, total_steps: int, trials: int) -> dict:
    """One configuration, `trials` replicates (distinct seeds, identical compute)."""
    return {
        "name": name, "seed": 0,
        "workload": {"device": "cpu", "data": {"name": "ring_mog"}, "batch_size": 128,
                     "generator": {"hidden_dim": 64, "num_layers": 3}, "total_steps": total_steps,
                     "eval_every_steps": max(total_steps // 4, 1), "eval": {"num_samples": 500}},
        "axes": {"kernel": ["laplace"]}, "replicates": trials,
        "resources": {"cpus_per_trial": 1, "max_concurrent": CONCURRENCY},
        "budget": {"max_trials": trials},
    }


def watch_first_metric(tracking_uri: str, experiment: str, started: float, out: dict, stop: threading.Event):
    """Poll MLflow until any run of `experiment` has a metric; record the seconds since `started`."""
    client = MlflowClient(tracking_uri)
    while not stop.is_set():
        try:
            found = client.get_experiment_by_name(experiment)
            if found is not None and any(r.data.metrics for r in client.search_runs([found.experiment_id])):
                out["first_metric_s"] = time.perf_counter() - started
                return
        except Exception:  # noqa: BLE001 - the store may not exist yet
            pass
        time.sleep(0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-steps", type=int, default=200, help="training steps per trial")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ds_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(bench_plan(f"bench-{int(time.time())}", args.total_steps, args.trials)))
    plan = load_plan(path)
    configs = [trial.config for trial in expand_trials(plan)]
    torch.set_num_threads(1)

    # -- 3. bare sequential loop: the trial compute.
    compute_s = []
    for config in configs:
        started = time.perf_counter()
        run_workload(config, lambda step, metrics: None)
        compute_s.append(time.perf_counter() - started)
    ideal_s = sum(compute_s) / CONCURRENCY

    # -- 2. Optuna's own parallel loop.
    queue = list(configs)
    lock = threading.Lock()

    def objective(trial: optuna.Trial) -> float:
        with lock:
            config = queue.pop()
        return run_workload(config, lambda step, metrics: None)["final"]["swd"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    optuna.create_study().optimize(objective, n_trials=len(configs), n_jobs=CONCURRENCY)
    optuna_wall_s = time.perf_counter() - started

    # -- 1. driftsweep (Ray Tune + MLflow), with the time to the first metric in MLflow.
    first: dict = {}
    stop = threading.Event()
    started = time.perf_counter()
    watcher = threading.Thread(target=watch_first_metric,
                               args=(resolve_tracking_uri(plan), plan.name, started, first, stop), daemon=True)
    watcher.start()
    summary = run_sweep(plan, path)
    ds_wall_s = time.perf_counter() - started
    stop.set()

    print(f"trials: {len(configs)} x {args.total_steps} steps; mean trial compute {sum(compute_s) / len(compute_s):.2f} s "
          f"(sum {sum(compute_s):.1f} s, ideal wall at {CONCURRENCY} concurrent {ideal_s:.1f} s)")
    print(f"{'path':<34}{'wall s':>9}{'overhead ratio':>16}")
    print(f"{'driftsweep (Ray Tune, 2 conc.)':<34}{ds_wall_s:>9.1f}{ds_wall_s / ideal_s:>16.2f}")
    print(f"{'optuna study.optimize(n_jobs=2)':<34}{optuna_wall_s:>9.1f}{optuna_wall_s / ideal_s:>16.2f}")
    print(f"{'sequential loop':<34}{sum(compute_s):>9.1f}{sum(compute_s) / ideal_s:>16.2f}")
    print(f"driftsweep: {summary.n_completed}/{summary.n_total} completed; first metric visible in MLflow after "
          f"{first.get('first_metric_s', float('nan')):.1f} s")


if __name__ == "__main__":
    main()
