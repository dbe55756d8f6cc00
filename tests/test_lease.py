"""One driver per sweep (tune_jobs/lease.py): real processes holding, dying and handing over a sweep's lease."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tune_jobs.lease import STALE_S, lease_path, sweep_lease
from tune_jobs.spec import SpecError

ROOT = Path(__file__).resolve().parent.parent
HOLD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as at a terminal, even when run as a background job
from tune_jobs.lease import sweep_lease
with sweep_lease(sys.argv[1], "s", tracking_uri=sys.argv[2] if len(sys.argv) > 2 else None):
    print("HOLDING", flush=True)
    time.sleep(600)
"""


@pytest.fixture(autouse=True)
def short_silence(monkeypatch):
    """A dead holder on another host is taken over after a short look, not the real two heartbeats."""
    from tune_jobs import lease

    monkeypatch.setattr(lease, "SILENT_S", 0.3)


def holder(storage, tracking_uri: str | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(storage), *filter(None, [tracking_uri])], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HOLDING"
    return proc


def test_a_second_driver_is_refused_with_one_line_naming_the_holder(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(SpecError) as refused, sweep_lease(str(tmp_path), "s"):
            pass
        message = str(refused.value)
        assert "\n" not in message and f"pid {proc.pid} on {socket.gethostname()}" in message
        assert json.loads(lease_path(str(tmp_path), "s").read_text())["pid"] == proc.pid  # left as it was
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_drivers_lease_is_taken_over_at_once_and_released_at_the_end(tmp_path):
    proc = holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    said = io.StringIO()
    with sweep_lease(str(tmp_path), "s", out=said):
        assert json.loads(lease_path(str(tmp_path), "s").read_text())["pid"] == os.getpid()
    line = said.getvalue()
    assert line.count("\n") == 1 and f"pid {proc.pid}" in line and "taking over" in line
    assert not lease_path(str(tmp_path), "s").exists()


def test_ctrl_c_releases_the_lease(tmp_path):
    proc = holder(tmp_path)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # say how the holder took the signal (SigIgn bit 1: SIGINT ignored)
        status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        proc.kill()
        raise AssertionError("the holder outlived Ctrl-C: " + "; ".join(
            line for line in status if line.startswith(("State", "Sig", "Shd", "Threads"))))
    assert not lease_path(str(tmp_path), "s").exists()


@pytest.mark.parametrize("age, taken", [(1.0, False), (STALE_S + 5, True)])
def test_a_holder_on_another_host_counts_until_its_heartbeat_is_stale(tmp_path, age, taken):
    path = lease_path(str(tmp_path), "s")
    now = time.time()
    path.write_text(json.dumps({"host": "node-7", "pid": 1, "started": now - 3600, "heartbeat": now - age,
                                "token": "theirs"}))
    if taken:
        with sweep_lease(str(tmp_path), "s", out=io.StringIO()):
            assert json.loads(path.read_text())["host"] == socket.gethostname()
    else:
        with pytest.raises(SpecError, match="pid 1 on node-7"), sweep_lease(str(tmp_path), "s"):
            pass
        assert json.loads(path.read_text())["token"] == "theirs"


def test_a_holder_elsewhere_that_beats_again_once_the_store_answers_is_not_taken_over(tmp_path, monkeypatch):
    # a sweep on cloud storage waits out a tracking-server outage, but its heartbeats in the store fail meanwhile:
    # a second driver that first read the store as it came back took the live sweep over, and both ran it
    import threading

    from tune_jobs import lease

    monkeypatch.setattr(lease, "SILENT_S", 2.0)
    path = lease_path(str(tmp_path), "s")
    stale = {"host": "node-7", "pid": 1, "started": time.time() - 3600, "heartbeat": time.time() - STALE_S - 60,
             "token": "theirs"}
    path.write_text(json.dumps(stale))
    beat = threading.Timer(0.5, lambda: path.write_text(json.dumps({**stale, "heartbeat": time.time()})))
    beat.start()
    with pytest.raises(SpecError, match="pid 1 on node-7"), sweep_lease(str(tmp_path), "s"):
        pass
    beat.join()
    assert json.loads(path.read_text())["token"] == "theirs"


def test_an_empty_lease_left_by_a_driver_killed_while_creating_it_expires(tmp_path):
    path = lease_path(str(tmp_path), "s")
    path.write_text("")
    with pytest.raises(SpecError), sweep_lease(str(tmp_path), "s"):
        pass
    os.utime(path, (time.time() - STALE_S - 5,) * 2)
    with sweep_lease(str(tmp_path), "s", out=io.StringIO()):
        pass


def test_cloud_storage_keeps_its_lease_in_the_tracking_store(tmp_path):
    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import lease_experiment, sweep_of

    assert lease_path("s3://bucket/ray_results", "s") is None
    assert lease_path("file:///shared/ray_results", "s") == Path("/shared/ray_results/s.lease")
    storage, uri = "s3://bucket/ray_results", f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = holder(storage, uri)
    try:
        with pytest.raises(SpecError) as refused, sweep_lease(storage, "s", tracking_uri=uri):
            pass
        assert "\n" not in str(refused.value) and f"pid {proc.pid} on {socket.gethostname()}" in str(refused.value)
        experiments = MlflowClient(uri).search_experiments()
        assert [sweep_of(e.name) for e in experiments if e.name == lease_experiment("s")] == [None]  # not a sweep
    finally:
        proc.kill()
        proc.wait()
    said = io.StringIO()
    for _ in range(2):  # taken over from the killed holder, released, then free for the next driver at once
        with sweep_lease(storage, "s", out=said, tracking_uri=uri):
            assert MlflowClient(uri).get_experiment_by_name(lease_experiment("s")) is not None
    assert said.getvalue().count("taking over") == 1
    assert MlflowClient(uri).get_experiment_by_name(lease_experiment("s")) is None


def _stranger(token: str) -> dict:
    """A record held by this very process: alive for every check."""
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now, "token": token}


