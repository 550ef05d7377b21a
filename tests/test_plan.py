"""The ablation plan: validation, expansion (grid / ofat / replicates), seeds, optuna space, URIs.

Expected counts and level sets are computed here from the raw YAML (itertools / numpy), not from
the implementation's own output.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from orchestrator.errors import PlanError
from orchestrator.plan import (
    Cluster,
    Plan,
    Tracking,
    count_trials,
    expand_trials,
    load_plan,
    mask_uri,
    optuna_space,
    parse_plan,
    resolve_ray_address,
    resolve_storage_path,
    resolve_tracking_uri,
    trial_from_params,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _plan(text: str) -> Plan:
    return parse_plan(text, source="test.yaml")


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------------------ examples


def test_examples_exist_for_each_design():
    names = {p.name for p in EXAMPLES}
    assert {"quick.yaml", "alignment.yaml", "digits.yaml", "ofat.yaml", "optuna.yaml"} <= names
    designs = {_raw(p)["design"]["type"] for p in EXAMPLES}
    assert designs == {"grid", "ofat", "optuna"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_plan_validates_and_expands(path):
    plan = load_plan(path)
    raw = _raw(path)
    assert plan.name == raw["name"]
    if plan.design.type == "optuna":
        assert set(optuna_space(plan)) == set(raw["axes"])
    else:
        trials = expand_trials(plan)
        assert len(trials) == count_trials(plan) <= (plan.budget.max_trials or len(trials))
        assert all(t.config.seed == t.seed for t in trials)


def test_quick_example_is_the_briefed_grid():
    plan = load_plan(REPO / "examples/quick.yaml")
    assert plan.workload.data.name in ("ring_mog", "swiss_roll", "checkerboard", "two_moons")
    # kernel {laplace, gaussian} x temperature sets {[0.05], [0.02, 0.05, 0.2]} x anneal {0, 3}
    assert len(expand_trials(plan)) == 2 * 2 * 2
    assert plan.workload.total_steps <= 500 and plan.workload.batch_size <= 512


# ------------------------------------------------------------------------------------------ grid


GRID = """
name: g
seed: 7
axes:
  kernel: [laplace, gaussian, cauchy]
  temperatures: [[0.05], [0.02, 0.05, 0.2]]
  anneal_rate: [0, 1, 3, 5]
  optim.lr: [0.001, 0.0003]
"""


def test_grid_is_exactly_the_factorial():
    raw = yaml.safe_load(GRID)["axes"]
    trials = expand_trials(_plan(GRID))
    # anneal_rate is a float field, so the YAML's 0 becomes 0.0.
    expected = {json.dumps([float(v) if k == "anneal_rate" else v for k, v in zip(raw, combo)])
                for combo in itertools.product(*raw.values())}
    got = [json.dumps([t.params[k] for k in raw]) for t in trials]
    assert len(got) == len(set(got)) == 3 * 2 * 4 * 2
    assert set(got) == expected


def test_trial_config_carries_the_params():
    for trial in expand_trials(_plan(GRID)):
        assert trial.config.kernel == trial.params["kernel"]
        assert trial.config.temperatures == trial.params["temperatures"]
        assert trial.config.anneal_rate == trial.params["anneal_rate"]
        assert trial.config.optim.lr == trial.params["optim.lr"]


def test_trial_ids_and_names_are_unique_and_describe_the_difference():
    trials = expand_trials(_plan(GRID))
    assert [t.trial_id for t in trials] == [f"t{i:04d}" for i in range(len(trials))]
    assert len({t.name for t in trials}) == len(trials)
    base = next(t for t in trials if t.name == "baseline")  # the workload's own values are levels
    assert base.params == {"kernel": "laplace", "temperatures": [0.02, 0.05, 0.2], "anneal_rate": 0.0,
                           "optim.lr": 0.001}
    other = next(t for t in trials if t.params["kernel"] == "gaussian" and t.params["temperatures"] == [0.05]
                 and t.params["anneal_rate"] == 0.0 and t.params["optim.lr"] == 0.001)
    assert other.name == "kernel=gaussian,temperatures=[0.05]"


# ------------------------------------------------------------------------------------------ ofat


OFAT = """
name: o
axes:
  kernel: [laplace, gaussian, cauchy]
  temperatures: [[0.02, 0.05, 0.2], [0.02], [0.05], [0.2]]
  anneal_rate: [0, 1, 3, 5]
  batch_size: [64, 256, 1024]
