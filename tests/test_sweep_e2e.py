"""End to end: real Ray, a real MLflow SQLite store, real Optuna, the real CLI in its own process.

Slow by nature (each test starts Ray and trains small models); marked ``slow`` and run in CI.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tune_jobs.layout import (ERROR, FIT_STATUSES, GPU_IDS, STATUS, STUDY, TRIAL, TRIAL_ROLE, experiment_name,
                              runs_filter)
from tune_jobs.tracking import open_store

pytestmark = pytest.mark.slow


def write_spec(path: Path, data_root: Path, *, name="t", trials=2, epochs=2, datasets=("cluttered-digits",),
               variants=("baseline", "attzoom"), max_concurrent=2, cpus=1, gpus=0, local_gpus=None,
               max_retries=1) -> Path:
    local = f"local_gpus = {local_gpus}\n" if local_gpus is not None else ""
    path.write_text(f"""
name = "{name}"
trials = {trials}
epochs = {epochs}
patience = 5
data_root = "{data_root}"
storage = "{path.parent / 'ray_results'}"
tracking_uri = "sqlite:///{path.parent / 'mlflow.db'}"
max_concurrent = {max_concurrent}
[matrix]
backbones = ["tiny_resnet"]
datasets = {list(datasets)!r}
variants = {list(variants)!r}
[resources]
cpus = {cpus}
gpus = {gpus}
{local}
[train]
augment = false
[search]
batch_sizes = [128]
lr = [1e-3, 1e-2]
[failure]
max_retries = {max_retries}
""".replace("'", '"'))
    return path


def start(*args, cwd) -> subprocess.Popen:
    """The CLI in a session of its own, so a 'crash' can take the driver and its local Ray down together."""
    return subprocess.Popen([sys.executable, "-m", "tune_jobs.cli", *args], cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def crash(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process of its session (its Ray instance and trial workers)."""
    victims = [p for p in psutil.process_iter() if _session(p.pid) == proc.pid]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(victims, timeout=30)


def _session(pid: int):
    try:
        return os.getsid(pid)
    except OSError:
        return None


def finish(proc: subprocess.Popen, timeout=900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def trial_runs(spec_dir: Path, sweep="t"):
    client = open_store(f"sqlite:///{spec_dir / 'mlflow.db'}")  # polls while the sweep may create the store
    experiment = client.get_experiment_by_name(experiment_name(sweep))
    if experiment is None:
        return client, []
    return client, client.search_runs([experiment.experiment_id], runs_filter(TRIAL_ROLE))


def wait_for(condition, timeout=600, every=1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def statuses(spec_dir):
    try:
        _, runs = trial_runs(spec_dir)
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return []
    return [r.info.status for r in runs]


def assert_exactly_once(spec_dir: Path, trials_per_study: int, epochs: int, studies: int) -> None:
    client, runs = trial_runs(spec_dir)
    tune_trials = {d.name.rsplit("-", 1)[1] for d in (spec_dir / "ray_results" / "t").iterdir() if d.is_dir()}
    trial_ids = [r.data.tags[TRIAL] for r in runs]
    assert len(trial_ids) == len(set(trial_ids)), "a trial has two MLflow runs"
    assert set(trial_ids) == tune_trials, "MLflow runs and Tune trials differ"
    per_study = {}
    for run in runs:
        per_study.setdefault(run.data.tags[STUDY], []).append(run)
        assert run.info.status == "FINISHED"
        # how fit ended is what the trial itself reported last (trainable.py), not guessed from the epochs
        [folder] = (spec_dir / "ray_results" / "t").glob(f"*-{run.data.tags[TRIAL]}")
        last = json.loads((folder / "result.json").read_text().splitlines()[-1])
        assert run.data.tags[STATUS] == last["fit_status"] and last["fit_status"] in FIT_STATUSES
        for key in ("val_top1", "train_loss", "images_per_s"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(1, epochs + 1)), f"{key} steps {steps}"
    assert len(per_study) == studies
    assert all(len(r) == trials_per_study for r in per_study.values())


def test_killed_twice_and_resumed_runs_each_trial_once_and_logs_each_epoch_once(tmp_path, digits_root):
    spec = write_spec(tmp_path / "spec.toml", digits_root, trials=3, epochs=3)
    first = start("sweep", str(spec), cwd=tmp_path)
    wait_for(lambda: "FINISHED" in statuses(tmp_path) and "RUNNING" in statuses(tmp_path))
    crash(first)

    resumed = start("resume", "t", "--storage", str(tmp_path / "ray_results"), cwd=tmp_path)
    done_before = statuses(tmp_path).count("FINISHED")
    wait_for(lambda: statuses(tmp_path).count("FINISHED") > done_before and "RUNNING" in statuses(tmp_path))
    crash(resumed)

    last = start("resume", str(tmp_path / "ray_results" / "t"), cwd=tmp_path)
    time.sleep(5)  # a second driver on the same sweep (a retried job, a second terminal) is turned away
    second = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "resume", "t", "--storage",
                             str(tmp_path / "ray_results")], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert second.returncode == 2 and second.stdout == "", second.stdout + second.stderr
    assert second.stderr.count("\n") == 1 and f"pid {last.pid}" in second.stderr, second.stderr
    out = finish(last)
    assert "| tiny_resnet.cluttered-digits.attzoom | 3 | 0 | 0 |" in out
    assert_exactly_once(tmp_path, trials_per_study=3, epochs=3, studies=2)
    assert not (tmp_path / "ray_results" / "t.lease").exists()
    # the killed tries' working files lived in their trial folders, and the tries that ended removed them
    trials = [d.name.rsplit("-", 1)[1] for d in (tmp_path / "ray_results" / "t").iterdir() if d.is_dir()]
    assert not [p for t in trials for p in Path(tempfile.gettempdir()).glob(f"attzoom-{t}-*")]
    assert not list((tmp_path / "ray_results" / "t").glob("*/work"))


def test_a_failing_trial_is_retried_marked_failed_and_the_sweep_goes_on(tmp_path, digits_root):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits_root, data)
    (data / "cifar-100-python").mkdir()
    for part in ("train", "test", "meta"):
        (data / "cifar-100-python" / part).write_bytes(b"\x80\x04\x95 truncated")  # present but malformed
    spec = write_spec(tmp_path / "spec.toml", data, trials=1, epochs=1, datasets=("cifar100", "cluttered-digits"),
                      variants=("baseline",), max_retries=2)
    out = finish(start("sweep", str(spec), cwd=tmp_path))
    client, runs = trial_runs(tmp_path)
    by_dataset = {r.data.tags["dataset"]: r for r in runs}
    failed, ok = by_dataset["cifar100"], by_dataset["cluttered-digits"]
    assert failed.info.status == "FAILED" and "CIFAR-100 file" in failed.data.tags[ERROR]
    assert len(client.get_metric_history(failed.info.run_id, "failures")) == 3  # first try + 2 retries
    assert ok.info.status == "FINISHED" and ok.data.metrics["val_top1"] >= 0
    assert "| tiny_resnet.cifar100.baseline | 0 | 1 | 0 |" in out


