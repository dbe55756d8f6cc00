"""`attzoom status`: each sweep's studies against their N trials, read from the tracking store.

One reading (``sweep_status``) feeds both outputs: lines for a person, and with ``--json`` one JSON
object for a script, whose checks then depend on a state's name, not on a sentence's wording.

    sweep states   running (a driver holds it) · stopped (trials left, no driver: resume continues it)
                   in progress (trials left; this machine cannot see whether a driver runs it)
                   done · ended with failures · failed (a study with no finished trial) · unknown (no stored spec)
                   runs deleted (every trial ended, but runs of some were deleted in MLflow: restore them)
    study states   waiting · in progress · done · ended with failures · failed · unknown · runs deleted
"""

from __future__ import annotations

from .naming import counted
from .spec import SpecError

RUNNING, STOPPED, DONE, WITH_FAILURES, FAILED, WAITING, IN_PROGRESS, UNKNOWN, RUNS_DELETED = (
    "running", "stopped", "done", "ended with failures", "failed", "waiting", "in progress", "unknown", "runs deleted")
COUNTS = ("finished", "pruned", "running", "failed", "stopped", "deleted", "epochs")


def sweep_status(client, experiment, tracking_uri: str) -> dict:
    """The sweep's state, its studies' counts and states (every study of its stored spec, those without a run too),
    and, when no driver runs it and trials are left or failed, the command that continues it."""
    from .layout import ADDRESS, sweep_of
    from .lease import driver_alive
    from .summary import summarize
    from .sweep import resume_command

    rows, spec = summarize(client, experiment.experiment_id), stored_spec_of(experiment)
    ordered = [s.name for s in spec.studies] if spec else []  # the spec's order, as the sweep's own table
    names = ordered + sorted(set(rows) - set(ordered))
    studies = {name: study_status(rows.get(name), spec.trials if spec else None) for name in names}
    alive = driver_alive(spec.storage, spec.name, tracking_uri) if spec else None
    state = overall(studies.values(), bool(spec), alive)
    gone = alive is False
    retry = gone and (state in (STOPPED, WITH_FAILURES, FAILED) or any(s["running"] for s in studies.values()))
    return {"sweep": sweep_of(experiment.name), "state": state, "trials_per_study": spec.trials if spec else None,
            "driver_gone": None if alive is None else gone, "studies": studies,
            "resume_command": resume_command(spec, experiment.tags.get(ADDRESS)) if retry else None}


def study_status(row: dict | None, trials: int | None) -> dict:
    """A study's counts, its best validation top-1 and its state against its N trials (unknown without a spec)."""
    from .summary import closed

    counts = {key: (row or {}).get(key, 0) for key in COUNTS}
    best = (row or {}).get("best_top1")
    if trials is None:
        state = UNKNOWN
    elif row is None:
        state = WAITING
    elif closed(row) < trials:  # its runs deleted in the UI: no resume brings them back (each trial has its one run)
        lost = closed(row) + row.get("deleted", 0) >= trials and not row["running"] and not row["stopped"]
        state = RUNS_DELETED if lost else IN_PROGRESS
    else:
        state = DONE if not row["failed"] else FAILED if not row["finished"] else WITH_FAILURES
    return {**counts, "best_val_top1": best, "state": state}


def overall(studies, known: bool, driver_alive: bool | None) -> str:
    """The sweep's state: running while a driver holds it (a resume's retried trials read FAILED until they start
    again), else from its studies', as its closing line would say it."""
    states = {study["state"] for study in studies}
    if driver_alive:
        return RUNNING
    if not known:
        return UNKNOWN
    if states & {WAITING, IN_PROGRESS} or not states:
        return IN_PROGRESS if driver_alive is None else STOPPED
    if RUNS_DELETED in states:
        return RUNS_DELETED
    return FAILED if FAILED in states else WITH_FAILURES if WITH_FAILURES in states else DONE


def print_sweep_status(status: dict) -> None:
    """One line per study against its N trials: a study with no run yet is listed too, so the lines show what the
    sweep still has to do."""
    print(headline(status))
    started = {name: study for name, study in status["studies"].items() if study["state"] != WAITING}
    if not started:  # a sweep stopped before its first trial opened a run
        print("  no trial has started yet")
    for name, study in started.items():
        print(f"  {name}: {study_line(study)}")
    if started and (waiting := [name for name in status["studies"] if name not in started]):
        print(f"  no trial yet: {', '.join(waiting)}")
    print_what_resumes(status)


def headline(status: dict) -> str:
    """The sweep's state and how far it is, first: at the paper's scale the study lines fill a screen."""
    from .summary import closed

    trials, studies = status["trials_per_study"], status["studies"].values()
    if not trials:  # no stored spec (a sweep stopped before it stored one): nothing to count against
        return f"{status['sweep']}:"
    ended = sum(min(closed(study), trials) for study in studies)  # a study's extra runs count up to its N
    return (f"{status['sweep']}: {status['state']}, {ended} of {counted(len(studies) * trials, 'trial')} ended "
            f"({trials} per study)")


def study_line(study: dict) -> str:
    best = "-" if study["best_val_top1"] is None else f"{study['best_val_top1']:.2f}"
    pruned = f" ({study['pruned']} stopped early by the scheduler)" if study["pruned"] else ""
    them = "it" if study["stopped"] == 1 else "them"
    stopped = f", stopped {study['stopped']} (resume continues {them})" if study["stopped"] else ""
    return (f"finished {study['finished']}{pruned}, running {study['running']}, failed {study['failed']}{stopped}, "
            f"epochs {study['epochs']}, best val_top1 {best}{ending(study)}")


def ending(study: dict) -> str:
    """How a study whose N trials have all ended ended: "done" only when none failed, as the sweep's closing line."""
    if study["state"] == RUNS_DELETED:
        them = "it" if study["deleted"] == 1 else "them"
        runs = counted(study["deleted"], "trial run")
        return f", {runs} deleted in MLflow (restore {them} in the MLflow UI to count {them})"
    if study["state"] == WITH_FAILURES:
        return f", ended with {study['failed']} failed (fix the cause; a resume runs them again)"
    return {DONE: ", done", FAILED: ", failed: no trial finished (fix the cause; a resume runs the failed trials "
                                    "again)"}.get(study["state"], "")


def print_what_resumes(status: dict) -> None:
    """When no driver runs the sweep: the command that continues its running trials (the runs say RUNNING until
    the next driver) or runs its failed ones again."""
    studies, command = status["studies"].values(), status["resume_command"]
    if not status["driver_gone"] or not command:
        return
    if any(study["running"] for study in studies):
        print(f"  no driver runs it now (it stopped or was killed): nothing trains the running trials; continue "
              f"with `{command}`")
    elif status["state"] == STOPPED:
        print(f"  no driver runs it now: continue it with `{command}`")
    elif failed := sum(study["failed"] for study in studies):
        print(f"  {counted(failed, 'failed trial')}: once the cause is fixed, `{command}` runs them again")


def stored_spec_of(experiment):
    """The spec a sweep stored with its experiment; None for a sweep stored before specs were, or an unreadable one."""
    from .layout import SPEC
    from .spec import spec_from_json

    text = experiment.tags.get(SPEC)
    try:
        return spec_from_json(text, source=f"experiment {experiment.name}") if text else None
    except (SpecError, ValueError, TypeError):
        return None