design:
  type: ofat
  baseline: {kernel: gaussian, anneal_rate: 1}
"""


def test_ofat_is_baseline_plus_each_axis_alone():
    raw = yaml.safe_load(OFAT)["axes"]
    trials = expand_trials(_plan(OFAT))
    assert len(trials) == 1 + sum(len(levels) - 1 for levels in raw.values())
    # Baseline: the given entries, and the workload's own value for the others.
    baseline = {"kernel": "gaussian", "temperatures": [0.02, 0.05, 0.2], "anneal_rate": 1.0, "batch_size": 256}
    assert trials[0].params == baseline and trials[0].name == "baseline"
    for trial in trials[1:]:
        changed = [k for k in baseline if trial.params[k] != baseline[k]]
        assert len(changed) == 1
        assert trial.name.startswith(f"{changed[0]}=")
    for axis, levels in raw.items():
        seen = [t.params[axis] for t in trials if t.params[axis] != baseline[axis]]
        assert len(seen) == len(levels) - 1


def test_ofat_baseline_must_be_a_level():
    bad = OFAT.replace("baseline: {kernel: gaussian, anneal_rate: 1}", "baseline: {kernel: imq}")
    with pytest.raises(PlanError, match=r"design\.baseline\.kernel: .*not a level"):
        _plan(bad)
    missing = OFAT.replace("batch_size: [64, 256, 1024]", "batch_size: [64, 1024]")
    with pytest.raises(PlanError, match=r"design\.baseline\.batch_size: missing, and the workload's value 256"):
        _plan(missing)


# ------------------------------------------------------------------------------------------ replicates, seeds


@pytest.mark.parametrize("text", [GRID, OFAT], ids=["grid", "ofat"])
def test_replicates_multiply(text):
    one = expand_trials(_plan(text))
    three = expand_trials(_plan(text + "\nreplicates: 3\n"))
    assert len(three) == 3 * len(one)
    for trial in one:
        reps = [t for t in three if t.params == trial.params]
        assert sorted(t.replicate for t in reps) == [0, 1, 2]
        assert len({t.seed for t in reps}) == 3
        assert all(t.name.endswith(f"rep={t.replicate}") for t in reps)


def test_seeds_distinct_and_reproducible_across_loads(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GRID + "replicates: 2\n")
    first, second = expand_trials(load_plan(path)), expand_trials(load_plan(path))
    seeds = [t.seed for t in first]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [t.seed for t in second]
    assert all(0 <= s < 2**32 for s in seeds)
    other_root = expand_trials(_plan(GRID.replace("seed: 7", "seed: 8") + "replicates: 2\n"))
    assert [t.seed for t in other_root] != seeds


def test_seeds_do_not_depend_on_the_process_hash_seed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GRID)
    code = ("import sys, json; from orchestrator.plan import load_plan, expand_trials; "
            "print(json.dumps([t.seed for t in expand_trials(load_plan(sys.argv[1]))]))")
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                             check=True, cwd=REPO)
        outputs.append(json.loads(out.stdout))
    assert outputs[0] == outputs[1] == [t.seed for t in expand_trials(load_plan(path))]


# ------------------------------------------------------------------------------------------ ranges


def test_range_levels_grid_points():
    plan = _plan("""
name: r
axes:
  optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true, num: 3}
  anneal_rate: {low: 0, high: 4, step: 1.5}
  batch_size: {low: 64, high: 1024, log: true, num: 5}
""")
    trials = expand_trials(plan)
    lrs = sorted({t.params["optim.lr"] for t in trials})
    rates = sorted({t.params["anneal_rate"] for t in trials})
    sizes = sorted({t.params["batch_size"] for t in trials})
    np.testing.assert_allclose(lrs, np.geomspace(1e-4, 1e-2, 3), rtol=1e-9)
    np.testing.assert_allclose(rates, np.arange(0, 4 + 1e-9, 1.5))
    assert sizes == [int(round(v)) for v in np.geomspace(64, 1024, 5)]
    assert all(isinstance(s, int) for s in sizes)
    assert len(trials) == 3 * len(rates) * 5


# ------------------------------------------------------------------------------------------ optuna


OPTUNA = """
name: opt
seed: 3
axes:
  optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  batch_size: {low: 64, high: 512, step: 64}
  temperatures: [[0.05], [0.02, 0.05, 0.2]]
  kernel: [laplace, gaussian]
