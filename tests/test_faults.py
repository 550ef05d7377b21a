"""Faults injected for real: a worker node killed mid-trial, the MLflow server restarted mid-sweep,
and the MLflow server gone for good.

Each test reads its outcome back from MLflow (the user's record) and from Ray Tune's own per-trial
result log (what the trial process actually reported), so a trial that silently restarted from step 0
cannot pass: MLflow skips steps it already has, but Tune's log would show them reported twice.

With env DRIFTSWEEP_FAULT_COUNTS=<file>, each test appends its counts (fault kind, trials lost,
duplicate runs, orphan RUNNING runs) as a JSON line; scripts/fault_table.py runs them and prints the
table of the closing note.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from conftest import TINY_WORKLOAD, free_port, start_mlflow_server, wait_for_server
from orchestrator.artifacts import plot_steps
from orchestrator.errors import DriftsweepError, TrackingUnreachableError
from orchestrator.tracking import RETRY_WINDOW_ENV, RetryingClient

DOWN_S = 8.0  # how long the MLflow server stays down before it is started again
RETRY_WINDOW_S = 5.0  # DRIFTSWEEP_TRACKING_RETRY_S of the server-down-for-good sweep
COUNTS_ENV = "DRIFTSWEEP_FAULT_COUNTS"
# Dead-node detection in seconds instead of Ray's default ~30 s (health check every 1 s, 3 misses).
FAST_HEALTH_CHECK = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def run_cli(*args: str, cwd: Path, env: dict | None = None, **popen) -> subprocess.Popen:
    """`driftsweep ARGS` as its own process (the real entry point, its real exit code)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=cwd,
                            env={**os.environ, **(env or {})}, text=True, **popen)


@contextlib.contextmanager
def cli_driver(*args: str, cwd: Path, env: dict | None = None, **popen):
    """run_cli as a context: the driver process is killed on the way out if it still runs."""
    driver = run_cli(*args, cwd=cwd, env=env, **popen)
    try:
        yield driver
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def sweep_runs(client: MlflowClient, experiment_name: str) -> tuple[list, list]:
    """(parent runs, child runs) of an experiment."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return [], []
    runs = client.search_runs([experiment.experiment_id])
    return ([r for r in runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])


def tune_reported_steps(experiment_dir: Path) -> dict[str, list[int]]:
    """Tune's record of what each trial process reported: {trial dir name: [step, ...]} in order.

    result.json is written by the driver (Tune's JSON logger), one line per tune.report, across
    restores of the trial; a restart from step 0 would show its early steps twice.
    """
    reported = {}
    for result_file in experiment_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        reported[result_file.parent.name] = [int(line["step"]) for line in lines]
    return reported


def record_counts(kind: str, *, trials_lost: int, duplicate_runs: int, orphan_running: int) -> None:
    """Append this injection's counts to $DRIFTSWEEP_FAULT_COUNTS (when set) for the fault table."""
    path = os.environ.get(COUNTS_ENV)
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"fault": kind, "trials_lost": trials_lost, "duplicate_runs": duplicate_runs,
                                  "orphan_running": orphan_running}) + "\n")


def assert_nothing_lost(client: MlflowClient, name: str, kind: str) -> tuple[list, list]:
    """The sweep's runs after a `kind` fault: counts recorded for the fault table, all asserted 0.

    Returns:
        (parents, children) as sweep_runs.
    """
    parents, children = sweep_runs(client, name)
    counts = outcome_counts(parents, children, {"t0000", "t0001"})
    record_counts(kind, **counts)
    assert counts == {"trials_lost": 0, "duplicate_runs": 0, "orphan_running": 0}
    return parents, children


