"""MLflow tracking: one parent run per plan, one nested child run per trial, and the preflight.

Run layout (fixed; tests and `driftsweep status/report` read it):
- parent run (run name = plan name): params = plan-level settings (`plan.*`), artifacts = the plan
  file and `trials.json` (the resolved trial list); tags `driftsweep.plan_hash`, `driftsweep.design`,
  `driftsweep.version.<package>`, `driftsweep.git_commit`, and at the end `best_run_id`, `best_value`,
  `best_trial`, `stopped_reason`.
- child run per trial (run name = Trial.name, tag `mlflow.parentRunId` = parent): params = the trial's
  resolved WorkloadConfig flattened with dotted keys plus `axis.<name>`; tags `trial_id`, `replicate`,
  `seed`, `axis.<name>`, `ray_trial_id`, `node_id`, `fid_extractor`, `last_step`; metrics per step.
  Status FINISHED / FAILED (tag `error`) / KILLED (tag `pruned`=true when pruned, `stopped_reason`
  when a budget stopped it).

Child runs are created INSIDE the trial process (works on multi-node clusters with a server URI) and
looked up by (parent run id, `trial_id` tag) first, so a retried or restored trial reuses its run.

Tracking server outages (http/https URIs): every client call goes through `RetryingClient`, which
retries transient failures (connection refused/reset, timeouts, HTTP 429 and 5xx) with exponential
backoff for at most `retry_window_s()` seconds (default 120, env DRIFTSWEEP_TRACKING_RETRY_S), then
raises TrackingUnreachableError (one line). MLflow's own per-request retries are turned off
deliberately (see `configure_mlflow_http`) so that this window is the only retry layer and the bound
is known: a call gives up at most `window + MLFLOW_HTTP_REQUEST_TIMEOUT` (20 s) after its first
failure. Retried calls are idempotent: a metric batch is resent with the same timestamps (the server
drops exact duplicates) and a child run is looked up before it is (re)created.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from orchestrator.errors import DriftsweepError, TrackingUnreachableError
from orchestrator.plan import mask_uri

_logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
PLAN_HASH_TAG = "driftsweep.plan_hash"
CREATE_TOKEN_TAG = "driftsweep.create_token"  # one per create_run attempt unit: a lost reply is found, not redone
TRIAL_ID_TAG = "trial_id"
LAST_STEP_TAG = "last_step"
# MLflow 3 opens an experiment on its runs view (not the GenAI traces view) when this tag says so
# (mlflow/server/js: experimentKind CUSTOM_MODEL_DEVELOPMENT; assistant/skills/mlflow-onboarding).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
VERSIONED_PACKAGES = ("driftsweep", "torch", "ray", "optuna", "mlflow")
# MLflow log_batch limits per call (mlflow/utils/validation.py MAX_PARAMS_TAGS_PER_BATCH etc.).
MAX_PARAMS_PER_BATCH = 100
HEALTH_TIMEOUT_S = 5.0
# Retry window (seconds) of a tracking call against an unreachable server; covers a server restart
# (measured in tests/test_faults.py: a PostgreSQL-backed `mlflow server` answers 12-16 s after it is
# started on a loaded 2-core machine) with room for a slow pod reschedule.
RETRY_WINDOW_ENV = "DRIFTSWEEP_TRACKING_RETRY_S"
DEFAULT_RETRY_WINDOW_S = 120.0
# Backoff between attempts in seconds: 0.5, 1, 2, 4, 8, 8, ... (+ up to 10 % jitter).
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
# MLflow's HTTP client settings, set unless the user set them (mlflow/environment_variables.py):
# MLflow 3.17 defaults to 7 urllib3 retries with backoff 2 s * 2^n (capped at 120 s), i.e. ~4 min
# on a refused connection, and a 120 s timeout per attempt (up to ~16 min on a hung server).
MLFLOW_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
RETRIED_HTTP_STATUS = (429, 500, 502, 503, 504)

T = TypeVar("T")
# Tracking URIs whose server a call of this process gave up on: later calls try once, without a new
# wait, until one succeeds (a trial or driver already failing over an outage does not wait again).
_GAVE_UP_URIS: set[str] = set()


def ui_hint(tracking_uri: str) -> str:
    """Where the user looks at the runs: the server address, or the `mlflow ui` command for a store."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def preflight_tracking(tracking_uri: str, masked_uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Check that the tracking store can be reached, in bounded time, before any trial starts.

    Args:
        tracking_uri: the real URI (may hold credentials).
        masked_uri: the same URI with credentials masked, used in the message.
        timeout_s: HTTP timeout in seconds.

    Raises:
        TrackingUnreachableError: the server does not answer /health, or the SQLite/file store's
            directory is not writable; the message names the address and the fix.
    """
    scheme = urllib.parse.urlparse(tracking_uri).scheme
    if scheme in ("http", "https"):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError, socket.timeout) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnreachableError(
                f"tracking.uri={masked_uri} is unreachable ({reason}); start the server "
                "(`mlflow server --host 127.0.0.1 --port 5000 ...`) or fix tracking.uri in the plan"
            ) from None
        return
    if scheme == "sqlite":
        path = Path(tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else "")
        directory = path.parent if path.name else None
    elif scheme in ("", "file"):
        directory = Path(urllib.parse.urlparse(tracking_uri).path or tracking_uri)
        directory = directory if directory.exists() else directory.parent
    else:
        # Database URIs (postgresql://, mysql://): a cheap call through MLflow's own client.
        try:
            MlflowClient(tracking_uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any driver error means "unreachable" here
            raise TrackingUnreachableError(
                f"tracking.uri={masked_uri} is unreachable ({type(exc).__name__}); check the database "
                "address and credentials, or fix tracking.uri in the plan"
            ) from None
        return
    if directory is None or not directory.is_dir() or not os.access(directory, os.W_OK):
        raise TrackingUnreachableError(
            f"tracking.uri={masked_uri}: directory {directory} does not exist or is not writable; "
            "create it or point tracking.uri at a writable location"
        )


def retry_window_s() -> float:
    """Seconds a tracking call retries an unreachable server: env DRIFTSWEEP_TRACKING_RETRY_S, else 120.

    Raises:
        DriftsweepError: the variable is not a non-negative number (one line, exit 2 at the CLI).
    """
    text = os.environ.get(RETRY_WINDOW_ENV)
    if text is None:
        return DEFAULT_RETRY_WINDOW_S
    try:
        window_s = float(text)
    except ValueError:
        window_s = -1.0
    if not math.isfinite(window_s) or window_s < 0:
        raise DriftsweepError(f"env {RETRY_WINDOW_ENV}={text!r} is not a number of seconds >= 0; unset it "
                              f"(default {DEFAULT_RETRY_WINDOW_S:g} s) or set e.g. {RETRY_WINDOW_ENV}=300")
    return window_s


def configure_mlflow_http() -> None:
    """Turn MLflow's own per-request retries off and cap one request at 20 s (unless the user set
    MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT): RetryingClient does the retrying.
    MLflow reads these variables at every request, so this takes effect for the whole process."""
    for name, value in MLFLOW_HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


def is_transient(exc: BaseException) -> bool:
    """True for a failure worth retrying: the server did not answer, or answered 429/5xx.

    MLflow's REST client raises RestException for an error the server returned (4xx = our request is
    wrong: not retried) and a plain MlflowException when the request itself failed (connection,
    timeout, a non-JSON 5xx page from a proxy).
    """
    if isinstance(exc, RestException):
        return exc.get_http_status_code() in RETRIED_HTTP_STATUS
    return isinstance(exc, (MlflowException, OSError))


def failure_kind(exc: BaseException) -> str:
    """A short name of a failed request: "HTTP 503", or the transport error's type ("ConnectionError")."""
    if isinstance(exc, RestException):
        return f"HTTP {exc.get_http_status_code()}"
    root = exc.__cause__ or exc.__context__ or exc
    return type(root).__name__


