"""Infrastructure failures: storage and tracking-store problems stop a sweep; outages are waited out in order."""

import errno
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tune_jobs import infra, outbox
from tune_jobs.infra import InfrastructureError, report_problem, stops_on_problems
from tune_jobs.outbox import Outbox


@pytest.fixture(autouse=True)
def no_problem_left():
    infra.clear()
    yield
    infra.clear()


def test_a_storage_error_in_the_driver_becomes_one_line_with_the_resume_command():
    with pytest.raises(InfrastructureError) as stopped:
        with stops_on_problems("attzoom resume s --storage /x", "sqlite:///m.db"):
            raise OSError(errno.EROFS, "Read-only file system", "/x/s/experiment_state.json")
    message = str(stopped.value)
    assert "/x/s/experiment_state.json: Read-only file system (EROFS)" in message
    assert message.endswith("continue with: attzoom resume s --storage /x") and "\n" not in message


def test_a_problem_a_driver_thread_reported_stops_the_driver_after_its_body():
    with pytest.raises(InfrastructureError, match="lease: No space left"):
        with stops_on_problems("attzoom resume s", "sqlite:///m.db"):
            worker = threading.Thread(target=report_problem, args=("lease: No space left on device (ENOSPC)",))
            worker.start()
            worker.join()
    with stops_on_problems("attzoom resume s", "sqlite:///m.db"):  # a new driver starts without the old problem
        pass


def test_a_trials_own_error_is_not_an_infrastructure_error():
    with pytest.raises(ValueError):
        with stops_on_problems("attzoom resume s", "sqlite:///m.db"):
            raise ValueError("lr must be positive")


def test_an_error_after_a_sigterm_is_the_stops_doing_said_as_an_interrupt():
    # a SIGTERM to every process (Slurm, systemd) ended Ray's workers too; when a trial's lost result reached the
    # driver before the GCS watch saw Ray end, the driver died in a traceback, exit 1, without the continue line
    with pytest.raises(KeyboardInterrupt, match=r"^interrupted: stopped by a SIGTERM, which ended Ray's processes too "
                                                r"\(RuntimeError: object lost\); continue with: attzoom resume s$"):
        with stops_on_problems("attzoom resume s", "sqlite:///m.db"):
            infra._watching.set()  # noqa: SLF001 - as the SIGTERM handler (infra._as_interrupt) sets it
            raise RuntimeError("object lost")
    with pytest.raises(RuntimeError):  # without a SIGTERM, an error is an error
        with stops_on_problems("attzoom resume s", "sqlite:///m.db"):
            raise RuntimeError("object lost")


def test_the_guard_ends_the_run_on_a_reported_storage_failure_and_lets_results_through():
    from tune_jobs.guard import SweepGuard
    from tune_jobs.infra import STORAGE_KEY

    guard = SweepGuard()
    guard.on_trial_result(0, [], SimpleNamespace(trial_id="a"), {"val_top1": 3.0, "epoch": 1})
    guard.on_step_begin(0, [])
    with pytest.raises(InfrastructureError, match="/s/t: Permission denied"):
        guard.on_trial_result(0, [], SimpleNamespace(trial_id="a"),
                              {"val_top1": 0.0, STORAGE_KEY: "/s/t: Permission denied (EACCES)"})
    with pytest.raises(InfrastructureError):  # and at every later step, whatever reports next
        guard.on_step_begin(1, [])