def test_four_quarter_gpu_trials_share_one_logical_gpu(tmp_path, digits_root):
    # long enough (6 epochs) that the last trial starts before the first ends on a busy 2-core machine
    spec = write_spec(tmp_path / "spec.toml", digits_root, trials=4, epochs=6, variants=("baseline",),
                      max_concurrent=4, cpus=0.5, gpus=0.25, local_gpus=1)
    finish(start("sweep", str(spec), cwd=tmp_path))
    _, runs = trial_runs(tmp_path)
    assert len(runs) == 4
    assert {r.data.tags[GPU_IDS] for r in runs} == {"0"}
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs), "the four did not overlap"


def test_studies_share_the_global_cap_and_fill_it_until_the_end(tmp_path, digits_root):
    spec = write_spec(tmp_path / "spec.toml", digits_root, trials=3, epochs=1, max_concurrent=2)
    finish(start("sweep", str(spec), cwd=tmp_path))
    _, runs = trial_runs(tmp_path)
    runs = sorted(runs, key=lambda r: r.info.start_time)
    assert len(runs) == 6
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    running, peak = 0, 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak == 2  # the cap holds across studies ...
    studies = [r.data.tags[STUDY] for r in runs]
    assert studies[:2] != [studies[0]] * 2  # ... both studies start at once, fewest trials first
    last_start = runs[-1].info.start_time
    assert any(r.info.start_time < last_start < r.info.end_time for r in runs[:-1]), "cluster idled at the end"


# Ports every Ray node binds whatever ports it is given: GCS, dashboard, client, the dashboard's metrics server and
# the dashboard agent. A test port that lands on one of them (44227 is inside the kernel's ephemeral range) loses it
# to Ray, and the dashboard's HTTP server then fails to start.
RAY_FIXED_PORTS = {6379, 8265, 10001, 44227, 52365}


def free_port() -> int:
    """A free loopback port that none of Ray's fixed default ports can take."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_FIXED_PORTS:
            return port


def test_submit_to_a_real_head_with_token_auth(tmp_path, digits_root):
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    # the cluster's nodes run this project's environment, as a cluster image would
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "PATH": path}
    env.pop("RAY_AUTH_TOKEN", None)
    gcs, dashboard = free_port(), free_port()
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                             "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        wait_for(lambda: _jobs_api_answers(address, token.read_text()), timeout=120)
        spec = write_spec(Path(__file__).parent.parent / "tune_jobs" / "specs" / f".test-{tmp_path.name}.toml",
                          digits_root, trials=1, epochs=1, variants=("baseline",))
        try:
            submitted = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "submit", str(spec), "--address",
                                        address, "--storage", str(tmp_path / "ray_results"), "--tracking-uri",
                                        f"sqlite:///{tmp_path / 'mlflow.db'}"],
                                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        finally:
            spec.unlink()
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        assert token.read_text() not in submitted.stdout + submitted.stderr  # the token is never printed
        logs = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "logs", job_id, "--address", address],
                              env=env, capture_output=True, text=True, timeout=600)
        assert "SUCCEEDED" in logs.stderr, logs.stdout[-3000:] + logs.stderr[-3000:]
        _, runs = trial_runs(tmp_path)
        assert [r.info.status for r in runs] == ["FINISHED"]
        refused = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "status", "--job", job_id, "--address",
                                  address], env={**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")},
                                 capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert refused.returncode == 2 and "needs its token" in refused.stderr
    finally:
        crash(head)


def _jobs_api_answers(address: str, token: str) -> bool:
    """The dashboard's HTTP server is up (not merely something listening on its port)."""
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status == 200
    except OSError:
        return False