class RetryingClient:
    """An MlflowClient whose every method call retries transient failures of a tracking server.

    For http/https URIs a call that keeps failing is retried with backoff (0.5 s doubling to 8 s)
    until `window_s` seconds have passed since its first failure, then raises
    TrackingUnreachableError; the wait is therefore at most window_s + one request timeout (20 s,
    `configure_mlflow_http`). After a call gave up, later calls to the same URI in this process try
    once (no new wait) until one succeeds, so a process that already waited does not wait again on its
    way out (ending the run FAILED, the driver's status updates). A call that starts waiting logs one
    warning, and one more when the server answers again, so a stalled trial or driver says why it
    stalls. Other stores (sqlite, file, database URIs) are called once, their errors unchanged.

    Args:
        tracking_uri: the real URI (may hold credentials; messages show it masked).
        window_s: retry window in seconds; default: retry_window_s().
    """

    def __init__(self, tracking_uri: str, window_s: float | None = None):
        remote = urllib.parse.urlparse(tracking_uri).scheme in ("http", "https")
        if remote:
            configure_mlflow_http()
        self.raw = MlflowClient(tracking_uri)
        self.masked_uri = mask_uri(tracking_uri)
        self.window_s = (retry_window_s() if window_s is None else window_s) if remote else 0.0
        self.remote = remote
        self._uri = tracking_uri

    def call(self, fn: Callable[[MlflowClient], T], what: str) -> T:
        """Run `fn(raw MlflowClient)` under the retry policy; `fn` must be safe to repeat.

        Args:
            fn: the MLflow call(s) to make.
            what: what is being done, for the error message (e.g. "log_batch").

        Returns:
            What `fn` returned.

        Raises:
            TrackingUnreachableError: the server stayed unreachable for the whole window.
            MlflowException: a non-transient error (e.g. the run does not exist).
        """
        first_failure = None
        backoff_s = FIRST_BACKOFF_S
        while True:
            try:
                result = fn(self.raw)
            except Exception as exc:  # noqa: BLE001 - classified just below
                if not self.remote or not is_transient(exc):
                    raise
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                waited_s = now - first_failure
                if self._uri in _GAVE_UP_URIS or waited_s >= self.window_s:
                    _GAVE_UP_URIS.add(self._uri)
                    raise TrackingUnreachableError(
                        f"tracking.uri={self.masked_uri} did not answer {what} for {waited_s:.0f} s "
                        f"({failure_kind(exc)}; retry window {self.window_s:g} s, env {RETRY_WINDOW_ENV}); "
                        "start the server, then `driftsweep resume` the plan"
                    ) from None
                if waited_s == 0:
                    _logger.warning("driftsweep: tracking.uri=%s did not answer %s (%s); retrying for up to %g s "
                                    "(env %s)", self.masked_uri, what, failure_kind(exc), self.window_s,
                                    RETRY_WINDOW_ENV)
                time.sleep(min(backoff_s * (1 + 0.1 * random.random()), self.window_s - waited_s))
                backoff_s = min(2 * backoff_s, MAX_BACKOFF_S)
            else:
                _GAVE_UP_URIS.discard(self._uri)
                if first_failure is not None:
                    _logger.warning("driftsweep: tracking.uri=%s answered %s again after %.1f s", self.masked_uri,
                                    what, time.monotonic() - first_failure)
                return result

    def __getattr__(self, name: str):
        method = getattr(self.raw, name)
        if not callable(method):
            return method

        def retried(*args, **kwargs):
            return self.call(lambda raw: getattr(raw, name)(*args, **kwargs), name)

        return retried


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {dotted.key: str(value)} (lists kept as JSON so they stay readable).

    Args:
        mapping: nested mapping (e.g. WorkloadConfig.model_dump()).
        prefix: key prefix.

    Returns:
        Flat mapping with string values, as MLflow params take.
    """
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not-installed"
    return versions


def git_commit(directory: str | os.PathLike) -> str | None:
    """The git commit of the code in `directory` (with `-dirty` when modified), or None."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit or None


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Get or create the experiment; make MLflow 3 open it on its runs view.

    Returns:
        The experiment id.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """log_batch params in chunks of MLflow's per-call limit."""
    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])