PROBE = """
import sys
from pathlib import Path
from tune_jobs.infra import storage_problem
folder, storage = Path(sys.argv[1]), Path(sys.argv[2])
print(storage_problem(RuntimeError("[enforce fail at inline_container.cc] open file failed"), folder, storage))
print(storage_problem(PermissionError(13, "Permission denied", "/elsewhere/data.bin"), storage, storage))
"""


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("capsh"), reason="root without capsh ignores permissions")
def test_a_storage_folder_that_refuses_writes_is_told_from_a_trials_own_error(tmp_path):
    folder = tmp_path / "storage" / "s" / "trial"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    command = [sys.executable, "-c", PROBE, str(folder), str(tmp_path / "storage")]
    if os.geteuid() == 0:
        command = ["capsh", "--drop=cap_dac_override", "--", "-c", 'exec "$0" "$@"', *command]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)
    assert out.returncode == 0, out.stderr
    refused, elsewhere = out.stdout.splitlines()
    assert refused == f"{folder}: Permission denied (EACCES)"  # torch's error carries no OS error: the probe tells
    assert elsewhere == "None"  # an unreadable file outside the storage is the trial's own failure
    assert not list(folder.iterdir())


def test_an_os_error_inside_the_storage_names_its_path(tmp_path):
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "s" / "t" / "last.pt"))
    told = infra.storage_problem(error, tmp_path, tmp_path)
    assert told == f"{tmp_path}/s/t/last.pt: No space left on device (ENOSPC)"


# --- the outbox: a make function stands for the tracking store ----------------------------------------------


class Store:
    """Makes writes like a tracking store; ``down`` calls fail as a server that does not answer."""

    def __init__(self, down: int = 0, error=ConnectionError("connection refused")):
        self.made, self.down, self.error = [], down, error

    def make(self, write: dict) -> None:
        if self.down:
            self.down -= 1
            raise self.error
        self.made.append(write)


def outbox_for(path: Path, store: Store, deadline_s: float = 60.0, out=None) -> Outbox:
    return Outbox(path, store.make, lambda e: isinstance(e, ConnectionError), "http://tracking", deadline_s,
                  out=out or io.StringIO())


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(outbox, "RETRY_S", (0.01,))


def test_writes_are_made_in_order_once_and_the_journal_is_emptied(tmp_path, quick_retries):
    store, path = Store(), tmp_path / "journal.jsonl"
    box = outbox_for(path, store)
    writes = [{"op": "epoch", "step": i} for i in range(5)]
    for write in writes:
        box.put(write)
    box.drain()
    assert store.made == writes
    assert path.read_text() == ""


def test_a_closed_outbox_leaves_no_writer_thread_and_no_open_journal(tmp_path, quick_retries):
    # a process running sweeps one after another (the demo: sweep then confirm, a notebook) kept an idle writer
    # thread and an open journal per sweep
    store = Store(down=1)  # the writer is busy waiting when the first close comes: that close leaves it working
    box = outbox_for(tmp_path / "journal.jsonl", store)
    box.put({"step": 0})
    box.close()
    box.drain()
    box.close()
    assert store.made == [{"step": 0}] and box._file is None
    assert not box._thread.is_alive()


def test_an_outage_is_waited_out_while_the_hooks_return_at_once(tmp_path, quick_retries):
    store, out = Store(down=20), io.StringIO()
    box = outbox_for(tmp_path / "journal.jsonl", store, out=out)
    started = time.monotonic()
    for i in range(3):
        box.put({"step": i})
    assert time.monotonic() - started < 0.5 and box.pending == 3
    box.drain()
    assert store.made == [{"step": 0}, {"step": 1}, {"step": 2}]
    said = out.getvalue().splitlines()
    assert len(said) == 2 and "unreachable" in said[0] and "is back" in said[1]
    assert infra.problem() is None


def test_writes_a_killed_driver_kept_are_made_by_the_next_one_in_order(tmp_path, quick_retries):
    path = tmp_path / "journal.jsonl"
    dead = outbox_for(path, Store(down=10**9), deadline_s=3600)  # its store never answers
    for i in range(3):
        dead.put({"step": i})
    dead.sync()  # what get_state does before each experiment snapshot
    store, out = Store(), io.StringIO()
    box = outbox_for(path, store, out=out)
    assert "making 3 MLflow writes kept by an earlier driver" in out.getvalue()
    box.put({"step": 3})
    box.drain()
    assert store.made == [{"step": i} for i in range(4)]


