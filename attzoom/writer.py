"""Epoch ends in the background: the next epoch trains while the last one's checkpoint is written and reported.

Writing ``last.pt`` and reporting it (Tune copies the folder and waits for its driver) used to
stall the device once per epoch. ``fit`` now copies the state to the CPU, hands the write and the
report to one worker thread, and goes on. Epoch ends still happen one at a time and in order, a
checkpoint is still on disk before its report, and a failure there (a full disk, a callback that
raises, Tune stopping the trial) reaches the training thread within one step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class EpochWriter:
    """One worker thread, at most one epoch end in flight."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attzoom-epoch-end")
        self._pending: Future | None = None

    def submit(self, work: Callable[[], None]) -> None:
        """Run ``work`` in the background once the previous epoch end is done (raising its failure here)."""
        self.wait()
        self._pending = self._pool.submit(work)

    def raise_if_failed(self) -> None:
        """Cheap enough for every step: raise what the finished epoch end raised, if anything."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        """Block until the epoch end in flight is done; raise what it raised (SystemExit included)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "EpochWriter":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error is None:
                self.wait()  # the last epoch's report comes before fit returns
            elif self._pending is not None:
                self._pending.exception()  # finish the write, but let the training thread's own error through
        finally:
            self._pool.shutdown(wait=True)
