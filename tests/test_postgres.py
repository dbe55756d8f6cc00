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

SECRET = "pw-s3cret"


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


def test_processes_creating_one_new_postgres_store_at_once_all_open_it_and_a_down_server_is_waited_out(
        postgres_server):
    from test_tracking import OPEN

    from tune_jobs.tracking import unreachable

    uri = postgres_server.database("race")
    openers = [subprocess.Popen([sys.executable, "-c", OPEN, uri], stderr=subprocess.PIPE, text=True)
               for _ in range(3)]  # unserialised, one fails on the tables another is creating
    errors = [p.communicate(timeout=300)[1] for p in openers]
    assert [p.returncode for p in openers] == [0] * 3, "\n".join(e[-800:] for e in errors)

    down = uri.replace(f":{postgres_server.port}/", f":{e2e.free_port()}/")  # a server that is not up (yet)
    with pytest.raises(sqlalchemy.exc.OperationalError) as refused:
        sqlalchemy.create_engine(down).connect()
    assert unreachable(refused.value)  # the driver's outbox waits it out, as for a tracking server
    with pytest.raises(sqlalchemy.exc.ProgrammingError) as wrong:
        with sqlalchemy.create_engine(uri).connect() as connection:
            connection.execute(sqlalchemy.text("SELECT * FROM no_such_table"))
    assert not unreachable(wrong.value)  # a store that answers with an error is not waited for


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
        tmp_path, few_digits_root, postgres_server, monkeypatch):
    # passwords in both URLs (the server trusts loopback, so it ignores them): never printed, never in MLflow
    tracking, optuna_storage = (postgres_server.database(name).replace("attzoom@", f"attzoom:{SECRET}@")
                                for name in ("mlflow", "optuna"))
    trial_runs, engine = trial_runs_in(tracking)
    monkeypatch.setattr(e2e, "trial_runs", trial_runs)  # the e2e helpers below read this store, not SQLite
    spec = e2e.write_spec(tmp_path / "spec.toml", few_digits_root, trials=2, epochs=2, tracking_uri=tracking)
    storage = tmp_path / "ray_results"
    try:
        first = e2e.start("sweep", str(spec), "--optuna-storage", optuna_storage, cwd=tmp_path)
        e2e.wait_for(lambda: "FINISHED" in e2e.statuses(tmp_path) and "RUNNING" in e2e.statuses(tmp_path),
                     timeout=300, every=0.5)
        e2e.crash(first)
        assert SECRET not in first.stdout.read()

        out = e2e.finish(e2e.start("resume", "t", "--storage", str(storage), cwd=tmp_path), timeout=300)
        assert SECRET not in out and "Restored on" not in out  # Ray's line per resumed trial: ours says it
        for variant in ("baseline", "attzoom"):
            assert f"| tiny_resnet.cluttered-digits.{variant} | 2 | 0 | 0 |" in out, out[-3000:]
        # the Optuna studies too: N complete trials each, none left RUNNING, with intermediate values and run ids
        e2e.assert_exactly_once(tmp_path, trials_per_study=2, epochs=2, studies=2, optuna_storage=optuna_storage)
        assert not (storage / "t.lease").exists()
        # the best checkpoints went under the sweep's storage, not ./mlruns of the folder the driver ran in
        assert list((storage / "mlartifacts" / "t").glob("*/artifacts/checkpoint/best.pt"))
        assert not (tmp_path / "mlruns").exists()
    finally:
        engine.dispose()

    status = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "status", "--tracking-uri", tracking],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert status.returncode == 0, status.stderr[-3000:]
    assert SECRET not in status.stdout + status.stderr
    assert_no_password_stored_or_reported(tracking, tmp_path)
    assert status.stdout.startswith("t: done, 4 of 4 trials ended (2 per study)\n"), status.stdout
    assert status.stdout.count(": finished 2, running 0, failed 0,") == status.stdout.count(", done\n") == 2, \
        status.stdout

    # the studies live in the Optuna storage the sweep was given, not in a default SQLite file
    import optuna

    assert not list(tmp_path.rglob("optuna.db")), "the studies went to the default SQLite storage"
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(optuna_storage)) == [
        "t/tiny_resnet.cluttered-digits.attzoom", "t/tiny_resnet.cluttered-digits.baseline"]


def assert_no_password_stored_or_reported(tracking: str, tmp_path) -> None:
    """The spec kept in the experiment (readable by every MLflow user) and the report hide the password; confirm,
    which reads that spec when the sweep's folder is out of reach, connects with the URI it was given."""
    from dashboards.report import build, write
    from tune_jobs.layout import SPEC
    from tune_jobs.sweep import load_saved_spec

    tag = open_store(tracking).get_experiment_by_name(experiment_name("t")).tags[SPEC]
    assert SECRET not in tag and "attzoom:***@" in tag
    paths = write(build(tracking, "t", with_figures=False), tmp_path / "report")
    for path in paths.values():
        assert SECRET not in path.read_text(errors="replace")
    assert load_saved_spec("t", str(tmp_path / "elsewhere"), tracking).tracking_uri == tracking