def test_an_outage_past_the_deadline_stops_the_sweep_and_keeps_the_writes(tmp_path, quick_retries):
    path = tmp_path / "journal.jsonl"
    box = outbox_for(path, Store(down=10**9), deadline_s=0.2)
    box.put({"step": 1})
    box.put({"step": 2})
    box.drain()  # returns once the outbox gives up
    assert "tracking store http://tracking unreachable for" in infra.problem()
    assert f"2 MLflow writes kept in {path}" in infra.problem()
    assert len(path.read_text().splitlines()) == 2


def test_a_store_that_refuses_a_write_stops_the_sweep_at_once(tmp_path, quick_retries):
    box = outbox_for(tmp_path / "journal.jsonl", Store(down=1, error=ValueError("attempt to write a readonly db")))
    box.put({"step": 1})
    box.drain()
    assert infra.problem().startswith("tracking store http://tracking failed: ValueError: attempt to write")


def test_a_server_that_does_not_answer_is_told_from_one_that_refuses(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tune_jobs.tracking import unreachable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(Exception) as down:
        MlflowClient(f"http://127.0.0.1:{port}").get_experiment_by_name("x")
    assert unreachable(down.value)
    with pytest.raises(Exception) as refused:
        MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run("0" * 32)
    assert not unreachable(refused.value)


def test_the_logger_keeps_writes_for_a_server_that_is_down_and_the_next_driver_makes_them_once(tmp_path, monkeypatch):
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import TRIAL, tag_filter
    from tune_jobs.mlflow_callback import MlflowCallback, journal_path
    from tune_jobs.spec import load_spec
    from tune_jobs.tracking import prepare_tracking
    from tune_jobs.trainable import SweepContext

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(outbox, "RETRY_S", (0.05,))
    demo = load_spec(Path(__file__).parent.parent / "tune_jobs" / "specs" / "demo.toml", storage=str(tmp_path / "r"))
    down = replace(demo, tracking_uri="http://127.0.0.1:9", tracking_outage_minutes=0.01)  # discard port: refused
    trial = SimpleNamespace(trial_id="t1", config={"study": demo.studies[0].name}, num_failures=0)
    logger = MlflowCallback(SweepContext(down), None)
    started = time.monotonic()
    logger.on_trial_start(0, [], trial)
    for epoch in (1, 2):
        logger.on_trial_result(0, [], trial, {"epoch": epoch, "val_top1": 10.0 * epoch})
    assert logger.get_state() is None and time.monotonic() - started < 1.0  # the hooks never wait for the server
    logger.on_experiment_end([])  # the deadline passes: the sweep would stop here
    assert "unreachable" in infra.problem()
    infra.clear()

    up = replace(demo, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    experiment, parents = prepare_tracking(up)
    resumed = MlflowCallback(SweepContext(up), lambda: (experiment, parents))
    resumed.setup()
    resumed.on_trial_result(0, [], trial, {"epoch": 2, "val_top1": 20.0})  # re-run after the driver died
    resumed.on_trial_result(0, [], trial, {"epoch": 3, "val_top1": 30.0})
    resumed.on_experiment_end([])
    client = MlflowClient(up.tracking_uri)
    [run] = client.search_runs([experiment], tag_filter(TRIAL, "t1"))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [1, 2, 3]
    assert journal_path(up).read_text() == ""


def test_a_line_cut_short_by_a_kill_is_cut_off_and_the_next_write_starts_on_its_own_line(tmp_path, quick_retries):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"ste')  # the driver died in the middle of its last append
    store = Store()
    box = outbox_for(path, store)
    box.put({"step": 2})
    box.drain()
    assert store.made == [{"step": 0}, {"step": 1}, {"step": 2}]


def test_a_write_whose_run_is_gone_is_skipped_not_a_sweep_that_can_never_resume(tmp_path, capsys):
    from dataclasses import replace

    from tune_jobs.mlflow_callback import MlflowCallback, journal_path
    from tune_jobs.spec import load_spec
    from tune_jobs.tracking import prepare_tracking
    from tune_jobs.trainable import SweepContext

    spec = load_spec(Path(__file__).parent.parent / "tune_jobs" / "specs" / "demo.toml", storage=str(tmp_path / "r"),
                     tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    ids = prepare_tracking(spec)
    journal_path(spec).parent.mkdir(parents=True)
    journal_path(spec).write_text('{"op": "epoch", "trial": "ghost", "step": 1, "metrics": {}, "tags": {}}\n')
    logger = MlflowCallback(SweepContext(replace(spec)), lambda: ids)
    logger.setup()
    logger.on_experiment_end([])
    assert infra.problem() is None and journal_path(spec).read_text() == ""
    assert "skipping a kept MLflow write for trial ghost (epoch)" in capsys.readouterr().err


def test_a_stopped_run_does_not_wait_out_an_outage_at_its_end(tmp_path, monkeypatch):
    from dataclasses import replace

    from tune_jobs.mlflow_callback import MlflowCallback, journal_path
    from tune_jobs.spec import load_spec
    from tune_jobs.trainable import SweepContext

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spec = replace(load_spec(Path(__file__).parent.parent / "tune_jobs" / "specs" / "demo.toml",
                             storage=str(tmp_path / "r")), tracking_uri="http://127.0.0.1:9",
                   tracking_outage_minutes=0.02)  # its writer gives up soon after the test, not in 30 min
    logger = MlflowCallback(SweepContext(spec), None)
    trial = SimpleNamespace(trial_id="t1", config={"study": spec.studies[0].name}, num_failures=0, status="RUNNING",
                            last_result={"epoch": 1})
    logger.on_trial_result(0, [], trial, {"epoch": 1, "val_top1": 10.0})
    started = time.monotonic()
    logger.on_experiment_end([trial])  # Ctrl-C or a storage failure: the trial is not finished
    kept = [json.loads(line) for line in journal_path(spec).read_text().splitlines()]
    assert time.monotonic() - started < 2 and [w["op"] for w in kept] == ["open", "epoch", "stop"]
    deadline = time.monotonic() + 30
    while infra.problem() is None and time.monotonic() < deadline:  # no writer left retrying in later tests
        time.sleep(0.1)
    assert "unreachable" in (infra.problem() or "")
    infra.clear()


def test_a_driver_whose_lease_was_taken_over_is_told_to_stop(tmp_path, monkeypatch):
    import json

    from tune_jobs import lease

    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    told = []
    with lease.sweep_lease(str(tmp_path), "s", on_error=told.append):
        path = lease.lease_path(str(tmp_path), "s")
        path.write_text(json.dumps({"host": "node-7", "pid": 1, "started": time.time(), "heartbeat": time.time(),
                                    "token": "theirs"}))
        deadline = time.monotonic() + 10
        while not told and time.monotonic() < deadline:
            time.sleep(0.05)
    assert told and "taken over by another driver (pid 1 on node-7" in told[0]
    assert json.loads(path.read_text())["token"] == "theirs"  # the new holder's lease is left alone


def test_the_drivers_own_failed_upload_to_the_storage_is_a_storage_failure_not_a_traceback(caplog):
    import logging

    from tune_jobs.guard import SYNC_LOGGERS, SweepGuard

    SweepGuard().setup()
    logger = logging.getLogger(SYNC_LOGGERS[0])
    try:
        raise PermissionError(13, "Failed to open local file '/s/t/experiment_state.json'")
    except PermissionError:
        logger.warning("Last sync command failed with the following error:\nTraceback ...")
    try:
        raise ValueError("something else")
    except ValueError:
        logger.warning("Last sync command failed with the following error:\nTraceback ... ValueError")
    assert "Failed to open local file '/s/t/experiment_state.json' (EACCES)" in infra.problem()
    assert [r.getMessage().splitlines()[-1] for r in caplog.records] == ["Traceback ... ValueError"]


def test_an_error_that_quotes_a_url_is_shortened_without_its_password():
    error = ConnectionError("API request to http://admin:s3cret@127.0.0.1:9/api/2.0/mlflow/runs/get failed with "
                            "timeout exception HTTPConnectionPool(host='127.0.0.1', port=9): Read timed out.")
    text = infra.short_error(error)
    assert "s3cret" not in text and "http://admin:***@127.0.0.1:9/api" in text


def test_confirm_makes_a_killed_sweeps_kept_writes_and_leaves_no_run_running(tmp_path):
    # a sweep killed mid-trial, then confirm instead of resume: the kept "open" write set the trial's run RUNNING
    # again after the leftover runs were stopped, and status showed it running with no driver
    from mlflow.tracking import MlflowClient

    from tune_jobs.confirm import tracking_after_kept_writes
    from tune_jobs.layout import TRIAL, TRIAL_ROLE, tag_filter
    from tune_jobs.mlflow_callback import journal_path
    from tune_jobs.spec import load_spec

    spec = load_spec(Path(__file__).parent.parent / "tune_jobs" / "specs" / "demo.toml", storage=str(tmp_path / "r"),
                     tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    journal_path(spec).parent.mkdir(parents=True)
    open_write = {"op": "open", "trial": "t1", "study": spec.studies[0].name, "tags": {}, "params": {"lr": "0.1"},
                  "role": TRIAL_ROLE}
    journal_path(spec).write_text(json.dumps(open_write) + "\n")
    experiment, _ = tracking_after_kept_writes(spec)
    [run] = MlflowClient(spec.tracking_uri).search_runs([experiment], tag_filter(TRIAL, "t1"))
    assert run.info.status == "KILLED" and journal_path(spec).read_text() == ""


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_trials_checkpoint_that_is_gone_or_holds_no_last_pt_starts_it_over_as_a_damaged_one_does(tmp_path, request,
                                                                                                   where):
    # Tune deletes a trial's older checkpoint as it registers the next; a driver killed before its next snapshot
    # resumed the trial from the deleted one: FileNotFoundError, the trial failed on every retry and every resume
    from ray import tune

    from attzoom.config import CheckpointError
    from tune_jobs.trainable import restore

    if where == "s3":
        request.getfixturevalue("s3")
    gone = tune.Checkpoint(str(tmp_path / "ckpt_000003") if where == "folder" else "s3://sweeps/t/x/ckpt_000003")
    with pytest.raises(CheckpointError, match="cannot resume from .*ckpt.*: it is gone"):
        restore(gone, tmp_path / "work")
    kept = tmp_path / "checkpoint_000004"
    kept.mkdir()
    (kept / "best.pt").write_bytes(b"b")
    # an ended trial's checkpoint, its last.pt removed (reclaim.py), restored after all (an older snapshot published
    # last): fit started it at epoch 1 silently, its run then held two trainings
    with pytest.raises(CheckpointError, match="cannot resume from .*checkpoint_000004: it holds no last.pt"):
        restore(tune.Checkpoint(str(kept)), tmp_path / "work")
    (kept / "last.pt").write_bytes(b"x")
    restore(tune.Checkpoint(str(kept)), tmp_path / "work")
    assert (tmp_path / "work" / "last.pt").read_bytes() == b"x"


def test_on_cloud_storage_the_snapshot_carries_the_unmade_writes_to_a_driver_on_another_host(tmp_path, monkeypatch):
    # the journal of a cloud sweep stays on its driver's host: a job retried on another host restored a snapshot
    # whose epochs were never logged, and whose finished trials' runs stayed KILLED for good
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import TRIAL, tag_filter
    from tune_jobs.mlflow_callback import MlflowCallback, journal_path
    from tune_jobs.spec import load_spec
    from tune_jobs.tracking import prepare_tracking
    from tune_jobs.trainable import SweepContext

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("HOME", str(tmp_path / "first-host"))
    monkeypatch.setattr(outbox, "RETRY_S", (0.05,))
    demo = load_spec(Path(__file__).parent.parent / "tune_jobs" / "specs" / "demo.toml", storage="s3://sweeps/r")
    down = replace(demo, tracking_uri="http://127.0.0.1:9", tracking_outage_minutes=0.01)
    trial = SimpleNamespace(trial_id="t1", config={"study": demo.studies[0].name}, num_failures=0)
    logger = MlflowCallback(SweepContext(down), None)
    logger.on_trial_start(0, [], trial)
    for epoch in (1, 2):
        logger.on_trial_result(0, [], trial, {"epoch": epoch, "val_top1": 10.0 * epoch})
    state = logger.get_state()  # what Tune pickles into the snapshot it uploads to the bucket
    logger.on_experiment_end([])
    infra.clear()

    monkeypatch.setenv("HOME", str(tmp_path / "second-host"))
    up = replace(demo, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    journal_path(up).parent.mkdir(parents=True)  # an older driver's journal here: the newer snapshot's writes win
    journal_path(up).write_text('{"op": "epoch", "trial": "stale", "step": 1, "metrics": {}, "tags": {}}\n')
    experiment, parents = prepare_tracking(up)
    resumed = MlflowCallback(SweepContext(up), lambda: (experiment, parents))
    resumed.set_state(state)  # Tune restores the callbacks' state before their setup
    resumed.setup()
    resumed.on_experiment_end([])
    client = MlflowClient(up.tracking_uri)
    [run] = client.search_runs([experiment], tag_filter(TRIAL, "t1"))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [1, 2]
    assert journal_path(up).read_text() == "" and infra.problem() is None
    assert MlflowCallback(SweepContext(up), None).get_state() == {"unmade": []}
    assert MlflowCallback(SweepContext(replace(up, storage=str(tmp_path / "r"))), None).get_state() is None


def test_a_restored_logger_goes_on_with_the_resuming_drivers_spec(tmp_path, monkeypatch):
    # `resume --data-root` moved the data, but Tune restored the logger pickled with the first driver's spec: it set
    # the experiment's spec tag back to the old root, and the trials opened since got the old root as their param
    import pickle
    from dataclasses import replace

    from tune_jobs import mlflow_callback
    from tune_jobs.mlflow_callback import MlflowCallback, adopt
    from tune_jobs.spec import load_spec
    from tune_jobs.trainable import SweepContext

    monkeypatch.setattr(mlflow_callback, "_driver", {})
    demo = load_spec(Path(__file__).parent.parent / "tune_jobs" / "specs" / "demo.toml", storage=str(tmp_path / "r"))
    pickled = pickle.dumps(MlflowCallback(SweepContext(replace(demo, data_root="/old/data")), None))
    assert pickle.loads(pickled).sweep.spec.data_root == "/old/data"  # no resuming driver here: as pickled
    adopt(SweepContext(replace(demo, data_root="/new/data")))
    assert pickle.loads(pickled).sweep.spec.data_root == "/new/data"
    adopt(SweepContext(replace(demo, name="other", data_root="/other")))  # another sweep's driver: not adopted
    assert pickle.loads(pickled).sweep.spec.data_root == "/old/data"


def test_a_ray_connection_failure_is_not_told_as_a_tracking_store_outage():
    # `--address` of something that is not Ray: "stopped: tracking store sqlite:///... unreachable (ConnectionError:
    # Failed to connect to Ray cluster at ...)", exit 3, for a cluster that was never joined
    from tune_jobs.spec import SpecError

    with pytest.raises(SpecError, match="cannot join"):  # join_cluster's one line, raised from Ray's ConnectionError
        with stops_on_problems("attzoom resume s --address 10.0.0.5:6379", "sqlite:///m.db"):
            try:
                raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")
            except ConnectionError:
                raise SpecError("cannot join the Ray cluster at --address 10.0.0.5:6379") from None
    with pytest.raises(InfrastructureError) as lost:  # a cluster lost mid-sweep is the cluster's, not the store's
        with stops_on_problems("attzoom resume s --address 10.0.0.5:6379", "sqlite:///m.db"):
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")
    assert str(lost.value).startswith("the Ray cluster does not answer (ConnectionError: Failed to connect to Ray")
    assert "tracking store" not in str(lost.value) and "--address 10.0.0.5:6379" in str(lost.value)


def test_a_trials_arguments_travel_in_its_trainable_not_in_rays_object_store():
    # tune.with_parameters put them into Ray's object store, owned by the driver: a SIGTERM sent to every process
    # ended the raylet, the driver tried to recover that object, and Ray's C++ ended it (exit 1) before it could say
    # how to go on (the killed-twice e2e test, about one run in three)
    from ray import cloudpickle
    from ray.tune import Experiment

    from tune_jobs.spec import load_spec
    from tune_jobs.trainable import SweepContext, trial_trainable

    demo = load_spec(Path(__file__).parent.parent / "tune_jobs" / "specs" / "demo.toml")
    params = {"best": "config-of-study-x"}
    trainable = trial_trainable(_arguments_seen, SweepContext(demo), params=params)
    assert Experiment.get_trainable_name(trainable) == "_arguments_seen"  # a restore finds the name it saved
    assert trainable._resources.required_resources == {"CPU": demo.cpus}  # the spec's resources per trial
    pickled = cloudpickle.dumps(trainable)  # what Tune stores in Ray's key-value store for the trials' processes
    assert b"config-of-study-x" in pickled and demo.data_root.encode() in pickled  # not a reference to an object
    assert cloudpickle.loads(pickled)({"a": 1}) == ({"a": 1}, demo, params)


def _arguments_seen(config, sweep, params):
    return config, sweep.spec, params


@pytest.mark.slow
def test_a_sigterm_to_the_drivers_process_group_stops_it_as_one_to_the_driver_does(tmp_path, few_digits_root):
    # `timeout`, `kill -TERM -PGID`: the private Ray's processes got the SIGTERM too, and the driver waited 60 s for
    # them, then died in Ray's C++ (exit 1, no resume command), leaving trial processes running
    import signal

    import psutil

    from test_sweep_e2e import start, wait_for, write_spec
    from tune_jobs.cli import attzoom_executable

    spec = write_spec(tmp_path / "spec.toml", few_digits_root, trials=2, epochs=30, variants=("baseline",))
    sweep = start("sweep", str(spec), cwd=tmp_path, stderr=subprocess.PIPE)  # its own session and process group
    def a_trial_runs() -> bool:
        for child in psutil.Process(sweep.pid).children(recursive=True):
            try:
                if "ImplicitFunc" in " ".join(child.cmdline()):
                    return True
            except psutil.Error:  # Ray starts and reaps workers all the time
                pass
        return False

    wait_for(a_trial_runs, timeout=300, every=0.5)
    os.killpg(sweep.pid, signal.SIGTERM)
    out, err = sweep.communicate(timeout=180)  # it took 60 s and more, and then exit 1
    assert sweep.returncode == 130, err[-3000:]
    resume = f"{attzoom_executable()} resume t --storage {tmp_path / 'ray_results'}"
    assert re.fullmatch(rf"interrupted: [01] of 2 trials ended; continue with: {re.escape(resume)}",
                        err.rstrip().splitlines()[-1]), err[-3000:]
    assert "Failed to connect to GCS" not in err

    def left_in_its_session() -> list:
        left = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == sweep.pid and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except (OSError, psutil.Error):
                pass
        return left

    # a trial's worker ends on its parent-death signal once its raylet is gone: within seconds, later on a busy machine
    try:
        wait_for(lambda: not left_in_its_session(), timeout=60, every=0.5)
    except AssertionError:
        pass
    assert not (left := left_in_its_session()), [p.cmdline() for p in left]