def outcome_counts(parents: list, children: list, trial_ids: set[str], failed_ids: frozenset[str] = frozenset()
                   ) -> dict[str, int]:
    """What a fault cost, read from MLflow.

    Args:
        parents, children: the sweep's runs (sweep_runs).
        trial_ids: the planned trial ids.
        failed_ids: trials the fault makes fail for good (they must end FAILED with an `error` tag).

    Returns:
        trials_lost: planned trials without their expected final record (FINISHED, or FAILED + error);
        duplicate_runs: parent runs beyond one plus child runs beyond one per trial;
        orphan_running: runs left RUNNING.
    """
    per_trial: dict[str, list] = {}
    for child in children:
        per_trial.setdefault(child.data.tags["trial_id"], []).append(child)

    def recorded(trial_id: str) -> bool:
        runs = per_trial.get(trial_id, [])
        if trial_id in failed_ids:
            return any(r.info.status == "FAILED" and r.data.tags.get("error") for r in runs)
        return any(r.info.status == "FINISHED" for r in runs)

    return {
        "trials_lost": sum(not recorded(trial_id) for trial_id in trial_ids),
        "duplicate_runs": max(len(parents) - 1, 0) + sum(len(runs) - 1 for runs in per_trial.values()),
        "orphan_running": sum(r.info.status == "RUNNING" for r in [*parents, *children]),
    }


# ---------------------------------------------------------------- worker node death


@pytest.fixture
def three_node_cluster():
    """Head with 0 CPUs (so every trial runs on a worker) + 2 workers of 1 CPU, fast dead-node detection."""
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH_CHECK})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, {node.node_id: node for node in workers}
    cluster.shutdown()


@pytest.mark.slow
def test_worker_node_death_resumes_trial_from_checkpoint_elsewhere(three_node_cluster, mlflow_server, write_plan,
                                                                    tmp_cwd):
    """Kill (ungracefully) the node of a trial that has checkpointed: the trial is restored from that
    checkpoint on the other node, in the same MLflow child run, and every trial finishes."""
    cluster, workers = three_node_cluster
    eval_steps = list(range(40, 321, 40))
    name = f"node-death-{tmp_cwd.name[-8:]}".lower()
    path = write_plan(
        name, {"kernel": ["laplace", "gaussian"]},
        failure={"max_retries": 1},
        resources={"cpus_per_trial": 1, "max_concurrent": 2},
        tracking={"uri": mlflow_server},
        cluster={"address": cluster.address, "storage_path": str(tmp_cwd / "tune")},
        workload={**TINY_WORKLOAD, "total_steps": eval_steps[-1], "eval_every_steps": 40},
    )
    client = MlflowClient(mlflow_server)
    victim = None
    with cli_driver("run", str(path), cwd=tmp_cwd) as driver:
        deadline = time.monotonic() + 240
        while victim is None and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            for child in sweep_runs(client, name)[1]:
                last_step = int(child.data.tags.get("last_step", -1))
                # Checkpointed (every eval step) and far from the end: the kill lands mid-trial.
                if child.info.status == "RUNNING" and eval_steps[0] <= last_step <= eval_steps[-3]:
                    victim = child
                    break
        assert victim is not None, "no trial reached a checkpointed step in time"
        killed_node_id = victim.data.tags["node_id"]
        killed_at_step = int(victim.data.tags["last_step"])
        cluster.remove_node(workers[killed_node_id], allow_graceful=False)
        stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr[-2000:]

    parents, children = assert_nothing_lost(client, name, "worker node death")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    restored = next(c for c in children if c.data.tags["trial_id"] == victim.data.tags["trial_id"])
    assert restored.info.run_id == victim.info.run_id
    # The restored attempt ran on the surviving worker and re-tagged the run with it.
    assert restored.data.tags["node_id"] != killed_node_id and restored.data.tags["node_id"] in workers
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        assert [m.step for m in sorted(client.get_metric_history(child.info.run_id, "swd"),
                                       key=lambda m: m.timestamp)] == eval_steps

    # What the trial processes reported to Tune: the restored trial went on from its last checkpointed
    # step, not from step 0, so no step was reported twice.
    reported = tune_reported_steps(tmp_cwd / "tune" / name)
    steps = reported[restored.info.run_name]
    assert steps == sorted(set(steps)) and steps[-1] == eval_steps[-1]


# ---------------------------------------------------------------- MLflow server restart / down for good


