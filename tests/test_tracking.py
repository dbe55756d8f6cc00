"""The MLflow store under concurrency: processes that open one new SQLite store at once."""

import subprocess
import sys
from pathlib import Path

from tune_jobs.layout import EARLIER_ERROR, ERROR, GPU_IDS, STATUS, STUDY, TRIAL, tag_filter

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
    assert STATUS not in runs.client.get_run(run.info.run_id).data.tags  # running again, no longer "error"
    runs.log_epoch("t1", 4, {"val_top1": 40.0}, {})
    runs.finish("t1", "completed", None)
    # the finished run showed the first attempt's error and kept it through every later retry
    tags = runs.client.get_run(run.info.run_id).data.tags
    assert ERROR not in tags and tags[EARLIER_ERROR] == "ValueError: bad" and tags[STATUS] == "completed"


def test_each_trial_run_carries_its_summary_so_a_reader_needs_no_history(tmp_path):
    from mlflow.entities import Metric

    from tune_jobs import layout
    from tune_jobs.summary import summarize
    from tune_jobs.tracking import TrialRuns, prepare_store, run_summary

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = prepare_store(uri, "s")
    runs = TrialRuns(uri, experiment, {"study": "p"})
    runs.open("t1", "study", {STUDY: "study"}, {"lr": 0.1})
    for step, top1, top5 in ((1, 10.0, 50.0), (2, 20.0, 60.0), (3, 20.0, 55.0), (4, 15.0, 70.0)):
        runs.log_epoch("t1", step, {"val_top1": top1, "val_top5": top5}, {})
    run = runs.client.get_run(runs.runs["t1"])
    assert layout.summary_of(run.data.metrics) == {"epoch": 2, "val_top1": 20.0, "val_top5": 60.0}
    assert run.data.metrics[layout.EPOCHS_DONE] == 4
    # the best is logged with the epochs that moved it, the count with every epoch
    assert [m.step for m in runs.client.get_metric_history(run.info.run_id, layout.BEST_TOP1)] == [1, 2]
    assert [m.step for m in runs.client.get_metric_history(run.info.run_id, layout.EPOCHS_DONE)] == [1, 2, 3, 4]
    # a driver that restarts goes on from the summary: the re-run epoch 4 is skipped, epoch 5 moves the best
    again = TrialRuns(uri, experiment, {"study": "p"})
    again.open("t1", "study", {STUDY: "study"}, {"lr": 0.1})
    again.log_epoch("t1", 4, {"val_top1": 99.0, "val_top5": 99.0}, {})
    again.log_epoch("t1", 5, {"val_top1": 30.0, "val_top5": 80.0}, {})
    run = runs.client.get_run(run.info.run_id)
    assert layout.summary_of(run.data.metrics)["epoch"] == 5 and run.data.metrics[layout.EPOCHS_DONE] == 5
    # a run written before summaries existed is summarised from its history
    legacy = runs.client.create_run(experiment, tags={STUDY: "study", layout.ROLE: layout.TRIAL_ROLE}).info.run_id
    runs.client.log_batch(legacy, metrics=[Metric("val_top1", v, 0, s) for s, v in ((1, 40.0), (2, 35.0))])
    assert run_summary(runs.client, runs.client.get_run(legacy)).best["val_top1"] == 40.0
    assert summarize(runs.client, experiment)["study"] == {"finished": 0, "running": 2, "failed": 0, "stopped": 0,
                                                           "pruned": 0, "epochs": 7, "best_top1": 40.0, "deleted": 0,
                                                           "deleted_runs": []}


def test_a_stop_ends_only_a_running_run_killed_and_a_resume_opens_it_again(tmp_path):
    """After Ctrl-C the stopped trials' runs stayed RUNNING ("running 1" with nothing running). A stop is a write
    in the outbox, after the trial's last ones, so a trial that finished just before is never marked stopped."""
    from tune_jobs.summary import summarize
    from tune_jobs.tracking import TrialRuns, prepare_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = prepare_store(uri, "s")
    runs = TrialRuns(uri, experiment, {"study": "p"})
    for trial in ("done", "cut"):
        runs.open(trial, "study", {STUDY: "study"}, {"lr": 0.1})
        runs.log_epoch(trial, 1, {"val_top1": 10.0, "val_top5": 50.0}, {})
    runs.finish("done", "completed", None)
    for trial in ("done", "cut", "never-started"):
        runs.stop(trial)
    status = {t: runs.client.get_run(runs.run_of(t)).info.status for t in ("done", "cut")}
    assert status == {"done": "FINISHED", "cut": "KILLED"}
    row = summarize(runs.client, experiment)["study"]
    assert (row["finished"], row["running"], row["stopped"]) == (1, 0, 1)
    TrialRuns(uri, experiment, {"study": "p"}).open("cut", "study", {STUDY: "study"}, {"lr": 0.1})  # resumed
    assert runs.client.get_run(runs.run_of("cut")).info.status == "RUNNING"


