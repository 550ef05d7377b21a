"""Feature maps: the spaces in which drift distances are taken (DESIGN.md "feature map" axis).

Every feature map is a frozen nn.Module (eval mode, parameters without gradient) that stays
differentiable with respect to its INPUT, so the generator gets gradients through it. Its forward
returns a list of tensors, one per feature map/stage, each of shape (L, N, C): L feature locations
(each gets its own kernel and its own loss term, DESIGN.md "The drift computation", last line),
N samples, C channels.

Registry FEATURE_MAPS:
- identity: the flattened sample, one location.
- random_projection: flattened sample times a fixed Gaussian matrix (D x k) with entries N(0, 1/k),
  k = features.projection_dim, seeded by features.projection_seed (Johnson-Lindenstrauss scaling:
  E||W^T x||^2 = ||x||^2).
- digits_encoder: a small conv classifier this project trains on sklearn digits (deterministic,
  cached); multi-scale features per stage (per-location vectors + global mean + global std).
- pretrained: a torchvision model loaded from a local weights file, multi-scale like digits_encoder.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from workloads.checkpoint import atomic_torch_save
from workloads.config import WorkloadConfig
from workloads.datasets import SAMPLE_SHAPES, load_digits_arrays

DIGITS_ENCODER_VERSION = "driftsweep-digits-encoder-v1"
DEFAULT_ENCODER_CACHE = Path.home() / ".cache" / "driftsweep" / "digits_encoder.pt"
# Training recipe of the digits encoder; changing any of these needs a new DIGITS_ENCODER_VERSION.
ENCODER_SEED = 0
ENCODER_EPOCHS = 12
ENCODER_BATCH_SIZE = 64
ENCODER_LR = 2e-3
ENCODER_NUM_VAL = 297  # held-out images (of 1797) for the recorded validation accuracy
# Added to the variance over locations before the square root: keeps the gradient of the global
# std finite when a map is constant over locations (feature units squared).
STD_EPS = 1e-6


def multiscale(feature_map: torch.Tensor) -> torch.Tensor:
    """Per-location vectors, their global mean and global std (the drifting paper's multi-scale features).

    Args:
        feature_map: (N, C, H, W).

    Returns:
        (H*W + 2, N, C): the H*W location vectors, then the mean and the std over locations.
    """
    locations = feature_map.flatten(2).permute(2, 0, 1)  # (H*W, N, C)
    mean = locations.mean(dim=0, keepdim=True)
    std = (locations.var(dim=0, unbiased=False, keepdim=True) + STD_EPS).sqrt()
    return torch.cat([locations, mean, std], dim=0)


def _freeze(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


class IdentityFeatures(nn.Module):
    """The flattened sample as one location: [(1, N, D)]."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.flatten(1).unsqueeze(0)]


class RandomProjectionFeatures(nn.Module):
    """Flattened sample times a fixed Gaussian matrix with N(0, 1/k) entries: [(1, N, k)]."""

    def __init__(self, input_dim: int, projection_dim: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(input_dim, projection_dim, generator=generator) / projection_dim**0.5
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [(x.flatten(1) @ self.matrix).unsqueeze(0)]


class DigitsEncoder(nn.Module):
    """Three conv stages on 8x8 digits (32 ch @ 8x8, 64 ch @ 4x4, 128 ch @ 2x2), mean pool, linear head."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.SiLU()),
                nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU()),
                nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.SiLU()),
            ]
        )
        self.head = nn.Linear(128, 10)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after each stage, [(N, 32, 8, 8), (N, 64, 4, 4), (N, 128, 2, 2)]."""
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last stage, (N, 128): the FID evaluation features."""
        return self.stage_outputs(x)[-1].mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.penultimate(x))


class MultiScaleFeatures(nn.Module):
    """multiscale() of every stage of a backbone: [(H_s*W_s + 2, N, C_s) per stage s]."""

    def __init__(self, stage_outputs: Callable[[torch.Tensor], list[torch.Tensor]], backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self._stage_outputs = stage_outputs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [multiscale(f) for f in self._stage_outputs(x)]


def _train_digits_encoder(progress: bool) -> tuple[DigitsEncoder, dict]:
    """Train the encoder deterministically: fixed seeds, deterministic algorithms, fixed data order."""
    images, labels = load_digits_arrays()
    split = torch.randperm(len(images), generator=torch.Generator().manual_seed(ENCODER_SEED))
    val_index, train_index = split[:ENCODER_NUM_VAL], split[ENCODER_NUM_VAL:]
    order_generator = torch.Generator().manual_seed(ENCODER_SEED + 1)
    was_deterministic, num_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # One thread: the order of CPU reductions, hence the weights, do not depend on the core count.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ENCODER_SEED)
            encoder = DigitsEncoder()
        optimizer = torch.optim.Adam(encoder.parameters(), lr=ENCODER_LR)
        batches_per_epoch = -(-len(train_index) // ENCODER_BATCH_SIZE)
        bar = tqdm(
            total=ENCODER_EPOCHS * batches_per_epoch,
            desc=f"training {DIGITS_ENCODER_VERSION} (once, cached)",
            disable=not progress,
            leave=False,
        )
        started = time.perf_counter()
        for _ in range(ENCODER_EPOCHS):
            order = train_index[torch.randperm(len(train_index), generator=order_generator)]
            for batch in order.split(ENCODER_BATCH_SIZE):
                loss = nn.functional.cross_entropy(encoder(images[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
        bar.close()
        with torch.no_grad():
            val_accuracy = (encoder(images[val_index]).argmax(1) == labels[val_index]).float().mean()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(num_threads)
    meta = {
        "version": DIGITS_ENCODER_VERSION,
        "val_accuracy": float(val_accuracy),
        "train_seconds": time.perf_counter() - started,
    }
    return encoder, meta


def load_digits_encoder(cache_path: str | os.PathLike | None = None, progress: bool = False) -> DigitsEncoder:
    """The frozen digits encoder, trained on first use and cached.

    Args:
        cache_path: cache file; None = ~/.cache/driftsweep/digits_encoder.pt.
        progress: show a progress bar while training.

    Returns:
        DigitsEncoder in eval mode with frozen parameters, on CPU; `.meta` holds version,
        val_accuracy and train_seconds.
    """
    path = Path(cache_path) if cache_path is not None else DEFAULT_ENCODER_CACHE
    cached = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
    if cached is not None and cached["meta"]["version"] == DIGITS_ENCODER_VERSION:
        encoder = DigitsEncoder()
        encoder.load_state_dict(cached["state_dict"])
        meta = cached["meta"]
    else:
        encoder, meta = _train_digits_encoder(progress)
        atomic_torch_save({"state_dict": encoder.state_dict(), "meta": meta}, path)
    encoder.meta = meta
    return _freeze(encoder)


def _pretrained(config: WorkloadConfig, progress: bool) -> nn.Module:
    features = config.features
    weights = features.pretrained_weights
    try:
        import torchvision
        from torchvision.models.feature_extraction import create_feature_extractor
    except ImportError:
        torchvision = None
    if torchvision is None or weights is None or not Path(weights).is_file():
        raise ValueError(
            "feature_map='pretrained' needs torchvision and a local weights file "
            f"(features.pretrained_weights=...); none found at {weights!r}"
        )
    model = torchvision.models.get_model(features.pretrained_name, weights=None)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    # ResNet-style backbones: one stage per residual layer.
    stage_names = [name for name, _ in model.named_children() if name.startswith("layer")]
    if not stage_names:
        raise ValueError(
            f"features.pretrained_name={features.pretrained_name!r} has no layer1..layerK stages; "
            "use a torchvision ResNet (resnet18, resnet50, ...)"
        )
    extractor = create_feature_extractor(model, return_nodes=stage_names)
    # ImageNet normalization of inputs in [-1, 1]; grey images are repeated over 3 channels.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def stage_outputs(x: torch.Tensor) -> list[torch.Tensor]:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = ((x + 1) / 2 - mean.to(x)) / std.to(x)
        return list(extractor(x).values())

    return MultiScaleFeatures(stage_outputs, extractor)


def _digits_encoder_features(config: WorkloadConfig, progress: bool) -> nn.Module:
    encoder = load_digits_encoder(config.features.encoder_cache, progress)
    return MultiScaleFeatures(encoder.stage_outputs, encoder)


FEATURE_MAPS: dict[str, Callable[[WorkloadConfig, bool], nn.Module]] = {
    "identity": lambda c, progress: IdentityFeatures(),
    "random_projection": lambda c, progress: RandomProjectionFeatures(
        math.prod(SAMPLE_SHAPES[c.data.name]),
        c.features.projection_dim,
        c.features.projection_seed,
    ),
    "digits_encoder": _digits_encoder_features,
    "pretrained": _pretrained,
}


def build_feature_map(config: WorkloadConfig, progress: bool = False) -> nn.Module:
    """Build the frozen feature map named by config.feature_map.

    Args:
        config: the workload config (feature_map and features.* fields).
        progress: progress bar if an encoder must be trained first.

    Returns:
        Frozen nn.Module: (N, *sample_shape) -> list of (L, N, C) tensors, differentiable in its input.

    Raises:
        ValueError: digits_encoder on non-digits data; pretrained without torchvision or weights.
    """
    if config.feature_map == "digits_encoder" and config.data.name != "digits":
        raise ValueError(
            f"feature_map='digits_encoder' takes 1x8x8 digits, not data.name={config.data.name!r}; "
            "use identity, random_projection or pretrained"
        )
    return _freeze(FEATURE_MAPS[config.feature_map](config, progress))
