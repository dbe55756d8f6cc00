"""The sweep's progress display (tune_jobs/progress.py) fed real Tune Trials the way Tune's loop feeds its callbacks,
and the logging set-up behind ``attzoom -v`` (tune_jobs/logs.py)."""

from __future__ import annotations

import io
import logging
import pickle
import re
import subprocess
import sys
from dataclasses import replace

import pytest
from ray.tune.experiment import Trial
from rich.console import Console

from tune_jobs.logs import StderrHandler, configure_logging
from tune_jobs.progress import StudyProgress
from tune_jobs.scheduler import PrunedTrials, StudyASHA
from tune_jobs.space import STUDY_KEY
from tune_jobs.spec import Spec
from tune_jobs.trainable import STATUS_KEY

SPEC = Spec(name="p", backbones=("tiny_resnet",), datasets=("cluttered-digits",), variants=("baseline", "attzoom"),
            trials=3, epochs=4)
STUDIES = [s.name for s in SPEC.studies]
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ")


class Loop:
    """Drives a callback as TuneController does: start, results, complete (before TERMINATED), error, steps."""

    def __init__(self, callback):
        self.callback, self.trials, self.step = callback, [], 0

    def start(self, study: str) -> Trial:
        trial = Trial("run_trial", config={STUDY_KEY: study}, stub=True)
        self.trials.append(trial)
        trial.set_status(Trial.RUNNING)
        self.callback.on_trial_start(iteration=self.step, trials=self.trials, trial=trial)
        return trial

    def epoch(self, trial: Trial, epoch: int, top1: float) -> None:
        result = {"epoch": epoch, "val_top1": top1, "training_iteration": epoch}
        trial.update_last_result(result)
        self.callback.on_trial_result(iteration=self.step, trials=self.trials, trial=trial, result=result)
        self.tick()

    def finish(self, trial: Trial) -> None:
        result = {**trial.last_result, STATUS_KEY: "early_stopped"}
        trial.update_last_result(result)
        self.callback.on_trial_result(iteration=self.step, trials=self.trials, trial=trial, result=result)
        self.callback.on_trial_complete(iteration=self.step, trials=self.trials, trial=trial)
        trial.set_status(Trial.TERMINATED)
        self.tick()

    def fail(self, trial: Trial) -> None:
        self.callback.on_trial_error(iteration=self.step, trials=self.trials, trial=trial)
        trial.set_status(Trial.ERROR)
        self.tick()

    def tick(self) -> None:
        self.step += 1
        for _ in range(3):  # Tune steps many times between events: nothing new must be said
            self.callback.on_step_end(iteration=self.step, trials=self.trials)

    def end(self) -> None:
        self.callback.on_experiment_end(trials=self.trials)


def sweep(loop: Loop, stop_last: bool = False) -> None:
    """Three trials per study: two finish after 2-3 epochs, one fails (or, ``stop_last``, is stopped with the
    sweep: TERMINATED without reporting its end)."""
    for study in STUDIES:
        for n in range(3):
            trial = loop.start(study)
            for epoch in range(1, 3 + (n == 0)):
                loop.epoch(trial, epoch, 10.0 * epoch + n)
            if n < 2:
                loop.finish(trial)
            elif stop_last:
                trial.set_status(Trial.TERMINATED)
            else:
                loop.fail(trial)
    loop.end()


def log_run(**options) -> tuple[list[str], Loop]:
    out = io.StringIO()
    loop = Loop(StudyProgress(SPEC, out=out, **options))
    sweep(loop)
    return out.getvalue().splitlines(), loop


