"""The driver's first Tune callback: a reported infrastructure problem ends the Tune run (tune_jobs/infra.py)."""

from __future__ import annotations

import logging
import sys

from ray import tune

from .infra import STORAGE_ERRNOS, STORAGE_KEY, InfrastructureError, os_problem, problem, report_problem

# Ray's loggers that tell of a failed upload of the experiment state (with a traceback) and then go on
SYNC_LOGGERS = ("ray.train._internal.syncer", "ray.tune.execution.experiment_state")
TUNE_LOGGER = "ray.tune.tune"  # says "Resume experiment with: Tuner.restore(...)" after a Ctrl-C


class SweepGuard(tune.Callback):
    """Raises before any other callback sees the result, so the logger's and the progress display's state stay as
    saved (Tune hands the result to its searcher first; that state is not saved again before the run ends)."""

    def setup(self, **info):
        for name in SYNC_LOGGERS:
            _add_filter(name, StorageSyncFailures)
        _add_filter(TUNE_LOGGER, TunesOwnResumeHint)

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


class TunesOwnResumeHint(logging.Filter):
    """After an interrupt Tune advises a Python call; the command says which ``attzoom`` command continues
    (infra.raise_if_interrupted), so Tune's advice is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with:" not in record.getMessage()


def _add_filter(name: str, kind: type[logging.Filter]) -> None:
    logger = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())