@pytest.mark.parametrize("kind", ["shared path", "cloud storage"])
def test_of_two_drivers_that_found_one_holder_dead_at_once_only_one_takes_over(tmp_path, kind):
    """B's write reaches a slow store only after A has written and read back its own record. The rule was: write,
    wait 0.2 s, read back; so both went on and ran the sweep. Now the driver that claimed the dead record writes."""
    from mlflow.tracking import MlflowClient

    from tune_jobs.lease import _acquire, lease_for

    storage = str(tmp_path) if kind == "shared path" else "s3://bucket/ray_results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, second = lease_for(storage, "s", uri), lease_for(storage, "s", uri)
    assert first.create({"host": "node-7", "pid": 1, "started": 0.0, "heartbeat": 0.0, "token": "dead"})
    outcomes, real_write = {}, second.write

    def slow_write(record):  # A runs its whole take-over while B's write is on its way
        if record["token"] == "B" and "A" not in outcomes:
            try:
                _acquire(first, "s", _stranger("A"), io.StringIO())
                outcomes["A"] = "took over"
            except SpecError as e:
                outcomes["A"] = str(e)
        return real_write(record)

    second.write = slow_write
    try:
        _acquire(second, "s", _stranger("B"), io.StringIO())
        outcomes["B"] = "took over"
    except SpecError as e:
        outcomes["B"] = str(e)
    assert list(outcomes.values()).count("took over") == 1, outcomes
    loser = next(v for v in outcomes.values() if v != "took over")
    assert "\n" not in loser and "taken over by another driver at this moment" in loser
    assert first.read()["token"] == "B"
    if kind == "shared path":  # no claim is left behind
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.lease"]
    else:
        assert [e.name for e in MlflowClient(uri).search_experiments() if "takeover" in e.name] == []


