"""`driftsweep`: validate, dry-run, run, resume, inspect and report ablation plans.

A thin entry point (STYLE.md): it parses arguments, loads the plan and hands it to the core
(`orchestrator.runner`, `orchestrator.report`, `orchestrator.k8s`), imported lazily so that
`validate`/`run --dry-run` start without importing ray, mlflow or torch.

Errors: every DriftsweepError (and pydantic ValidationError) becomes one line "error: ..." on
stderr and the exit code of orchestrator/errors.py (2 = bad input), never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from orchestrator.errors import EXIT_BAD_INPUT, EXIT_BUDGET_STOPPED, EXIT_TRIALS_FAILED, DriftsweepError
from orchestrator.plan import (
    OptunaDesign,
    Plan,
    count_trials,
    expand_trials,
    format_validation_error,
    is_local_tracking_uri,
    load_plan,
    mask_uri,
    optuna_space,
    plan_json_schema,
    resolve_experiment,
    resolve_ray_address,
    resolve_storage_path,
    resolve_tracking_uri,
)

app = typer.Typer(
    name="driftsweep",
    help="Ablation sweeps for drifting models: Ray Tune + Optuna + MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
plan_app = typer.Typer(help="Plan file utilities.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")

# soft_wrap: never break a line at the terminal width (errors and JSON must stay one line/parseable).
console = Console(soft_wrap=True)
RESOLVED_PLAN_FILE = "resolved_plan.json"

PlanArg = Annotated[Path, typer.Argument(help="ablation plan YAML file", show_default=False)]
F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> typer.Exit:
    """Print one line on stderr and return the Exit to raise."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code)


def _user_errors(command: F) -> F:
    """Turn DriftsweepError / ValidationError into one stderr line and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DriftsweepError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except ValidationError as exc:
            raise _fail(format_validation_error(exc, "input"), EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


def _design_text(plan: Plan) -> str:
    design = plan.design
    if isinstance(design, OptunaDesign):
        return f"design optuna, sampler {design.sampler}, pruning {plan.pruning.type}"
    reps = f", {plan.replicates} replicates" if plan.replicates > 1 else ""
    return f"design {design.type}{reps}, pruning {plan.pruning.type}"


def _resolved_plan(plan: Plan) -> dict[str, Any]:
    """The plan with every default made explicit (tracking/cluster resolved, credentials masked)."""
    data = plan.model_dump(mode="json")
    data["tracking"] = {"uri": mask_uri(resolve_tracking_uri(plan)), "experiment": resolve_experiment(plan)}
    data["cluster"] = {"address": resolve_ray_address(plan), "storage_path": resolve_storage_path(plan)}
    data["objective"]["mode"] = plan.objective.direction
    return data


def _space_json(plan: Plan) -> dict[str, Any]:
    from optuna.distributions import distribution_to_json

    return {path: json.loads(distribution_to_json(dist)) for path, dist in optuna_space(plan).items()}


def _print_dry_run(plan: Plan, as_json: bool) -> None:
    if isinstance(plan.design, OptunaDesign):
        space = _space_json(plan)
        if as_json:
            typer.echo(json.dumps({"design": "optuna", "sampler": plan.design.sampler,
                                   "n_trials": plan.design.n_trials, "space": space}))
            return
        table = Table(title=f"{plan.name}: optuna search space ({plan.design.n_trials} trials, "
                      f"sampler {plan.design.sampler})")
        table.add_column("axis")
        table.add_column("distribution")
        for path, dist in space.items():
            table.add_row(path, json.dumps(dist))
        console.print(table)
        return
    trials = expand_trials(plan)
    if as_json:
        typer.echo(json.dumps([trial.to_json() for trial in trials]))
        return
    table = Table(title=f"{plan.name}: {len(trials)} trials ({_design_text(plan)})")
    for column in ("id", "name", "seed", *plan.axes):
        table.add_column(column, overflow="fold")
    for trial in trials:
        values = [json.dumps(v) if isinstance(v, list) else str(v) for v in trial.params.values()]
        table.add_row(trial.trial_id, trial.name, str(trial.seed), *values)
    console.print(table)


def _print_summary(summary: Any) -> int:
    """Print a runner SweepSummary; return the exit code it implies (0, 3 failed, 4 budget-stopped)."""
    table = Table(title="sweep summary", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    rows = {
        "trials": f"{summary.n_completed} completed, {summary.n_pruned} pruned, {summary.n_failed} failed "
                  f"of {summary.n_total}" + (f", {summary.n_running} running" if getattr(summary, "n_running", 0)
                                               else ""),
        "best": json.dumps(summary.best) if summary.best else "none yet",
        "parent run": str(summary.parent_run_id),
        "tracking": mask_uri(summary.tracking_uri) or "",
        "stopped": summary.stopped_reason or "",
        "note": getattr(summary, "message", None) or "",
    }
    for key, value in rows.items():
        if value:
            table.add_row(key, value)
    console.print(table)
    uri = mask_uri(summary.tracking_uri) or ""
    if uri and is_local_tracking_uri(uri):
        console.print(f"view: mlflow ui --backend-store-uri {uri} --host 127.0.0.1", highlight=False)
    if summary.n_failed:
        return EXIT_TRIALS_FAILED
    if summary.stopped_reason:
        return EXIT_BUDGET_STOPPED
    return 0


def _run(plan_path: Path, resume: bool) -> None:
    plan = load_plan(plan_path)
    resolved = _resolved_plan(plan)
    console.print(f"[bold]{plan.name}[/]: {count_trials(plan)} trials ({_design_text(plan)})")
    console.print_json(data=resolved)
    storage = resolved["cluster"]["storage_path"]
    if "://" not in storage:  # remote storage (s3://, gs://): the runner records the plan there
        saved = Path(storage) / plan.name / RESOLVED_PLAN_FILE
        if saved.exists():  # the sweep's own record: a resume or a refused re-run must not rewrite it
            console.print(f"resolved plan of this sweep kept at {saved}", highlight=False)
        else:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(resolved, indent=2))
            console.print(f"resolved plan saved to {saved}", highlight=False)
    from orchestrator.runner import run_sweep

    summary = run_sweep(plan, plan_path, resume=resume, console=console)
    code = _print_summary(summary)
    if summary.n_completed:
        local = "://" not in storage
        _attach_report(plan, plan_path, summary, Path(storage) / plan.name / "report" if local else None)
    if code:
        raise typer.Exit(code)


def _attach_report(plan, plan_path: Path, summary: Any, out_dir: Path | None) -> None:
    """Build the ablation report of a finished sweep and log it on the parent run (under report/).

    A report that cannot be built is a warning, never a failed sweep: the runs are all recorded and
    `driftsweep report PLAN` builds it later.
    """
    import tempfile

    from orchestrator.report import build_report

    try:
        with tempfile.TemporaryDirectory(prefix="ds_report_") as scratch:
            html = build_report(summary.parent_run_id, tracking_uri=resolve_tracking_uri(plan),
                                out_dir=out_dir or scratch, attach=True)
            where = f"{html} and " if out_dir is not None else ""
            console.print(f"report: {where}the parent run's report/ artifacts", highlight=False)
    except Exception as exc:  # noqa: BLE001 - the sweep's results are recorded either way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        console.print(f"warning: the ablation report was not built ({first}); run `driftsweep report "
                      f"{plan_path}` later", highlight=False)


@app.command()
@_user_errors
def validate(plan_path: PlanArg) -> None:
    """Validate a plan: print "ok: N trials (...)" or one error line (exit 2)."""
    plan = load_plan(plan_path)
    prefix = "up to " if isinstance(plan.design, OptunaDesign) else ""
    typer.echo(f"ok: {prefix}{count_trials(plan)} trials ({_design_text(plan)})")


@plan_app.command("schema")
def schema() -> None:
    """Print the JSON Schema of plan files (everything a plan may say)."""
    typer.echo(json.dumps(plan_json_schema(), indent=2))


@app.command()
@_user_errors
def run(
    plan_path: PlanArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the resolved trials and stop")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="with --dry-run: print the trials as JSON")] = False,
) -> None:
    """Run a plan's sweep (Ray Tune + MLflow); --dry-run prints the resolved trials and stops."""
    if as_json and not dry_run:
        raise _fail("--json needs --dry-run; add --dry-run", EXIT_BAD_INPUT)
    if dry_run:
        _print_dry_run(load_plan(plan_path), as_json)
        return
    _run(plan_path, resume=False)


