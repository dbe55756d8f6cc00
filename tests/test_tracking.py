"""The MLflow store under concurrency: processes that open one new SQLite store at once."""

import subprocess
import sys

from tune_jobs.layout import ERROR, GPU_IDS, STUDY, TRIAL, tag_filter

OPEN = """
import sys
from tune_jobs.tracking import open_store
open_store(sys.argv[1]).search_experiments()
"""


def test_processes_creating_one_new_sqlite_store_at_once_all_open_it(tmp_path):
    # Unserialised, all but one fail ("table ... already exists") and leave the file unmigratable.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    openers = [subprocess.Popen([sys.executable, "-c", OPEN, uri], stderr=subprocess.PIPE, text=True)
               for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in openers]
    assert [p.returncode for p in openers] == [0] * 4, "\n".join(e[-800:] for e in errors)


def test_a_trial_process_loads_no_mlflow():
    # The driver logs trials (mlflow_callback.py): MLflow's import and store open stay off each trial's start.
    probe = "import sys, tune_jobs.trainable; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_trial_runs_keep_one_run_per_trial_and_each_epoch_once(tmp_path):
    from tune_jobs.tracking import TrialRuns, prepare_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = prepare_store(uri, "s")
    parent = TrialRuns(uri, experiment, {}).client.create_run(experiment).info.run_id
    for attempt in range(2):  # a driver that restarts finds the run by trial id, not a second one
        runs = TrialRuns(uri, experiment, {"study": parent})
        runs.open("t1", "study", {STUDY: "study"}, {"lr": 0.1})
        for step in (1, 2) if attempt == 0 else (2, 3):  # epoch 2 re-run after the crash
            runs.log_epoch("t1", step, {"val_top1": 10.0 * step + attempt}, {GPU_IDS: "0"})
    history = runs.client.get_metric_history(runs.runs["t1"], "val_top1")
    assert sorted((m.step, m.value) for m in history) == [(1, 10.0), (2, 20.0), (3, 31.0)]
    assert len(runs.client.search_runs([experiment], tag_filter(TRIAL, 't1'))) == 1
    runs.fail("t1", "ValueError: bad", attempt=1)
    runs.fail("t1", "ValueError: bad", attempt=1)  # made again by the next driver (outbox.py): counted once
    run = runs.client.search_runs([experiment], tag_filter(TRIAL, 't1'))[0]
    assert run.info.status == "FAILED" and run.data.tags[ERROR] == "ValueError: bad"
    assert [m.step for m in runs.client.get_metric_history(run.info.run_id, "failures")] == [1]
    runs.open("t1", "study", {STUDY: "study"}, {"lr": 0.1})  # Tune retries it
    assert runs.client.get_run(run.info.run_id).info.status == "RUNNING" and runs.runs["t1"] == run.info.run_id
