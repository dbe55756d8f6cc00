"""One driver per sweep: an exclusive lease that ``sweep``, ``resume``, ``demo`` and ``confirm`` hold while they run.

Two drivers on one sweep corrupt it: both restore the same experiment, run the same trials,
log epochs twice and delete each other's runs as orphans. So a driver takes the sweep's
lease before touching anything, and a second one stops with one line naming the holder.

The lease is a small JSON file beside the sweep's Tune folder (``<storage>/<sweep>.lease``),
so every machine that can run the driver sees it on a shared path; with cloud storage, where
no file can be created exclusively, it is kept in the MLflow store (StoreLease). It holds the holder's
host, pid and start time and a heartbeat the holder renews every few seconds. A lease is
taken over, with one line saying so, when its holder is gone: a process that no longer exists on
this host at once, a holder on another host once its heartbeat is older than STALE_S and stays still
for SILENT_S more (_silent). Of drivers that find one holder dead at once, the first to *claim* that
dead record (an exclusive create of ``<lease>~takeover~<its token>~<n>``; sweep names cannot hold
``~``) takes over and the others stop, however slow the store; a claim whose taker is gone is void
by the lease's own rule, and the next number is claimed. The holder removes the lease on any exit
Python sees (the end, an error, Ctrl-C).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import layout
from .infra import os_problem
from .spec import SpecError, local_path

HEARTBEAT_S = 5.0
STALE_S = 60.0  # a holder on another host that has not renewed for this long is taken to be dead
SILENT_S = 2 * HEARTBEAT_S + 1  # ... if it then stays silent for this long while the lease can be read (_silent)
CLAIM = "~takeover~"  # a take-over's claim: <lease><CLAIM><dead holder's token>~<n>


def lease_path(storage: str, sweep: str) -> Path | None:
    """Where a sweep's lease file lives; None for cloud storage (the lease is then kept in the MLflow store)."""
    folder = local_path(storage)
    return None if folder is None else folder / f"{sweep}.lease"


