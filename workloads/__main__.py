"""`python -m workloads CONFIG.yaml key=value ...`: run one workload alone (no Ray, no MLflow).

Overrides are dotted paths into the config, values parsed with yaml.safe_load, e.g.
`kernel=gaussian temperatures=[0.05] data.name=swiss_roll`. The resolved config is printed before
any work (`--dry-run` stops there), then one line of metrics per evaluation and the summary.
Bad input prints one line on stderr and exits with code 2; a diverged run (NaN/inf) exits with 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from tqdm.auto import tqdm

from workloads.config import WorkloadConfig
from workloads.train import NonFiniteLossError, run_workload

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1


class UsageError(ValueError):
    """Bad command line or config file."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(message)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set data[a][b]... = yaml.safe_load(value) for an override "a.b...=value".

    Raises:
        UsageError: no "=" in the override, or the path walks into a non-mapping.
    """
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise UsageError(f"override {override!r} must look like key=value (e.g. data.name=swiss_roll)")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"override {key!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_config(path: str, overrides: list[str]) -> WorkloadConfig:
    """Read the YAML file, apply overrides, validate.

    Raises:
        UsageError: missing/unreadable file, non-mapping YAML, or invalid fields ("field.path: message").
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the top level must be a mapping of config fields")
    for override in overrides:
        apply_override(data, override)
    try:
        return WorkloadConfig.model_validate(data)
    except ValidationError as error:
        messages = [
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
        ]
        raise UsageError("; ".join(messages)) from None


def _print_metrics(step: int, metrics: dict[str, float]) -> None:
    tqdm.write(f"step {step:7d}  " + "  ".join(f"{name}={value:.5g}" for name, value in metrics.items()))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = _Parser(prog="python -m workloads", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="workload YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--checkpoint-dir", default=None, help="checkpoint/resume directory")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    try:
        args = parser.parse_args(argv)
        config = load_config(args.config, args.overrides)
        print(yaml.safe_dump(config.model_dump(), sort_keys=False).rstrip(), flush=True)
        if args.dry_run:
            return 0
        summary = run_workload(config, _print_metrics, args.checkpoint_dir, progress=True)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except ValueError as error:  # UsageError and the workloads' one-line input errors
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps({"summary": summary}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
