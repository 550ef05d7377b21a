"""The per-trial function Ray Tune runs: one workload run, tracked in its own MLflow child run.

Inside the trial process: resolve the plan Trial from the Tune config, open (or reopen, on a retry
or a restore) the trial's MLflow child run, restore the workload checkpoint from Tune's last
checkpoint, run the workload, and on every report log the metrics to MLflow and hand Tune the
metrics plus a Checkpoint of the workload's latest.pt (so a retried/restored trial resumes).
While the workload runs, MLflow's system metrics monitor samples CPU/memory (and GPU where
nvidia-ml-py finds one) into the child run as `system/*` metrics, and `orchestrator.artifacts`
logs the resolved config and sample/alignment plots.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from orchestrator.artifacts import TrialArtifacts
from orchestrator.pruning import STEP_KEY
from orchestrator.tracking import ChildRun, flatten, one_line

TRIAL_INDEX_KEY = "trial_index"  # grid/ofat: Tune config = {"trial_index": i} into the trial list
SAMPLED_PREFIX = "sampled-"  # optuna: Tune trial names "sampled-0007" carry the trial number
LATEST_NAME = "latest.pt"  # the workload's resume file (workloads.checkpoint)
# System metrics sampling period in seconds: trials last tens of seconds to hours, so a 2 s period
# gives a curve even for short trials; each sample is averaged over the period (samples_before_logging=1).
SYSTEM_METRICS_INTERVAL_S = 2.0

_logger = logging.getLogger(__name__)


def start_system_metrics(tracking_uri: str, run_id: str, resume: bool):
    """Start MLflow's system metrics monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) for a run.

    The monitor's thread also stops by itself once the run leaves RUNNING (e.g. a pruned trial
    ended KILLED by the driver), so a trial stopped from outside does not leave it sampling.

    Args:
        tracking_uri: the run's tracking URI.
        run_id: the child run.
        resume: continue the step count of a reused run instead of starting at step 0.

    Returns:
        The started monitor (call `.finish()`), or None when it could not start (a warning is logged).
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, samples_before_logging=1,
            resume_logging=resume, tracking_uri=tracking_uri,
        )
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - monitoring must never fail a trial
        _logger.warning("driftsweep: system metrics not started for run %s: %s", run_id, exc)
        return None


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (passed once through the object store).

    Attributes:
        plan: the validated Plan.
        trials: grid/ofat: the expanded trial list; optuna: empty (trials come from the sampler).
        tracking_uri: MLflow URI reachable from every node.
        experiment_id: MLflow experiment id.
        parent_run_id: the sweep's parent run.
        retry_window_s: the driver's tracking retry window (env DRIFTSWEEP_TRACKING_RETRY_S there), so
            trials on other nodes use it too (Ray does not forward the driver's environment).
    """

    plan: Any
    trials: tuple
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    retry_window_s: float | None = None


def sampled_trial_name(tune_trial) -> str:
    """Tune trial_name_creator for optuna designs: "sampled-0007" from Tune's trial counter
    (SearchGenerator tags trials "8_kernel=..." counting from 1; plan trial numbers count from 0),
    kept in Tune's state so it is stable across restores."""
    return f"{SAMPLED_PREFIX}{int(tune_trial.experiment_tag.split('_', 1)[0]) - 1:04d}"


def sampled_trial_index(tune_trial_name: str) -> int:
    """The plan trial number a sampled trial's name carries ("sampled-0007" -> 7)."""
    return int(tune_trial_name.removeprefix(SAMPLED_PREFIX))


def resolve_trial(context: SweepContext, config: dict, tune_trial_name: str):
    """The plan Trial a Tune config stands for.

    Args:
        context: the sweep context.
        config: the Tune config ({"trial_index": i} or the sampled axis values).
        tune_trial_name: Tune's trial name (optuna designs: sampled_trial_name, holding the number).

    Returns:
        The plan's Trial (index, trial_id, name, params, replicate, seed, config).
    """
    if TRIAL_INDEX_KEY in config:
        return context.trials[int(config[TRIAL_INDEX_KEY])]
    from orchestrator.plan import trial_from_params

    return trial_from_params(context.plan, dict(config), sampled_trial_index(tune_trial_name))


def trial_params_and_tags(trial) -> tuple[dict[str, str], dict[str, str]]:
    """MLflow params (full config, dotted keys, + `axis.<name>`) and tags of one trial."""
    axes = {f"axis.{name}": str(value) for name, value in trial.params.items()}
    params = {**flatten(trial.config.model_dump()), **axes}
    tags = {**axes, "replicate": str(trial.replicate), "seed": str(trial.seed)}
    return params, tags


def run_trial(config: dict, context: SweepContext) -> None:
    """Ray Tune function trainable: run one trial of the sweep.

    Args:
        config: the Tune config of this trial.
        context: the sweep context (bound with tune.with_parameters).

    Raises:
        Exception: whatever the workload raised (NonFiniteLossError, ValueError...), after the
            MLflow child run was ended FAILED with the one-line message; Tune retries or fails it.
    """
    from workloads.train import run_workload

    tune_context = tune.get_context()
    ray_trial_id = tune_context.get_trial_id()
    trial = resolve_trial(context, config, tune_context.get_trial_name())
    params, tags = trial_params_and_tags(trial)
    tags.update(ray_trial_id=ray_trial_id, node_id=ray.get_runtime_context().get_node_id())
    child = ChildRun(
        context.tracking_uri, context.experiment_id, context.parent_run_id,
        trial.trial_id, trial.name, params, tags, window_s=context.retry_window_s,
    )
    if child.finished_metrics is not None:
        # Completed before the driver was lost: hand Tune the final result instead of re-running.
        tune.report({**child.finished_metrics, STEP_KEY: child.last_logged_step})
        return

    # -- resume: the workload resumes from checkpoint_dir/latest.pt if it is there.
    checkpoint_dir = Path(tempfile.mkdtemp(prefix="ds_ckpt_"))
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as restored_dir:
            if (Path(restored_dir) / LATEST_NAME).exists():
                shutil.copy2(Path(restored_dir) / LATEST_NAME, checkpoint_dir / LATEST_NAME)

    artifacts = TrialArtifacts(child.client, child.run_id, trial.config, trial.name)
    artifacts.log_config()
    monitor = start_system_metrics(context.tracking_uri, child.run_id, resume=child.reused)

    def report(step: int, metrics: dict[str, float]) -> None:
        child.log_metrics(step, metrics)
        latest = checkpoint_dir / LATEST_NAME
        # Hand Tune only latest.pt (not the ckpt-* history): Tune copies the directory to storage.
        with tempfile.TemporaryDirectory(prefix="ds_stage_") as stage:
            checkpoint = None
            if latest.exists():
                shutil.copy2(latest, Path(stage) / LATEST_NAME)
                checkpoint = tune.Checkpoint.from_directory(stage)
            tune.report({**metrics, STEP_KEY: step}, checkpoint=checkpoint)

    try:
        summary = run_workload(trial.config, report, checkpoint_dir=str(checkpoint_dir),
                               on_samples=artifacts.on_samples)
        if trial.config.task == "alignment":
            artifacts.log_alignment(summary["metrics"])
    except Exception as exc:
        if monitor is not None:
            monitor.finish()  # flush the last samples while the run is still RUNNING
        child.fail(one_line(exc))
        raise
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if monitor is not None:
        monitor.finish()
    if summary.get("fid_extractor"):
        child.set_tags({"fid_extractor": summary["fid_extractor"]})
    child.finish()
