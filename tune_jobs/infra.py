"""Infrastructure failures stop the sweep; they are not trial failures.

A trial that cannot write the storage (permission, disk full, read-only file system) is not
wrong itself: retrying it spends its retries and marks its run FAILED for nothing, while every
other trial fails the same way. So a trial that hits one reports it (STORAGE_KEY) instead of
raising, and waits to be stopped; the driver's own threads (the lease's heartbeat, the MLflow
writer) report what they hit with ``report_problem``. The guard (tune_jobs/guard.py), the first
of the driver's Tune callbacks, raises InfrastructureError at that result or at the next step: Tune stops the
trials without charging them a failure, the last experiment snapshot stays as it was (as after
a killed driver, so ``resume`` is exact), and the CLI prints one line and exits INFRA_EXIT.
This module loads no Ray and no MLflow: trials and the CLI import it.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
from pathlib import Path

from contextlib import contextmanager, suppress

from .spec import SpecError, hide_password

INFRA_EXIT = 3  # bad input is 2 (attzoom.cli.EXIT_USAGE), an interrupt 130
STORAGE_KEY = "storage_error"  # in a trial's report: the storage failure it hit, instead of raising
STORAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}

_problem: list[str] = []
_lock = threading.Lock()


class Interrupted(KeyboardInterrupt):
    """Tune stopped the run before its trials ended (Ctrl-C, SIGTERM): no "done"; str() says how to go on."""


def raise_if_interrupted(ended: int, expected: int, resume: str) -> None:
    if ended < expected:
        raise Interrupted(f"interrupted: {ended} of {expected} trials ended; continue with: {resume}")


class InfrastructureError(Exception):
    """Storage or tracking store failed: the sweep stops, to be resumed once the cause is fixed."""


def report_problem(message: str) -> None:
    """Called from any driver thread; the first problem is the one the sweep stops with."""
    with _lock:
        if not _problem:
            _problem.append(message)


def problem() -> str | None:
    with _lock:
        return _problem[0] if _problem else None


def clear() -> None:
    """A driver starts with no problem (a test or a notebook may run sweeps one after another)."""
    with _lock:
        _problem.clear()


def storage_problem(error: BaseException, folder: Path, storage: Path) -> str | None:
    """'<path>: <OS error>' when ``error`` comes from ``storage`` failing to take a write, else None.

    torch reports a failed write as a RuntimeError without the OS error, so besides the
    exception's own chain, ``folder`` (the trial's folder in the storage) is probed with a write.
    An OS error on a path outside the storage (an unreadable data file) stays the trial's own.
    """
    for cause in _chain(error):
        if (isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS and cause.filename
                and Path(str(cause.filename)).is_relative_to(storage)):
            return os_problem(cause)
    probe = folder / f".attzoom-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:  # not, say, EMFILE: a trial leaking files is the trial's own failure
            return os_problem(e, folder, name=False)  # the folder, not the probe's file name
    finally:
        with suppress(OSError):
            probe.unlink(missing_ok=True)
    return None


def os_problem(error: OSError, path=None, name: bool = True) -> str:
    """'<path>: <strerror> (<ERRNO>)', the one line a storage failure is told with."""
    code = errno.errorcode.get(error.errno, error.errno) if error.errno else type(error).__name__
    where = (error.filename if name else None) or path or "storage"
    return f"{where}: {error.strerror or error} ({code})"


# what a store's innermost error means to a user, said before it: "the disk is full (OperationalError: ...)"
PLAIN_CAUSES = (("database or disk is full", "the disk is full"), ("No space left on device", "the disk is full"),
                ("readonly database", "the database is read-only"),
                ("Read-only file system", "the file system is read-only"))


def short_error(error: BaseException) -> str:
    """``Type: reason`` on one line, with no full stop (it goes inside a sentence), and first what it means when a
    user can act on it (PLAIN_CAUSES). The innermost cause says it: a wrapper's own text misleads (Optuna's commit
    error blames "invalid data" for a full disk); for a connection failure, the OS error under MLflow's and
    urllib3's wrappers."""
    line = _type_and_reason(error)
    plain = next((said for known, said in PLAIN_CAUSES if known in line), None)
    return f"{plain} ({line})" if plain else line


def _type_and_reason(error: BaseException) -> str:
    if reason := re.search(r"\[Errno -?\d+\][^'\")]*", _one_line(error)):
        return f"{type(error).__name__}: {reason.group(0).strip()}"
    cause = _innermost_cause(error)
    return f"{type(cause).__name__}: {_one_line(cause)[:300]}".rstrip(" .")


def _one_line(error: BaseException) -> str:
    return hide_password(" ".join(str(error).split()))  # MLflow's errors quote the URL they called


def _innermost_cause(error: BaseException) -> BaseException:
    """The last error of the ``raise ... from`` chain that says something. An implicit ``__context__`` is not
    followed: an error raised while another was handled need not be caused by it."""
    seen, innermost = set(), error
    while (error := error.__cause__) is not None and id(error) not in seen:
        seen.add(id(error))
        innermost = error if str(error).strip() else innermost
    return innermost


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