def test_retrying_client_gives_up_after_its_window_then_fails_fast():
    """Nothing listens on the port: the call retries for the window, then one line; the next call to
    the same URI fails at once instead of waiting again."""
    uri = f"http://127.0.0.1:{free_port()}"
    client = RetryingClient(uri, window_s=1.5)
    started = time.monotonic()
    with pytest.raises(TrackingUnreachableError) as info:
        client.search_experiments(max_results=1)
    waited_s = time.monotonic() - started
    assert 1.5 <= waited_s < 1.5 + 5  # the window, plus the last (refused, instant) attempt
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"tracking.uri={uri} did not answer search_experiments")
    assert "ConnectionError" in message and "driftsweep resume" in message
    started = time.monotonic()
    with pytest.raises(TrackingUnreachableError):
        RetryingClient(uri, window_s=1.5).get_experiment("0")
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_bad_retry_window_is_a_one_line_error(monkeypatch, value):
    monkeypatch.setenv("DRIFTSWEEP_TRACKING_RETRY_S", value)
    with pytest.raises(DriftsweepError, match=f"env DRIFTSWEEP_TRACKING_RETRY_S={value!r} is not a number"):
        RetryingClient("http://127.0.0.1:5000")


@pytest.mark.slow
@pytest.mark.server
def test_retrying_client_does_not_retry_a_request_error(server):
    """A 4xx answer (the run does not exist) is the caller's error: raised at once, not retried."""
    from mlflow.exceptions import RestException

    started = time.monotonic()
    with pytest.raises(RestException, match="RESOURCE_DOES_NOT_EXIST|not found"):
        RetryingClient(server.uri, window_s=30).get_run("0" * 32)
    assert time.monotonic() - started < 5


@pytest.mark.slow
@pytest.mark.server
def test_trials_on_an_external_cluster_use_the_drivers_retry_window(three_node_cluster, server, write_plan, tmp_cwd):
    """DRIFTSWEEP_TRACKING_RETRY_S set for the driver only, its cluster's nodes started without it (as on a
    real cluster, where Ray does not forward the driver's environment): the trials give up after the
    driver's window, not after the nodes' default 120 s."""
    assert os.environ.get(RETRY_WINDOW_ENV) is None, f"unset {RETRY_WINDOW_ENV}: the nodes must run on the default"
    cluster, _ = three_node_cluster
    name = f"window-{tmp_cwd.name[-8:]}".lower()
    path = write_plan(
        name, {"kernel": ["laplace", "gaussian"]}, failure={"max_retries": 0},
        resources={"cpus_per_trial": 1, "max_concurrent": 2},
        tracking={"uri": server.uri}, cluster={"address": cluster.address, "storage_path": str(tmp_cwd / "tune")},
        workload={**TINY_WORKLOAD, "total_steps": 3000, "eval_every_steps": 25},
    )
    client = MlflowClient(server.uri)
    with cli_driver("run", str(path), cwd=tmp_cwd, env={RETRY_WINDOW_ENV: "3"}) as driver:
        wait_for_running_step(client, name, 25, driver)
        server.kill()
        killed = time.monotonic()
        stdout, stderr = driver.communicate(timeout=400)
        elapsed_s = time.monotonic() - killed
    server.start()
    print(f"external cluster, driver window 3 s: the sweep ended {elapsed_s:.1f} s after the kill")
    assert driver.returncode == TrackingUnreachableError.exit_code, stderr[-2000:]
    # A trial on the nodes' own 120 s window would keep the sweep alive for over 120 s.
    assert elapsed_s < 90


@pytest.mark.server
@pytest.mark.parametrize("kind", ["parent", "child"])
def test_create_run_whose_reply_is_lost_is_not_made_twice(server, monkeypatch, kind):
    """The server creates the run, the reply never arrives (a transport error), the call is retried:
    the retry finds the run instead of creating a second one. Fault injected in the client: the first
    create_run goes through for real, then raises as a reset connection would."""
    from mlflow.exceptions import MlflowException

    from orchestrator.tracking import ChildRun, create_parent_run, ensure_experiment

    real_create = MlflowClient.create_run
    lost = []

    def create_then_lose_reply(self, *args, **kwargs):
        run = real_create(self, *args, **kwargs)
        if not lost:
            lost.append(run.info.run_id)
            raise MlflowException("API request failed: ConnectionResetError (reply lost)")
        return run

    client = RetryingClient(server.uri, window_s=30)
    experiment_id = ensure_experiment(client, f"lost-reply-{kind}-{time.time_ns()}")
    parent_id = None if kind == "parent" else create_parent_run(client, experiment_id, "p", {}, {}, [])
    monkeypatch.setattr(MlflowClient, "create_run", create_then_lose_reply)
    if kind == "parent":
        run_id = create_parent_run(client, experiment_id, "p", {"a": "1"}, {"t": "v"}, [])
    else:
        run_id = ChildRun(server.uri, experiment_id, parent_id, "t0000", "baseline", {"a": "1"}, {}).run_id
    runs = MlflowClient(server.uri).search_runs([experiment_id])
    assert lost == [run_id]  # the retry returned the run whose reply was lost
    assert len(runs) == (1 if kind == "parent" else 2)


