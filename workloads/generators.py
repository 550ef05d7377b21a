"""One-step generators f: z ~ N(0, I_noise_dim) -> sample, and an EMA of their weights.

Registry GENERATORS: "mlp" for vector data (toys), "conv" for images; "auto" picks by data set.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from workloads.config import WorkloadConfig
from workloads.datasets import SAMPLE_SHAPES

CONV_MIN_CHANNELS = 32


class MLPGenerator(nn.Module):
    """generator.num_layers Linear layers with SiLU between them; unbounded output (data units)."""

    def __init__(self, noise_dim: int, hidden_dim: int, num_layers: int, out_shape: tuple[int, ...]):
        super().__init__()
        self.out_shape = out_shape
        widths = [noise_dim] + [hidden_dim] * (num_layers - 1) + [math.prod(out_shape)]
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if i < num_layers - 1:
                layers.append(nn.SiLU())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(len(z), *self.out_shape)


class ConvGenerator(nn.Module):
    """Linear -> (hidden_dim x s x s) map -> [nearest upsample x2 + 3x3 conv + SiLU]* -> 3x3 conv -> tanh.

    The start size s is 2 for 8x8 images (digits) and 4 for 32x32 (cifar10); channels halve at each
    upsampling (not below 32). Output in [-1, 1], the pixel range of the data sets.
    """

    def __init__(self, noise_dim: int, hidden_dim: int, out_shape: tuple[int, ...]):
        super().__init__()
        channels_out, height, width = out_shape
        start = 4 if height >= 32 else 2
        num_upsamples = int(math.log2(height // start))
        if height != width or start * 2**num_upsamples != height:
            raise ValueError(
                f"generator.name='conv' needs square images of side 2*2^k or 4*2^k, got {out_shape}"
            )
        self.start_shape = (hidden_dim, start, start)
        self.project = nn.Linear(noise_dim, math.prod(self.start_shape))
        blocks: list[nn.Module] = [nn.SiLU()]
        channels = hidden_dim
        for _ in range(num_upsamples):
            next_channels = max(channels // 2, CONV_MIN_CHANNELS)
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, next_channels, 3, padding=1),
                nn.SiLU(),
            ]
            channels = next_channels
        blocks += [nn.Conv2d(channels, channels_out, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.project(z).view(len(z), *self.start_shape))


GENERATORS: dict[str, Callable[[WorkloadConfig, tuple[int, ...]], nn.Module]] = {
    "mlp": lambda c, shape: MLPGenerator(
        c.generator.noise_dim, c.generator.hidden_dim, c.generator.num_layers, shape
    ),
    "conv": lambda c, shape: ConvGenerator(c.generator.noise_dim, c.generator.hidden_dim, shape),
}


def build_generator(config: WorkloadConfig) -> nn.Module:
    """Build the generator named by config.generator.name ("auto": conv for images, else mlp).

    Parameters are initialized from the global torch RNG: the caller seeds it (train does, from
    config.seed) so that the same seed gives the same initial weights.

    Args:
        config: the workload config (generator.* fields; data.name fixes the output shape).

    Returns:
        nn.Module mapping (N, noise_dim) noise to (N, *SAMPLE_SHAPES[data.name]) samples.

    Raises:
        ValueError: conv generator for toy data.
    """
    sample_shape = SAMPLE_SHAPES[config.data.name]
    name = config.generator.name
    if name == "auto":
        name = "conv" if config.is_image else "mlp"
    if name == "conv" and len(sample_shape) != 3:
        raise ValueError(
            f"generator.name='conv' needs image data, got per-sample shape {sample_shape}; "
            "use 'mlp' or 'auto'"
        )
    return GENERATORS[name](config, sample_shape)


class EMA:
    """Exponential moving average of a model's weights: w_ema <- decay * w_ema + (1 - decay) * w.

    Args:
        model: the trained model; a frozen deep copy is kept for evaluation.
        decay: weight of the running average per update, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step toward the model's current weights (buffers are copied)."""
        for ema_param, param in zip(self.model.parameters(), model.parameters()):
            ema_param.lerp_(param, 1 - self.decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.model.load_state_dict(state["model"])