design: {type: optuna, sampler: tpe, n_trials: 6, seed: 0}
pruning: {type: median, n_startup_trials: 2}
"""


def test_optuna_space_types():
    space = optuna_space(_plan(OPTUNA))
    assert space["optim.lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert space["batch_size"] == optuna.distributions.IntDistribution(64, 512, step=64)
    assert isinstance(space["temperatures"], optuna.distributions.CategoricalDistribution)
    assert space["kernel"].choices == ("laplace", "gaussian")


def test_optuna_suggestions_become_valid_trials():
    plan = _plan(OPTUNA)
    space = optuna_space(plan)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trials = []
    for number in range(6):
        ask = study.ask(space)
        trial = trial_from_params(plan, ask.params, number)
        trials.append(trial)
        assert trial.config.optim.lr == pytest.approx(ask.params["optim.lr"])
        assert trial.config.batch_size == ask.params["batch_size"]
        assert trial.config.temperatures == json.loads(ask.params["temperatures"])
        assert trial.trial_id == f"t{number:04d}"
        study.tell(ask, 0.0)
    assert len({t.seed for t in trials}) == len(trials)
    again = trial_from_params(plan, dict(reversed(list(study.trials[0].params.items()))), 0)
    assert again.seed == trials[0].seed and again.name == trials[0].name


def test_optuna_budget_below_n_trials_caps_the_search():
    plan = _plan(OPTUNA + "budget: {max_trials: 4}\n")  # n_trials: 6; the budget stops the search at 4
    assert count_trials(plan) == 4
    assert count_trials(_plan(OPTUNA)) == 6


def test_optuna_rejects_replicates_and_missing_axes():
    with pytest.raises(PlanError, match=r"replicates: optuna designs need replicates=1"):
        _plan(OPTUNA + "replicates: 2\n")
    with pytest.raises(PlanError, match=r"expected exactly the axes"):
        trial_from_params(_plan(OPTUNA), {"kernel": "laplace"}, 0)
    with pytest.raises(PlanError, match="optuna plans have no fixed trial list"):
        expand_trials(_plan(OPTUNA))


# ------------------------------------------------------------------------------------------ errors


def test_grid_over_budget_names_both_numbers():
    with pytest.raises(PlanError) as info:
        _plan(GRID + "budget: {max_trials: 10}\n")
    assert "budget.max_trials" in str(info.value) and "48" in str(info.value) and "10" in str(info.value)


def test_invalid_combination_is_reported_with_the_combination():
    text = """
name: c
workload: {data: {name: digits}, feature_map: digits_encoder}
objective: {metric: fid}
axes:
  data.name: [digits, ring_mog]
