"""Typed workload configuration: the one object `train`/`run_workload` take.

Every component is chosen by a registry name validated as a Literal, so a typo fails at
validation with the allowed names listed (no imports from dotted paths, no code in configs).

Units are in the names: `total_steps`, `eval_every_steps`, `batch_size` (samples per step).
Temperatures are *relative*: the logit is -d / (mean_d * tau) for Laplace and
-d^2 / (2 (mean_d * tau)^2) for Gaussian, with mean_d the batch-mean distance (no gradient),
so tau means the same in any dimension (DESIGN.md "Pitfalls").

Bandwidth annealing: tau_k(t) = tau_k0 * exp(-anneal_rate * t) for every temperature of the set,
with t = step / total_steps in [0, 1] (the fraction of training), so a rate is comparable across
run lengths; anneal_rate = 0 turns annealing off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

KernelName = Literal["laplace", "gaussian", "cauchy", "imq", "sinkhorn"]
FeatureMapName = Literal["identity", "random_projection", "digits_encoder", "pretrained"]
DatasetName = Literal["ring_mog", "swiss_roll", "checkerboard", "two_moons", "digits", "cifar10"]
AlignmentDatasetName = Literal["ring_mog_hd", "raw_mog_hd"]
AffinityNorm = Literal["both", "row", "none"]
GeneratorName = Literal["auto", "mlp", "conv"]

# Number of training images per data set: a batch larger than this is rejected at validation.
DATASET_SIZES: dict[str, int] = {"digits": 1797, "cifar10": 50000}
TOY_DATASETS = ("ring_mog", "swiss_roll", "checkerboard", "two_moons")
IMAGE_DATASETS = ("digits", "cifar10")
# Fields that name a local file or directory. `~` is expanded and a relative path is taken against a
# base directory by `WorkloadConfig.with_absolute_paths` (the orchestrator uses the directory the plan
# was loaded in: Ray Tune runs each trial in a directory of its own).
PATH_FIELDS = ("data.root", "features.encoder_cache", "features.pretrained_weights")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Which data set the generator learns."""

    name: DatasetName = "ring_mog"
    checkerboard_cells: PositiveInt = Field(
        4, description="checkerboard: cells per side (more cells = finer structure, for annealing)"
    )
    noise_std: float = Field(
        0.05, ge=0, description="toys: isotropic noise added around the ideal shape (data units)"
    )
    root: str | None = Field(None, description="cifar10: directory holding the torchvision download")


class GeneratorConfig(_Strict):
    """One-step generator f(z)."""

    name: GeneratorName = Field("auto", description="auto = mlp for toys, conv for images")
    noise_dim: PositiveInt = Field(16, description="dimension of the Gaussian input noise z")
    hidden_dim: PositiveInt = 256
    num_layers: PositiveInt = Field(4, description="mlp: number of Linear layers")
    ema_decay: float | None = Field(
        None, ge=0, lt=1, description="EMA of weights used for evaluation; None = off"
    )


class FeatureConfig(_Strict):
    """Settings of the feature map in which distances are taken."""

    projection_dim: PositiveInt = Field(64, description="random_projection: output dimension")
    projection_seed: int = Field(0, description="random_projection: fixed seed of the matrix")
    encoder_cache: str | None = Field(
        None, description="digits_encoder: cache file (default ~/.cache/driftsweep/digits_encoder.pt)"
    )
    pretrained_name: str = Field("resnet18", description="pretrained: torchvision/timm model name")
    pretrained_weights: str | None = Field(None, description="pretrained: local weights file")


class OptimConfig(_Strict):
    """AdamW with gradient clipping."""

    lr: PositiveFloat = 1e-3
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    grad_clip: PositiveFloat | None = Field(1.0, description="max global grad norm; None = off")


class EvalConfig(_Strict):
    """Evaluation (metrics are pure functions in workloads.metrics)."""

    num_samples: PositiveInt = Field(2000, description="generated/real samples per evaluation")
    swd_projections: PositiveInt = 200
    fid: bool = Field(True, description="images: compute FID with the evaluation extractor")


