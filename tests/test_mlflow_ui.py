"""A real sweep into a real `mlflow server`, read back through MLflow's API and its web UI.

The server is the session's PostgreSQL-backed `mlflow server` with served artifacts (conftest), so
trial artifacts travel from Ray worker processes over HTTP. The plan leaves tracking.uri empty
and the sweep finds the server through MLFLOW_TRACKING_URI. The UI check opens the experiment page
in headless Chromium (scripts/screenshots.py drives it over the DevTools pipe) and reads the
rendered DOM; a screenshot is kept under pytest's temporary directory (its path is printed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import TINY_WORKLOAD
from orchestrator.artifacts import CONFIG_ARTIFACT, sample_artifact_name
from orchestrator.plan import load_plan
from orchestrator.runner import run_sweep
from workloads.config import WorkloadConfig

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PLAN_NAME = "ui-sweep"
AXES = {"kernel": ["laplace", "gaussian"], "temperatures": [[0.05], [0.02, 0.05, 0.2]]}
TINY_EVAL_STEPS = (10, 20, 30, 40, 50)  # TINY_WORKLOAD: 50 steps, an evaluation every 10


def _screenshots_module():
    spec = importlib.util.spec_from_file_location("screenshots", REPO / "scripts" / "screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ui_sweep(mlflow_server, tmp_path_factory):
    """4 tiny trials (kernel x temperature set) run into the server: (client, plan, summary)."""
    root = tmp_path_factory.mktemp("ui_sweep")
    plan_data = {"name": PLAN_NAME, "seed": 3, "workload": TINY_WORKLOAD, "axes": AXES,
                 "objective": {"metric": "swd", "mode": "min"},
                 "resources": {"cpus_per_trial": 1, "max_concurrent": 2}}
    plan_path = root / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(plan_data))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        # MLflow's own knob: sample system metrics every 0.5 s so these few-second trials get some.
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
        plan = load_plan(plan_path)
        assert plan.tracking.uri is None  # the server is found through the environment
        summary = run_sweep(plan, plan_path)
    return MlflowClient(mlflow_server), plan, summary


def _children(client: MlflowClient, summary) -> list:
    experiment = client.get_experiment_by_name(PLAN_NAME)
    return client.search_runs([experiment.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")


def test_sweep_reaches_the_server_from_the_environment(ui_sweep):
    client, plan, summary = ui_sweep
    assert summary.tracking_uri.startswith("http://127.0.0.1:") and summary.n_completed == 4
    parent = client.get_run(summary.parent_run_id)
    tags = parent.data.tags
    assert (tags["driftsweep.plan_name"], tags["driftsweep.objective_metric"],
            tags["driftsweep.objective_mode"]) == (PLAN_NAME, "swd", "min")
    children = _children(client, summary)
    best = min(children, key=lambda run: run.data.metrics["swd"])
    assert tags["best_run_id"] == best.info.run_id and tags["best_trial"] == best.info.run_name


def test_children_have_config_sample_plots_and_system_metrics(ui_sweep, tmp_path):
    client, plan, summary = ui_sweep
    children = _children(client, summary)
    assert len(children) == 4
    for run in children:
        run_id = run.info.run_id
        config_file = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, str(tmp_path / run_id)))
        config = WorkloadConfig(**yaml.safe_load(config_file.read_text()))
        assert config.kernel == run.data.params["axis.kernel"]
        assert config.seed == int(run.data.tags["seed"])
        plots = {f.path for f in client.list_artifacts(run_id, "samples")}
        assert plots == {sample_artifact_name(step) for step in TINY_EVAL_STEPS}, run.info.run_name
        png = Path(client.download_artifacts(run_id, sample_artifact_name(50), str(tmp_path / run_id)))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
        memory = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
        assert cpu and memory, f"no system metrics on {run.info.run_name}"
        assert all(0 <= m.value <= 100 for m in cpu) and all(m.value > 0 for m in memory)


def test_experiment_page_lists_parent_and_children_with_axis_columns(ui_sweep, mlflow_server, tmp_path_factory):
    screenshots = _screenshots_module()
    try:
        screenshots.find_chromium()
    except screenshots.BrowserError as exc:
        pytest.fail(str(exc))
    client, plan, summary = ui_sweep
    children = _children(client, summary)
    experiment = client.get_experiment_by_name(PLAN_NAME)
    state = screenshots.runs_view_state(summary.parent_run_id, list(AXES), ["swd"])
    expected = [PLAN_NAME, *(run.info.run_name for run in children), "axis.kernel", "axis.temperatures"]
    shot = tmp_path_factory.mktemp("ui_screenshot") / "mlflow-experiment-page.png"
    with screenshots.Chromium() as browser:
        screenshots.open_experiment(browser, mlflow_server, experiment.experiment_id, state)
        try:
            text = browser.wait_for_texts(expected)
            screenshots.close_assistant(browser)  # MLflow's chat panel covers part of the table
        finally:
            browser.screenshot(shot)
            print(f"\nscreenshot of the experiment page: {shot}")
        header_cells = screenshots.column_headers(browser)
    assert {"axis.kernel", "axis.temperatures"} <= set(header_cells), header_cells
    # The axis columns hold each child's values: every kernel and temperature set is in the table.
    for run in children:
        assert run.data.params["axis.kernel"] in text and run.data.params["axis.temperatures"] in text
    assert shot.stat().st_size > 10_000
