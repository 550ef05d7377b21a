"""The driftsweep CLI: validate, plan schema, run --dry-run [--json], exit codes, one-line errors.

The runner/report/k8s cores are replaced by fake modules where a command would start Ray or MLflow:
these tests check the CLI's own contract (what it prints, what it passes on, its exit codes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import EXIT_BAD_INPUT, EXIT_BUDGET_STOPPED, EXIT_TRIALS_FAILED, ClusterUnreachableError
from orchestrator.plan import expand_trials, load_plan

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
runner = CliRunner()

SMALL = """
name: small
seed: 5
axes:
  kernel: [laplace, gaussian]
  temperatures: [[0.05], [0.02, 0.05, 0.2]]
replicates: 2
"""


@pytest.fixture
def small_plan(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    return path


def _assert_one_line_error(result, field: str) -> None:
    assert result.exit_code == EXIT_BAD_INPUT, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert field in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ validate


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_validate_examples(path):
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.stderr
    plan = load_plan(path)
    count = plan.design.n_trials if plan.design.type == "optuna" else len(expand_trials(plan))
    assert result.stdout.startswith("ok: ") and f"{count} trials" in result.stdout
    assert f"design {plan.design.type}" in result.stdout


# A dozen malformed plans: (plan text, the field path the error must name).
MALFORMED = [
    ("name: a\naxes: {kernel: []}", "axes.kernel"),
    ("name: a\naxes: {kernl: [laplace]}", "axes.kernl"),
    ("name: a\naxes: {kernel: [lapalce]}", "axes.kernel[0]"),
    ("name: a\naxes: {anneal_rate: [0, -1]}", "axes.anneal_rate[1]"),
    ("name: a\naxes: {temperatures: [[0.05], [0.0]]}", "axes.temperatures[1]"),
    ("name: a\naxes: {kernel: [laplace]}\nbogus: 1", "bogus"),
    ("name: Not A Slug\naxes: {kernel: [laplace]}", "name"),
    ("name: a\naxes: {kernel: [laplace, gaussian], anneal_rate: [0, 1, 3]}\nbudget: {max_trials: 5}",
     "budget.max_trials"),
    ("name: a\naxes: {kernel: [laplace]}\npruning: {type: median, n_startup_trials: -1}", "pruning.n_startup_trials"),
    ("name: a\naxes: {kernel: [laplace]}\npruning: {type: asha, percentile: 5}", "pruning.percentile"),
    ("name: a\naxes: {kernel: [laplace]}\ndesign: {type: optuna, n_trials: 4}\nreplicates: 3", "replicates"),
    ("name: a\naxes: {kernel: [laplace]}\nresources: {cpus_per_trial: 0}", "resources.cpus_per_trial"),
    ("name: a\naxes: {kernel: [laplace]}\nobjective: {metric: fid}", "objective.metric"),
    ("name: a\naxes: {kernel: [laplace]}\nworkload: {optim: {lr: -0.1}}", "workload.optim.lr"),
    ("name: a\naxes: {kernel: [laplace]}\ndesign: {type: ofat, baseline: {kernel: gaussian}}",
     "design.baseline.kernel"),
    ("name: a\naxes: {optim.lr: {low: 0.1, high: 0.01}}", "axes.optim.lr"),
    ("name: a\naxes: {kernel: [laplace]}\ncluster: {address: 'not an address'}", "cluster.address"),
    ("name: a\naxes: {kernel: [laplace\n", "(yaml)"),
    ("- just\n- a list\n", "(top level)"),
]


@pytest.mark.parametrize(("text", "field"), MALFORMED, ids=[f for _, f in MALFORMED])
def test_malformed_plan_one_line_error(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["validate", str(path)])
    _assert_one_line_error(result, f"{path}: {field}")
    # The same plan is refused by run, before anything starts.
    result = runner.invoke(app, ["run", str(path), "--dry-run"])
    _assert_one_line_error(result, field)


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes("name: café\naxes: {kernel: [laplace]}\n".encode("utf-16"))
    _assert_one_line_error(runner.invoke(app, ["validate", str(path)]), "(file)")


def test_missing_file():
    _assert_one_line_error(runner.invoke(app, ["validate", "no/such/plan.yaml"]), "no/such/plan.yaml: (file)")


# ------------------------------------------------------------------------------------------ schema


def test_plan_schema_is_valid_and_validates_examples():
    result = runner.invoke(app, ["plan", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in EXAMPLES:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert errors == [], (path.name, errors)
    # Not vacuous: it rejects an unknown key, a missing name and a wrong design type.
    assert not validator.is_valid({"name": "a", "axes": {"kernel": ["laplace"]}, "bogus": 1})
    assert not validator.is_valid({"axes": {"kernel": ["laplace"]}})
    assert not validator.is_valid({"name": "a", "axes": {"kernel": ["laplace"]}, "design": {"type": "random"}})


# ------------------------------------------------------------------------------------------ dry run


def test_dry_run_json_matches_expansion(small_plan, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", str(small_plan), "--dry-run", "--json"])
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    trials = expand_trials(load_plan(small_plan))
    assert len(printed) == len(trials) == 2 * 2 * 2
    for obj, trial in zip(printed, trials):
        assert obj["trial_id"] == trial.trial_id
        assert obj["name"] == trial.name
        assert obj["params"] == trial.params
        assert obj["replicate"] == trial.replicate
        assert obj["seed"] == trial.seed == obj["config"]["seed"]
        assert obj["config"]["kernel"] == trial.params["kernel"]
        assert obj["config"]["temperatures"] == trial.params["temperatures"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_dry_run_table_lists_trials(small_plan):
    result = runner.invoke(app, ["run", str(small_plan), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    for trial in expand_trials(load_plan(small_plan)):
        assert trial.trial_id in result.stdout and str(trial.seed) in result.stdout


def test_dry_run_optuna_prints_space():
    result = runner.invoke(app, ["run", str(REPO / "examples/optuna.yaml"), "--dry-run", "--json"])
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    raw = yaml.safe_load((REPO / "examples/optuna.yaml").read_text())
    assert printed["n_trials"] == raw["design"]["n_trials"]
    assert set(printed["space"]) == set(raw["axes"])
    assert printed["space"]["optim.lr"]["attributes"]["log"] is True


def test_json_without_dry_run_is_refused(small_plan):
    _assert_one_line_error(runner.invoke(app, ["run", str(small_plan), "--json"]), "--dry-run")


# ------------------------------------------------------------------------------------------ run/resume/status


def _summary(**overrides):
    fields = dict(n_total=8, n_completed=8, n_pruned=0, n_failed=0, n_running=0, best=None,
                  parent_run_id="abc123", tracking_uri="", stopped_reason=None, message=None)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


@pytest.fixture
def fake_runner(monkeypatch):
    """A stand-in orchestrator.runner that records its calls (no Ray, no MLflow)."""
    module = types.ModuleType("orchestrator.runner")
    module.calls = []
    module.result = _summary()

    def run_sweep(plan, plan_path, resume=False, console=None):
        module.calls.append(("run_sweep", plan.name, Path(plan_path), resume))
        return module.result

    def sweep_status(plan):
        module.calls.append(("sweep_status", plan.name))
        return module.result

    module.run_sweep, module.sweep_status = run_sweep, sweep_status
    monkeypatch.setitem(sys.modules, "orchestrator.runner", module)
    # The report the CLI builds after a sweep: a stand-in that records its calls (or raises).
    report_module = types.ModuleType("orchestrator.report")
    module.report_calls, module.report_error = [], None

    def build_report(run_id, tracking_uri=None, out_dir="report", attach=True, **kwargs):
        module.report_calls.append((run_id, tracking_uri, Path(out_dir), attach))
        if module.report_error is not None:
            raise module.report_error
        return Path(out_dir) / "report.html"

    report_module.build_report = build_report
    monkeypatch.setitem(sys.modules, "orchestrator.report", report_module)
    return module


def test_run_saves_resolved_plan_and_calls_runner(small_plan, tmp_path, monkeypatch, fake_runner):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fake_runner.result = _summary(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                                  best={"trial": "t0001", "value": 0.1})
    result = runner.invoke(app, ["run", str(small_plan)])
    assert result.exit_code == 0, result.stderr
    assert fake_runner.calls == [("run_sweep", "small", small_plan, False)]
    saved = json.loads((tmp_path / "ray_results/small/resolved_plan.json").read_text())
    assert saved["tracking"]["uri"] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert saved["tracking"]["experiment"] == "small" and saved["replicates"] == 2
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db --host 127.0.0.1" in result.stdout
    # The ablation report is built and attached to the parent run, next to the sweep's Tune state.
    assert fake_runner.report_calls == [
        ("abc123", f"sqlite:///{tmp_path.resolve()}/mlflow.db", tmp_path / "ray_results/small/report", True)]
    assert "report: " in result.stdout


def test_a_report_that_fails_after_the_sweep_is_a_warning(small_plan, tmp_path, monkeypatch, fake_runner):
    monkeypatch.chdir(tmp_path)
    fake_runner.report_error = RuntimeError("nothing completed\nsecond line")
    result = runner.invoke(app, ["run", str(small_plan)])
    assert result.exit_code == 0, result.stderr
    assert f"warning: the ablation report was not built (nothing completed); run `driftsweep report {small_plan}` " \
           "later" in " ".join(result.stdout.split())
    fake_runner.result = _summary(n_completed=0, n_failed=8)
    fake_runner.report_calls.clear()
    assert runner.invoke(app, ["run", str(small_plan)]).exit_code == EXIT_TRIALS_FAILED
    assert fake_runner.report_calls == []  # nothing completed: no report to build


def test_resolved_plan_of_an_existing_sweep_is_kept(small_plan, tmp_path, monkeypatch, fake_runner):
    monkeypatch.chdir(tmp_path)
    saved = tmp_path / "ray_results/small/resolved_plan.json"
    saved.parent.mkdir(parents=True)
    saved.write_text('{"original": true}')
    assert runner.invoke(app, ["resume", str(small_plan)]).exit_code == 0
    assert saved.read_text() == '{"original": true}'


def test_resolved_plan_masks_credentials(small_plan, tmp_path, monkeypatch, fake_runner):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:hunter2@db:5432/mlflow")
    fake_runner.result = _summary(tracking_uri="postgresql://mlflow:hunter2@db:5432/mlflow")
    result = runner.invoke(app, ["run", str(small_plan)])
    assert result.exit_code == 0, result.stderr
    saved = (tmp_path / "ray_results/small/resolved_plan.json").read_text()
    assert "hunter2" not in saved + result.stdout + result.stderr
    assert "mlflow:***@db" in saved


@pytest.mark.parametrize(
    ("overrides", "code"),
    [({"n_failed": 2, "n_completed": 6}, EXIT_TRIALS_FAILED),
     ({"stopped_reason": "budget.max_wall_time_s=60 reached", "n_completed": 3}, EXIT_BUDGET_STOPPED),
     ({}, 0)],
)
def test_run_exit_codes(small_plan, tmp_path, monkeypatch, fake_runner, overrides, code):
    monkeypatch.chdir(tmp_path)
    fake_runner.result = _summary(**overrides)
    result = runner.invoke(app, ["run", str(small_plan)])
    assert result.exit_code == code, (result.stdout, result.stderr)


def test_resume_and_status_call_runner(small_plan, tmp_path, monkeypatch, fake_runner):
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["resume", str(small_plan)]).exit_code == 0
    fake_runner.result = _summary(n_completed=3, n_running=2, n_total=8)
    result = runner.invoke(app, ["status", str(small_plan)])
    assert result.exit_code == 0
    assert fake_runner.calls == [("run_sweep", "small", small_plan, True), ("sweep_status", "small")]
    assert "3 completed" in result.stdout and "2 running" in result.stdout


def test_runner_errors_are_one_line(small_plan, tmp_path, monkeypatch, fake_runner):
    monkeypatch.chdir(tmp_path)

    def unreachable(*args, **kwargs):
        raise ClusterUnreachableError("cluster.address: ray://10.9.9.9:10001 unreachable; start the cluster")

    fake_runner.run_sweep = unreachable
    _assert_one_line_error(runner.invoke(app, ["run", str(small_plan)]), "ray://10.9.9.9:10001")


def test_status_k8s_uses_job_status(monkeypatch):
    module = types.ModuleType("orchestrator.k8s")
    calls = []

    def job_status(name, namespace, context):
        calls.append((name, namespace, context))
        return {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}

    module.job_status = job_status
    monkeypatch.setitem(sys.modules, "orchestrator.k8s", module)
    result = runner.invoke(app, ["status", "--k8s", "sweep-1", "--namespace", "ml", "--context", "kind"])
    assert result.exit_code == 0, result.stderr
    assert calls == [("sweep-1", "ml", "kind")]
    assert "RUNNING" in result.stdout


def test_report_passes_plan_tracking_uri(small_plan, tmp_path, monkeypatch):
    module = types.ModuleType("orchestrator.report")
    calls = []

    def build_report(plan_or_run_id, tracking_uri=None, out_dir="report", attach=True, console=None, threshold=None):
        calls.append((plan_or_run_id, tracking_uri, Path(out_dir), attach, threshold))
        return Path(out_dir) / "report.html"

    module.build_report = build_report
    monkeypatch.setitem(sys.modules, "orchestrator.report", module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["report", str(small_plan), "--out", "rep", "--no-attach"])
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(app, ["report", str(small_plan), "--out", "rep", "--threshold", "0.25"])
    assert result.exit_code == 0, result.stderr
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert calls == [(str(small_plan), uri, Path("rep"), False, None), (str(small_plan), uri, Path("rep"), True, 0.25)]


# ------------------------------------------------------------------------------------------ entry points


def test_python_dash_m_and_light_startup(small_plan):
    """`python -m orchestrator` works, and validate does not import ray or mlflow."""
    code = ("import sys, runpy; sys.argv = ['driftsweep', 'validate', sys.argv[1]]\n"
            "try:\n    runpy.run_module('orchestrator', run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print('heavy:', sorted(m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, str(small_plan)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert out.stdout.startswith("ok: 8 trials"), out.stderr
    assert "heavy: []" in out.stdout