def test_a_log_gets_one_time_stamped_line_per_trial_event_and_a_final_summary():
    lines, loop = log_run()
    assert all(STAMP.match(line) for line in lines)
    ids = [t.trial_id for t in loop.trials]
    events = [line for line in lines if " trial " in line]
    assert len(events) == 2 * len(ids)  # started + finished or failed, once each
    for trial_id in ids:
        assert sum(f"trial {trial_id}  started" in line for line in events) == 1
    finished = [line for line in events if "finished" in line]
    assert len(finished) == 4 and all("best val_top1" in line and "epochs" in line for line in finished)
    assert f"{STUDIES[0]}  trial {ids[0]}  finished: best val_top1 30.00 in 3 epochs" in finished[0]
    assert sum(line.endswith("failed") for line in events) == 2
    summaries = [line for line in lines if "  summary  " in line]
    assert len(summaries) <= 1  # at most once a minute
    final = [line for line in lines if "  final  " in line]
    assert [STUDIES[0] in final[0], STUDIES[1] in final[1]] == [True, True]
    assert f"{STUDIES[1]}  done 2/3  failed 1  best val_top1 30.00" in final[1]
    assert "done 4/6  running 0  failed 2  epochs 14" in final[-1] and "elapsed" in final[-1]
    assert len(lines) <= 3 * len(ids) + 1 + len(final)


def test_a_trial_a_resumed_sweep_continues_says_after_which_epoch_and_ray_does_not_repeat_it():
    """One line of ours, not Ray's per-trial 'Restored on <ip> from checkpoint: Checkpoint(<path>)' from the worker
    (its logger is quieted wherever the trainable is loaded, which is before Tune restores the trial)."""
    import logging

    import tune_jobs.trainable  # noqa: F401 - what a trial's worker imports to run it

    out = io.StringIO()
    progress = StudyProgress(SPEC, out=out)
    trial = Trial("run_trial", config={STUDY_KEY: STUDIES[0]}, stub=True)
    trial.update_last_result({"epoch": 2, "val_top1": 20.0, "training_iteration": 2})  # before the driver died
    trial.set_status(Trial.RUNNING)
    progress.on_trial_start(iteration=0, trials=[trial], trial=trial)
    assert out.getvalue().rstrip().endswith(f"{STUDIES[0]}  trial {trial.trial_id}  resumed after epoch 2")
    assert not logging.getLogger("ray.tune.trainable.trainable").isEnabledFor(logging.INFO)


def test_a_trial_the_scheduler_stopped_is_done_and_said_to_be_pruned():
    out = io.StringIO()
    loop = Loop(StudyProgress(SPEC, out=out))
    trial = loop.start(STUDIES[0])
    loop.epoch(trial, 1, 12.5)
    result = {**trial.last_result, "done": True}  # the epoch the scheduler stopped it on ...
    PrunedTrials(marked_stop(trial)).on_trial_result(0, loop.trials, trial, result)  # ... marked ended
    trial.update_last_result(result)
    loop.callback.on_trial_complete(iteration=loop.step, trials=loop.trials, trial=trial)
    trial.set_status(Trial.TERMINATED)
    loop.end()
    lines = out.getvalue().splitlines()
    assert any(line.endswith(f"trial {trial.trial_id}  pruned (trailing its study): best val_top1 12.50 in 1 epoch")
               for line in lines), lines
    assert f"{STUDIES[0]}  done 1/3  failed 0" in "\n".join(lines)


def marked_stop(trial: Trial) -> StudyASHA:
    scheduler = StudyASHA("val_top1", "max", 4, 1, 2)
    scheduler.pruned[trial.trial_id] = 1
    return scheduler


def test_no_line_is_repeated_without_a_change_even_with_a_summary_at_every_step():
    lines, _ = log_run(summary_every_s=0)
    bodies = [STAMP.sub("", line) for line in lines]
    counted = [re.sub(r"\(\d+\.\d+/s\).*", "", b) for b in bodies if b.startswith("summary")]
    assert len(counted) > 5 and len(counted) == len(set(counted))  # a summary only when a count moved
    assert all(a != b for a, b in zip(bodies, bodies[1:]))


def test_a_summary_comes_at_most_once_a_minute_and_only_when_something_moved():
    out = io.StringIO()
    progress = StudyProgress(SPEC, out=out)
    loop = Loop(progress)
    trial = loop.start(STUDIES[0])
    loop.epoch(trial, 1, 10.0)
    summaries = []
    for step in ("first minute", "a minute on", "an epoch, same minute", "a minute on", "a minute, nothing new"):
        if step.startswith("a minute"):
            progress._summary_at -= 60
        if step.startswith("an epoch"):
            loop.epoch(trial, 2, 12.0)
        loop.tick()
        summaries.append(out.getvalue().count("  summary  "))
    assert summaries == [0, 1, 1, 2, 2]


