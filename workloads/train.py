"""The drifting training loop: `train(config, report)` and the task dispatcher `run_workload`.

One step (DESIGN.md "The drift computation"): z ~ N(0, I) -> x = f(z); features phi(x) and
phi(y+) (positives, no gradient); per feature tensor (L x N x C) the drift
V = drift_field(phi(x), phi(y+), negatives = phi(x) itself, tau = annealed temperatures) (steps 1-5);
loss = sum over tensors and locations of MSE(phi(x), stop_gradient(phi(x) + V)) (step 6);
AdamW with global grad-norm clipping.

Randomness: one root seed (config.seed) derives independent CPU torch.Generators for the initial
weights, the training noise, the data draws and the evaluation set. The evaluation noise and the
real evaluation samples are drawn once from the evaluation stream, so they do not depend on the
batch size, the step or the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from workloads.alignment import run_alignment
from workloads.checkpoint import load_latest, save_checkpoint
from workloads.config import WorkloadConfig
from workloads.datasets import Dataset, make_dataset
from workloads.drift import anneal_temperatures, drift_field
from workloads.features import build_feature_map
from workloads.fid import evaluation_extractor, feature_stats, fid_from_stats
from workloads.generators import EMA, build_generator
from workloads.metrics import frechet_distance, gaussian_stats, rbf_mmd, sliced_wasserstein

Report = Callable[[int, dict[str, float]], None]
# on_samples(step, samples): the evaluation samples just generated at an evaluation step
# (num_samples x *sample_shape, float32, CPU), e.g. for sample plots; never called when None.
SamplesHook = Callable[[int, torch.Tensor], None]

# Independent random streams derived from the root seed (SeedSequence spawn keys).
_STREAMS = ("init", "noise", "data", "eval")
EVAL_BATCH_SIZE = 1000  # generated samples per forward pass at evaluation


class NonFiniteLossError(RuntimeError):
    """A training quantity became NaN or infinite; the message names the step and the quantity."""


def _stream_seeds(seed: int) -> dict[str, int]:
    """Independent 63-bit seeds per stream from the root seed (numpy SeedSequence spawning)."""
    children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    return {name: int(child.generate_state(1, np.uint64)[0] >> 1) for name, child in zip(_STREAMS, children)}


def resolve_device(requested: str) -> torch.device:
    """cuda when available and requested (auto/cuda), else cpu.

    Raises:
        ValueError: device='cuda' on a machine without CUDA.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' was requested but CUDA is not available here; use device='cpu' or 'auto'"
        )
    return torch.device("cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


class _Evaluator:
    """Fixed evaluation set and the metrics of DESIGN.md "Metrics the users read" (pure functions)."""

    def __init__(self, config: WorkloadConfig, dataset: Dataset, seed: int, progress: bool):
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        num_real = min(config.eval.num_samples, dataset.size or config.eval.num_samples)
        self.noise = torch.randn(config.eval.num_samples, config.generator.noise_dim, generator=generator)
        self.real = dataset.sample(num_real, generator)
        self.fid_extractor: str | None = None
        if config.is_image and config.eval.fid:
            self.fid_extractor, self.extract = evaluation_extractor(config, progress)
            self.reference = feature_stats(self.real, self.extract, progress)
        elif not config.is_image:
            self.fid_extractor = "raw"
            self.reference = gaussian_stats(self.real.flatten(1))

    @torch.no_grad()
    def samples(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        return torch.cat([model(z.to(device)).float().cpu() for z in self.noise.split(EVAL_BATCH_SIZE)])

    def metrics(self, fake: torch.Tensor) -> dict[str, float]:
        real_flat, fake_flat = self.real.flatten(1), fake.flatten(1)
        metrics = {
            "swd": sliced_wasserstein(fake_flat, real_flat, num_projections=self.config.eval.swd_projections),
            "mmd": rbf_mmd(fake_flat, real_flat),
        }
        if not self.config.is_image:
            metrics["fd"] = frechet_distance(*gaussian_stats(fake_flat), *self.reference)
        elif self.config.eval.fid:
            metrics["fid"] = fid_from_stats(fake, self.reference, self.extract)
        return metrics


def _drift_loss(
    features_x: list[torch.Tensor], features_y: list[torch.Tensor], config: WorkloadConfig, taus: list[float]
) -> tuple[torch.Tensor, list[float]]:
    """DESIGN.md step 6: sum over feature tensors and locations of MSE(phi, sg(phi + V)).

    Returns:
        (loss, drift RMS per temperature before normalization, averaged over feature tensors).
    """
    loss = torch.zeros((), device=features_x[0].device)
    drift_rms = [0.0] * len(taus)
    for fx, fy in zip(features_x, features_y):
        v, stats = drift_field(
            fx.detach(),
            fy,
            kernel=config.kernel,
            temperatures=taus,
            affinity_norm=config.affinity_norm,
            sinkhorn_iters=config.sinkhorn_iters,
            return_stats=True,
        )
        target = (fx + v.to(fx.dtype)).detach()
        # Mean over samples and channels per location, summed over the L locations.
        loss = loss + (fx - target).square().mean(dim=(1, 2)).sum()
        drift_rms = [acc + r / len(features_x) for acc, r in zip(drift_rms, stats["drift_rms"])]
    return loss, drift_rms


def evaluation_steps(total_steps: int, eval_every_steps: int) -> list[int]:
    """The steps at which `train` evaluates (and reports): every eval_every_steps and the last.

    Args:
        total_steps: training steps.
        eval_every_steps: evaluation period in steps.

    Returns:
        Increasing list of steps.
    """
    steps = list(range(eval_every_steps, total_steps + 1, eval_every_steps))
    return steps if steps and steps[-1] == total_steps else [*steps, total_steps]


def _empty_sums(num_temperatures: int) -> dict[str, Any]:
    """Running sums since the last evaluation (means are reported): loss, grad_norm, step_time_s
    (seconds), drift_rms per temperature."""
    return {"loss": 0.0, "grad_norm": 0.0, "step_time_s": 0.0, "drift_rms": [0.0] * num_temperatures}


def _check_finite(value: torch.Tensor, step: int, quantity: str) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteLossError(
            f"step {step}: {quantity} is not finite ({float(value.detach().float().abs().max())}); "
            "lower optim.lr or set optim.grad_clip"
        )


def train(
    config: WorkloadConfig,
    report: Report,
    checkpoint_dir: str | None = None,
    *,
    progress: bool = False,
    on_samples: SamplesHook | None = None,
) -> dict[str, Any]:
    """Train a one-step generator by drifting and report metrics at every evaluation.

    At every eval_every_steps and at the last step: evaluate, save a checkpoint (when checkpoint_dir
    is given and the step is a checkpoint step), THEN call report(step, metrics), so a run stopped
    inside report resumes from that step. Metric names: loss, grad_norm, swd, mmd, fd (toys),
    fid (images, eval.fid), samples_per_s, step_time_s, lr, drift_rms/k{i}, tau/k{i}; loss,
    grad_norm, drift_rms and step_time_s are means over the steps since the previous evaluation.

    Args:
        config: validated workload config (task "train").
        report: called as report(step, metrics) with step = completed steps.
        checkpoint_dir: where ckpt-{step:07d}.pt / latest.pt go; resumes from latest.pt if present.
        progress: show a tqdm progress bar.
        on_samples: called as on_samples(step, samples) at every evaluation, before report, with
            the evaluation samples the metrics were computed on (CPU float32); None = not called.

    Returns:
        {"steps", "seed", "device", "fid_extractor", "final" (last metrics), "resumed_from" (step or None)}.

    Raises:
        NonFiniteLossError: generated samples, loss or gradient norm became NaN/inf.
        ValueError: bad device, data set or feature map for this machine (one-line message).
    """
    device = resolve_device(config.device)
    seeds = _stream_seeds(config.seed)
    dataset = make_dataset(config)
    feature_map = build_feature_map(config, progress).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds["init"])
        model = build_generator(config).to(device)
    ema = EMA(model, config.generator.ema_decay) if config.generator.ema_decay is not None else None
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.optim.lr,
        betas=(config.optim.beta1, config.optim.beta2),
        weight_decay=config.optim.weight_decay,
    )
    noise_generator = torch.Generator().manual_seed(seeds["noise"])
    data_generator = torch.Generator().manual_seed(seeds["data"])
    evaluator = _Evaluator(config, dataset, seeds["eval"], progress)
    pos_batch_size = config.pos_batch_size or config.batch_size
    checkpoint_every_steps = config.checkpoint_every_steps or config.eval_every_steps
    eval_steps = set(evaluation_steps(config.total_steps, config.eval_every_steps))
    sums = _empty_sums(len(config.temperatures))
    steps_in_window = 0
    start_step, final = 0, {}

    state = load_latest(checkpoint_dir)
    if state is not None:
        if state["config"] != config.model_dump():
            raise ValueError(
                f"checkpoint_dir={checkpoint_dir!r} holds a checkpoint of a different config; "
                "use an empty checkpoint_dir for a new run"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        noise_generator.set_state(state["rng"]["noise"])
        data_generator.set_state(state["rng"]["data"])
        start_step, sums, final = state["step"], state["sums"], state["final"]
        steps_in_window = state["steps_in_window"]

    bar = tqdm(total=config.total_steps, initial=start_step, desc="train", disable=not progress)
    for step in range(start_step + 1, config.total_steps + 1):
        # -- one drifting step; t = step / total_steps is the fraction of training after it.
        started = time.perf_counter()
        taus = anneal_temperatures(config.temperatures, config.anneal_rate, step / config.total_steps)
        z = torch.randn(config.batch_size, config.generator.noise_dim, generator=noise_generator).to(device)
        positives = dataset.sample(pos_batch_size, data_generator).to(device)
        x = model(z)
        _check_finite(x, step, "generated samples")
        with torch.no_grad():
            features_y = feature_map(positives)
        loss, drift_rms = _drift_loss(feature_map(x), features_y, config, taus)
        _check_finite(loss, step, "loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip or math.inf)
        _check_finite(grad_norm, step, "gradient norm")
        optimizer.step()
        if ema is not None:
            ema.update(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so step_time_s measures the GPU work, not the launch
        sums["loss"] += loss.item()
        sums["grad_norm"] += float(grad_norm)
        sums["step_time_s"] += time.perf_counter() - started
        sums["drift_rms"] = [acc + r for acc, r in zip(sums["drift_rms"], drift_rms)]
        steps_in_window += 1
        bar.update()

        is_eval = step in eval_steps
        if is_eval:
            # -- evaluate on the fixed evaluation set (EMA weights when enabled).
            fake = evaluator.samples(ema.model if ema is not None else model, device)
            metrics = evaluator.metrics(fake)
            if on_samples is not None:
                on_samples(step, fake)
            step_time_s = sums["step_time_s"] / steps_in_window
            metrics.update(
                loss=sums["loss"] / steps_in_window,
                grad_norm=sums["grad_norm"] / steps_in_window,
                step_time_s=step_time_s,
                samples_per_s=config.batch_size / step_time_s,
                lr=optimizer.param_groups[0]["lr"],
            )
            for i, (rms_sum, tau) in enumerate(zip(sums["drift_rms"], taus)):
                metrics[f"drift_rms/k{i}"] = rms_sum / steps_in_window
                metrics[f"tau/k{i}"] = tau
            final = metrics
            sums = _empty_sums(len(taus))
            steps_in_window = 0
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "swd", "fid")})
        if checkpoint_dir is not None and (step % checkpoint_every_steps == 0 or step == config.total_steps):
            # -- checkpoint BEFORE report: a run stopped inside report resumes from this step.
            save_checkpoint(
                {
                    "config": config.model_dump(),
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "rng": {"noise": noise_generator.get_state(), "data": data_generator.get_state()},
                    "sums": sums,
                    "steps_in_window": steps_in_window,
                    "final": final,
                },
                checkpoint_dir,
                step,
            )
        if is_eval:
            report(step, metrics)
    bar.close()
    return {
        "steps": config.total_steps,
        "seed": config.seed,
        "device": str(device),
        "fid_extractor": evaluator.fid_extractor,
        "final": final,
        "resumed_from": start_step if state is not None else None,
    }


def run_workload(
    config: WorkloadConfig,
    report: Report,
    checkpoint_dir: str | None = None,
    progress: bool = False,
    on_samples: SamplesHook | None = None,
) -> dict[str, Any]:
    """Run the task named by config.task: "train" -> train, "alignment" -> run_alignment.

    Args:
        config: validated workload config.
        report: report(step, metrics) callback.
        checkpoint_dir: train only: checkpoint/resume directory.
        progress: train only: progress bar.
        on_samples: train only: on_samples(step, samples) at every evaluation (see `train`).

    Returns:
        The task's summary dict.
    """
    if config.task == "alignment":
        return run_alignment(config, report)
    return train(config, report, checkpoint_dir, progress=progress, on_samples=on_samples)
