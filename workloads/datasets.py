"""Data sets behind one interface: `make_dataset(config).sample(n, generator)`.

Toys (2-D, infinite: every draw is fresh, in data units of roughly [-2, 2]^2):
- ring_mog: 8 equal-weight Gaussian modes at angles 2*pi*k/8 on a circle of radius 2, each with
  standard deviation data.noise_std (the ring mixture of the drifting demos).
- swiss_roll: the 2-D swiss roll of sklearn.datasets.make_swiss_roll (t = 1.5 pi (1 + 2u), point
  (t cos t, t sin t)), divided by 5 so it fits in [-2.5, 2.5]^2, plus noise.
- checkerboard: uniform on the "black" cells ((i + j) even) of a data.checkerboard_cells^2 grid
  over [-2, 2]^2, plus noise.
- two_moons: the curves of sklearn.datasets.make_moons (outer: (cos pi t, sin pi t); inner:
  (1 - cos pi t, 0.5 - sin pi t)), centred at the origin, plus noise.
Images (finite, sampled without replacement within a batch, pixels scaled to [-1, 1]):
- digits: sklearn's bundled 8x8 digits (1797 images), shape (1, 8, 8).
- cifar10: torchvision CIFAR-10 training set (50000 images) from data.root, shape (3, 32, 32).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from workloads.config import WorkloadConfig

RING_MODES = 8
RING_RADIUS = 2.0
SWISS_ROLL_SCALE = 1 / 5
CHECKERBOARD_HALF_WIDTH = 2.0
DIGITS_MAX_PIXEL = 16.0  # sklearn digits pixels are integers in [0, 16]
# Per-sample shape of each data set, known without loading it (the generator is built from it).
SAMPLE_SHAPES: dict[str, tuple[int, ...]] = {
    "ring_mog": (2,), "swiss_roll": (2,), "checkerboard": (2,), "two_moons": (2,),
    "digits": (1, 8, 8), "cifar10": (3, 32, 32),
}


class Dataset(ABC):
    """A sampler of training data on CPU.

    Attributes:
        name: registry name.
        shape: per-sample shape, e.g. (2,) or (1, 8, 8).
        is_image: True for image data sets.
        size: number of distinct samples, None for infinite toys.
    """

    name: str
    shape: tuple[int, ...]
    is_image: bool = False
    size: int | None = None

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw a batch.

        Args:
            n: number of samples.
            generator: CPU torch.Generator, the only source of randomness.

        Returns:
            float32 tensor of shape (n, *shape) on CPU.
        """


class ToyDataset(Dataset):
    """Infinite 2-D toy: an ideal shape `draw(n, generator)` plus isotropic Gaussian noise."""

    shape = (2,)

    def __init__(self, name: str, draw: Callable[[int, torch.Generator], torch.Tensor], noise_std: float):
        self.name = name
        self._draw = draw
        self.noise_std = noise_std

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        points = self._draw(n, generator)
        return points + self.noise_std * torch.randn(n, 2, generator=generator)


class TensorDataset(Dataset):
    """Finite image set; each batch is drawn without replacement."""

    is_image = True

    def __init__(self, name: str, images: torch.Tensor):
        self.name = name
        self.images = images
        self.shape = tuple(images.shape[1:])
        self.size = len(images)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if n > len(self.images):
            raise ValueError(
                f"cannot draw {n} samples without replacement from data set {self.name!r} "
                f"({len(self.images)} images); use batch_size <= {len(self.images)}"
            )
        index = torch.randperm(len(self.images), generator=generator)[:n]
        return self.images[index]


def _ring_mog(n: int, generator: torch.Generator) -> torch.Tensor:
    mode = torch.randint(RING_MODES, (n,), generator=generator)
    angle = 2 * math.pi * mode.float() / RING_MODES
    return RING_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)


def _swiss_roll(n: int, generator: torch.Generator) -> torch.Tensor:
    # sklearn.datasets.make_swiss_roll: t = 1.5 pi (1 + 2 u), x = t cos t, z = t sin t.
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    return SWISS_ROLL_SCALE * torch.stack([t * t.cos(), t * t.sin()], dim=1)


def _checkerboard(cells: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    # Black cells are those with (row + col) even: cells^2 / 2 of them (rounded up).
    black = [(i, j) for i in range(cells) for j in range(cells) if (i + j) % 2 == 0]
    corners = torch.tensor(black, dtype=torch.float32)
    cell_width = 2 * CHECKERBOARD_HALF_WIDTH / cells

    def draw(n: int, generator: torch.Generator) -> torch.Tensor:
        cell = corners[torch.randint(len(black), (n,), generator=generator)]
        offset = torch.rand(n, 2, generator=generator)
        return (cell + offset) * cell_width - CHECKERBOARD_HALF_WIDTH

    return draw


def _two_moons(n: int, generator: torch.Generator) -> torch.Tensor:
    # sklearn.datasets.make_moons curves, shifted by (-0.5, -0.25) to centre them at the origin.
    t = math.pi * torch.rand(n, generator=generator)
    outer = torch.rand(n, generator=generator) < 0.5
    x = torch.where(outer, t.cos(), 1 - t.cos())
    y = torch.where(outer, t.sin(), 0.5 - t.sin())
    return torch.stack([x - 0.5, y - 0.25], dim=1)


def load_digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's bundled 8x8 digits.

    Returns:
        images (1797, 1, 8, 8) float32 in [-1, 1] and labels (1797,) int64.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    return images / DIGITS_MAX_PIXEL * 2 - 1, torch.as_tensor(bunch.target, dtype=torch.int64)


def _cifar10(config: WorkloadConfig) -> Dataset:
    hint = (
        f"data.name='cifar10' needs torchvision and the CIFAR-10 files under data.root={config.data.root!r}; "
        "install driftsweep[vision] and download them, or use data.name='digits'"
    )
    try:
        from torchvision.datasets import CIFAR10
    except ImportError:
        raise ValueError(hint) from None
    if config.data.root is None:
        raise ValueError(hint)
    try:
        cifar = CIFAR10(config.data.root, train=True, download=False)
    except RuntimeError:  # torchvision raises RuntimeError("Dataset not found or corrupted ...")
        raise ValueError(hint) from None
    # (50000, 32, 32, 3) uint8 -> (50000, 3, 32, 32) float32 in [-1, 1].
    images = torch.as_tensor(cifar.data).permute(0, 3, 1, 2).float() / 127.5 - 1
    return TensorDataset("cifar10", images)


DATASETS: dict[str, Callable[[WorkloadConfig], Dataset]] = {
    "ring_mog": lambda c: ToyDataset("ring_mog", _ring_mog, c.data.noise_std),
    "swiss_roll": lambda c: ToyDataset("swiss_roll", _swiss_roll, c.data.noise_std),
    "checkerboard": lambda c: ToyDataset(
        "checkerboard", _checkerboard(c.data.checkerboard_cells), c.data.noise_std
    ),
    "two_moons": lambda c: ToyDataset("two_moons", _two_moons, c.data.noise_std),
    "digits": lambda c: TensorDataset("digits", load_digits_arrays()[0]),
    "cifar10": _cifar10,
}


def make_dataset(config: WorkloadConfig) -> Dataset:
    """Build the data set named by config.data.name.

    Args:
        config: the workload config (data.* fields).

    Returns:
        A Dataset.

    Raises:
        ValueError: cifar10 without torchvision or its files (one line, names data.root).
    """
    return DATASETS[config.data.name](config)
