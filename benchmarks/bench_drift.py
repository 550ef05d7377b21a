"""Benchmark one drift + loss step against a naive drift and against torch.mm throughput.

    python benchmarks/bench_drift.py [--n 4096 --d 512 --quick]

A step: x = Linear(z) (N x D), V = drift_field(x, positives, 3 temperatures), loss = MSE(x, sg(x + V)),
backward through the Linear layer. N+ = N, negatives = x (self-masked), M = N+ + N targets.

FLOP count (stated in the output): 2*N*M*D for the distances (one matmul-equivalent) plus 2*N*M*D
per temperature for A @ [y+; y-], plus 6*N*D*D for the Linear layer forward and backward.
Elementwise work (exp, softmax, sums) is not counted, so GFLOP/s is a lower bound on useful work
and the fraction of torch.mm throughput is an honest efficiency measure.

Every configuration runs in its own subprocess so its peak RSS (resource.ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEMPERATURES = (0.02, 0.05, 0.2)
FLOP_FORMULA = "FLOPs = 2*N*M*D*(1 + T) + 6*N*D*D  (M = N+ + N, T temperatures; elementwise not counted)"


def naive_drift(x: torch.Tensor, positives: torch.Tensor, temperatures) -> torch.Tensor:
    """Straightforward DESIGN.md steps 1-5: full matrices, two softmaxes, separate matmuls."""
    n, n_pos = x.shape[0], positives.shape[0]
    targets = torch.cat([positives, x])
    d = torch.cdist(x, targets)
    eye = torch.zeros_like(d)
    eye[torch.arange(n), n_pos + torch.arange(n)] = 1.0
    mean_d = (d * (1 - eye)).sum() / (d.numel() - n)
    d = d + eye * 1e6  # mask: a generated sample never repels itself
    total = torch.zeros_like(x)
    for tau in temperatures:
        logit = -d / (mean_d * tau)
        a = torch.sqrt(torch.softmax(logit, dim=1) * torch.softmax(logit, dim=0))
        a_pos, a_neg = a[:, :n_pos], a[:, n_pos:]
        w_pos = a_pos * a_neg.sum(dim=1, keepdim=True)
        w_neg = a_neg * a_pos.sum(dim=1, keepdim=True)
        v = w_pos @ positives - w_neg @ x
        total += v / v.square().mean().sqrt()
    return total


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(spec: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    from workloads.drift import drift_field

    torch.manual_seed(0)
    n, dim, temps, impl, reps = spec["n"], spec["d"], spec["temperatures"], spec["impl"], spec["reps"]
    m = 2 * n
    result: dict = {"n": n, "m": m, "d": dim, "t": len(temps), "impl": impl}
    layer = torch.nn.Linear(dim, dim)
    z, positives = torch.randn(n, dim), torch.randn(n, dim)
    # torch.mm on the drift's own matmul shape (N x M) @ (M x D), timed in the same process and
    # interleaved with the steps, so that CPU contention hits both alike (best of each is kept).
    with_mm = impl == "fast" and spec.get("mm", True)
    mm_a, mm_b = (torch.randn(n, m), torch.randn(m, dim)) if with_mm else (None, None)
    baseline = _rss_mib()

    def step() -> None:
        x = layer(z)
        if impl == "fast":
            v = drift_field(x, positives, temperatures=temps)
        else:
            v = naive_drift(x.detach(), positives, temps)
        loss = torch.nn.functional.mse_loss(x, (x + v).detach())
        layer.zero_grad(set_to_none=True)
        loss.backward()

    step_times, mm_times = [], []
    for rep in range(reps + (1 if spec["warmup"] else 0)):
        if mm_a is not None:
            start = time.perf_counter()
            torch.mm(mm_a, mm_b)
            mm_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        step()
        if rep > 0 or not spec["warmup"]:
            step_times.append(time.perf_counter() - start)
    best = min(step_times)
    if mm_times:
        result["mm_gflops"] = 2 * n * m * dim / min(mm_times) / 1e9
    flops = 2 * n * m * dim * (1 + len(temps)) + 6 * n * dim * dim
    result.update(
        seconds=best,
        gflops=flops / best / 1e9,
        peak_rss_mib=_peak_rss_mib(),
        extra_rss_mib=_peak_rss_mib() - baseline,
        threads=torch.get_num_threads(),
    )
    return result


def _run(spec: dict) -> dict | None:
    command = [sys.executable, __file__, "--worker", json.dumps(spec), "--threads", str(spec["threads"])]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {spec['impl']} N={spec['n']}: failed ({proc.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="generated samples N (= N+)")
    parser.add_argument("--d", type=int, default=512, help="feature dimension D")
    parser.add_argument("--quick", action="store_true", help="short series, one repetition")
    parser.add_argument("--naive-max-n", type=int, default=8192, help="largest N for the naive drift")
    parser.add_argument("--big-n", type=int, default=65536, help="memory check N (0 = skip)")
    parser.add_argument("--big-d", type=int, default=64, help="memory check D")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    reps = 2 if args.quick else 3
    series = sorted({1024, 2048, args.n} if args.quick else {1024, 2048, 4096, 8192, 16384, args.n})
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
        f"(load average {load}), float32, temperatures {TEMPERATURES}"
    )
    print(FLOP_FORMULA)
    print("work MiB = peak RSS minus RSS after allocating inputs (and the torch.mm operands): working memory")
    header = (
        f"{'N':>6} {'M':>6} {'D':>4} | {'fast s':>7} {'GFLOP/s':>8} {'mm GF/s':>8} {'of mm':>6} "
        f"{'work MiB':>8} | {'naive s':>7} {'work MiB':>8} {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    for n in series:
        base = {"n": n, "d": args.d, "temperatures": list(TEMPERATURES), "reps": reps, "warmup": True,
                "threads": args.threads}
        fast = _run({**base, "impl": "fast"})
        naive = _run({**base, "impl": "naive"}) if n <= args.naive_max_n else None
        if fast is None:
            continue
        row = (
            f"{n:>6} {fast['m']:>6} {args.d:>4} | {fast['seconds']:>7.3f} {fast['gflops']:>8.1f} "
            f"{fast['mm_gflops']:>8.1f} {fast['gflops'] / fast['mm_gflops']:>6.0%} {fast['extra_rss_mib']:>8.0f} | "
        )
        if naive is not None:
            speedup = naive["seconds"] / fast["seconds"]
            row += f"{naive['seconds']:>7.3f} {naive['extra_rss_mib']:>8.0f} {speedup:>6.1f}x"
        else:
            row += f"{'skipped (memory)':>25}"
        print(row, flush=True)
    if args.big_n:
        # No torch.mm reference here: its N x M operand alone would not fit in memory.
        spec = {"n": args.big_n, "d": args.big_d, "temperatures": [0.05], "reps": 1, "warmup": False,
                "impl": "fast", "threads": args.threads, "mm": False}
        big = _run(spec)
        if big is not None:
            dense_gib = big["n"] * big["m"] * 4 / 2**30
            print(
                f"memory check: N={big['n']} M={big['m']} D={big['d']} T=1: {big['seconds']:.1f} s, "
                f"{big['gflops']:.1f} GFLOP/s, peak RSS "
                f"{big['peak_rss_mib'] / 1024:.2f} GiB, working memory {big['extra_rss_mib'] / 1024:.2f} GiB "
                f"(one dense N x M float32 matrix would be {dense_gib:.0f} GiB)"
            )


if __name__ == "__main__":
    main()
