"""Per-trial MLflow artifacts: sample plots at evaluation steps, the alignment quiver, the config.

What a child run gets (paths inside the run's artifact root):
- `config.yaml`: the trial's resolved WorkloadConfig; `python -m workloads config.yaml` re-runs it.
- `samples/step-0000100.png` at a few evaluation steps (`plot_steps`: the first, the last and evenly
  spaced ones in between): generated vs data scatter for vector data (the first two coordinates
  when D > 2), an 8 x 8 grid of generated images for image data.
- `alignment/fields.png` for alignment trials: the drift discrepancy Delta_ms and the scaled score
  discrepancy lambda_hat * Delta_s at query points, projected on the mixture plane (paper §5.1).

Rendering uses matplotlib's object API (`matplotlib.figure.Figure`, Agg canvas, no pyplot state),
so it runs in Ray worker processes without a display. Logging goes through MlflowClient.log_figure /
log_text, which write to a local store and to a remote `mlflow server --serve-artifacts` alike.
An artifact that cannot be rendered or uploaded is a logged warning, never a failed trial.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from workloads.alignment import alignment_draws
from workloads.config import WorkloadConfig
from workloads.datasets import make_dataset
from workloads.drift import kernel_fields
from workloads.train import evaluation_steps

_logger = logging.getLogger(__name__)

CONFIG_ARTIFACT = "config.yaml"
SAMPLES_DIR = "samples"
ALIGNMENT_ARTIFACT = "alignment/fields.png"
MAX_SAMPLE_PLOTS = 5  # sample plots per trial (PNG uploads stay a handful per trial)
SCATTER_MAX_POINTS = 1000  # points per side (generated, data) in a scatter
GRID_SIDE = 8  # images per row and column of a sample grid
GRID_GAP_PX = 1  # gray pixels between the images of a grid
QUIVER_MAX_ARROWS = 96  # query points drawn in the alignment quiver
FIGURE_DPI = 100
SCATTER_SIZE_IN = (4.5, 4.5)  # figure size in inches


def sample_artifact_name(step: int) -> str:
    """`samples/step-0000100.png`: zero-padded so artifact listings sort by step."""
    return f"{SAMPLES_DIR}/step-{step:07d}.png"


def plot_steps(total_steps: int, eval_every_steps: int, max_plots: int = MAX_SAMPLE_PLOTS) -> set[int]:
    """Evaluation steps that get a sample plot: the first, the last and evenly spaced ones between.

    Args:
        total_steps: training steps.
        eval_every_steps: evaluation period in steps.
        max_plots: at most this many steps (>= 2).

    Returns:
        The chosen evaluation steps.
    """
    steps = evaluation_steps(total_steps, eval_every_steps)
    if len(steps) <= max_plots:
        return set(steps)
    picks = np.linspace(0, len(steps) - 1, max_plots).round().astype(int)
    return {steps[i] for i in picks}


def scatter_figure(generated: torch.Tensor, data: torch.Tensor, title: str) -> Figure:
    """Generated samples over data samples (first two coordinates), same axes.

    Args:
        generated: (N, D) generated samples, D >= 2.
        data: (M, D) data samples.
        title: figure title.

    Returns:
        The figure (not yet saved).
    """
    fig = Figure(figsize=SCATTER_SIZE_IN, dpi=FIGURE_DPI)
    ax = fig.add_subplot()
    for points, label, color in ((data, "data", "tab:gray"), (generated, "generated", "tab:orange")):
        xy = points[:SCATTER_MAX_POINTS, :2].numpy()
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.5, color=color, label=label, linewidths=0)
    suffix = "" if generated.shape[1] == 2 else f" (coordinates 1-2 of {generated.shape[1]})"
    ax.set_title(title + suffix, fontsize=9)
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="upper right", fontsize=8, markerscale=3)
    fig.tight_layout()
    return fig


def image_grid(images: torch.Tensor, side: int = GRID_SIDE) -> np.ndarray:
    """Tile the first side*side images row by row, pixel values mapped from [-1, 1] to [0, 1].

    Tiles are separated by GRID_GAP_PX gray (0.5) pixels; missing images stay gray.

    Args:
        images: (N, C, H, W) with C = 1 or 3, values in [-1, 1] (the data sets' range).
        side: images per row and column.

    Returns:
        (side*(H+g)-g, side*(W+g)-g) for C = 1, the same with a trailing 3 for C = 3, float in [0, 1],
        g = GRID_GAP_PX.
    """
    n, channels, height, width = images.shape
    gap = GRID_GAP_PX
    tiles = torch.full((side * side, channels, height + gap, width + gap), 0.5)
    count = min(n, side * side)
    tiles[:count, :, :height, :width] = ((images[:count].float() + 1) / 2).clamp(0, 1)
    # (row, col, C, H, W) -> (row, H, col, W, C): rows of images stacked, then columns side by side.
    grid = tiles.reshape(side, side, channels, height + gap, width + gap).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(side * (height + gap), side * (width + gap), channels)[: -gap or None, : -gap or None]
    grid = grid.numpy()
    return grid[:, :, 0] if channels == 1 else grid


def image_grid_figure(images: torch.Tensor, title: str) -> Figure:
    """An 8 x 8 grid of generated images (`image_grid`) as a figure."""
    fig = Figure(figsize=SCATTER_SIZE_IN, dpi=FIGURE_DPI)
    ax = fig.add_subplot()
    ax.imshow(image_grid(images), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class AlignmentFields:
    """Alignment fields at query points, projected on the 2-D plane of the mixture.

    Attributes:
        queries: (Q, 2) projected query points.
        drift: (Q, 2) projected Delta_ms = m_p - m_q.
        scaled_score: (Q, 2) projected lambda_hat * Delta_s, Delta_s = s_p - s_q.
        centers_p, centers_q: projected mode centers of p and q.
        lambda_hat: the predicted scale (paper Eq. 12), mean over queries of (b_p + b_q) / 2.
        tau: kernel temperature in data units.
        basis: (d, 2) orthonormal basis of the plane.
    """

    queries: np.ndarray
    drift: np.ndarray
    scaled_score: np.ndarray
    centers_p: np.ndarray
    centers_q: np.ndarray
    lambda_hat: float
    tau: float
    basis: np.ndarray


def alignment_fields(config: WorkloadConfig, max_queries: int = QUIVER_MAX_ARROWS) -> AlignmentFields:
    """Mean-shift and score discrepancies of an alignment trial, for plotting (paper §5.1).

    Uses the oracle pair and draws that `workloads.alignment.run_alignment` measures on
    (`alignment_draws`) and the fields of `workloads.drift.kernel_fields`. The plane is spanned by the
    two leading right singular vectors of p's mode centers: the ring's own plane for ring_mog_hd
    (its centers span it), the best 2-D fit of the centers for raw_mog_hd.

    Args:
        config: an alignment-task config.
        max_queries: keep the first this many queries (arrows).

    Returns:
        The projected fields.
    """
    pair, ref_p, ref_q, queries, tau = alignment_draws(config)
    queries = queries[:max_queries]
    m_p, s_p, b_p = kernel_fields(queries, ref_p, config.kernel, tau)
    m_q, s_q, b_q = kernel_fields(queries, ref_q, config.kernel, tau)
    lambda_hat = float(((b_p + b_q) / 2).mean())
    basis = torch.linalg.svd(pair.centers_p, full_matrices=False).Vh[:2].T  # (d, 2)

    def project(vectors: torch.Tensor) -> np.ndarray:
        return (vectors.to(basis.dtype) @ basis).numpy()

    return AlignmentFields(
        queries=project(queries),
        drift=project(m_p - m_q),
        scaled_score=project(lambda_hat * (s_p - s_q)),
        centers_p=project(pair.centers_p),
        centers_q=project(pair.centers_q),
        lambda_hat=lambda_hat,
        tau=tau,
        basis=basis.numpy(),
    )


def alignment_figure(fields: AlignmentFields, title: str) -> Figure:
    """Quiver of Delta_ms and lambda_hat * Delta_s at the queries: aligned arrows = aligned fields."""
    fig = Figure(figsize=(5.5, 5.0), dpi=FIGURE_DPI)
    ax = fig.add_subplot()
    # One arrow scale for both fields so their lengths compare.
    scale = float(np.abs(np.concatenate([fields.drift, fields.scaled_score])).max()) * 12 or 1.0
    x, y = fields.queries[:, 0], fields.queries[:, 1]
    ax.quiver(x, y, *fields.drift.T, color="tab:blue", scale=scale, width=0.004, label="Δms = m_p − m_q")
    ax.quiver(x, y, *fields.scaled_score.T, color="tab:orange", scale=scale, width=0.004, alpha=0.8,
              label=f"λ̂ Δs (λ̂ = {fields.lambda_hat:.3g})")
    ax.scatter(*fields.centers_p.T, marker="x", color="black", label="p modes")
    ax.scatter(*fields.centers_q.T, marker="o", facecolors="none", edgecolors="black", label="q modes")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return fig


def _format_title(config: WorkloadConfig, run_name: str, extra: str) -> str:
    return f"{run_name}\n{config.data.name if config.task == 'train' else config.alignment.dataset}: {extra}"


class TrialArtifacts:
    """Logs one trial's artifacts to its MLflow run; every failure is a warning, never an exception.

    Args:
        client: MLflow client of the trial's tracking URI.
        run_id: the trial's child run.
        config: the trial's resolved WorkloadConfig.
        run_name: shown in plot titles.
        max_plots: sample plots per trial (see `plot_steps`).
    """

    def __init__(self, client: MlflowClient, run_id: str, config: WorkloadConfig, run_name: str,
                 max_plots: int = MAX_SAMPLE_PLOTS):
        self.client, self.run_id, self.config, self.run_name = client, run_id, config, run_name
        self.steps = plot_steps(config.total_steps, config.eval_every_steps, max_plots)
        self._data: torch.Tensor | None = None

    def _log_figure(self, build, artifact_file: str) -> bool:
        try:
            fig = build()
            self.client.log_figure(self.run_id, fig, artifact_file, save_kwargs={"dpi": FIGURE_DPI})
            return True
        except Exception as exc:  # noqa: BLE001 - an artifact must never fail the trial
            _logger.warning("driftsweep: artifact %s not logged for run %s: %s", artifact_file, self.run_id, exc)
            return False

    def log_config(self) -> bool:
        """Log `config.yaml` (the resolved WorkloadConfig, loadable by `python -m workloads`).

        Returns:
            True when logged.
        """
        try:
            text = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
            self.client.log_text(self.run_id, text, CONFIG_ARTIFACT)
            return True
        except Exception as exc:  # noqa: BLE001
            _logger.warning("driftsweep: %s not logged for run %s: %s", CONFIG_ARTIFACT, self.run_id, exc)
            return False

    def _data_samples(self, num_samples: int) -> torch.Tensor:
        if self._data is None:
            # A fixed draw of the training data (seeded by the trial seed) for every plot of the trial.
            generator = torch.Generator().manual_seed(self.config.seed)
            self._data = make_dataset(self.config).sample(num_samples, generator).flatten(1)
        return self._data

    def on_samples(self, step: int, samples: torch.Tensor) -> bool:
        """`workloads.train` hook: plot the evaluation samples at the steps of `plot_steps`.

        Args:
            step: the evaluation step.
            samples: (N, *sample_shape) generated evaluation samples on CPU.

        Returns:
            True when a plot was logged.
        """
        if step not in self.steps:
            return False
        title = _format_title(self.config, self.run_name, f"step {step}")
        if samples.ndim == 4:
            return self._log_figure(lambda: image_grid_figure(samples, title), sample_artifact_name(step))
        flat = samples.flatten(1)
        if flat.shape[1] < 2:
            return False
        return self._log_figure(
            lambda: scatter_figure(flat, self._data_samples(min(len(flat), SCATTER_MAX_POINTS)), title),
            sample_artifact_name(step),
        )

    def log_alignment(self, metrics: Mapping[str, float]) -> bool:
        """Log the alignment quiver of an alignment trial.

        Args:
            metrics: the trial's reported alignment metrics (cosine, rel_error shown in the title).

        Returns:
            True when logged.
        """
        cfg = self.config.alignment
        summary = ", ".join(f"{key} {metrics[key]:.3g}" for key in ("cosine", "rel_error") if key in metrics)
        title = _format_title(self.config, self.run_name, f"d={cfg.dim}, kernel {self.config.kernel}; {summary}")
        return self._log_figure(lambda: alignment_figure(alignment_fields(self.config), title), ALIGNMENT_ARTIFACT)
