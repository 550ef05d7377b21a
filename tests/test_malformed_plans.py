"""Property test (issue 5, item 6): every broken plan is rejected by the CLI with ONE line naming a
field, exit code 2, no traceback, and nothing started.

Hypothesis builds >= 200 broken plans from a valid base: wrong types, unknown keys, empty axes,
negative/zero rates and temperatures, grids over the budget, bad YAML, wrong encodings and binary
bytes. Each goes through `driftsweep validate` or `driftsweep run` in-process (typer's CliRunner) in
an empty working directory; `orchestrator.runner` is replaced by a tripwire, so a plan that got as far
as starting a sweep fails the test, and the directory must stay empty (no mlflow.db, no ray_results).
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import get_args
from unittest import mock

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import EXIT_BAD_INPUT
from orchestrator.plan import Plan, parse_plan
from workloads.config import KernelName, OptimConfig, WorkloadConfig

BASE: dict = {
    "name": "prop",
    "seed": 0,
    "workload": {"total_steps": 100, "eval_every_steps": 50, "optim": {"lr": 0.001}},
    "objective": {"metric": "swd", "mode": "min"},
    "axes": {
        "kernel": ["laplace", "gaussian"],
        "temperatures": [[0.05], [0.02, 0.05, 0.2]],
        "anneal_rate": [0, 3],
    },
    "design": {"type": "grid"},
    "replicates": 1,
    "pruning": {"type": "none"},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 2},
    "budget": {"max_trials": 8},
    "failure": {"max_retries": 1},
    "tracking": {},
    "cluster": {},
}
# Markers for errors that precede any field: the file itself, its YAML syntax, its top-level type.
PSEUDO_FIELDS = ("(file)", "(yaml)", "(top level)")
TOP_FIELDS = tuple(Plan.model_fields)
KERNELS = get_args(KernelName)
runner = CliRunner()


def _dump(data: dict) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def _with(path: str, value) -> dict:
    """BASE with the dotted `path` set to `value` (intermediate mappings created)."""
    data = copy.deepcopy(BASE)
    *parents, leaf = path.split(".") if not path.startswith("axes.") else ["axes", path[5:]]
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


letters = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
fractional = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).filter(lambda x: not float(x).is_integer())
negative = st.one_of(st.integers(max_value=-1), st.floats(max_value=-1e-9, min_value=-1e9, allow_nan=False))
nonpositive = st.one_of(st.integers(max_value=0), st.floats(max_value=0, min_value=-1e9, allow_nan=False))

# -- (plan bytes, the field the error must name)

wrong_types = st.one_of(
    st.tuples(st.just("name"), st.one_of(st.integers(), st.lists(letters, min_size=1)), st.just("name")),
    st.tuples(st.just("seed"), st.one_of(letters, fractional, st.lists(st.integers())), st.just("seed")),
    st.tuples(st.just("replicates"), st.one_of(letters, fractional), st.just("replicates")),
    st.tuples(st.just("axes"), st.one_of(st.lists(letters), letters, st.integers()), st.just("axes")),
    st.tuples(st.just("design"), st.one_of(letters, st.integers()), st.just("design")),
    st.tuples(st.just("pruning"), st.one_of(st.lists(letters), st.integers()), st.just("pruning")),
    st.tuples(st.just("resources.max_concurrent"), st.one_of(letters, fractional), st.just("resources.max_concurrent")),
    st.tuples(st.just("budget.max_trials"), st.one_of(letters, fractional), st.just("budget.max_trials")),
    st.tuples(st.just("failure.max_retries"), st.one_of(letters, fractional), st.just("failure.max_retries")),
    st.tuples(st.just("workload.batch_size"), st.one_of(letters, fractional), st.just("workload.batch_size")),
    st.tuples(st.just("workload.kernel"), letters.filter(lambda s: s not in KERNELS), st.just("workload.kernel")),
    st.tuples(st.just("objective.mode"), letters.filter(lambda s: s not in ("min", "max")), st.just("objective.mode")),
    st.tuples(st.just("tracking"), st.lists(letters, min_size=1), st.just("tracking")),
    st.tuples(st.just("axes.kernel"), st.integers(), st.just("axes.kernel")),
    st.tuples(st.just("axes.kernel"), st.lists(letters.filter(lambda s: s not in KERNELS), min_size=1, max_size=3,
                                               unique=True), st.just("axes.kernel")),
    st.tuples(st.just("axes.temperatures"), st.lists(st.floats(0.01, 1), min_size=1, max_size=3, unique=True),
              st.just("axes.temperatures")),
).map(lambda t: (_dump(_with(t[0], t[1])), t[2]))


def _sections() -> dict[str, tuple[str, ...]]:
    return {
        "": TOP_FIELDS,
        "workload": tuple(WorkloadConfig.model_fields),
        "workload.optim": tuple(OptimConfig.model_fields),
        "objective": ("metric", "mode"),
        "design": ("type",),
        "pruning": ("type",),
        "resources": ("cpus_per_trial", "gpus_per_trial", "max_concurrent"),
        "budget": ("max_trials", "max_wall_time_s", "max_gpu_hours"),
        "failure": ("max_retries",),
        "tracking": ("uri", "experiment"),
        "cluster": ("address", "storage_path"),
    }


@st.composite
def unknown_keys(draw):
    section, allowed = draw(st.sampled_from(sorted(_sections().items())))
    key = draw(st.from_regex(r"\A[a-z][a-z_]{0,11}\Z").filter(lambda k: k not in allowed))
    path = f"{section}.{key}" if section else key
    return _dump(_with(path, draw(st.one_of(st.integers(), letters)))), path


@st.composite
def empty_axes(draw):
    if draw(st.booleans()):
        return _dump(_with("axes", {})), "axes"
    axis = draw(st.sampled_from(["kernel", "temperatures", "anneal_rate", "batch_size", "optim.lr", "data.name"]))
    data = copy.deepcopy(BASE)
    data["axes"][axis] = []
    return _dump(data), f"axes.{axis}"


nonpositive_values = st.one_of(
    st.tuples(st.just("axes.anneal_rate"), st.lists(negative, min_size=1, max_size=3).map(lambda v: [0.5, *v])),
    st.tuples(st.just("axes.temperatures"), nonpositive.map(lambda v: [[0.05], [0.02, v]])),
    st.tuples(st.just("axes.optim.lr"), nonpositive.map(lambda v: [0.001, v])),
    st.tuples(st.just("axes.batch_size"), st.integers(max_value=0).map(lambda v: [64, v])),
    st.tuples(st.just("workload.anneal_rate"), negative),
    st.tuples(st.just("workload.temperatures"), nonpositive.map(lambda v: [v, 0.05])),
    st.tuples(st.just("workload.optim.lr"), nonpositive),
    st.tuples(st.just("resources.cpus_per_trial"), nonpositive),
    st.tuples(st.just("resources.gpus_per_trial"), negative),
    st.tuples(st.just("resources.max_concurrent"), st.integers(max_value=0)),
    st.tuples(st.just("replicates"), st.integers(max_value=0)),
    st.tuples(st.just("failure.max_retries"), st.integers(max_value=-1)),
    st.tuples(st.just("budget.max_trials"), st.integers(max_value=0)),
    st.tuples(st.just("budget.max_wall_time_s"), nonpositive),
    st.tuples(st.just("budget.max_gpu_hours"), nonpositive),
).map(lambda t: (_dump(_with(t[0], t[1])), t[0]))


@st.composite
def over_budget(draw):
    kernels = draw(st.lists(st.sampled_from(["laplace", "gaussian", "cauchy", "imq"]), min_size=1, unique=True))
    rates = draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=30, unique=True))
    sizes = draw(st.lists(st.integers(1, 4096), min_size=1, max_size=12, unique=True))
    replicates = draw(st.integers(1, 4))
    total = len(kernels) * len(rates) * len(sizes) * replicates
    if total < 2:
        sizes.append(5000)  # a second level so that a budget below the total exists
        total *= 2
    data = copy.deepcopy(BASE)
    data["axes"] = {"kernel": kernels, "anneal_rate": rates, "batch_size": sizes}
    data["replicates"] = replicates
    data["budget"] = {"max_trials": draw(st.integers(1, total - 1))}
    return _dump(data), "budget.max_trials"


BREAKERS = (
    "broken: [unclosed\n",
    "broken: {a: 1\n",
    "broken: 'unterminated\n",
    "broken: !!python/object/apply:os.system ['true']\n",
    "key: value: other\n",
    "\tname: tab\n",
    "- sequence\n",
)


@st.composite
def bad_yaml(draw):
    lines = _dump(BASE).decode().splitlines(keepends=True)
    at = draw(st.integers(0, len(lines)))
    text = "".join(lines[:at]) + draw(st.sampled_from(BREAKERS)) + "".join(lines[at:])
    return text.encode(), "(yaml)"


@st.composite
def bad_encodings(draw):
    text = _dump(_with("name", draw(st.sampled_from(["café", "naïve", "ablation-ß", "温度"])))).decode()
    kind = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "prefix", "random"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=200)), None
    if kind == "prefix":
        # A continuation byte (0x80-0xBF) can never start a UTF-8 sequence: the file cannot decode.
        head = draw(st.integers(0x80, 0xBF))
        return bytes([head, *draw(st.lists(st.integers(0x80, 0xFF), max_size=3))]) + _dump(BASE), "(file)"
    if kind == "latin-1":
        text = text.replace("温度", "temp\u00e9")  # latin-1 can only encode the accented names
    return text.encode(kind), "(file)"


broken_plans = st.one_of(wrong_types, unknown_keys(), empty_axes(), nonpositive_values, over_budget(), bad_yaml(),
                         bad_encodings())


def _field_of(line: str, source: str) -> str:
    """The field path named by 'error: <source>: <field>: ...'."""
    assert line.startswith(f"error: {source}: "), line
    return line[len(f"error: {source}: "):].split(": ", 1)[0]


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=broken_plans, command=st.sampled_from(["validate", "run"]))
def test_broken_plans_are_rejected_in_one_line(case, command):
    content, field = case
    tripwire = types.ModuleType("orchestrator.runner")

    def started(*args, **kwargs):
        raise AssertionError("a broken plan reached run_sweep")

    tripwire.run_sweep = tripwire.sweep_status = started
    with tempfile.TemporaryDirectory() as cwd, contextlib.chdir(cwd), \
            mock.patch.dict(sys.modules, {"orchestrator.runner": tripwire}):
        Path("plan.yaml").write_bytes(content)
        result = runner.invoke(app, [command, "plan.yaml"])
        assert sorted(p.name for p in Path(cwd).iterdir()) == ["plan.yaml"]  # no mlflow.db, ray_results
    output = result.stdout + result.stderr
    assert result.exit_code == EXIT_BAD_INPUT, output
    assert "Traceback" not in output and result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    named = _field_of(lines[0], "plan.yaml")
    if field is None:  # random bytes: any field or pre-field marker, but one must be named
        assert named in PSEUDO_FIELDS or re.split(r"[.\[]", named)[0] in TOP_FIELDS, lines[0]
    else:
        assert named == field or named.startswith((f"{field}.", f"{field}[")), (field, lines[0])
    assert "; " in lines[0]  # every message carries a fix


@settings(max_examples=50, deadline=None, database=None)
@given(case=st.one_of(nonpositive_values, unknown_keys(), over_budget()))
def test_parse_plan_agrees_with_the_cli(case):
    """The library path raises the same one-line PlanError the CLI prints."""
    content, field = case
    try:
        parse_plan(content, source="p.yaml")
    except Exception as exc:  # noqa: BLE001 - the type is the assertion
        assert type(exc).__name__ == "PlanError", repr(exc)
        assert "\n" not in str(exc) and str(exc).startswith(f"p.yaml: {field}")
    else:
        raise AssertionError(f"accepted a broken plan: {content!r}")
