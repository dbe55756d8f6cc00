"""Reading a sweep back at scale: the store benchmark's writer at a small size, then status and report's reads.

The store is filled through the driver's own writer (benchmarks/store.py fill: TrialRuns), and
every reader is checked against what was written: the summary each run carries, and the bulk
history reads of a SQLite store and of a real tracking server, against MLflow's per-run reads.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from test_sweep_e2e import free_port, start_tracking_server

from dashboards.history import histories
from dashboards.runs import load_sweep
from tune_jobs import layout
from tune_jobs.summary import summarize
from tune_jobs.tracking import open_store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from store import fill  # noqa: E402

STUDIES, TRIALS, EPOCHS = 2, 3, 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    written = fill(uri, "bench", STUDIES, TRIALS, EPOCHS)
    return folder, uri, written


def test_status_reads_each_study_as_written_in_one_query(store):
    folder, uri, written = store
    client = open_store(uri)
    experiment = client.get_experiment_by_name(layout.experiment_name("bench")).experiment_id
    summary = summarize(client, experiment)
    assert set(summary) == set(written["studies"])
    for study, wrote in written["studies"].items():
        assert summary[study]["finished"] == TRIALS and summary[study]["running"] == summary[study]["failed"] == 0
        assert summary[study]["epochs"] == wrote["epochs"] == TRIALS * EPOCHS
        assert summary[study]["best_top1"] == pytest.approx(wrote["best_top1"])
    out = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "status", "bench", "--tracking-uri", uri],
                         capture_output=True, text=True, timeout=120, cwd=folder)
    assert out.returncode == 0, out.stderr[-2000:]
    for study, wrote in written["studies"].items():
        assert f"{study}: finished {TRIALS}, running 0, failed 0, epochs {TRIALS * EPOCHS}, best val_top1 " \
               f"{wrote['best_top1']:.2f}" in out.stdout


def test_the_report_reads_every_history_in_bulk_as_mlflow_reads_it_run_by_run(store):
    _, uri, written = store
    sweep = load_sweep(uri, "bench")
    client = open_store(uri)
    trials = [t for s in sweep.studies for t in s.trials]
    assert len(trials) == STUDIES * TRIALS
    for trial in trials:
        one_by_one = {key: {m.step: m.value for m in client.get_metric_history(trial.run_id, key)}
                      for key in ("val_top1", "val_top5", "epoch_time")}
        assert trial.history["val_top1"] == one_by_one["val_top1"] and len(one_by_one["val_top1"]) == EPOCHS
        assert trial.history["epoch_time"] == one_by_one["epoch_time"]
        assert trial.best == layout.best_epoch(one_by_one["val_top1"], one_by_one["val_top5"])  # the summary
    for study in (s for s in sweep.studies if s.trials):
        assert study.best.best["val_top1"] == pytest.approx(written["studies"][study.name]["best_top1"])


def test_a_tracking_server_answers_the_bulk_read_as_the_sqlite_store_does(store):
    folder, uri, _ = store
    client = open_store(uri)
    experiment = client.get_experiment_by_name(layout.experiment_name("bench")).experiment_id
    ids = [r.info.run_id for r in client.search_runs([experiment], layout.runs_filter(layout.TRIAL_ROLE))]
    from_sqlite = histories(client, ids, "val_top1")
    port = free_port()
    server = start_tracking_server(folder, port)
    try:
        from mlflow.tracking import MlflowClient

        from_server = histories(MlflowClient(f"http://127.0.0.1:{port}"), [*ids, ids[0]], "val_top1")
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert from_server == from_sqlite and all(len(h) == EPOCHS for h in from_sqlite.values())