def test_runs_a_killed_driver_left_running_end_killed_when_the_next_driver_prepares_the_store(tmp_path):
    """After kill -9 of the driver, status said "running 1" until a resume (a confirm never fixed it)."""
    from dataclasses import replace
    from pathlib import Path

    from tune_jobs.spec import load_spec
    from tune_jobs.summary import summarize
    from tune_jobs.tracking import TrialRuns, prepare_tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    demo = Path(__file__).parent.parent / "tune_jobs" / "specs" / "demo.toml"
    spec = replace(load_spec(demo), tracking_uri=uri, storage=str(tmp_path / "r"))
    experiment, parents = prepare_tracking(spec)
    study = spec.studies[0].name
    runs = TrialRuns(uri, experiment, parents)
    runs.open("t1", study, {STUDY: study}, {"lr": 0.1})  # then the driver is killed
    prepare_tracking(spec)  # the next driver (resume, confirm) holds the lease
    assert runs.client.get_run(runs.run_of("t1")).info.status == "KILLED"
    assert summarize(runs.client, experiment)[study]["stopped"] == 1


def test_a_resuming_driver_opens_the_parent_runs_of_unfinished_studies_again(tmp_path):
    # they read KILLED in the MLflow UI and the report while their trials ran again, until the sweep ended (QA pass 9)
    from dataclasses import replace
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from tune_jobs.spec import load_spec
    from tune_jobs.tracking import prepare_tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    demo = Path(__file__).parent.parent / "tune_jobs" / "specs" / "demo.toml"
    spec = replace(load_spec(demo), tracking_uri=uri, storage=str(tmp_path / "r"))
    _, parents = prepare_tracking(spec)
    client = MlflowClient(uri)
    cut, done = parents.values()
    client.set_terminated(cut, "KILLED")  # as an interrupted sweep ends its studies
    client.set_terminated(done, "FINISHED")
    prepare_tracking(spec)  # a confirm, or a reader's preparation: runs no trial
    assert client.get_run(cut).info.status == "KILLED"
    prepare_tracking(spec, "", reopen=True)  # the resume's driver
    assert [client.get_run(r).info.status for r in (cut, done)] == ["RUNNING", "FINISHED"]


def test_an_orphan_trials_run_is_deleted_killed_not_running(tmp_path):
    # a trial the restored experiment does not know: its run went to the bin still RUNNING (the resumed driver had
    # reopened it from the kept writes), so a restored run read as running with nothing training it
    from dataclasses import replace
    from pathlib import Path

    from mlflow.entities import ViewType

    from tune_jobs.spec import load_spec
    from tune_jobs.sweep import drop_orphan_runs
    from tune_jobs.tracking import TrialRuns, prepare_tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = replace(load_spec(Path(__file__).parent.parent / "tune_jobs" / "specs" / "demo.toml"), tracking_uri=uri,
                   storage=str(tmp_path / "r"))
    experiment, parents = prepare_tracking(spec)
    study = spec.studies[0].name
    runs = TrialRuns(uri, experiment, parents)
    runs.open("kept", study, {STUDY: study}, {"lr": 0.1})
    runs.open("orphan", study, {STUDY: study}, {"lr": 0.2})
    drop_orphan_runs(spec, experiment, {"kept"})
    everything = runs.client.search_runs([experiment], tag_filter(TRIAL, "orphan"), run_view_type=ViewType.ALL)
    assert [(r.info.lifecycle_stage, r.info.status) for r in everything] == [("deleted", "KILLED")]
    assert runs.client.get_run(runs.run_of("kept")).info.status == "RUNNING"


def test_a_studys_parent_run_is_not_ranked_beside_its_best_trial(tmp_path):
    # the parent logged best_val_top1 too: the runs table ranked by it (the sweep's saved view) and the README's
    # filter `metrics.best_val_top1 > 50` listed each study right beside its best trial, a duplicate row
    from dataclasses import replace

    from tune_jobs import layout
    from tune_jobs.spec import load_spec
    from tune_jobs.summary import finish_studies
    from tune_jobs.tracking import TrialRuns, prepare_tracking, study_tags

    root = Path(__file__).resolve().parent.parent
    spec = replace(load_spec(root / "tune_jobs" / "specs" / "demo.toml"), tracking_uri=f"sqlite:///{tmp_path}/m.db",
                   trials=1)
    experiment_id, parents = prepare_tracking(spec)
    runs = TrialRuns(spec.tracking_uri, experiment_id, parents)
    for n, study in enumerate(spec.studies):
        runs.open(f"t{n}", study.name, study_tags(spec, study), {"lr": 0.1})
        runs.log_epoch(f"t{n}", 1, {"val_top1": 60.0 + n, "val_top5": 90.0}, {})
        runs.finish(f"t{n}", "completed", None)
    finish_studies(spec, experiment_id, parents)
    for parent in parents.values():
        metrics = runs.client.get_run(parent).data.metrics
        assert set(metrics) == {"trials_finished", "trials_failed", "study_best_val_top1"}, metrics
    ranked = runs.client.search_runs([experiment_id], "metrics.best_val_top1 > 50")
    assert sorted(r.data.tags[layout.ROLE] for r in ranked) == ["trial", "trial"]
