"""Per-trial artifacts (orchestrator/artifacts.py), the workloads' on_samples hook, system metrics,
the driver's cache warm-up and the tracking-URI environment variable. No Ray: fast."""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import EVAL_STEPS, TINY_WORKLOAD, free_port
from orchestrator import runner
from orchestrator.artifacts import (
    ALIGNMENT_ARTIFACT,
    CONFIG_ARTIFACT,
    TrialArtifacts,
    alignment_fields,
    evaluation_steps,
    image_grid,
    plot_steps,
    sample_artifact_name,
    scatter_figure,
)
from orchestrator.errors import TrackingUnreachableError
from orchestrator.plan import load_plan
from orchestrator.trainable import start_system_metrics
from workloads.alignment import make_alignment_pair
from workloads.config import WorkloadConfig
from workloads.train import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its schema takes seconds): (client, experiment id)."""
    root = tmp_path_factory.mktemp("store")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client, client.create_experiment("artifacts", artifact_location=str(root / "artifacts"))


@pytest.fixture
def client_and_run(store):
    """The module's client and a fresh run of its own."""
    client, experiment_id = store
    return client, client.create_run(experiment_id).info.run_id


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header (IHDR chunk), read without matplotlib."""
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE, path
    return struct.unpack(">II", header[16:24])


def test_plot_steps_first_last_and_spread():
    # train evaluates every 20 steps and at the last step: 20, 40, 50.
    assert evaluation_steps(50, 20) == [20, 40, 50]
    assert evaluation_steps(50, 10) == EVAL_STEPS
    assert plot_steps(50, 20) == {20, 40, 50}
    # 10 evaluations (200 ... 2000), 3 plots: the first, the middle (index 4.5 -> 4 or 5), the last.
    chosen = plot_steps(2000, 200, max_plots=3)
    assert len(chosen) == 3 and {200, 2000} <= chosen and chosen & {1000, 1200}


def test_image_grid_places_each_image_in_its_cell():
    side, height, width = 3, 2, 3  # non-square cells catch a transposed layout
    values = torch.linspace(-1, 1, 7)  # 7 images for 9 cells: the last two stay gray
    images = values.view(7, 1, 1, 1).expand(7, 1, height, width)
    grid = image_grid(images, side)
    assert grid.shape == (side * (height + 1) - 1, side * (width + 1) - 1)
    for index in range(side * side):
        row, col = divmod(index, side)
        cell = grid[row * (height + 1): row * (height + 1) + height, col * (width + 1): col * (width + 1) + width]
        expected = (float(values[index]) + 1) / 2 if index < 7 else 0.5
        assert cell.min() == pytest.approx(expected) and cell.max() == pytest.approx(expected), (row, col)
    assert grid[height, :].tolist() == [0.5] * grid.shape[1]  # the gap row between image rows


def test_alignment_fields_gaussian_are_exactly_aligned_on_the_ring_plane():
    config = WorkloadConfig(task="alignment", kernel="gaussian",
                            alignment={"dim": 8, "num_ref": 512, "num_query": 64})
    fields = alignment_fields(config, max_queries=32)
    # Theorem 1 (Tweedie): for the Gaussian kernel m = tau^2 s and b = tau^2, so Delta_ms = lambda_hat Delta_s.
    assert fields.lambda_hat == pytest.approx(fields.tau**2, rel=1e-12)
    assert fields.drift.shape == (32, 2)
    assert abs(fields.drift - fields.scaled_score).max() < 1e-8 * abs(fields.drift).max()
    # The plane is the ring's: projecting the centers and lifting them back loses nothing.
    centers = make_alignment_pair("ring_mog_hd", 8, config.seed).centers_p.numpy()
    lifted = fields.centers_p @ fields.basis.T
    assert abs(lifted - centers).max() < 1e-10
    # Laplace in d=8 is not exact (rel_error ~1 there): the fields differ, so the check above can fail.
    laplace = alignment_fields(config.model_copy(update={"kernel": "laplace"}), max_queries=32)
    assert abs(laplace.drift - laplace.scaled_score).max() > 1e-3 * abs(laplace.drift).max()


def test_on_samples_hook_sees_every_evaluation_and_changes_nothing():
    torch.set_num_threads(1)
    config = WorkloadConfig(**{**TINY_WORKLOAD, "total_steps": 25})  # evaluations at 10, 20, 25
    seen: list[tuple[int, tuple]] = []
    reports_with: list[dict] = []
    reports_without: list[dict] = []
    train(config, lambda step, m: reports_with.append(m),
          on_samples=lambda step, samples: seen.append((step, tuple(samples.shape))))
    train(config, lambda step, m: reports_without.append(m))
    assert [step for step, _ in seen] == [10, 20, 25]
    assert {shape for _, shape in seen} == {(TINY_WORKLOAD["eval"]["num_samples"], 2)}

    def drop_timing(m):
        return {k: v for k, v in m.items() if k not in ("step_time_s", "samples_per_s")}

    assert [drop_timing(m) for m in reports_with] == [drop_timing(m) for m in reports_without]


def test_trial_artifacts_config_and_sample_plots(client_and_run, tmp_path):
    client, run_id = client_and_run
    config = WorkloadConfig(**TINY_WORKLOAD)
    artifacts = TrialArtifacts(client, run_id, config, "kernel=gaussian", max_plots=2)
    assert artifacts.log_config()
    saved = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, str(tmp_path)))
    assert WorkloadConfig(**yaml.safe_load(saved.read_text())) == config
    samples = torch.randn(200, 2)
    assert artifacts.on_samples(10, samples)  # the first evaluation
    assert not artifacts.on_samples(30, samples)  # neither first nor last of 2 plots
    assert artifacts.on_samples(50, samples)  # the last
    names = {f.path for f in client.list_artifacts(run_id, "samples")}
    assert names == {sample_artifact_name(10), sample_artifact_name(50)} == {
        "samples/step-0000010.png", "samples/step-0000050.png"}
    png = Path(client.download_artifacts(run_id, sample_artifact_name(50), str(tmp_path)))
    assert _png_size(png) == (450, 450)  # SCATTER_SIZE_IN 4.5 in x 100 dpi


def test_image_samples_become_a_grid(client_and_run, tmp_path):
    client, run_id = client_and_run
    config = WorkloadConfig(data={"name": "digits"}, batch_size=64, total_steps=10, eval_every_steps=10)
    assert TrialArtifacts(client, run_id, config, "digits").on_samples(10, torch.rand(70, 1, 8, 8) * 2 - 1)
    assert _png_size(Path(client.download_artifacts(run_id, sample_artifact_name(10), str(tmp_path)))) == (450, 450)


def test_scatter_of_higher_dimensional_samples_uses_the_first_two_coordinates():
    generated, data = torch.randn(30, 5), torch.randn(40, 5)
    axes = scatter_figure(generated, data, "d5").axes[0]
    data_points, generated_points = (c.get_offsets() for c in axes.collections)
    assert (generated_points == generated[:, :2].numpy()).all() and (data_points == data[:, :2].numpy()).all()
    assert axes.get_title() == "d5 (coordinates 1-2 of 5)"


def test_alignment_trial_gets_its_quiver(client_and_run, tmp_path):
    client, run_id = client_and_run
    config = WorkloadConfig(task="alignment", alignment={"dim": 4, "num_ref": 256, "num_query": 32})
    assert TrialArtifacts(client, run_id, config, "alignment").log_alignment({"cosine": 0.9, "rel_error": 0.1})
    png = Path(client.download_artifacts(run_id, ALIGNMENT_ARTIFACT, str(tmp_path)))
    assert _png_size(png) == (550, 500)  # 5.5 x 5.0 in at 100 dpi


def test_artifact_failure_is_a_warning_not_an_error(client_and_run, caplog):
    client, _ = client_and_run
    artifacts = TrialArtifacts(client, "0" * 32, WorkloadConfig(**TINY_WORKLOAD), "missing run")
    with caplog.at_level(logging.WARNING, logger="orchestrator.artifacts"):
        assert artifacts.on_samples(10, torch.randn(50, 2)) is False
        assert artifacts.log_config() is False
    assert "samples/step-0000010.png not logged" in caplog.text and "config.yaml not logged" in caplog.text


def test_system_metrics_sampled_then_stopped(client_and_run, monkeypatch):
    client, run_id = client_and_run
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # MLflow's override of the 2 s
    monitor = start_system_metrics(client.tracking_uri, run_id, resume=False)
    assert monitor.sampling_interval == 0.5
    time.sleep(1.6)  # three sampling periods
    monitor.finish()
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 1 and all(0 <= m.value <= 100 for m in history)
    memory = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert memory and all(m.value > 0 for m in memory)
    assert monitor._process is None  # finish() joined the sampling thread
    # A run ended from outside (a pruned trial ended KILLED by the driver) stops the thread by itself.
    other = start_system_metrics(client.tracking_uri, run_id, resume=True)
    client.set_terminated(run_id, "KILLED")
    other._process.join(timeout=10)
    assert not other._process.is_alive()


def test_warm_caches_builds_the_digits_encoder_once_per_cache(monkeypatch, tmp_path):
    calls: list[str] = []
    monkeypatch.setattr("workloads.features.load_digits_encoder", lambda path, progress: calls.append(path))
    cache = str(tmp_path / "enc.pt")
    configs = [
        WorkloadConfig(data={"name": "digits"}, batch_size=64, feature_map="digits_encoder",
                       features={"encoder_cache": cache}),
        WorkloadConfig(data={"name": "digits"}, batch_size=64, features={"encoder_cache": cache}),  # FID
        WorkloadConfig(data={"name": "digits"}, batch_size=64, eval={"fid": False}),  # needs nothing
        WorkloadConfig(**TINY_WORKLOAD),  # toy: needs nothing
    ]
    assert runner.warm_caches(configs) == [cache]
    assert calls == [cache]


def test_tracking_uri_from_environment_when_the_plan_is_silent(write_plan, monkeypatch):
    plan_path = write_plan("envuri", {"kernel": ["laplace"]})
    plan = load_plan(plan_path)
    assert plan.tracking.uri is None
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", address)
    with pytest.raises(TrackingUnreachableError, match=address.replace(".", r"\.")):
        runner.run_sweep(plan, plan_path)
    # Nothing was started: no local store was created in the working directory.
    assert not Path("mlflow.db").exists()
