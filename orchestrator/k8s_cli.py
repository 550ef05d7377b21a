"""Kubernetes commands of the driftsweep CLI: submit --k8s, logs, and the `k8s` sub-app.

Thin wrappers around orchestrator.k8s: parse arguments, call, print. Errors become one line
"error: ..." on stderr and the error's exit code (2 for bad input and Kubernetes API errors).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from orchestrator import k8s
from orchestrator.errors import DriftsweepError

_T = TypeVar("_T")

NamespaceOpt = Annotated[str, typer.Option("--namespace", "-n", help="namespace of the driftsweep stack")]
ContextOpt = Annotated[str | None, typer.Option("--context", help="kubeconfig context (default: current)")]
ImageOpt = Annotated[str | None, typer.Option("--image", help="submitter image (default: the RayCluster's)")]
PlanArg = Annotated[Path, typer.Argument(help="plan YAML file")]
NameArg = Annotated[str, typer.Argument(help="RayJob name, as printed by submit")]


def _run(fn: Callable[..., _T], *args: object, **kwargs: object) -> _T:
    """Call fn; a DriftsweepError becomes "error: <message>" on stderr and its exit code."""
    try:
        return fn(*args, **kwargs)
    except DriftsweepError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(exc.exit_code) from None


def submit_command(
    plan: PlanArg,
    k8s_flag: Annotated[bool, typer.Option("--k8s", help="submit to Kubernetes (KubeRay RayJob)")] = False,
    namespace: NamespaceOpt = k8s.DEFAULT_NAMESPACE,
    context: ContextOpt = None,
    image: ImageOpt = None,
) -> None:
    """Submit a plan to a cluster: a ConfigMap with the plan and a RayJob that runs it."""
    if not k8s_flag:
        typer.echo("error: submit needs --k8s (the only remote backend); to run here: driftsweep run PLAN", err=True)
        raise typer.Exit(2)
    typer.echo(_run(k8s.submit, plan, namespace=namespace, context=context, image=image))


def logs_command(name: NameArg, namespace: NamespaceOpt = k8s.DEFAULT_NAMESPACE, context: ContextOpt = None) -> None:
    """Print the logs of a submitted RayJob (its submitter pod follows the Ray job's driver)."""
    typer.echo(_run(k8s.job_logs, name, namespace=namespace, context=context), nl=False)


def render_command(plan: PlanArg, namespace: NamespaceOpt = k8s.DEFAULT_NAMESPACE, image: ImageOpt = None) -> None:
    """Print the objects `submit --k8s` would create, as YAML (pipe to `kubectl apply -f -`)."""
    typer.echo(k8s.to_yaml(_run(k8s.render_submission, plan, namespace=namespace, image=image)), nl=False)


def status_command(name: NameArg, namespace: NamespaceOpt = k8s.DEFAULT_NAMESPACE, context: ContextOpt = None) -> None:
    """Print a RayJob's status (Ray job status, KubeRay deployment status, times, message)."""
    status = _run(k8s.job_status, name, namespace=namespace, context=context)
    for key, value in status.items():
        typer.echo(f"{key}: {value}")


def register(app: typer.Typer) -> None:
    """Add `submit`, `logs` and the `k8s` sub-app (render, status, logs) to the driftsweep CLI.

    Args:
        app: the top-level Typer app.
    """
    app.command("submit")(submit_command)
    app.command("logs")(logs_command)
    k8s_app = typer.Typer(help="Kubernetes (KubeRay): render, status and logs of submitted plans.",
                          no_args_is_help=True)
    k8s_app.command("render")(render_command)
    k8s_app.command("status")(status_command)
    k8s_app.command("logs")(logs_command)
    app.add_typer(k8s_app, name="k8s")
