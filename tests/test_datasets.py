"""Data sets: shapes, determinism, geometry of the toys against sklearn's generators, image sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sklearn.datasets import load_digits, make_moons, make_swiss_roll

from workloads.config import TOY_DATASETS, WorkloadConfig
from workloads.datasets import SAMPLE_SHAPES, make_dataset


def _toy(name: str, **data) -> object:
    return make_dataset(WorkloadConfig(data={"name": name, **data}))


def _max_nearest_distance(points: np.ndarray, reference: np.ndarray) -> float:
    """Largest distance from a point to its nearest reference point (one side of Hausdorff)."""
    return float(torch.cdist(torch.as_tensor(points), torch.as_tensor(reference)).min(dim=1).values.max())


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toys_shape_determinism_and_fresh_draws(name):
    dataset = _toy(name)
    assert dataset.shape == SAMPLE_SHAPES[name] == (2,) and not dataset.is_image and dataset.size is None
    first = dataset.sample(500, torch.Generator().manual_seed(3))
    again = dataset.sample(500, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    draw_one, draw_two = dataset.sample(500, generator), dataset.sample(500, generator)
    assert first.shape == (500, 2) and first.dtype == torch.float32
    assert torch.equal(first, again)  # same seed, same batch
    assert not torch.equal(draw_one, draw_two)  # infinite: a second draw is fresh


def test_ring_mog_modes_on_circle():
    # Noise-free points sit on 8 equally spaced angles of the radius-2 circle, all modes used.
    points = _toy("ring_mog", noise_std=0.0).sample(4000, torch.Generator().manual_seed(0)).double()
    np.testing.assert_allclose(points.norm(dim=1), 2.0, atol=1e-6)
    modes = torch.atan2(points[:, 1], points[:, 0]) / (2 * math.pi / 8)
    np.testing.assert_allclose(modes, modes.round(), atol=1e-5)
    counts = torch.bincount(modes.round().long() % 8, minlength=8)
    assert counts.min() > 4000 / 8 * 0.8


def test_noise_std_is_the_spread_around_the_shape():
    points = _toy("ring_mog", noise_std=0.1).sample(20000, torch.Generator().manual_seed(0)).double()
    radial = points.norm(dim=1) - 2.0
    # For noise << radius the radial deviation is ~ N(0, 0.1^2).
    assert abs(float(radial.std()) - 0.1) < 0.005


@pytest.mark.parametrize(
    "name, reference",
    [
        # sklearn's swiss roll: columns (x, z) are (t cos t, t sin t); our toy divides by 5.
        ("swiss_roll", make_swiss_roll(20000, noise=0.0, random_state=0)[0][:, [0, 2]] / 5),
        # sklearn's moons, shifted by (-0.5, -0.25) to be centred.
        ("two_moons", make_moons(20000, noise=0.0, random_state=0)[0] - np.array([0.5, 0.25])),
    ],
)
def test_curves_match_sklearn(name, reference):
    ours = _toy(name, noise_std=0.0).sample(3000, torch.Generator().manual_seed(1)).double().numpy()
    # Both directions: every point of ours lies on sklearn's curve, and ours covers the curve.
    spacing = 0.05  # data units; sklearn's 20000 points are denser than this along the curve
    assert _max_nearest_distance(ours, reference) < spacing
    assert _max_nearest_distance(reference, ours) < 3 * spacing


@pytest.mark.parametrize("cells", [2, 4, 8])
def test_checkerboard_only_black_cells_all_covered(cells):
    points = _toy("checkerboard", checkerboard_cells=cells, noise_std=0.0).sample(
        20000, torch.Generator().manual_seed(0)
    )
    assert points.abs().max() <= 2.0
    index = ((points + 2) / (4 / cells)).floor().long().clamp_max(cells - 1)
    assert bool(((index[:, 0] + index[:, 1]) % 2 == 0).all())
    used = {tuple(i) for i in index.tolist()}
    expected = {(i, j) for i in range(cells) for j in range(cells) if (i + j) % 2 == 0}
    assert used == expected


def test_digits_matches_sklearn_and_draws_without_replacement():
    dataset = make_dataset(WorkloadConfig(data={"name": "digits"}))
    assert dataset.shape == (1, 8, 8) and dataset.is_image and dataset.size == 1797
    reference = torch.as_tensor(load_digits().images, dtype=torch.float32) / 8 - 1  # [0, 16] -> [-1, 1]
    batch = dataset.sample(1797, torch.Generator().manual_seed(0))
    assert batch.min() == -1 and batch.max() == 1
    # A full batch is a permutation of the data set: same multiset of images (sorted unique rows
    # with their counts).
    ours, ours_counts = torch.unique(batch.flatten(1), dim=0, return_counts=True)
    theirs, theirs_counts = torch.unique(reference.flatten(1), dim=0, return_counts=True)
    assert torch.equal(ours, theirs) and torch.equal(ours_counts, theirs_counts)
    with pytest.raises(ValueError, match="batch_size <= 1797"):
        dataset.sample(1798, torch.Generator())


def test_batch_larger_than_dataset_is_one_line_config_error():
    with pytest.raises(ValidationError) as error:
        WorkloadConfig(data={"name": "digits"}, batch_size=4096)
    message = error.value.errors()[0]["msg"]
    assert "batch_size=4096" in message and "\n" not in message


def test_cifar10_without_torchvision_or_files(tmp_path):
    with pytest.raises(ValueError) as error:
        make_dataset(WorkloadConfig(data={"name": "cifar10", "root": str(tmp_path)}))
    message = str(error.value)
    assert "\n" not in message
    assert f"data.root={str(tmp_path)!r}" in message and "data.name='digits'" in message