def test_a_trial_stopped_with_the_sweep_is_neither_finished_nor_failed():
    out = io.StringIO()
    loop = Loop(StudyProgress(SPEC, out=out))
    sweep(loop, stop_last=True)
    lines = out.getvalue().splitlines()
    assert not [line for line in lines if line.endswith("failed")]
    assert f"{STUDIES[0]}  done 2/3  failed 0  unfinished 1 (resume runs it on)" in out.getvalue()


def test_confirm_counts_the_seeds_earlier_runs_did_and_names_itself_to_run_the_rest_on():
    # it said "done 0/3" for a study whose seeds 1-2 an earlier confirm had trained, and "resume runs them on"
    out = io.StringIO()
    progress = StudyProgress(SPEC, done_before={STUDIES[0]: 2}, continued_by="confirm", out=out)
    loop = Loop(progress)
    trial = loop.start(STUDIES[0])
    loop.epoch(trial, 1, 50.0)
    trial.set_status(Trial.TERMINATED)  # stopped with the run (a Ctrl-C)
    loop.end()
    text = out.getvalue()
    assert f"{STUDIES[0]}  done 2/3  failed 0  unfinished 1 (confirm runs it on)" in text, text
    assert f"{STUDIES[1]}  done 0/3" in text and "final  done 2/6" in text, text


def test_a_terminal_gets_one_live_table_with_a_row_per_study_and_a_total():
    out = io.StringIO()
    progress = StudyProgress(SPEC, out=out, live=True)
    loop = Loop(progress)
    sweep(loop)
    screen = out.getvalue()
    assert screen.endswith("\x1b[?25h\n") or "\x1b[?25h" in screen[-20:]  # stopped: the cursor is back
    assert progress._display is None
    text = io.StringIO()
    Console(file=text, width=160).print(progress.table(loop.trials))
    rows = [line for line in text.getvalue().splitlines() if "tiny_resnet" in line or "total" in line]
    assert len(rows) == len(STUDIES) + 1
    assert re.search(r"attzoom\s*│\s*2/3\s*│\s*0\s*│\s*1\s*│\s*30\.00\s*│\s*\d", rows[1])
    assert re.search(r"total\s*│\s*4/6\s*│\s*0\s*│\s*2\s*│\s*30\.00", rows[2])
    assert "elapsed" in text.getvalue() and "left" in text.getvalue()


def test_a_table_taller_than_the_terminal_keeps_the_running_studies_the_total_and_the_time_left():
    # 15 studies in 16 rows: the live table showed 12 studies and "...", never the total or the time left
    spec = replace(SPEC, datasets=("cluttered-digits", "cifar100", "tinyimagenet"),
                   variants=("baseline", "attzoom", "zoom-only", "attention-only", "resize2x"), trials=2)
    studies = [s.name for s in spec.studies]
    loop = Loop(StudyProgress(spec, out=io.StringIO(), live=True))
    for study in studies[:12]:
        trial = loop.start(study)
        loop.epoch(trial, 1, 10.0)
        loop.finish(trial)
    running = [loop.start(study) for study in studies[12:14]]
    loop.epoch(running[0], 1, 40.0)
    narrow = io.StringIO()  # study names folded onto two lines: still within the terminal
    Console(file=narrow, width=90).print(loop.callback.table(loop.trials, screen=(90, 16)))
    assert len(narrow.getvalue().splitlines()) < 16 and "total" in narrow.getvalue(), narrow.getvalue()
    assert "more studies" in narrow.getvalue() and narrow.getvalue().count("│       1 │") == 2, narrow.getvalue()
    text = io.StringIO()
    Console(file=text, width=120).print(loop.callback.table(loop.trials, screen=(120, 16)))
    lines = text.getvalue().splitlines()
    assert len(lines) < 16, text.getvalue()
    shown = [s for s in studies if any(f"│ {s} " in line for line in lines)]
    assert studies[12] in shown and studies[13] in shown and 2 < len(shown) < len(studies), text.getvalue()
    more = next(line for line in lines if "more studies" in line)
    assert f"{len(studies) - len(shown)} more studies" in more, text.getvalue()
    assert re.search(r"total\s*│\s*12/30\s*│\s*2\s*│\s*0\s*│\s*40\.00", text.getvalue()), text.getvalue()
    assert "left" in lines[-1]
    whole = io.StringIO()
    Console(file=whole, width=120).print(loop.callback.table(loop.trials, final=True))
    assert all(f"│ {s} " in whole.getvalue() for s in studies)  # the last table, printed once the run ends: whole


