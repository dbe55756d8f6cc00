"""The cluster's database for real: MLflow and the Optuna studies on PostgreSQL (cluster/mlflow/postgres.yaml).

A throw-away server on 127.0.0.1 (tests/postgres.py, fixture ``postgres_server``); the sweep is the SQLite kill
test's (tests/test_sweep_e2e.py), smaller, with both stores on it and the same exact counts.
"""

import subprocess
import sys
import time

import pytest
import sqlalchemy

import test_sweep_e2e as e2e
from tune_jobs.layout import TRIAL_ROLE, experiment_name, runs_filter
from tune_jobs.spec import SpecError, check_store_exists
from tune_jobs.tracking import open_store


def test_readers_refuse_at_once_a_database_that_is_no_store_and_create_nothing_in_it(postgres_server):
    empty = postgres_server.database("empty")
    with pytest.raises(SpecError, match=r"^no tracking store in .*/empty_\d+ \(the database holds no MLflow tables\)"):
        check_store_exists(empty)
    engine = sqlalchemy.create_engine(empty)
    with engine.connect() as connection:
        assert sqlalchemy.inspect(connection).get_table_names() == []  # MLflow would have made its tables
    engine.dispose()

    missing = empty.replace("attzoom@", "attzoom:secret@").rsplit("/", 1)[0] + "/missing"
    began = time.monotonic()
    with pytest.raises(SpecError, match='does not answer .*database "missing" does not exist') as refused:
        check_store_exists(missing)
    assert time.monotonic() - began < 10 and "secret" not in str(refused.value)  # MLflow retries for 100 s

    open_store(empty)  # the store made
    check_store_exists(empty)


def trial_runs_in(tracking_uri: str):
    """test_sweep_e2e.trial_runs for a PostgreSQL store. Until the driver has made its experiment (after it
    built the store's tables) the store is not opened: a second process creating the tables alongside it collides."""
    engine, client = sqlalchemy.create_engine(tracking_uri), None

    def trial_runs(spec_dir, sweep="t"):
        nonlocal client
        if client is None:
            try:
                with engine.connect() as connection:
                    made = connection.execute(sqlalchemy.text("SELECT 1 FROM experiments WHERE name = :name"),
                                              {"name": experiment_name(sweep)}).first()
            except sqlalchemy.exc.ProgrammingError:  # no tables yet
                made = None
            if not made:
                return None, []
            client = open_store(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name(sweep))
        return client, client.search_runs([experiment.experiment_id], runs_filter(TRIAL_ROLE))

    return trial_runs, engine


@pytest.mark.slow
def test_a_sweep_killed_and_resumed_on_postgres_runs_each_trial_once_and_logs_each_epoch_once(
        tmp_path, digits_root, postgres_server, monkeypatch):
    tracking, optuna_storage = postgres_server.database("mlflow"), postgres_server.database("optuna")
    trial_runs, engine = trial_runs_in(tracking)
    monkeypatch.setattr(e2e, "trial_runs", trial_runs)  # the e2e helpers below read this store, not SQLite
    # assert_exactly_once's own Optuna check reads the default SQLite storage; this sweep's is checked at the end
    monkeypatch.setattr(e2e, "assert_studies_in_optuna", lambda *args, **kwargs: None, raising=False)
    spec = e2e.write_spec(tmp_path / "spec.toml", digits_root, trials=2, epochs=2, tracking_uri=tracking)
    storage = tmp_path / "ray_results"
    try:
        first = e2e.start("sweep", str(spec), "--optuna-storage", optuna_storage, cwd=tmp_path)
        e2e.wait_for(lambda: "FINISHED" in e2e.statuses(tmp_path) and "RUNNING" in e2e.statuses(tmp_path),
                     timeout=300, every=0.5)
        e2e.crash(first)

        out = e2e.finish(e2e.start("resume", "t", "--storage", str(storage), cwd=tmp_path), timeout=300)
        for variant in ("baseline", "attzoom"):
            assert f"| tiny_resnet.cluttered-digits.{variant} | 2 | 0 | 0 |" in out, out[-3000:]
        e2e.assert_exactly_once(tmp_path, trials_per_study=2, epochs=2, studies=2)
        assert not (storage / "t.lease").exists()
    finally:
        engine.dispose()

    status = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "status", "--tracking-uri", tracking],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert status.returncode == 0, status.stderr[-3000:]
    assert status.stdout.startswith("t:\n") and status.stdout.count(": finished 2, running 0, failed 0,") == 2, \
        status.stdout

    # the studies live in the Optuna storage the sweep was given: one per study, each with its trials once
    import optuna

    assert not list(tmp_path.rglob("optuna.db")), "the studies went to the default SQLite storage"
    studies = optuna.get_all_study_summaries(optuna_storage)
    assert len(studies) == 2, [s.study_name for s in studies]
    for summary in studies:
        trials = optuna.load_study(study_name=summary.study_name, storage=optuna_storage).trials
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        # none left RUNNING by the killed driver
        assert len(complete) == 2 and all(t.state.is_finished() for t in trials), \
            (summary.study_name, [t.state.name for t in trials])