class FileLease:
    """The lease as a file beside the sweep's Tune folder; O_EXCL makes one of two creators win."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def name(self) -> str:
        return self.path.name

    def sibling(self, suffix: str) -> FileLease:
        return FileLease(self.path.with_name(self.path.name + suffix))

    def siblings(self, infix: str) -> list[FileLease]:
        return [FileLease(p) for p in self.path.parent.glob(glob.escape(self.path.name + infix) + "*")]

    def create(self, record: dict) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "x") as f:
                json.dump(record, f)
            return True
        except FileExistsError:
            return False

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def write(self, record: dict) -> bool:
        tmp = self.path.with_name(f"{self.path.name}.{os.urandom(4).hex()}.tmp")  # pids repeat across hosts
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)
        return True

    def age_s(self) -> float:
        return time.time() - self.path.stat().st_mtime

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class StoreLease:
    """The lease in the MLflow store, for cloud storage (no file there can be created exclusively).

    It is an experiment of its own, named after the sweep (not ``attzoom-...``, so no reader takes it
    for a sweep), holding the record in a tag: MLflow refuses a second experiment of one name, which
    makes one of two creators win. Released, it is renamed and deleted, which frees the name.
    """

    def __init__(self, client, name: str):
        self.client, self.name = client, name

    def sibling(self, suffix: str) -> StoreLease:
        return StoreLease(self.client, self.name + suffix)

    def siblings(self, infix: str) -> list[StoreLease]:
        prefix = self.name + infix  # LIKE reads '_' as any character: the exact prefix is checked here
        found = self.client.search_experiments(filter_string=f"name LIKE '{prefix}%'")
        return [self.sibling(e.name[len(self.name):]) for e in found if e.name.startswith(prefix)]

    def create(self, record: dict) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_experiment(self.name, tags={layout.LEASE: json.dumps(record)})
            return True
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return False

    def _experiment(self):
        return self.client.get_experiment_by_name(self.name)

    def read(self) -> dict:
        experiment = self._experiment()
        try:
            return json.loads(experiment.tags.get(layout.LEASE, "")) if experiment else {}
        except ValueError:
            return {}

    def write(self, record: dict) -> bool:
        """False when the lease was released meanwhile (and another driver created it first)."""
        from mlflow.exceptions import MlflowException

        experiment = self._experiment()
        if experiment is None:
            return self.create(record)
        try:
            self.client.set_experiment_tag(experiment.experiment_id, layout.LEASE, json.dumps(record))
        except MlflowException:
            now = self._experiment()
            if now is None or now.experiment_id != experiment.experiment_id:
                return False  # renamed and deleted by its holder as this driver wrote
            raise
        return True

    def age_s(self) -> float:
        experiment = self._experiment()
        return time.time() - experiment.creation_time / 1000 if experiment else float("inf")

    def remove(self) -> None:
        experiment = self._experiment()
        if experiment:
            self.client.rename_experiment(experiment.experiment_id, f"{self.name}.released.{os.urandom(4).hex()}")
            self.client.delete_experiment(experiment.experiment_id)


def lease_for(storage: str, sweep: str, tracking_uri: str | None):
    """Beside the Tune folder for a local or shared path; in the MLflow store for cloud storage; else none."""
    path = lease_path(storage, sweep)
    if path is not None:
        return FileLease(path)
    if not tracking_uri:
        return None
    from .tracking import open_store

    return StoreLease(open_store(tracking_uri), layout.lease_experiment(sweep))


def driver_gone(storage: str, sweep: str, tracking_uri: str | None) -> bool:
    """Whether no driver holds the sweep now, as far as this machine can tell: False when it cannot tell."""
    return driver_alive(storage, sweep, tracking_uri) is False


def driver_alive(storage: str, sweep: str, tracking_uri: str | None) -> bool | None:
    """Whether a driver holds the sweep now; None when this machine cannot tell: its storage folder is not visible
    here (a local path of another machine, a folder this user may not enter) or the lease cannot be read."""
    try:
        if (path := lease_path(storage, sweep)) is not None and not (path.parent / sweep).is_dir():
            return None
        lease = lease_for(storage, sweep, tracking_uri)
        holder = _current(lease) if lease is not None else {}
    except Exception:  # noqa: BLE001 - a folder or store that refuses the read: unknown
        return None
    return holder is not None and _alive(holder, lease)


@contextmanager
def sweep_lease(storage: str, sweep: str, out=sys.stderr, on_error: Callable[[str], None] | None = None,
                tracking_uri: str | None = None):
    """Hold the sweep's lease for the body; SpecError (one line, exit 2) when a live driver holds it.

    ``on_error`` hears of a heartbeat the storage refused (the sweep then stops: tune_jobs/infra.py).
    """
    lease = lease_for(storage, sweep, tracking_uri)
    if lease is None:
        yield
        return
    mine = _record()
    _acquire(lease, sweep, mine, out)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lease, mine, stop, on_error), name="attzoom-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        try:
            if lease.read().get("token") == mine["token"]:
                lease.remove()
        except Exception:  # noqa: BLE001 - a store that refuses: this host's next driver sees the holder gone
            pass


def _acquire(lease, sweep: str, mine: dict, out, rounds: int = 3) -> None:
    for _ in range(rounds):  # another round when the lease changed hands while this driver looked at it
        if lease.create(mine):  # of two drivers starting at once, one creates it
            return
        holder = _current(lease)
        if holder is None:  # released as this driver looked: create it in the next round
            continue
        if holder.get("token") == mine["token"]:  # its own write, which a read-back just missed
            return
        if _alive(holder, lease):
            raise SpecError(f"sweep {sweep!r} is being run by another driver: {describe(holder)}; wait for it to end "
                            f"or stop it (a driver that died is taken over at once on its own host, from another "
                            f"host {STALE_S:.0f} s after its last heartbeat)")
        if not _silent(lease, holder):  # it beat again: the next round finds it alive
            continue
        if take_over(lease, sweep, holder, mine):
            print(f"taking over sweep {sweep!r} from a driver that is gone ({describe(holder)})", file=out, flush=True)
            return
    raise SpecError(f"sweep {sweep!r} changed hands {rounds} times while this driver tried to take it; run it again")


def take_over(lease, sweep: str, dead: dict, mine: dict) -> bool:
    """Replace a dead holder's record with ``mine``; False when the lease changed meanwhile (look again).

    Only the driver that claimed ``dead`` writes, so two that found it dead at once never both run the
    sweep; SpecError for the other. Claims on any other record are void once this one is written. A
    taker too slow to write within STALE_S / 2 of its claim gives up: by STALE_S another may claim.
    """
    began = time.monotonic()
    claim = _claim(lease, sweep, dead, mine)
    try:
        now = _current(lease)
        if now is None or _key(now) != _key(dead) or _alive(now, lease):  # it changed, or its holder came back
            return False
        late = time.monotonic() - began > STALE_S / 2
        if late or claim.read().get("token") != mine["token"] or not lease.write(mine):
            return False
        return lease.read().get("token") == mine["token"]
    finally:
        _clear_claims(lease, claim)


def _claim(lease, sweep: str, dead: dict, mine: dict):
    """The first free claim on ``dead``; SpecError while another live driver's claim on it stands.

    A claim holds its maker's record: it is void, like a lease, once its maker is gone (at once on
    this host, after STALE_S elsewhere), and the next number is free to claim.
    """
    for n in range(100):
        claim = lease.sibling(f"{CLAIM}{_key(dead)}~{n}")
        if claim.create(mine):
            return claim
        taker = claim.read()
        if _alive(taker, claim):
            raise SpecError(f"sweep {sweep!r} is being taken over by another driver at this moment "
                            f"({describe(taker) if taker else 'just starting'}); run this again in "
                            f"{STALE_S:.0f} s if it does not start")
    raise SpecError(f"sweep {sweep!r} has 100 abandoned take-over claims beside its lease ({lease.name}{CLAIM}...); "
                    "delete them and run this again")


def _current(lease) -> dict | None:
    """The lease's record ({} while being written or when unreadable); None when there is no lease."""
    record = lease.read()
    if record:
        return record
    try:
        return None if lease.age_s() == float("inf") else record
    except FileNotFoundError:
        return None