@app.command()
@_user_errors
def resume(plan_path: PlanArg) -> None:
    """Continue an interrupted sweep from Ray Tune's saved state (finished trials are not re-run)."""
    _run(plan_path, resume=True)


@app.command()
@_user_errors
def status(
    plan_path: Annotated[Path | None, typer.Argument(help="ablation plan YAML file", show_default=False)] = None,
    k8s: Annotated[str | None, typer.Option("--k8s", help="a RayJob name: show its Kubernetes status")] = None,
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace (with --k8s)")] = "driftsweep",
    context: Annotated[str | None, typer.Option(help="kubeconfig context (with --k8s)")] = None,
) -> None:
    """Trials done/running/pruned/failed and the best so far (from MLflow), or a RayJob's status."""
    if k8s is not None:
        from orchestrator.k8s import job_status

        table = Table(title=f"RayJob {k8s} ({namespace})", show_header=False)
        for key, value in job_status(k8s, namespace, context).items():
            table.add_row(str(key), json.dumps(value) if isinstance(value, (dict, list)) else str(value))
        console.print(table)
        return
    if plan_path is None:
        raise _fail("status needs a PLAN file (or --k8s JOBNAME)", EXIT_BAD_INPUT)
    plan = load_plan(plan_path)
    from orchestrator.runner import sweep_status

    _print_summary(sweep_status(plan))


@app.command()
@_user_errors
def report(
    plan_or_run_id: Annotated[str, typer.Argument(help="plan file or MLflow parent run id", show_default=False)],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default: the plan's, or env/local)")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="directory for report.html/.md/.csv and plots")] = Path(
        "report"),
    attach: Annotated[bool, typer.Option(help="also log the report on the parent run")] = True,
    threshold: Annotated[float | None, typer.Option(
        help="steps-to-threshold level in metric units: per trial, the first logged step with the metric <= it "
        "(min) or >= it (max); default: the plan's objective.threshold")] = None,
) -> None:
    """Ablation table of a sweep (main effects, best configuration) plus an HTML/Markdown report."""
    if tracking_uri is None:
        if Path(plan_or_run_id).is_file():
            tracking_uri = resolve_tracking_uri(load_plan(plan_or_run_id))
        else:
            tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    from orchestrator.report import build_report

    html = build_report(plan_or_run_id, tracking_uri=tracking_uri, out_dir=out_dir, attach=attach, console=console,
                        threshold=threshold)
    console.print(f"report: {html}", highlight=False)


# Kubernetes commands (submit, logs, k8s render|status|logs) live in their own module.
from orchestrator.k8s_cli import register as _register_k8s  # noqa: E402 - registers onto `app` above

_register_k8s(app)
