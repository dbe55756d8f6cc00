"""The driver's first Tune callback: a reported infrastructure problem ends the Tune run (tune_jobs/infra.py)."""

from __future__ import annotations

from ray import tune

from .infra import STORAGE_KEY, InfrastructureError, problem, report_problem


class SweepGuard(tune.Callback):
    """Raises before any other callback sees the result, so the logger's and the progress display's state stay as
    saved (Tune hands the result to its searcher first; that state is not saved again before the run ends)."""

    def on_step_begin(self, iteration, trials, **info):
        if (message := problem()) is not None:
            raise InfrastructureError(message)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if STORAGE_KEY in result:
            report_problem(result[STORAGE_KEY])
            raise InfrastructureError(problem())
