"""Evaluation features for FID (DESIGN.md "Metrics the users read").

FID = Frechet distance between Gaussian fits of evaluation features of real and generated samples
(Heusel et al. 2017, Eq. 6; computed by workloads.metrics.frechet_distance). Which network makes the
features is recorded with the number:
- "inception-v3-pytorch-fid": 2048-d pool features of Inception-v3 with the pytorch-fid weights,
  used only when torchvision is installed and DRIFTSWEEP_INCEPTION_WEIGHTS names the weights file.
- DIGITS_ENCODER_VERSION ("driftsweep-digits-encoder-v1"): for digits otherwise, the 128-d
  penultimate features of the project's own frozen digits encoder (workloads.features).
- "raw": toys, the raw coordinates (then FID is the Frechet distance "fd" on the data itself).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from workloads.config import WorkloadConfig
from workloads.features import DIGITS_ENCODER_VERSION, load_digits_encoder
from workloads.metrics import frechet_distance, gaussian_stats

Extractor = Callable[[torch.Tensor], torch.Tensor]

INCEPTION_WEIGHTS_ENV = "DRIFTSWEEP_INCEPTION_WEIGHTS"
INCEPTION_NAME = "inception-v3-pytorch-fid"
INCEPTION_INPUT_SIZE = 299  # pixels per side expected by Inception-v3
INCEPTION_NUM_CLASSES = 1008  # the TF-ported pytorch-fid weights keep 1008 logits
EXTRACT_BATCH_SIZE = 500  # samples per forward pass when extracting features


def _inception_extractor(weights: str) -> Extractor:
    import torchvision

    model = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=INCEPTION_NUM_CLASSES
    )
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()  # keep the 2048-d pool features
    model.eval().requires_grad_(False)

    def extract(images: torch.Tensor) -> torch.Tensor:
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        # pytorch-fid feeds images in [-1, 1] resized bilinearly to 299 x 299.
        images = torch.nn.functional.interpolate(
            images, size=(INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE), mode="bilinear", align_corners=False
        )
        return model.to(images.device)(images)

    return extract


def evaluation_extractor(config: WorkloadConfig, progress: bool = False) -> tuple[str, Extractor]:
    """Pick the FID feature extractor for the data set.

    Args:
        config: the workload config (data.name, features.encoder_cache).
        progress: progress bar if the digits encoder must be trained first.

    Returns:
        (name recorded with the FID, function (N, *sample_shape) -> (N, F) features, no gradient).

    Raises:
        ValueError: cifar10 without torchvision and the Inception weights.
    """
    if not config.is_image:
        return "raw", lambda x: x.flatten(1)
    weights = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if importlib.util.find_spec("torchvision") is not None and weights and Path(weights).is_file():
        return INCEPTION_NAME, _inception_extractor(weights)
    if config.data.name == "digits":
        encoder = load_digits_encoder(config.features.encoder_cache, progress)
        return DIGITS_ENCODER_VERSION, lambda x: encoder.to(x.device).penultimate(x)
    raise ValueError(
        f"FID on data.name={config.data.name!r} needs torchvision and the Inception weights "
        f"({INCEPTION_WEIGHTS_ENV}={weights!r}); set them or use eval.fid=false"
    )


@torch.no_grad()
def feature_stats(
    samples: torch.Tensor, extractor: Extractor, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the evaluation features of samples.

    Args:
        samples: (N, *sample_shape).
        extractor: from evaluation_extractor.
        progress: progress bar over extraction batches.

    Returns:
        (mu, sigma) from workloads.metrics.gaussian_stats.
    """
    batches = samples.split(EXTRACT_BATCH_SIZE)
    bar = tqdm(batches, desc="FID features", disable=not progress, leave=False)
    features = [extractor(batch).float().cpu() for batch in bar]
    return gaussian_stats(torch.cat(features))


def fid_from_stats(
    fake: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor], extractor: Extractor
) -> float:
    """FID of generated samples against precomputed reference statistics (computed once per run).

    Args:
        fake: generated samples (N, *sample_shape).
        reference: (mu, sigma) of the real samples, from feature_stats.
        extractor: the extractor that made the reference statistics.

    Returns:
        The Frechet distance (float).
    """
    mu, sigma = feature_stats(fake, extractor)
    return frechet_distance(mu, sigma, *reference)


def fid_from_samples(real: torch.Tensor, fake: torch.Tensor, extractor: Extractor) -> float:
    """FID between real and generated samples.

    Args:
        real: real samples (N, *sample_shape).
        fake: generated samples (M, *sample_shape).
        extractor: from evaluation_extractor.

    Returns:
        The Frechet distance (float).
    """
    return fid_from_stats(fake, feature_stats(real, extractor), extractor)