def create_parent_run(
    client: RetryingClient,
    experiment_id: str,
    run_name: str,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    artifacts: Iterable[Path],
) -> str:
    """Create the sweep's parent run with its params, tags and artifacts.

    The run is found-or-created as one retried unit (like a child run): it carries a fresh
    `driftsweep.create_token` tag, so a create_run whose reply was lost is found on the retry
    instead of made twice.

    Args:
        client: the driver's RetryingClient.
        experiment_id: the sweep's experiment.
        run_name: the plan name.
        params: flattened plan params.
        tags: parent tags.
        artifacts: files to attach (the plan, trials.json).

    Returns:
        The parent run id.
    """
    token = uuid.uuid4().hex
    all_tags = {**tags, CREATE_TOKEN_TAG: token}

    def find_or_create(raw: MlflowClient):
        found = raw.search_runs([experiment_id], filter_string=f"tags.`{CREATE_TOKEN_TAG}` = '{token}'",
                                max_results=1)
        return found[0] if found else raw.create_run(experiment_id, run_name=run_name, tags=all_tags)

    run = client.call(find_or_create, "create_run")
    run_id = run.info.run_id
    log_params(client, run_id, params)
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    return run_id


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """All child runs of a parent (every status)."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_child_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str):
    """The child run of `trial_id` under `parent_run_id`, or None."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
        max_results=2,
    )
    return found[0] if found else None


