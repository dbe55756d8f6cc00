"""Sweep progress a person can follow: a live table on a terminal, time-stamped trial events everywhere else.

On a terminal, one rich table is redrawn in place: a row per study (done / running / failed of N,
best metric so far, epochs per second) and a total with the elapsed time and an estimate of the
time left. In a log (CI, a Ray job, a file) a table redrawn every few seconds is hundreds of
identical lines, so there each trial event is one line (started, finished, failed), a summary
follows at most once a minute when something moved, and one final summary closes the run.
"""

from __future__ import annotations

import atexit
import sys
import time

from ray.tune import Callback

from .layout import PRUNED_STATUS
from .naming import counted
from .space import STUDY_KEY
from .trainable import RESTART_KEY, STATUS_KEY, reported_end

SUMMARY_EVERY_S = 60.0  # a log gets a summary at most this often
REDRAW_EVERY_S = 1.0  # a terminal's table is redrawn at most this often


class StudyProgress(Callback):
    """Tune callback showing every study's progress; the sweep's and confirm's one display."""

    def __init__(self, spec, trials: int | None = None, study_of=None, studies=None, out=None,
                 live: bool | None = None, summary_every_s: float = SUMMARY_EVERY_S, done_before: dict | None = None,
                 continued_by: str = "resume"):
        """``trials`` per study (default the spec's); ``study_of(config)``: the study a trial belongs to (default
        its STUDY_KEY; a module-level function, pickled with the run); ``studies``: those shown (default all);
        ``out``: the stream (default stderr); ``live``: force the table on or off (default: when ``out`` is a TTY);
        ``done_before``: {study: trials done by earlier runs that Tune does not hold (confirm's earlier seeds)};
        ``continued_by``: the command that runs unfinished trials on."""
        self.studies = [s.name for s in (studies or spec.studies)]
        self.trials = trials or spec.trials
        self.done_before = dict(done_before or {})
        self.continued_by = continued_by
        self.epochs = spec.epochs
        self.metric = getattr(spec, "metric", "val_top1")
        self.study_of = study_of
        self.out = out
        self.live = live
        self.summary_every_s = summary_every_s
        self._start_driver()

    def _start_driver(self) -> None:
        """What one driver counts: a restored sweep starts its clock, rates and announcements afresh."""
        self._started = time.monotonic()
        self._epochs = dict.fromkeys(self.studies, 0)  # epochs reported to this driver, per study
        self._said: dict[str, str] = {}  # trial id -> its last announced event
        self._summary_key = None
        self._summary_at = self._started  # the first summary after a minute: the start is in the event lines
        self._drawn_at = 0.0
        self._display = None  # the rich Live, made on first use
        self._live_now = None  # this driver's choice: a table or lines

    def __getstate__(self):
        # Tune pickles the callback with the run config (and restores it on resume): no console, no display
        state = self.__dict__.copy()
        state["_display"] = None
        return state

    def __setstate__(self, state):
        # a sweep started by an older version restores its callback without the attributes added since
        self.__dict__.update({"done_before": {}, "continued_by": "resume", **state})
        self._start_driver()

    # Tune's hooks

    def setup(self, **info):
        self._started = self._summary_at = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info):
        tries, done = trial.num_failures, epoch_of(trial)
        if tries:
            self._event(trial, f"started again (try {tries + 1})")
        else:  # epochs reported before this start: a resumed sweep continues the trial from its checkpoint
            self._event(trial, f"resumed after epoch {done}" if done else "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result and STATUS_KEY not in result and RESTART_KEY not in result:  # one finished epoch
            study = self._study(trial)
            if study in self._epochs:
                self._epochs[study] += 1

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Tune calls this before it sets TERMINATED: the trial is ending, and finished if fit said how it ended
        last = trial.last_result or {}
        if STATUS_KEY in last:
            best = best_of(trial, self.metric)
            ended = "pruned (trailing its study)" if last[STATUS_KEY] == PRUNED_STATUS else "finished"
            self._event(trial, f"{ended}: best {self.metric} {fmt(best)} in {counted(last.get('epoch', '?'), 'epoch')}")
        else:
            self._event(trial, "stopped before it ended")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._event(trial, f"failed (try {trial.num_failures}), retrying{error_file(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._event(trial, f"failed{error_file(trial)}")

    def on_step_end(self, iteration, trials, **info):
        if self._is_live():
            if time.monotonic() - self._drawn_at >= REDRAW_EVERY_S:
                self._draw(trials)
        elif time.monotonic() - self._summary_at >= self.summary_every_s:
            self._summarize(trials)

    def on_experiment_end(self, trials, **info):
        """Called when the run ends, fails or is interrupted (Tune's cleanup): the display stops here."""
        if self._is_live():
            self._draw(trials, final=True)
            self.stop()
        else:
            self._print("\n".join(self.final_lines(trials)))

    # counting

    def _study(self, trial) -> str | None:
        return self.study_of(trial.config) if self.study_of else trial.config.get(STUDY_KEY)

    def rows(self, trials) -> dict:
        """{study: done, running, failed, waiting, best} over the trials Tune has; ``waiting``: pending, or
        stopped with the sweep (an interrupt, a storage failure: not done, resume runs it on)."""
        rows = {n: {"done": self.done_before.get(n, 0), "running": 0, "failed": 0, "waiting": 0, "best": None}
                for n in self.studies}
        for trial in trials:
            row = rows.get(self._study(trial))
            if row is None:
                continue
            row[state_of(trial)] += 1
            best = best_of(trial, self.metric)
            if best is not None and (row["best"] is None or best > row["best"]):
                row["best"] = best
        return rows

    def time_left(self, trials) -> float | None:
        """Seconds left, from this driver's epoch rate and the epochs the unfinished trials still have to run
        (a finished trial's mean stands in for one not yet run: early stopping makes it less than ``epochs``)."""
        done_epochs = sum(self._epochs.values())
        elapsed = time.monotonic() - self._started
        if not done_epochs or elapsed <= 0:
            return None
        ours = [t for t in trials if self._study(t) in self._epochs]
        ended = [epoch_of(t) for t in ours if state_of(t) == "done"]
        per_trial = sum(ended) / len(ended) if ended else self.epochs
        open_trials = [t for t in ours if state_of(t) in ("running", "waiting")]
        unseen = len(self.studies) * self.trials - len(ours) - sum(self.done_before.values())
        left = unseen * per_trial + sum(max(per_trial - epoch_of(t), 0) for t in open_trials)
        return left / (done_epochs / elapsed)

    # log lines

    def _event(self, trial, what: str) -> None:
        """One line per trial event; the same event of the same trial is never said twice by one driver."""
        if self._said.get(trial.trial_id) == what:
            return
        self._said[trial.trial_id] = what
        line = f"{stamp()}  {self._study(trial)}  trial {trial.trial_id}  {what}"
        if self._is_live():
            self._console().print(line, highlight=False, soft_wrap=True)  # above the table
        else:
            self._print(line)

    def _summarize(self, trials) -> None:
        """The summary line, when anything it counts has moved since the last one."""
        rows = self.rows(trials)
        key = (tuple(tuple(r.values()) for r in rows.values()), sum(self._epochs.values()))
        if key == self._summary_key:
            return
        self._summary_key, self._summary_at = key, time.monotonic()
        self._print(f"{stamp()}  summary  {self.totals(rows, trials)}")

    def totals(self, rows, trials, final: bool = False) -> str:
        """One line of totals: counts, epochs and their rate, the best so far and where, elapsed, time left."""
        count = {k: sum(r[k] for r in rows.values()) for k in ("done", "running", "failed")}
        elapsed = time.monotonic() - self._started
        epochs = sum(self._epochs.values())
        ranked = max(((r["best"], n) for n, r in rows.items() if r["best"] is not None), default=None)
        best = f"best {self.metric} {fmt(ranked[0])} ({ranked[1]})" if ranked else f"best {self.metric} -"
        return (f"done {count['done']}/{len(rows) * self.trials}  running {count['running']}  failed "
                f"{count['failed']}  epochs {epochs} ({epochs / max(elapsed, 1e-9):.2f}/s)  {best}  "
                f"elapsed {duration(elapsed)}" + ("" if final else f"  left {about(self.time_left(trials))}"))

    def final_lines(self, trials) -> list[str]:
        """The closing summary: a line per study, then the totals."""
        rows = self.rows(trials)
        lines = []
        for name, r in rows.items():
            them = "them" if r["waiting"] > 1 else "it"
            waiting = f"  unfinished {r['waiting']} ({self.continued_by} runs {them} on)" if r["waiting"] else ""
            lines.append(f"{stamp()}  final  {name}  done {r['done']}/{self.trials}  failed {r['failed']}"
                         f"{waiting}  best {self.metric} {fmt(r['best'])}")
        return lines + [f"{stamp()}  final  {self.totals(rows, trials, final=True)}"]

    def _print(self, text: str) -> None:
        print(text, file=self.out or sys.stderr, flush=True)

    # the live table

    def _is_live(self) -> bool:
        """Decided per driver: a sweep started on a terminal may be resumed in a log."""
        if self._live_now is None:
            stream = self.out or sys.stderr
            self._live_now = self.live if self.live is not None else bool(getattr(stream, "isatty", bool)())
        return self._live_now

    def _console(self):
        return self._live_display().console

    def _live_display(self):
        """The rich Live, started on first use; stopped at the run's end, or at exit if the run never ended."""
        if self._display is None:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.out or sys.stderr, force_terminal=True)
            self._display = Live(console=console, auto_refresh=False)  # redrawn by Tune's loop: no second thread
            self._display.start()
            atexit.register(self.stop)
        return self._display

    def _draw(self, trials, final: bool = False) -> None:
        self._drawn_at = time.monotonic()
        console = self._console()
        screen = None if final else (console.width, console.height)  # the last table is printed whole, below
        self._live_display().update(self.table(trials, final, screen), refresh=True)

    def table(self, trials, final: bool = False, screen: tuple[int, int] | None = None):
        """The rich table: a row per study, then the totals; its caption, the elapsed time and the time left.
        ``screen`` (width, height): a table taller than the terminal lost its last rows, the total and time left
        among them; the studies with trials running then come first, and the rest are one row."""
        rows = self.rows(trials)
        whole = self._table(rows, trials, final)
        if screen is None or rendered_height(whole, screen[0]) < screen[1]:
            return whole
        ranked = sorted(rows, key=lambda n: (not rows[n]["running"], not rows[n]["waiting"],
                                             rows[n]["done"] + rows[n]["failed"] >= self.trials))

        def cut(keep: int):
            return self._table({n: r for n, r in rows.items() if n in ranked[:keep]}, trials, final,
                               [r for n, r in rows.items() if n not in ranked[:keep]])
        return cut(most_that_fit(lambda keep: rendered_height(cut(keep), screen[0]) < screen[1], len(rows) - 1))

    def _table(self, rows: dict, trials, final: bool, hidden: list[dict] | None = None):
        from rich.table import Column, Table

        elapsed = time.monotonic() - self._started
        left = "" if final else f", left {about(self.time_left(trials))}"
        # once the run has ended nothing runs: the trials a stop left unfinished (which a resume runs on) show instead
        live = "waiting" if final else "running"
        numbers = [Column(name, justify="right") for name in ("done", "unfinished" if final else "running", "failed",
                                                               f"best {self.metric}", "epochs/s")]
        table = Table(Column("study", overflow="fold"), *numbers, caption=f"elapsed {duration(elapsed)}{left}")

        def add(name, them, epochs, **style):
            bests = [r["best"] for r in them if r["best"] is not None]
            table.add_row(name, f"{sum(r['done'] for r in them)}/{len(them) * self.trials}",
                          str(sum(r[live] for r in them)), str(sum(r["failed"] for r in them)),
                          fmt(max(bests) if bests else None), rate(epochs, elapsed), **style)
        last = list(rows)[-1] if rows else None
        for name, r in rows.items():
            add(name, [r], self._epochs[name], end_section=name == last and not hidden)
        if hidden and rows:  # with no study shown, the total says it all
            names = [n for n in self.studies if n not in rows]
            add(f"{counted(len(hidden), 'more study', 'more studies')}", hidden,
                sum(self._epochs[n] for n in names), end_section=True, style="dim")
        everything = [*rows.values(), *(hidden or [])]
        add("total", everything, sum(self._epochs.values()), style="bold")
        return table

    def stop(self) -> None:
        """Leave the terminal clean (cursor back, table kept) so what is printed next comes below it."""
        if self._display is not None:
            self._display.stop()
            self._display = None
            atexit.unregister(self.stop)


def most_that_fit(fits, most: int) -> int:
    """The largest n in 0..most with fits(n) (fits(0) taken as true; fits holds up to some n, not above): a binary
    search, a few renders of the table even for the 60 studies of the paper's matrix with its controls."""
    low, high = 0, most
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def rendered_height(renderable, width: int) -> int:
    """Lines a renderable takes on a terminal this wide (folded study names take two)."""
    import io

    from rich.console import Console

    return len(Console(file=io.StringIO(), width=width, force_terminal=True).render_lines(
        renderable, pad=False, new_lines=False))


def state_of(trial) -> str:
    """done / failed / running / waiting. One stopped with the sweep (TERMINATED, but it did not report its end)
    is not done: resume runs it on."""
    if reported_end(trial):
        return "done"
    if trial.status == "ERROR":
        return "failed"
    return "running" if trial.status == "RUNNING" else "waiting"


def error_file(trial) -> str:
    """Where Tune wrote the trial's error: its folder in the storage, where a person finds the rest of it."""
    name = trial.run_metadata.error_filename
    return f": see {trial.path}/{name}" if name and trial.storage is not None else ""


def best_of(trial, metric: str) -> float | None:
    """The best ``metric`` of the trial's finished epochs, or None before its first: a trial stopped before one
    ends with a report of 0 (as does a storage problem's), which read "best 0.00" beside studies' "-". Such a
    report is never above a real epoch's value, so the max over all reports is the max over epochs."""
    if trial.metric_analysis.get("epoch", {}).get("max", 0) < 1:
        return None
    return trial.metric_analysis.get(metric, {}).get("max")


def epoch_of(trial) -> int:
    return int((trial.last_result or {}).get("epoch") or 0)


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def rate(epochs: int, elapsed: float) -> str:
    return f"{epochs / elapsed:.2f}" if epochs and elapsed > 0 else "-"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def about(seconds: float | None) -> str:
    return "?" if seconds is None else f"~{duration(seconds)}"
