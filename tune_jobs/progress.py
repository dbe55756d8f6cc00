"""Live progress per study: done / running / failed and the best validation top-1 so far."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from .space import STUDY_KEY
from .trainable import reported_end


class StudyProgress(Callback):
    """Prints one line per study whenever its counts or its best change (and at most every few seconds)."""

    def __init__(self, spec, trials: int | None = None, study_of=None, studies=None, out=None,
                 min_interval_s: float = 2.0):
        """``trials`` per study (default the spec's); ``study_of(config)``: the study a trial belongs to (default
        its STUDY_KEY; a module-level function, pickled with the run); ``studies``: those shown (default all)."""
        self.studies = [s.name for s in (studies or spec.studies)]
        self.trials = trials or spec.trials
        self.study_of = study_of
        self.min_interval_s = min_interval_s
        self.out = out
        self._last: dict = {}
        self._printed_at = 0.0

    def on_step_end(self, iteration, trials, **info):
        self._maybe_print(trials, force=False)

    def on_experiment_end(self, trials, **info):
        self._maybe_print(trials, force=True)

    def _maybe_print(self, trials, force: bool) -> None:
        rows = self.rows(trials)
        if rows == self._last or (not force and time.monotonic() - self._printed_at < self.min_interval_s):
            return
        out = self.out or sys.stderr
        for name in self.studies:
            r = rows[name]
            best = "-" if r["best"] is None else f"{r['best']:.2f}"
            print(f"[{name}] done {r['done']}/{self.trials}  running {r['running']}  failed {r['failed']}  "
                  f"best val_top1 {best}", file=out, flush=True)
        self._last, self._printed_at = rows, time.monotonic()

    def rows(self, trials) -> dict:
        rows = {n: {"done": 0, "running": 0, "failed": 0, "best": None} for n in self.studies}
        for trial in trials:
            row = rows.get(self.study_of(trial.config) if self.study_of else trial.config.get(STUDY_KEY))
            if row is None:
                continue
            # one stopped with the sweep (an interrupt, a storage failure) is not done: resume runs it on
            row["done" if reported_end(trial) else "failed" if trial.status == "ERROR" else "running"] += 1
            best = trial.metric_analysis.get("val_top1", {}).get("max")
            if best is not None and (row["best"] is None or best > row["best"]):
                row["best"] = best
        return rows
