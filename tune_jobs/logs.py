"""Logging of the ``attzoom`` command: every library's warnings and errors; their INFO chatter only with -v.

A sweep's output is its progress (tune_jobs/progress.py). Without this, a run also prints
Optuna's "A new study created ...", MLflow's and alembic's store migration lines, and
whatever else logs at INFO: lines that say nothing a user acts on. Two warnings and errors are left
out too, each one a failure the command reports itself in one line: urllib3's retries and MLflow's log
of a database store's failed write (the error it then raises).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE = "%Y-%m-%d %H:%M:%S"  # the progress lines' time stamps
HANDLER = "attzoom"


class StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record comes: under the live progress table, which redirects it, a
    warning is printed above the table instead of through it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(verbose: bool = False) -> None:
    """INFO of every library when ``verbose``, else only warnings and errors."""
    level = logging.INFO if verbose else logging.WARNING
    # MLflow sets its own and alembic's levels when imported, from this variable; Ray's workers inherit it
    os.environ["MLFLOW_LOGGING_LEVEL"] = logging.getLevelName(level)
    root = logging.getLogger()
    if not root.handlers:
        # a root handler also stops Optuna's alembic env.py from calling logging.config.fileConfig, which would
        # switch off every logger made so far and print "Context impl SQLiteImpl" at INFO
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATE))
        handler.set_name(HANDLER)
        root.addHandler(handler)
    for handler in root.handlers:
        if handler.get_name() == HANDLER:
            handler.setLevel(level)  # a library's logger set to INFO that propagates still shows warnings only
    root.setLevel(level)
    for name in ("alembic", "mlflow"):  # not sqlalchemy: at INFO it echoes every statement
        logging.getLogger(name).setLevel(level)
    # a line per request during a tracking-server outage, which the outbox already reports once
    _filter_unless(verbose, "urllib3.connectionpool", _not_a_retry)
    # MLflow logs a database store's failed write with its traceback (~95 lines for a full disk), then raises it:
    # the raised error is what the sweep stops with, in one line (tune_jobs/infra.py), or retries ("locked")
    _filter_unless(verbose, "mlflow.store.db.utils", _not_a_caught_database_error)
    logging.getLogger("ray.tune.tune").addFilter(_stop_notice_in_our_words)
    import optuna.logging  # Optuna sets its logger to INFO on import: its own setter is the way to quiet it

    optuna.logging.set_verbosity(level)


def plain_ray_lines(streams=None) -> None:
    """Ray colours the worker lines it forwards to the driver ("(raylet) A worker died ...", to stdout and stderr)
    whatever the output is: escape codes in a script's log file. None unless both are terminals, nor with NO_COLOR
    set (no-color.org); RAY_COLOR_PREFIX, when set, decides. ``streams`` default to sys.stdout and sys.stderr as they
    are at the call: those at import may since have been replaced and closed (main called in-process)."""
    streams = streams or (sys.stdout, sys.stderr)
    if os.environ.get("NO_COLOR") or not all(stream.isatty() for stream in streams):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _filter_unless(verbose: bool, name: str, keep) -> None:
    logger = logging.getLogger(name)
    if verbose:
        logger.removeFilter(keep)
    else:
        logger.addFilter(keep)  # once: a filter already there is not added again


def _not_a_retry(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Retrying (")


def _not_a_caught_database_error(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SQLAlchemy database error")


STOP_NOTICE = ("stopping: the trials stop, each keeping its last epoch's checkpoint, and the sweep saves its state "
               "for resume (Ctrl-C or SIGTERM again skips that save)")


def _stop_notice_in_our_words(record: logging.LogRecord) -> bool:
    """Tune's notice on Ctrl-C says "ending Ray Tune run" and "Press CTRL+C", also when SIGTERM stopped it."""
    if record.getMessage().startswith("Stop signal received"):
        record.msg, record.args = STOP_NOTICE, ()
    return True


def quiet_ray() -> None:
    """Ray gives its logger a handler of its own at INFO when imported: its INFO lines (a job's packaging, file by
    file) follow -v as every library's do, and its notice that .git and .venv are left out of a job is dropped
    (the job needs neither)."""
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):  # the Jobs client's sets INFO for itself
        logging.getLogger(name).setLevel(logging.getLogger().level)
    logging.getLogger("ray._private.runtime_env.working_dir").addFilter(_not_a_default_exclude_notice)


def _not_a_default_exclude_notice(record: logging.LogRecord) -> bool:
    return "is now ignored by default" not in record.getMessage()


class VerboseFlag(argparse.Action):
    """``-v/--verbose``: the libraries' INFO lines back, from the moment it is parsed (before any command runs)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        configure_logging(verbose=True)
        setattr(namespace, self.dest, True)


def add_verbose_flag(*parsers) -> None:
    """The same flag on the command and each subcommand, so ``attzoom -v sweep ...`` and ``attzoom sweep ... -v``
    both work (a subcommand's default does not undo the command's)."""
    for parser in parsers:
        parser.add_argument("-v", "--verbose", action=VerboseFlag, default=argparse.SUPPRESS,
                            help="show other libraries' INFO logs (Optuna, MLflow, alembic); warnings always show")