def test_the_last_table_after_a_stop_shows_the_unfinished_trials():
    # after Ctrl-C on a terminal the last table read "running 0, failed 0" beside "done 2/3": the stopped trial
    # showed nowhere (the log lines said "unfinished 1")
    loop = Loop(StudyProgress(SPEC, out=io.StringIO(), live=True))
    sweep(loop, stop_last=True)
    text = io.StringIO()
    Console(file=text, width=160).print(loop.callback.table(loop.trials, final=True))
    assert "unfinished" in text.getvalue() and "running" not in text.getvalue()
    total = next(line for line in text.getvalue().splitlines() if "total" in line)
    assert re.search(r"total\s*│\s*4/6\s*│\s*2\s*│\s*0\s*│", total), text.getvalue()


def test_a_warning_logged_under_the_live_table_comes_above_it_not_through_it():
    handler = StderrHandler()  # made before the table, as the command's own is
    logger = logging.getLogger("tests.progress.library")
    logger.addHandler(handler)
    try:
        out = io.StringIO()
        loop = Loop(StudyProgress(SPEC, out=out, live=True))
        loop.epoch(loop.start(STUDIES[0]), 1, 10.0)
        logger.warning("disk almost full")
        loop.end()
    finally:
        logger.removeHandler(handler)
    assert "disk almost full" in out.getvalue()


def test_the_callback_pickles_with_the_run_config_and_a_restored_one_does_not_announce_old_trials():
    out = io.StringIO()
    progress = StudyProgress(SPEC, out=out, live=True)
    loop = Loop(progress)
    trial = loop.start(STUDIES[0])
    loop.epoch(trial, 1, 12.0)
    assert progress._display is not None
    restored = pickle.loads(pickle.dumps(progress))
    progress.stop()
    assert restored._display is None and restored.studies == STUDIES and restored.trials == 3
    restored.live, restored.out, restored._live_now = False, io.StringIO(), None  # resumed in a log
    loop.finish(trial)  # the previous driver saw it end; the restored one gets it TERMINATED
    again = Loop(restored)
    again.trials = loop.trials
    again.tick()
    again.end()
    said = restored.out.getvalue()
    assert "finished" not in said and "started" not in said
    assert f"{STUDIES[0]}  done 1/3" in said


def test_a_callback_pickled_by_an_older_version_restores_and_ends_the_run():
    # `resume` of a sweep started before done_before existed: AttributeError in on_experiment_end, after training
    out = io.StringIO()
    older = StudyProgress(SPEC, out=out)
    del older.done_before, older.continued_by  # as Tune pickled it with the run config then
    loop = Loop(pickle.loads(pickle.dumps(older)))
    loop.callback.out = out
    trial = loop.start(STUDIES[0])
    loop.epoch(trial, 1, 50.0)
    trial.set_status(Trial.TERMINATED)
    loop.end()
    assert f"{STUDIES[0]}  done 0/3  failed 0  unfinished 1 (resume runs it on)" in out.getvalue()


def test_time_left_comes_from_the_epoch_rate():
    out = io.StringIO()
    progress = StudyProgress(SPEC, out=out)
    loop = Loop(progress)
    assert progress.time_left(loop.trials) is None
    trial = loop.start(STUDIES[0])
    loop.epoch(trial, 1, 10.0)
    left = progress.time_left(loop.trials)
    assert left is not None and left > 0  # 3 epochs of this trial and 5 unseen trials of 4 epochs to go