@pytest.mark.parametrize("taker_gone", ["killed on this host", "silent on another host"])
def test_a_take_over_claim_blocks_others_only_while_its_maker_lives(tmp_path, taker_gone):
    path = lease_path(str(tmp_path), "s")
    path.write_text(json.dumps({"host": "node-7", "pid": 1, "started": 0.0, "heartbeat": 0.0, "token": "dead"}))
    claim = path.with_name("s.lease~takeover~dead~0")  # a taker stopped between its claim and its write
    taker = subprocess.Popen(["sleep", "60"])
    now = time.time()
    record = {"host": socket.gethostname(), "pid": taker.pid, "started": now, "heartbeat": now, "token": "taker"}
    if taker_gone == "silent on another host":
        record = {**record, "host": "node-8", "pid": 2}
    claim.write_text(json.dumps(record))
    with pytest.raises(SpecError, match=f"at this moment \\(pid {record['pid']} on {record['host']}"), \
            sweep_lease(str(tmp_path), "s"):
        pass
    taker.kill()
    taker.wait()
    if taker_gone == "silent on another host":
        claim.write_text(json.dumps({**record, "heartbeat": now - STALE_S - 5}))
    said = io.StringIO()
    with sweep_lease(str(tmp_path), "s", out=said):
        assert json.loads(path.read_text())["host"] == socket.gethostname()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.lease"]  # both claims cleared once it was written
    assert "taking over" in said.getvalue()


@pytest.mark.parametrize("kind", ["shared path", "cloud storage"])
def test_a_driver_that_saw_the_dead_record_before_another_took_it_over_stops(tmp_path, kind):
    """A took over and cleared its claim between B's read of the dead record and B's claim: B's claim succeeds,
    but B must read the lease again and find A there, not write over it."""
    from tune_jobs.lease import _acquire, lease_for

    storage = str(tmp_path) if kind == "shared path" else "s3://bucket/ray_results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, second = lease_for(storage, "s", uri), lease_for(storage, "s", uri)
    assert first.create({"host": "node-7", "pid": 1, "started": 0.0, "heartbeat": 0.0, "token": "dead"})
    real_read, reads = second.read, []

    def read_then_a_takes_over():
        record = real_read()
        if not reads:
            _acquire(first, "s", _stranger("A"), io.StringIO())
        reads.append(record)
        return record

    second.read = read_then_a_takes_over
    with pytest.raises(SpecError, match="is being run by another driver"):
        _acquire(second, "s", _stranger("B"), io.StringIO())
    assert reads[0]["token"] == "dead" and first.read()["token"] == "A"


def test_a_lease_released_as_the_next_driver_looks_is_created_not_taken_over(tmp_path):
    from tune_jobs.lease import FileLease, _acquire

    path = lease_path(str(tmp_path), "s")
    path.write_text(json.dumps(_stranger("leaving")))
    lease, real_create = FileLease(path), FileLease.create

    def create_then_release(record):  # refused by the live holder, which then ends and removes its lease
        made = real_create(lease, record)
        path.unlink(missing_ok=True)
        lease.create = lambda r: real_create(lease, r)
        return made

    lease.create = create_then_release
    said = io.StringIO()
    _acquire(lease, "s", _stranger("next"), said)
    assert json.loads(path.read_text())["token"] == "next" and said.getvalue() == ""


def test_a_store_lease_released_while_a_taker_writes_is_lost_not_a_traceback(tmp_path):
    from tune_jobs.lease import lease_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder_side, taker_side = lease_for("s3://b/r", "s", uri), lease_for("s3://b/r", "s", uri)
    assert holder_side.create(_stranger("holder"))
    real_tag = taker_side.client.set_experiment_tag

    def released_first(*args):  # the holder ends (rename, delete) between the taker's lookup and its write
        holder_side.remove()
        return real_tag(*args)

    taker_side.client.set_experiment_tag = released_first
    assert taker_side.write(_stranger("taker")) is False
