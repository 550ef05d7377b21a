"""Budget stoppers: GPU-hours as a Ray Tune Stopper.

max_trials is enforced when the plan is validated and max_wall_time_s is Tune's own time_budget_s; the GPU-hour
budget has no Tune equivalent, so it is a Stopper that sums gpus_per_trial x each trial's
wall-clock seconds (`time_total_s` in Tune results) and stops the whole sweep when it is spent.
"""

from __future__ import annotations

from ray.tune import Stopper

SECONDS_PER_HOUR = 3600.0


class GpuHoursStopper(Stopper):
    """Stop the sweep once the trials have used `max_gpu_hours` GPU-hours.

    Args:
        max_gpu_hours: the budget in GPU-hours.
        gpus_per_trial: GPUs each trial holds (fractions allowed).
    """

    def __init__(self, max_gpu_hours: float, gpus_per_trial: float):
        self.max_gpu_hours = max_gpu_hours
        self.gpus_per_trial = gpus_per_trial
        self._seconds_by_trial: dict[str, float] = {}
        self.reached = False

    @property
    def gpu_hours(self) -> float:
        """GPU-hours used so far (by the results seen)."""
        return self.gpus_per_trial * sum(self._seconds_by_trial.values()) / SECONDS_PER_HOUR

    def __call__(self, trial_id: str, result: dict) -> bool:
        self._seconds_by_trial[trial_id] = float(result.get("time_total_s", 0.0))
        self.reached = self.reached or self.gpu_hours >= self.max_gpu_hours
        return self.reached

    def stop_all(self) -> bool:
        return self.reached