@pytest.fixture
def logging_state():
    root = logging.getLogger()
    saved = root.level, list(root.handlers), {n: logging.getLogger(n).level for n in ("alembic", "mlflow", "optuna")}
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def test_verbose_flag_brings_the_libraries_info_back(logging_state, monkeypatch):
    import optuna

    from tune_jobs.cli import build_parser

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    configure_logging(verbose=False)
    assert optuna.logging.get_verbosity() == logging.WARNING
    assert not logging.getLogger("mlflow").isEnabledFor(logging.INFO)
    assert logging.getLogger("mlflow").isEnabledFor(logging.WARNING)
    for argv in (["-v", "status"], ["status", "--verbose"]):
        configure_logging(verbose=False)
        build_parser().parse_args(argv)
        assert optuna.logging.get_verbosity() == logging.INFO
        assert logging.getLogger("alembic").isEnabledFor(logging.INFO)
    configure_logging(verbose=False)
    build_parser().parse_args(["status"])
    assert optuna.logging.get_verbosity() == logging.WARNING


CHATTER = """
import logging, sys
from tune_jobs.logs import configure_logging
import optuna
from mlflow.tracking import MlflowClient

for verbose in (False, True):
    configure_logging(verbose)
    optuna.create_study(storage=f"sqlite:///{sys.argv[1]}/o{verbose}.db")
    MlflowClient(f"sqlite:///{sys.argv[1]}/m{verbose}.db").search_experiments()
    logging.getLogger("some.library").warning("a warning shows")
    print("-- verbose", file=sys.stderr, flush=True)
"""


