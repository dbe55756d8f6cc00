"""The driver's first Tune callback: a reported infrastructure problem ends the Tune run (tune_jobs/infra.py)."""

from __future__ import annotations

import logging
import sys

from ray import tune

from .infra import STORAGE_ERRNOS, STORAGE_KEY, InfrastructureError, os_problem, problem, report_problem

# Ray's loggers that tell of a failed upload of the experiment state (with a traceback) and then go on
SYNC_LOGGERS = ("ray.train._internal.syncer", "ray.tune.execution.experiment_state")


class SweepGuard(tune.Callback):
    """Raises before any other callback sees the result, so the logger's and the progress display's state stay as
    saved (Tune hands the result to its searcher first; that state is not saved again before the run ends)."""

    def setup(self, **info):
        for name in SYNC_LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, StorageSyncFailures) for f in logger.filters):
                logger.addFilter(StorageSyncFailures())

    def on_step_begin(self, iteration, trials, **info):
        if (message := problem()) is not None:
            raise InfrastructureError(message)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if STORAGE_KEY in result:
            report_problem(result[STORAGE_KEY])
            raise InfrastructureError(problem())


class StorageSyncFailures(logging.Filter):
    """The driver's own upload to a storage that refuses writes is a storage failure: reported (the sweep stops at
    its next step) instead of logged as a traceback. Ray logs it inside its ``except``, so the error is at hand."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            report_problem(os_problem(error))
            return False
        return True