def one_line(exc: BaseException, limit: int = 500) -> str:
    """`Type: first line of the message`, truncated (an MLflow tag, a table cell)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:limit]


def last_logged_step(client: MlflowClient, run) -> int:
    """The highest evaluation step a run holds: the max of its `last_step` tag and of its metric steps.

    The tag alone is not enough: MLflow's log_batch commits the metrics and the tags of one call
    separately, so a process killed between the two commits leaves metrics one evaluation ahead of
    the tag. System metrics (`system/...`, the monitor's own step count) are not evaluations.

    Args:
        client: a client of the run's tracking store.
        run: the run (as returned by get_run/search_runs).

    Returns:
        The step, -1 when nothing was logged.
    """
    step = int(run.data.tags.get(LAST_STEP_TAG, -1))
    for key in run.data.metrics:
        if not key.startswith("system/"):
            step = max([step, *(m.step for m in client.get_metric_history(run.info.run_id, key))])
    return step


class ChildRun:
    """The child run of one trial, opened (or reopened) inside the trial process.

    A run found FINISHED is not reopened: `finished_metrics` then holds its last metrics.

    Args:
        tracking_uri: MLflow tracking URI reachable from this node.
        experiment_id: the sweep's experiment.
        parent_run_id: the sweep's parent run.
        trial_id: the plan's stable trial id (lookup key of the run).
        run_name: Trial.name.
        params: flattened trial config + axis params.
        tags: trial tags (axes, replicate, seed, node id...).
        window_s: retry window of its tracking calls; default: retry_window_s() of this process.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        trial_id: str,
        run_name: str,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        window_s: float | None = None,
    ):
        self.client = RetryingClient(tracking_uri, window_s)
        all_tags = {PARENT_TAG: parent_run_id, TRIAL_ID_TAG: trial_id, **tags}
        self.finished_metrics: dict[str, float] | None = None

        def find_or_create(raw: MlflowClient) -> tuple[Any, bool]:
            # One retried unit: a create_run whose answer was lost is found, not created twice.
            existing = find_child_run(raw, experiment_id, parent_run_id, trial_id)
            if existing is not None:
                return existing, False
            return raw.create_run(experiment_id, run_name=run_name, tags=all_tags), True

        run, created = self.client.call(find_or_create, "create_run")
        self.run_id = run.info.run_id
        self.reused = not created
        self.last_logged_step = -1 if created else last_logged_step(self.client, run)
        if not created and run.info.status == RunStatus.to_string(RunStatus.FINISHED):
            # The trial already ran to the end (a driver killed before Tune saved that): left as is.
            self.finished_metrics = dict(run.data.metrics)
            return
        if not created:
            # A retried/restored trial: same run, back to RUNNING, stale outcome tags removed.
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            for stale in ("error", "pruned", "stopped_reason"):
                if stale in run.data.tags:
                    self.client.delete_tag(self.run_id, stale)
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
        # Also on reuse: an earlier attempt may have lost the server between create_run and its params
        # (logging a param again with the same value is allowed).
        log_params(self.client, self.run_id, params)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Log one evaluation's metrics at `step` (one log_batch call).

        Steps at or below the last logged step (`last_logged_step`) are skipped, so a trial resumed
        from an older checkpoint never writes a step twice.

        Returns:
            True when logged, False when skipped.
        """
        if step <= self.last_logged_step:
            return False
        timestamp_ms = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp_ms, step) for key, value in metrics.items()]
        tags = [RunTag(LAST_STEP_TAG, str(step))]
        self.client.call(lambda raw: raw.log_batch(self.run_id, metrics=batch, tags=tags), f"log_batch of step {step}")
        self.last_logged_step = step
        return True

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set several tags in one call."""
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def fail(self, message: str) -> None:
        """End the run FAILED with the one-line error (tag `error`) and the last logged step
        (tag `last_step`, 0 when it failed before its first evaluation)."""
        self.set_tags({"error": message, LAST_STEP_TAG: str(max(self.last_logged_step, 0))})
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FAILED))

    def finish(self) -> None:
        """End the run FINISHED."""
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))


def end_run(
    client: MlflowClient,
    run_id: str,
    status: str,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Driver side: set a run's final status and outcome tags (idempotent).

    Args:
        client: MLflow client.
        run_id: the parent or a child run id.
        status: "FINISHED", "FAILED" or "KILLED".
        tags: outcome tags (`pruned`, `error`, `stopped_reason`).
    """
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    client.set_terminated(run_id, status)


def is_finite(value: Any) -> bool:
    """True for a real, finite number."""
    return isinstance(value, (int, float)) and math.isfinite(value)