class Server:
    """A PostgreSQL-backed `mlflow server` on a fixed 127.0.0.1 port that the test kills and restarts."""

    def __init__(self, backend_uri: str):
        self.backend_uri = backend_uri
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.root = Path(tempfile.mkdtemp(prefix="mlfr_", dir="/tmp"))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it (again) on the same port, unless it is running; return once it answers."""
        if self.process is None or self.process.poll() is not None:
            self.process = start_mlflow_server(self.backend_uri, self.port, self.root)
        wait_for_server(self.uri, self.process, self.root)

    def kill(self) -> None:
        """SIGKILL the server and its uvicorn child (its own process group): no graceful shutdown."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@pytest.fixture(scope="module")
def module_server(fresh_database):
    """One Server on its own database for this module (a server start costs ~15 s); killed at the end."""
    control = Server(fresh_database)
    yield control
    control.kill()


@pytest.fixture
def server(module_server):
    """The module's Server, running."""
    module_server.start()
    return module_server


def wait_for_running_step(client: MlflowClient, name: str, min_step: int, driver: subprocess.Popen,
                          timeout_s: float = 240):
    """The first RUNNING child run of experiment `name` that has logged step >= min_step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.5)
        for child in sweep_runs(client, name)[1]:
            if child.info.status == "RUNNING" and int(child.data.tags.get("last_step", -1)) >= min_step:
                return child
    raise AssertionError(f"no trial of {name} reached step {min_step} (driver exit {driver.poll()})")


@pytest.mark.slow
@pytest.mark.server
def test_mlflow_server_restart_mid_sweep_loses_no_metric(server, write_plan, tmp_cwd):
    """Kill the tracking server while trials log, keep it down until a trial's metric batch waits on it,
    start it again on the same port: every step each trial reported to Tune is in MLflow exactly once,
    including the batch that waited through the outage."""
    total_steps, every = 300, 15
    eval_steps = list(range(every, total_steps + 1, every))
    # Kill just after a step whose next two successors are not sample-plot steps: a trial's next tracking
    # call is then a metric batch (a plot upload would wait on the server before the batch), even when the
    # trial has moved on one evaluation before the kill lands.
    plotted = plot_steps(total_steps, every)
    kill_after = {step for step in eval_steps[:-5] if not {step + every, step + 2 * every} & plotted}
    name = "server-restart"
    path = write_plan(
        name, {"kernel": ["laplace", "gaussian"]},
        resources={"cpus_per_trial": 1, "max_concurrent": 2},
        tracking={"uri": server.uri}, cluster={"storage_path": str(tmp_cwd / "tune")},
        workload={**TINY_WORKLOAD, "total_steps": total_steps, "eval_every_steps": every},
    )
    client = MlflowClient(server.uri)
    # The driver's Ray gets its own RAY_TMPDIR: the trials' stderr (Ray's worker-*.err logs; the CLI does
    # not forward it to the driver) is then this sweep's alone.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt_", dir="/tmp"))

    def trial_logs() -> str:
        return "".join(p.read_text(errors="replace") for p in ray_tmp.glob("ray/session_*/logs/worker-*.err"))

    with cli_driver("run", str(path), cwd=tmp_cwd, env={"RAY_TMPDIR": str(ray_tmp)}) as driver:
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.1)
            steps = {c.info.run_id: int(c.data.tags.get("last_step", -1))
                     for c in sweep_runs(client, name)[1] if c.info.status == "RUNNING"}
            if any(step in kill_after and seen.get(run_id) != step for run_id, step in steps.items()):
                break  # a trial has just logged a step in kill_after
            seen = steps
        else:
            raise AssertionError(f"no trial reached a step in {sorted(kill_after)} (driver exit {driver.poll()})")
        server.kill()
        killed = time.monotonic()
        # Down for at least DOWN_S and until a trial's log says a metric batch is waiting for the server:
        # the outage provably overlapped metric logging.
        waiting = None
        while time.monotonic() < killed + 90 and driver.poll() is None:
            waiting = waiting or re.search(r"did not answer log_batch of step (\d+)", trial_logs())
            if waiting and time.monotonic() >= killed + DOWN_S:
                break
            time.sleep(0.2)
        assert waiting, f"no metric batch waited on the server in 90 s (driver exit {driver.poll()})"
        server.start()
        stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr[-2000:]
    # The batch that waited landed once the server was back (and below: no step lost or doubled).
    assert f"answered log_batch of step {waiting.group(1)} again" in trial_logs()
    shutil.rmtree(ray_tmp, ignore_errors=True)

    parents, children = assert_nothing_lost(client, name, "MLflow server restart")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    reported = tune_reported_steps(tmp_cwd / "tune" / name)
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        assert reported[child.info.run_name] == eval_steps  # what the trial reported to Tune
        for metric in ("swd", "loss"):
            history = client.get_metric_history(child.info.run_id, metric)
            assert sorted(m.step for m in history) == eval_steps, metric  # each step once, none lost


@pytest.mark.slow
@pytest.mark.server
def test_mlflow_server_down_for_good_fails_in_bounded_time_then_resumes(server, write_plan, tmp_cwd):
    """A server that never comes back: the sweep ends with one error line within a bounded time, its
    state kept; once the server is back, `resume` finishes every trial in its own run, no step lost."""
    eval_steps = list(range(25, 151, 25))
    name = "server-down"
    path = write_plan(
        name, {"kernel": ["laplace", "gaussian"]},
        failure={"max_retries": 1}, resources={"cpus_per_trial": 1, "max_concurrent": 2},
        tracking={"uri": server.uri}, cluster={"storage_path": str(tmp_cwd / "tune")},
        workload={**TINY_WORKLOAD, "total_steps": eval_steps[-1], "eval_every_steps": 25},
    )
    client = MlflowClient(server.uri)
    retry_env = {"DRIFTSWEEP_TRACKING_RETRY_S": str(RETRY_WINDOW_S)}
    with cli_driver("run", str(path), cwd=tmp_cwd, env=retry_env) as driver:
        wait_for_running_step(client, name, eval_steps[0], driver)
        server.kill()
        killed = time.monotonic()
        stdout, stderr = driver.communicate(timeout=600)
        elapsed_s = time.monotonic() - killed
    print(f"server down for good: the sweep ended {elapsed_s:.1f} s after the kill (retry window {RETRY_WINDOW_S:g} s)")
    # The CLI's last word is one line naming the address, how long it waited, and what to do.
    # (Above it Tune logs each failed trial attempt with its traceback, as for any failed trial.)
    last_line = stderr.strip().splitlines()[-1]
    assert driver.returncode == TrackingUnreachableError.exit_code, stderr[-2000:]
    assert last_line.startswith(f"error: tracking.uri={server.uri} did not answer") and "driftsweep resume" in last_line
    # Bounded: each trial attempt waits one window before it fails (failure.max_retries + 1 attempts,
    # each also paying a trial process start, ~10-20 s on this loaded 2-core machine); the driver's
    # waits overlap them. Without a bound MLflow's own retries would take ~4 min per call.
    assert elapsed_s < (1 + 1) * (RETRY_WINDOW_S + 20) + 30
    state = json.loads((tmp_cwd / "tune" / name / "driftsweep.json").read_text())
    assert state["finished"] is False

    server.start()
    resumed = run_cli("resume", str(path), cwd=tmp_cwd)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    parents, children = assert_nothing_lost(client, name, "MLflow server down for good, then resume")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "swd")) == eval_steps
