"""The driver's MLflow writes, kept on disk in order until the tracking store has taken each one.

A tracking server that is down for minutes must not stop training, and a driver killed in the
meantime must lose nothing. So every write is first appended to a journal file beside the
sweep and made from there by one writer thread, in order; the journal is emptied whenever all
are made. While the store is unreachable the writer waits and tries again, up to a deadline;
then, or at once on any other failure, the sweep stops (infra.report_problem) with the journal
intact, and the next driver of the sweep makes its writes first.

Each write must be idempotent (tracking.TrialRuns: runs found by trial id, an epoch logged once,
a failure counted once per attempt): a write made just before a kill is made again after it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from .infra import os_problem, report_problem, short_error

RETRY_S = (1, 2, 4, 8, 15)  # waits between tries while the store is unreachable; the last repeats


class Outbox:
    """Ordered, durable, exactly-once delivery of the driver's writes to one tracking store."""

    def __init__(self, path: Path, make: Callable[[dict], None], unreachable: Callable[[BaseException], bool],
                 store: str, deadline_s: float, out=sys.stderr, kept: list[dict] | None = None):
        """``kept``: the writes the restored experiment snapshot carries (cloud storage, where the journal stays on
        its driver's host). They replace this host's journal, which may be an older driver's: Tune redoes all that
        came after the snapshot, so its writes are the ones to make."""
        self.path, self.make, self.unreachable = path, make, unreachable
        self.store, self.deadline_s, self.out = store, deadline_s, out
        self._file = None
        self._pending = deque(self._load() if kept is None else kept)
        if kept is not None:
            journal = self._journal()
            journal.truncate(0)
            journal.writelines(json.dumps(write) + "\n" for write in kept)
            journal.flush()
        self._cond = threading.Condition()
        self._stopped = False  # gave up: the sweep stops, the journal stays for the next driver
        self._closed = False  # every write made and the writer gone (close)
        self._down = False  # the store is unreachable now: the writer waits for it
        if self._pending:
            self._say(f"making {len(self._pending)} MLflow writes kept by an earlier driver of this sweep")
        self._thread = threading.Thread(target=self._run, name="attzoom-mlflow", daemon=True)
        self._thread.start()

    def put(self, write: dict) -> None:
        """Queue one write; it is in the journal (not yet on disk for sure: sync) when this returns."""
        line = json.dumps(write) + "\n"
        with self._cond:
            self._pending.append(write)
            try:
                journal = self._journal()
                journal.write(line)
                journal.flush()
            except OSError as e:
                report_problem(os_problem(e, self.path))
            self._cond.notify_all()

    def sync(self) -> None:
        """Every write queued so far survives a killed driver (called before each experiment snapshot)."""
        with self._cond:
            if self._file is not None:
                try:
                    os.fsync(self._file.fileno())
                except OSError as e:
                    report_problem(os_problem(e, self.path))

    def drain(self) -> None:
        """Wait until every write is made, or the outbox has given up (then the sweep stops)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pending or self._stopped)
        self.sync()

    def close(self) -> None:
        """Once every write is made: end the writer thread and close the journal (a process that runs sweeps one
        after another, a notebook or the demo, kept one idle thread and open file per sweep)."""
        with self._cond:
            if self._pending:
                return  # the writer still has work, or gave up: the journal keeps it for the next driver
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._file is not None:
            self._file.close()
            self._file = None

    def settle(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for every write, but not while the store is unreachable (a stopped sweep does not
        wait out an outage: the journal keeps the writes for the next driver)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pending or self._stopped or self._down, timeout=timeout_s)
        self.sync()

    def unmade(self) -> list[dict]:
        """The writes not made yet, in order."""
        with self._cond:
            return list(self._pending)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def _run(self) -> None:
        down_since, tries = None, 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                write = self._pending[0]
            try:
                self.make(write)
            except Exception as error:  # noqa: BLE001 - every failure either waits or stops the sweep
                if not self.unreachable(error):
                    return self._give_up(f"tracking store {self.store} failed: {short_error(error)}")
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    with self._cond:
                        self._down = True
                        self._cond.notify_all()
                    self._say(f"tracking store {self.store} unreachable ({short_error(error)}); training goes on, "
                              f"MLflow writes are kept in {self.path} for up to {self.deadline_s / 60:g} min")
                if now - down_since > self.deadline_s:
                    return self._give_up(f"tracking store {self.store} unreachable for {self.deadline_s / 60:g} "
                                         f"min ({short_error(error)})")
                left = self.deadline_s - (now - down_since)
                time.sleep(max(0.1, min(RETRY_S[min(tries, len(RETRY_S) - 1)], left + 0.1)))  # gives up on time
                tries += 1
                continue
            if down_since is not None:
                self._say(f"tracking store {self.store} is back after {time.monotonic() - down_since:.0f} s; "
                          f"making the {self.pending} writes kept meanwhile")
                down_since, tries = None, 0
            with self._cond:
                self._down = False
                self._pending.popleft()
                if not self._pending:
                    self._emptied()
                self._cond.notify_all()

    def _emptied(self) -> None:
        """All made: a later driver has nothing to replay."""
        try:
            self._journal().truncate(0)
        except OSError as e:
            report_problem(os_problem(e, self.path))

    def _give_up(self, message: str) -> None:
        with self._cond:
            self._stopped = True
            report_problem(f"{message}; {len(self._pending)} MLflow writes kept in {self.path}")
            self._cond.notify_all()

    def _journal(self):
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the driver's life
        return self._file

    def _load(self) -> list[dict]:
        """The writes a killed driver left. A last line cut short by the kill (never synced, so never counted on)
        is cut off the file, so the next write starts on a line of its own."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        complete = text[:text.rfind("\n") + 1]
        if complete != text:
            with open(self.path, "r+", encoding="utf-8") as f:
                f.truncate(len(complete.encode("utf-8")))
        writes = []
        for number, line in enumerate(complete.splitlines(), 1):
            try:
                writes.append(json.loads(line))
            except ValueError:
                self._say(f"{self.path}:{number}: skipping a damaged MLflow write")
        return writes

    def _say(self, message: str) -> None:
        print(message, file=self.out, flush=True)