def test_a_new_store_and_study_are_silent_unless_verbose(tmp_path):
    err = subprocess.run([sys.executable, "-c", CHATTER, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         check=True).stderr
    quiet, verbose = err.split("-- verbose")[:2]
    for chatter in ("A new study created in RDB", "Creating initial MLflow database tables"):
        assert chatter not in quiet and chatter in verbose, err
    assert "Context impl SQLiteImpl" not in quiet
    assert "a warning shows" in quiet and "a warning shows" in verbose


FULL_DISK = """
import sys
from tune_jobs.logs import configure_logging
configure_logging(verbose=False)  # as the `attzoom` command starts, before MLflow is loaded
from sqlalchemy import event
from sqlalchemy.pool import Pool
from tune_jobs.layout import STUDY
from tune_jobs.tracking import TrialRuns, prepare_store

uri = f"sqlite:///{sys.argv[1]}/mlflow.db"
runs = TrialRuns(uri, prepare_store(uri, "s"), {"study": "p"})
runs.open("t1", "study", {STUDY: "study"}, {"lr": 0.1})
@event.listens_for(Pool, "checkout")
def disk_full(dbapi_connection, record, proxy):  # SQLite's own SQLITE_FULL: no page beyond those the file has
    dbapi_connection.execute("PRAGMA max_page_count = 1")
try:
    runs.log_epoch("t1", 1, {f"m{i}": float(i) for i in range(500)}, {})
except Exception as e:
    from tune_jobs.infra import short_error  # what the driver stops with: "tracking store ... failed: <this>"
    print(type(e).__name__, e, short_error(e), sep="\\n")
"""


def test_a_tracking_store_whose_disk_is_full_fails_the_write_without_mlflows_traceback(tmp_path):
    # a full disk under a sweep printed ~95 lines (MLflow's "SQLAlchemy database error" and its traceback) above the
    # sweep's own one-line stop; the error itself must still reach the driver, which stops with it
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.startswith("MlflowException") and "database or disk is full" in out.stdout, out.stdout
    assert out.stdout.splitlines()[-1] == "the disk is full (OperationalError: database or disk is full)", out.stdout
    assert out.stderr == "", out.stderr[-3000:]


@pytest.mark.parametrize("failed, finished, ending, code", [
    ((0, 0), (3, 3), "sweep p done in 42 s", 0),
    ((1, 0), (2, 3), "sweep p ended in 42 s with 1 failed trial(s); each failed trial's error is in", 0),
    ((3, 0), (0, 3), "sweep p failed after 42 s: no trial of tiny_resnet.cluttered-digits.baseline finished "
                     "(3 of 6 trials failed)", 1),
    # a sweep that ended normally with trials missing from the store (their writes lost): it said "done"
    ((0, 0), (3, 2), "sweep p ended in 42 s, but the tracking store sqlite:///mlflow.db records fewer trials than "
                     "the sweep ran: tiny_resnet.cluttered-digits.attzoom has 2 of 3", 1),
])
def test_a_sweep_says_done_only_when_every_trial_is_recorded_and_none_failed(failed, finished, ending, code):
    from tune_jobs.summary import closing

    summary = {study: {"finished": f, "failed": x, "running": 0} for study, f, x in zip(STUDIES, finished, failed)}
    line, exit_code = closing(SPEC, summary, 42.4)
    assert line.startswith(ending) and exit_code == code


def test_a_sweeps_failed_trials_end_with_the_command_that_runs_them_again():
    # "ended in 42 s with 1 failed trial(s)" (exit 0) named no command: a script's log said nothing of resume
    from tune_jobs.cli import attzoom_executable
    from tune_jobs.summary import closing

    spec = replace(SPEC, storage="/r/ray results")
    ended_with = {STUDIES[0]: {"finished": 2, "failed": 1}, STUDIES[1]: {"finished": 3, "failed": 0}}
    none_finished = {STUDIES[0]: {"finished": 0, "failed": 3}, STUDIES[1]: {"finished": 3, "failed": 0}}
    for summary in (ended_with, none_finished):
        line = closing(spec, summary, 42.4, address="10.0.0.1:6379")[0]
        assert line.endswith(f"once the cause is fixed, `{attzoom_executable()} resume p --storage '/r/ray results' "
                             "--address 10.0.0.1:6379` runs them again"), line
    assert "resume" not in closing(spec, {s: {"finished": 3, "failed": 0} for s in STUDIES}, 42.4)[0]
    lost = closing(spec, {STUDIES[1]: {"finished": 3, "failed": 0}}, 42.4)[0]  # a study's runs missing: none failed
    assert lost.startswith("sweep p failed after 42 s") and "runs them again" not in lost, lost


def test_tunes_metrics_warning_for_a_trial_stopped_before_its_first_epoch_is_not_shown(caplog):
    # after a Ctrl-C in a trial's first epoch, the sweep's output ended in Tune's "Failed to fetch metrics for 1
    # trial(s): ... both result.json and progress.csv were not found" (its results are never read)
    from ray.tune import ExperimentAnalysis

    from tune_jobs.ray_session import _not_a_metrics_fetch, quiet_metrics_fetch_warning

    logging.getLogger("ray.tune.analysis.experiment_analysis").removeFilter(_not_a_metrics_fetch)  # a sweep's, earlier
    analysis = ExperimentAnalysis.__new__(ExperimentAnalysis)  # as tuner.fit() ends: its trials, one never reported
    analysis.trials = [Trial("run_trial", config={STUDY_KEY: STUDIES[0]}, stub=True)]
    analysis._fetch_trial_dataframes()  # noqa: SLF001 - what Tune calls to build the fit's ResultGrid
    assert "Failed to fetch metrics for 1 trial(s)" in caplog.text  # Tune's warning, as it was
    caplog.clear()
    quiet_metrics_fetch_warning()
    analysis._fetch_trial_dataframes()  # noqa: SLF001
    assert caplog.records == []


def test_counts_read_in_their_number():
    # "1 trials per study", "1 seeds per study", "unfinished 1 (resume runs them on)"
    from tune_jobs.naming import counted

    assert [counted(n, "trial") for n in (0, 1, 2)] == ["0 trials", "1 trial", "2 trials"]
    assert [counted(n, "study", "studies") for n in (1, 2)] == ["1 study", "2 studies"]


def test_a_one_trial_sweeps_first_line_reads_in_its_number(capsys):
    # "sweep p: 1 study x 1 trials of up to 1 epochs" (QA-11)
    from tune_jobs.sweep import announce

    announce(replace(SPEC, variants=("baseline",), trials=1, epochs=1), None, False)
    assert capsys.readouterr().out.startswith("sweep p: 1 study x 1 trial of up to 1 epoch; results in ")


@pytest.mark.parametrize("sweep_failed, confirm_failed, ending", [
    (0, [], "demo done in 42 s. Compare the runs in the MLflow UI"),
    (1, [], "sweep p ended in 42 s with 2 failed trial(s)"),  # it said "demo done"
    (0, [(STUDIES[1], 2)], "confirm runs of p are incomplete: 1 failed"),
])
def test_the_demo_says_done_only_when_its_sweep_and_confirm_runs_both_are(sweep_failed, confirm_failed, ending):
    from tune_jobs.cli import demo_closing

    summary = {study: {"finished": 3 - sweep_failed, "failed": sweep_failed} for study in STUDIES}
    line, code = demo_closing(SPEC, summary, confirm_failed, [], 42.4)
    assert line.startswith(ending) and code == (0 if ending.startswith("demo done") else 1), line


def test_a_trial_stopped_before_its_first_epoch_shows_no_best():
    # its last report (how fit ended, with metric 0 and epoch 0) read "best val_top1 0.00" beside the other
    # studies' "-" in the progress of a sweep stopped during its first epochs
    out = io.StringIO()
    loop = Loop(StudyProgress(SPEC, out=out))
    stopped, trained = loop.start(STUDIES[0]), loop.start(STUDIES[1])
    stopped.update_last_result({"epoch": 0, "val_top1": 0.0, STATUS_KEY: "interrupted", "training_iteration": 1})
    loop.epoch(trained, 1, 40.0)
    trained.update_last_result({"epoch": 1, "val_top1": 0.0, "storage_problem": "x", "training_iteration": 2})
    rows = loop.callback.rows(loop.trials)
    assert rows[STUDIES[0]]["best"] is None and rows[STUDIES[1]]["best"] == 40.0


def test_the_demos_hint_to_retry_its_confirm_runs_names_the_cluster_it_ran_on():
    # `attzoom demo --address X` ended "retry them with `attzoom confirm ...`" without --address: run here, that
    # moved the seed re-runs onto a private local Ray
    from tune_jobs.cli import demo_closing

    summary = {study: {"finished": 3, "failed": 0} for study in STUDIES}
    line, code = demo_closing(SPEC, summary, [(STUDIES[1], 2)], [], 42.4, address="10.0.0.1:6379")
    assert "--address 10.0.0.1:6379" in line and code == 1, line


@pytest.mark.parametrize("case", ["file", "terminal", "terminal with NO_COLOR", "chosen"])
def test_rays_forwarded_worker_lines_get_colour_codes_only_on_a_terminal(case, tmp_path, monkeypatch):
    # '\x1b[33m(raylet)\x1b[0m A worker died ...' in a script's log file, even with NO_COLOR=1 (QA pass 10)
    import os

    from tune_jobs.logs import plain_ray_lines

    for name in ("RAY_COLOR_PREFIX", "NO_COLOR"):  # set, then removed: restored after the test either way
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    if case == "chosen":
        monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    if case == "terminal with NO_COLOR":
        monkeypatch.setenv("NO_COLOR", "1")
    leader, follower = os.openpty()  # a real terminal
    try:
        with open(tmp_path / "log", "w") as log, open(follower, "w", closefd=False) as tty:
            plain_ray_lines((tty, log) if case in ("file", "chosen") else (tty, tty))  # stderr to a file: no codes
    finally:
        os.close(leader)
        os.close(follower)
    expected = {"file": "0", "terminal": None, "terminal with NO_COLOR": "0", "chosen": "1"}[case]
    assert os.environ.get("RAY_COLOR_PREFIX") == expected