def _key(record: dict) -> str:
    return record.get("token") or "unwritten"


def _clear_claims(lease, own) -> None:
    """Drop this driver's claim and every claim on a record the lease no longer holds (no taker can use them)."""
    try:
        own.remove()
        current = lease.read()
        if not current:  # unreadable just now: which claims are void is unknown
            return
        for claim in lease.siblings(CLAIM):
            if claim.name[len(lease.name) + len(CLAIM):].rsplit("~", 1)[0] != _key(current):
                claim.remove()
    except Exception:  # noqa: BLE001 - a store that refuses now: claims left behind are void once their maker is gone
        pass


def describe(record: dict) -> str:
    since = datetime.fromtimestamp(record.get("started", 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    beat = time.time() - record.get("heartbeat", 0)
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')} since {since}, last heartbeat {beat:.0f} s ago"


def _alive(record: dict, lease) -> bool:
    """Whether the holder may still run: on this host, its process exists; elsewhere, its heartbeat is fresh."""
    if not record:  # being written by a driver that has just created it, or left empty by one killed then
        try:
            return lease.age_s() < STALE_S
        except OSError:
            return False
    if record.get("host") == socket.gethostname():
        return _same_process(record.get("pid"), record.get("pid_started"))
    return time.time() - record.get("heartbeat", 0) < STALE_S


def _silent(lease, holder: dict) -> bool:
    """Whether a holder on another host whose heartbeat is stale stays silent while this driver can read the lease.

    A holder whose heartbeats failed only because the store did (a tracking-server outage, which a sweep on cloud
    storage waits out) beats again as soon as the store answers, the moment this driver first reads it too."""
    if not holder or holder.get("host") == socket.gethostname():
        return True  # the lease's age or the process table already said
    time.sleep(SILENT_S)
    now = _current(lease)
    return now is not None and _key(now) == _key(holder) and now.get("heartbeat") == holder.get("heartbeat")


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


def _heartbeat(lease, mine: dict, stop: threading.Event, on_error) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            holder = lease.read()
            if holder.get("token") != mine["token"]:  # taken over while this driver was thought dead: it stops
                if on_error:
                    on_error(f"sweep lease taken over by another driver ({describe(holder)}) after this one missed "
                             f"its heartbeats for {STALE_S:.0f} s")
                return
            lease.write({**mine, "heartbeat": time.time()})
        except OSError as e:
            if on_error:
                on_error(os_problem(e, getattr(lease, "path", None)))
            return
        except Exception:  # noqa: BLE001 - a tracking server down for a while: the next beat tries again
            continue