class AlignmentConfig(_Strict):
    """Paper §5.1 measurement (task = alignment): no training, oracle samplers p and q."""

    dataset: AlignmentDatasetName = "ring_mog_hd"
    dim: PositiveInt = Field(2, description="ambient dimension d")
    num_ref: PositiveInt = Field(4096, description="reference samples per distribution")
    num_query: PositiveInt = Field(512, description="query points drawn from q")
    tau_scale: PositiveFloat = Field(
        1.0, description="tau = tau_scale * mean query norm (paper: tau proportional to mean norm)"
    )


class WorkloadConfig(_Strict):
    """The whole workload. Sweep axes map to the top-level fields of the same name."""

    task: Literal["train", "alignment"] = "train"
    seed: int = Field(0, description="root seed; everything random derives from it")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    data: DataConfig = DataConfig()
    kernel: KernelName = "laplace"
    temperatures: list[PositiveFloat] = Field(
        default_factory=lambda: [0.02, 0.05, 0.2],
        min_length=1,
        description="relative kernel temperatures; drifts normalized per temperature and summed",
    )
    anneal_rate: float = Field(
        0.0, ge=0, description="r in tau(t) = tau0 * exp(-r t), t = fraction of training; 0 = off"
    )
    affinity_norm: AffinityNorm = Field("both", description="softmax over rows x cols, rows, none")
    sinkhorn_iters: PositiveInt = Field(20, description="sinkhorn kernel: Sinkhorn iterations")
    batch_size: PositiveInt = Field(256, description="generated samples per step")
    pos_batch_size: PositiveInt | None = Field(None, description="positives per step; None = batch_size")
    feature_map: FeatureMapName = "identity"
    features: FeatureConfig = FeatureConfig()

    generator: GeneratorConfig = GeneratorConfig()
    optim: OptimConfig = OptimConfig()
    total_steps: PositiveInt = 2000
    eval_every_steps: PositiveInt = 200
    checkpoint_every_steps: PositiveInt | None = Field(
        None, description="None = at every evaluation"
    )
    eval: EvalConfig = EvalConfig()
    alignment: AlignmentConfig = AlignmentConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> WorkloadConfig:
        size = DATASET_SIZES.get(self.data.name)
        for field in ("batch_size", "pos_batch_size"):
            value = getattr(self, field)
            if size is not None and value is not None and value > size:
                raise ValueError(
                    f"{field}={value} is larger than data set {self.data.name!r} ({size} images); "
                    f"use {field} <= {size}"
                )
        if self.task == "train":
            if self.data.name in TOY_DATASETS and self.feature_map in ("digits_encoder", "pretrained"):
                raise ValueError(
                    f"feature_map={self.feature_map!r} needs an image data set, not {self.data.name!r}; "
                    "use identity or random_projection for toys"
                )
            if self.eval_every_steps > self.total_steps:
                raise ValueError(
                    f"eval_every_steps={self.eval_every_steps} exceeds total_steps={self.total_steps}; "
                    "lower eval_every_steps"
                )
        return self

    def with_absolute_paths(self, base_dir: str | os.PathLike[str]) -> WorkloadConfig:
        """This config with every path of PATH_FIELDS `~`-expanded and made absolute against base_dir.

        Args:
            base_dir: the directory relative paths are taken against.

        Returns:
            A new config (self when no path field is set).
        """
        data = self.model_dump()
        changed = False
        for dotted in PATH_FIELDS:
            section, name = dotted.split(".")
            value = data[section][name]
            if value is not None:
                absolute = os.path.normpath(Path(base_dir, Path(value).expanduser()))
                changed |= absolute != value
                data[section][name] = absolute
        return WorkloadConfig.model_validate(data) if changed else self

    @property
    def is_image(self) -> bool:
        return self.data.name in IMAGE_DATASETS