@contextmanager
def stops_on_problems(resume: str, tracking_uri: str):
    """Run a driver's body; a storage or tracking-store failure becomes one InfrastructureError line, and a
    Ctrl-C (or SIGTERM, sigterm_as_interrupt) that does not say how to go on (one before any trial) names ``resume``.

    ``resume`` is the command that continues the work once the cause is fixed.
    """
    clear()
    previous = sigterm_as_interrupt()
    _resume[:] = [resume]
    _watching.clear()  # a driver run after another in one process (the demo's sweep, then its confirm) is watched
    try:
        yield
    except KeyboardInterrupt as e:
        if str(e):  # it says how many trials ended and how to go on (raise_if_interrupted)
            raise
        raise KeyboardInterrupt(f"interrupted; continue with: {resume}") from None
    except Exception as error:
        message = problem() or _infrastructure(error, tracking_uri)
        if message is None and _watching.is_set():  # a SIGTERM came first: what failed then is the stop's doing
            raise KeyboardInterrupt(f"interrupted: stopped by a SIGTERM, which ended Ray's processes too "
                                    f"({short_error(error)}); continue with: {resume}") from None
        if message is None:
            raise
        raise InfrastructureError(_stopped(message, resume)) from error
    finally:
        _resume.clear()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if (message := problem()) is not None:
        raise InfrastructureError(_stopped(message, resume))


BEFORE_START = "interrupted before the sweep started; run the same command again"
RUN_AGAIN = "interrupted; run the same command again"  # outside a sweep's run: before it, or after its last line


def sigterm_as_interrupt():
    """SIGTERM (`ray job stop`, Kubernetes ending the pod, `kill PID`, `timeout`) stops the driver as Ctrl-C does:
    Tune stops the trials and saves its snapshot, the runs end KILLED, and the last line says how to go on; Ray's
    own handler printed a crash dump and died mid-write. The SIGINT handler is called, not SIGINT raised: a Ray
    job's driver may have SIGINT blocked or ignored. Returns the handler it replaced (None off the main thread,
    where Python sets none)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _as_interrupt)


def _as_interrupt(signum, frame) -> None:
    if _resume and not _watching.is_set():
        _watching.set()
        threading.Thread(target=_end_if_ray_ends, args=(_resume[0],), name="attzoom-ray-watch", daemon=True).start()
    handler = signal.getsignal(signal.SIGINT)  # Tune's during its run: it stops the run; else Python's
    if callable(handler) and handler is not _as_interrupt:
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a driver started with & by a script): SIGTERM still stops it
        raise KeyboardInterrupt


_resume: list[str] = []  # the command that continues the driver's work, while stops_on_problems runs it
_watching = threading.Event()


def _end_if_ray_ends(resume: str) -> None:
    """A SIGTERM sent to every process by pid (Slurm's scancel, systemd stopping a unit's control group) ends the
    driver's private Ray with it: Tune's stop then waited 60 s for the lost GCS, and Ray's C++ ended the driver
    with exit 1 and no word of how to go on. Once that Ray is gone, nothing it held can be saved: the driver ends
    at once, as a killed one would (the journal and the last experiment snapshot are what resume reads), with
    the interrupt's line and exit code. It ends between two snapshots, never within one (snapshots.py)."""
    import time

    from .ray_session import private_ray_lost, private_ray_running
    from .snapshots import snapshot_held

    try:
        while private_ray_running() and not private_ray_lost():
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - a watch that cannot watch leaves the stop as it was
        return
    if private_ray_running():
        snapshot_held()  # and never let go: the process ends here
        try:
            print(f"interrupted: this machine's Ray ended with the driver (a signal sent to every process); "
                  f"continue with: {resume}", file=sys.stderr, flush=True)
        finally:
            os._exit(130)


def raise_if_problem() -> None:
    if (message := problem()) is not None:
        raise InfrastructureError(message)


def _stopped(message: str, resume: str) -> str:
    return f"{message.rstrip(' .')}. No trial was charged for it; once the cause is fixed, continue with: {resume}"


def ray_connection_lost(error: BaseException) -> bool:
    """Ray's own "Failed to connect to Ray cluster at ...": a plain ConnectionError, which is no tracking outage."""
    return isinstance(error, ConnectionError) and "Ray cluster" in str(error)


def _infrastructure(error: BaseException, tracking_uri: str) -> str | None:
    """What an exception that escaped the driver says about the storage or the tracking store, if anything."""
    from .tracking import unreachable  # MLflow: the driver has it loaded by now

    if isinstance(error, SpecError):  # bad input (a cluster that is not there): its own line, exit 2; not the store
        return None
    for cause in _chain(error):
        if isinstance(cause, InfrastructureError):
            return str(cause)
        if ray_connection_lost(cause):
            return f"the Ray cluster does not answer ({short_error(cause)})"
        if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
            return os_problem(cause)
        if unreachable(cause):
            return f"tracking store {hide_password(tracking_uri)} unreachable ({short_error(cause)})"
    return None
