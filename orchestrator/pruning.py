"""Optuna pruners inside Ray Tune: a Tune scheduler that asks an Optuna pruner.

Ray's OptunaSearch creates its study with a NopPruner and never asks `should_prune`. Here the
scheduler is the ONE component that decides early stops: on every Tune result it reports the
objective to the trial's Optuna trial (`trial.report(value, step)`, step = the workload's training
step) and returns STOP when the configured pruner says prune. The study then records the trial
as PRUNED (not COMPLETE), so the sampler learns from it correctly (Optuna's samplers treat pruned
trials with their last intermediate value).

- design optuna: the study is OptunaSearch's own (`PrunableOptunaSearch` installs the pruner on
  it, hands out its Optuna trials, and tells PRUNED for the trials this scheduler stopped).
- design grid/ofat: a separate study with one Optuna trial per Ray trial (no parameters: the
  pruners only compare intermediate-value histories), stored in a journal file next to Tune's
  experiment state so a restored sweep keeps the histories of finished trials.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

STEP_KEY = "step"  # the workload's completed training steps, reported with every result
RAY_TRIAL_ATTR = "ray_trial_id"

# Registry of Optuna pruners by plan name; settings are passed as the pruner's keyword arguments.
OPTUNA_PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
}


def build_optuna_pruner(kind: str, settings: dict[str, Any]) -> optuna.pruners.BasePruner:
    """Instantiate the Optuna pruner named `kind` with `settings` as keyword arguments.

    Raises:
        ValueError: unknown pruner name or settings the pruner does not accept.
    """
    if kind not in OPTUNA_PRUNERS:
        raise ValueError(f"pruning.type={kind!r} is not an Optuna pruner; use one of {sorted(OPTUNA_PRUNERS)}")
    try:
        return OPTUNA_PRUNERS[kind](**settings)
    except TypeError as exc:
        raise ValueError(f"pruning settings for {kind!r}: {exc}") from None


def _direction(mode: str) -> str:
    return "minimize" if mode == "min" else "maximize"


class PrunableOptunaSearch(OptunaSearch):
    """OptunaSearch whose study uses a real pruner and records pruned trials as PRUNED.

    Intermediate values are reported by `OptunaPruningScheduler` (with the workload's step),
    so `on_trial_result` does nothing here: one reporter, one decider.

    Args:
        pruner: the Optuna pruner to install on the study.
        **kwargs: OptunaSearch arguments (space, metric, mode, sampler...).
    """

    def __init__(self, pruner: optuna.pruners.BasePruner, **kwargs: Any):
        self._pruner = pruner
        self._pruned_ids: set[str] = set()
        super().__init__(**kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        self._ot_study.pruner = self._pruner

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def optuna_trial(self, trial_id: str) -> optuna.Trial | None:
        """The Optuna trial behind Ray trial `trial_id` (None if unknown or already told)."""
        if trial_id in self._completed_trials:
            return None
        return self._ot_trials.get(trial_id)

    def mark_pruned(self, trial_id: str) -> None:
        """Remember that the scheduler stopped `trial_id`; told PRUNED at completion."""
        self._pruned_ids.add(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = (result or {}).get(self.metric)
        if trial_id in self._pruned_ids:
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        elif error or value is None or not math.isfinite(value):
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.FAIL)
        else:
            self._ot_study.tell(self._ot_trials[trial_id], value)
        self._completed_trials.add(trial_id)


class OptunaPruningScheduler(FIFOScheduler):
    """A Tune scheduler that stops trials when an Optuna pruner says prune.

    Args:
        pruner: the Optuna pruner (ignored when `searcher` is given: its study's pruner decides).
        metric: the objective metric name in Tune results.
        mode: "min" or "max".
        searcher: design optuna: the PrunableOptunaSearch whose study holds the trials.
        journal_path: design grid/ofat: file for the scheduler's own study (None = in memory).
    """

    def __init__(
        self,
        pruner: optuna.pruners.BasePruner,
        metric: str,
        mode: str,
        searcher: PrunableOptunaSearch | None = None,
        journal_path: str | Path | None = None,
    ):
        super().__init__()
        self._metric_name = metric
        self._mode = mode
        self._searcher = searcher
        self._own_trials: dict[str, optuna.Trial] = {}
        self._finished: set[str] = set()
        self.pruned_trial_ids: set[str] = set()
        self._study: optuna.Study | None = None
        if searcher is None:
            storage = None
            if journal_path is not None:
                storage = optuna.storages.JournalStorage(
                    optuna.storages.journal.JournalFileBackend(str(journal_path))
                )
            self._study = optuna.create_study(
                storage=storage,
                study_name="driftsweep-pruning",
                direction=_direction(mode),
                pruner=pruner,
                load_if_exists=True,
            )

    @property
    def study(self) -> optuna.Study:
        """The study whose trials mirror the Ray trials (the searcher's for optuna designs)."""
        return self._searcher.study if self._searcher is not None else self._study

    def _optuna_trial(self, trial_id: str) -> optuna.Trial | None:
        if self._searcher is not None:
            return self._searcher.optuna_trial(trial_id)
        if trial_id in self._finished:
            return None
        if trial_id not in self._own_trials:
            # A restored sweep: reattach to the Optuna trial this Ray trial had before.
            for frozen in self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if frozen.user_attrs.get(RAY_TRIAL_ATTR) == trial_id:
                    self._own_trials[trial_id] = optuna.Trial(self._study, frozen._trial_id)
                    break
            else:
                trial = self._study.ask()
                trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
                self._own_trials[trial_id] = trial
        return self._own_trials[trial_id]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        value = result.get(self._metric_name)
        ot_trial = self._optuna_trial(trial.trial_id)
        if value is None or ot_trial is None:
            return TrialScheduler.CONTINUE
        step = int(result.get(STEP_KEY, result.get("training_iteration", 0)))
        ot_trial.report(float(value), step)
        if not ot_trial.should_prune():
            return TrialScheduler.CONTINUE
        self.pruned_trial_ids.add(trial.trial_id)
        if self._searcher is not None:
            self._searcher.mark_pruned(trial.trial_id)
        else:
            self._study.tell(ot_trial, state=TrialState.PRUNED)
            self._finished.add(trial.trial_id)
        return TrialScheduler.STOP

    def _tell_own(self, trial_id: str, value: Any, failed: bool) -> None:
        if self._searcher is not None or trial_id in self._finished or trial_id not in self._own_trials:
            return
        if failed or value is None or not math.isfinite(value):
            self._study.tell(self._own_trials[trial_id], state=TrialState.FAIL)
        else:
            self._study.tell(self._own_trials[trial_id], float(value))
        self._finished.add(trial_id)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._tell_own(trial.trial_id, (result or {}).get(self._metric_name), failed=False)

    def on_trial_error(self, tune_controller, trial) -> None:
        # Tune also calls this before a retry; the Optuna trial fails only when no retry is left.
        if not trial.should_recover():
            self._tell_own(trial.trial_id, None, failed=True)

    def debug_string(self) -> str:
        return f"OptunaPruningScheduler: {len(self.pruned_trial_ids)} pruned"
