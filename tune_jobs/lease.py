"""One driver per sweep: an exclusive lease that ``sweep``, ``resume``, ``demo`` and ``confirm`` hold while they run.

Two drivers on one sweep corrupt it: both restore the same experiment, run the same trials,
log epochs twice and delete each other's runs as orphans. So a driver takes the sweep's
lease before touching anything, and a second one stops with one line naming the holder.

The lease is a small JSON file beside the sweep's Tune folder (``<storage>/<sweep>.lease``),
so every machine that can run the driver sees it on a shared path. It holds the holder's
host, pid and start time and a heartbeat the holder renews every few seconds. A lease is
taken over, with one line saying so, when its holder is gone: a process that no longer
exists on this host at once, a holder on another host once its heartbeat is older than
STALE_S. The holder removes it on any exit Python sees (the end, an error, Ctrl-C).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .spec import SpecError

HEARTBEAT_S = 5.0
STALE_S = 60.0  # a holder on another host that has not renewed for this long is taken to be dead


def lease_path(storage: str, sweep: str) -> Path | None:
    """Where a sweep's lease lives; None for cloud storage (no lease there yet)."""
    if "://" in storage and not storage.startswith("file://"):
        return None
    return Path(storage.removeprefix("file://")) / f"{sweep}.lease"


@contextmanager
def sweep_lease(storage: str, sweep: str, out=sys.stderr):
    """Hold the sweep's lease for the body; SpecError (one line, exit 2) when a live driver holds it."""
    path = lease_path(storage, sweep)
    if path is None:
        yield
        return
    mine = _record()
    _acquire(path, sweep, mine, out)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, mine, stop), name="attzoom-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if _read(path).get("token") == mine["token"]:
            path.unlink(missing_ok=True)


def _acquire(path: Path, sweep: str, mine: dict, out) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x") as f:  # O_EXCL: of two drivers starting at once, one creates it
            json.dump(mine, f)
        return
    except FileExistsError:
        pass
    holder = _read(path)
    if _alive(holder, path):
        raise SpecError(f"sweep {sweep!r} is being run by another driver: {describe(holder)}; wait for it to end or "
                        f"stop it (a driver that died is taken over {STALE_S:.0f} s after its last heartbeat)")
    _write(path, mine)
    time.sleep(0.2)  # two drivers taking over one dead lease at once: the later write wins, the other stops
    if _read(path).get("token") != mine["token"]:
        raise SpecError(f"sweep {sweep!r} was just taken over by another driver: {describe(_read(path))}")
    print(f"taking over sweep {sweep!r} from a driver that is gone ({describe(holder)})", file=out, flush=True)


def describe(record: dict) -> str:
    since = datetime.fromtimestamp(record.get("started", 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    beat = time.time() - record.get("heartbeat", 0)
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')} since {since}, last heartbeat {beat:.0f} s ago"


def _alive(record: dict, path: Path) -> bool:
    """Whether the holder may still run: on this host, its process exists; elsewhere, its heartbeat is fresh."""
    if not record:  # being written by a driver that has just created it, or left empty by one killed then
        try:
            return time.time() - path.stat().st_mtime < STALE_S
        except OSError:
            return False
    if record.get("host") == socket.gethostname():
        return _same_process(record.get("pid"), record.get("pid_started"))
    return time.time() - record.get("heartbeat", 0) < STALE_S


def _same_process(pid, started) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return started is None or _process_start(int(pid)) in (None, started)  # a reused pid is another process


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell it from a later one with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _record() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_start(os.getpid()),
            "started": now, "heartbeat": now, "token": os.urandom(8).hex()}


def _heartbeat(path: Path, mine: dict, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        if _read(path).get("token") != mine["token"]:
            return  # taken over (this driver was thought dead): stop claiming it
        _write(path, {**mine, "heartbeat": time.time()})


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, record: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