"""
    with pytest.raises(PlanError, match=r"axes\.data\.name\[1\]: 'ring_mog' is not a valid data\.name"):
        _plan(text)


def test_objective_must_be_reported_by_the_task():
    with pytest.raises(PlanError, match=r"objective\.metric: fid needs an image data set"):
        _plan("name: a\nobjective: {metric: fid}\naxes: {kernel: [laplace]}")
    with pytest.raises(PlanError, match=r"objective\.metric: swd is not reported by task=alignment"):
        _plan("name: a\nworkload: {task: alignment}\naxes: {kernel: [laplace]}")
    with pytest.raises(PlanError, match=r"objective\.metric: rel_error needs workload\.task=alignment"):
        _plan("name: a\nobjective: {metric: rel_error}\naxes: {kernel: [laplace]}")
    assert _plan("name: a\nobjective: {metric: cosine}\nworkload: {task: alignment}\naxes: {kernel: [laplace]}"
                 ).objective.direction == "max"


def test_integer_field_range_needs_integer_bounds_and_step():
    for rng in ("{low: 64, high: 512, step: 0.5}", "{low: 64.5, high: 512}"):
        with pytest.raises(PlanError, match=r"axes\.batch_size(\.low)?: .*integer"):
            _plan(f"name: a\naxes: {{batch_size: {rng}}}\ndesign: {{type: optuna, n_trials: 3}}")


def test_unknown_axis_suggests_close_names():
    with pytest.raises(PlanError, match=r"axes\.optim\.lrr: unknown workload field 'optim\.lrr'; did you mean optim\.lr"):
        _plan("name: a\naxes: {optim.lrr: [0.1]}")


def test_yaml_tags_never_execute(tmp_path):
    marker = tmp_path / "pwned"
    text = f"name: a\naxes: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(PlanError, match=r"\(yaml\)"):
        _plan(text)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ URIs


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        ("postgresql+psycopg2://mlflow:s3cret@db:5432/mlflow", "postgresql+psycopg2://mlflow:***@db:5432/mlflow"),
        ("https://user:tok:en@host/path", "https://user:***@host/path"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("ray://10.0.0.1:10001", "ray://10.0.0.1:10001"),
    ],
)
def test_mask_uri(uri, masked):
    assert mask_uri(uri) == masked
    assert "s3cret" not in mask_uri(uri) and "tok:en" not in mask_uri(uri)


def test_relative_paths_are_taken_against_the_directory_the_plan_was_loaded_in(tmp_path, monkeypatch):
    """Tune runs each trial in a directory of its own: a relative path must not follow it there."""
    here, elsewhere = tmp_path / "here", tmp_path / "trial-dir"
    here.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(here)
    plan = _plan(
        "name: a\nworkload: {data: {root: ~/cifar}, features: {encoder_cache: cache/enc.pt}}\n"
        "axes: {features.pretrained_weights: [w/one.pt, /abs/two.pt]}\ntracking: {uri: 'sqlite:///runs/m.db'}"
    )
    plan = pickle.loads(pickle.dumps(plan))  # as it travels to a trial process
    monkeypatch.chdir(elsewhere)  # the trial's working directory
    assert plan.base_dir == str(here)
    configs = [trial.config for trial in expand_trials(plan)]
    assert [c.features.pretrained_weights for c in configs] == [str(here / "w/one.pt"), "/abs/two.pt"]
    assert {c.features.encoder_cache for c in configs} == {str(here / "cache/enc.pt")}
    assert {c.data.root for c in configs} == {str(Path.home() / "cifar")}
    assert plan.workload.features.encoder_cache == "cache/enc.pt"  # the plan itself is left as written

    def uri(value: str) -> str:
        return resolve_tracking_uri(plan.model_copy(update={"tracking": Tracking(uri=value)}))

    assert resolve_tracking_uri(plan) == f"sqlite:///{here.resolve()}/runs/m.db"
    assert uri("file:mlruns") == f"file://{here.resolve()}/mlruns"
    assert uri("mlruns") == str(here.resolve() / "mlruns")
    assert uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    storage = plan.model_copy(update={"cluster": Cluster(storage_path="state")})
    assert resolve_storage_path(storage) == str(here.resolve() / "state")


def test_plan_field_error_survives_pickling():
    """Raised in a trial process (a sampled combination the workload rejects), it travels to the driver."""
    from orchestrator.plan import PlanFieldError

    error = pickle.loads(pickle.dumps(PlanFieldError("axes", "the combination x=1 is invalid", "remove that level")))
    assert (error.path, error.message, error.fix) == ("axes", "the combination x=1 is invalid", "remove that level")
    assert str(error) == "axes: the combination x=1 is invalid; remove that level"


def test_errors_never_print_credentials():
    with pytest.raises(PlanError) as info:
        _plan("name: a\naxes: {kernel: [laplace]}\ntracking: {uri: 'ftp://me:hunter2@host/x'}")
    assert "hunter2" not in str(info.value) and "tracking.uri" in str(info.value)


def test_default_resolution(tmp_path, monkeypatch):
    plan = _plan("name: a\naxes: {kernel: [laplace]}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_tracking_uri(plan, cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_ray_address(plan) is None
    assert resolve_storage_path(plan, cwd=tmp_path) == str(tmp_path.resolve() / "ray_results")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:10001")
    assert resolve_tracking_uri(plan, cwd=tmp_path) == "http://127.0.0.1:5001"
    assert resolve_ray_address(plan) == "ray://127.0.0.1:10001"
    explicit = _plan("name: a\naxes: {kernel: [laplace]}\ntracking: {uri: 'sqlite:///x.db'}\ncluster: {address: auto}")
    assert resolve_tracking_uri(explicit) == f"sqlite:///{Path.cwd().resolve()}/x.db"  # relative: made absolute
    assert resolve_ray_address(explicit) == "auto"
