"""A real multi-node Ray cluster on 127.0.0.1 (cluster/local.sh): a worker node dies mid-sweep.

Head (no CPUs: it runs the job driver only) + two one-CPU worker nodes, token auth on. A small
sweep is submitted with `attzoom submit`; once a trial has reported an epoch, the worker node
running it is SIGKILLed whole (raylet, agents, trial process). Tune retries the trial from its
last checkpoint on the surviving node; the sweep still ends with exactly N trials per study, one
MLflow run per trial, each epoch logged once, and the killed trial continued instead of restarting.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from test_sweep_e2e import assert_exactly_once, free_port, trial_runs, wait_for, write_spec
from tune_jobs.layout import TRIAL
from tune_jobs.sweep import trial_id_of
from tune_jobs.trainable import STATUS_KEY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SH = ROOT / "cluster" / "local.sh"
EPOCHS = 5  # a trial killed after epoch 1 to 3 has two or more left to train on the other node (a quarter of the
# digits: an epoch takes about 1.5 s on one CPU, so 2 epochs are the time to notice one and kill its node)


def free_port_block(size: int = 40) -> int:
    """A base port with ``size`` free ports above it, outside Ray's worker port range (10002-19999)."""
    for _ in range(200):
        base = random.randrange(20000, 32000, 10)
        if all(_free(p) for p in range(base, base + size)):
            return base
    raise AssertionError("no free block of ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def cluster_env(state: Path) -> dict:
    """Private ports and folders; Ray's temp root stays short (its socket paths must fit 107 bytes)."""
    env = {**os.environ, "ATTZOOM_CLUSTER_DIR": str(state), "ATTZOOM_RAY_PORT": str(free_port()),
           "ATTZOOM_RAY_TEMP": tempfile.mkdtemp(prefix="azr-"),
           "ATTZOOM_DASHBOARD_PORT": str(free_port()), "ATTZOOM_CLIENT_PORT": str(free_port()),
           "ATTZOOM_NODE_PORT_BASE": str(free_port_block()), "ATTZOOM_HEAD_CPUS": "0", "ATTZOOM_WORKER_CPUS": "1",
           # a dead node is noticed in about 3 s instead of 15 s
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    return env


def session_members(sid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                members.append(p)
        except OSError:
            pass
    return members


def stop_cluster(env: dict) -> subprocess.CompletedProcess:
    """cluster/local.sh stop; then SIGKILL whatever a failed stop left, and drop Ray's temp folders."""
    stopped = subprocess.run(["bash", str(LOCAL_SH), "stop"], env=env, capture_output=True, text=True, timeout=120)
    for pid_file in Path(env["ATTZOOM_CLUSTER_DIR"]).glob("*.pid"):
        kill_session(int(pid_file.read_text()))
    shutil.rmtree(env["ATTZOOM_RAY_TEMP"], ignore_errors=True)
    return stopped


def kill_session(sid: int) -> None:
    victims = session_members(sid)
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)


@pytest.fixture
def cluster(tmp_path):
    state = tmp_path / "cluster"
    env = cluster_env(state)
    started = subprocess.run(["bash", str(LOCAL_SH), "start", "--workers", "2"], env=env, capture_output=True,
                             text=True, timeout=240)
    sessions = set()
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        # RAY_AUTH_MODE=token too: without it Ray's own CLI sent no token, and `ray job stop` was refused
        assert f"export RAY_AUTH_TOKEN_PATH={state / 'token'} RAY_AUTH_MODE=token" in started.stdout
        sessions = {int(f.read_text()) for f in state.glob("*.pid")}
        assert len(sessions) == 3
        yield env, f"http://127.0.0.1:{env['ATTZOOM_DASHBOARD_PORT']}"
    finally:
        stopped = subprocess.run(["bash", str(LOCAL_SH), "stop"], env=env, capture_output=True, text=True,
                                 timeout=120)
        left = [p for sid in sessions for p in session_members(sid)] if started.returncode == 0 else []
        stop_cluster(env)  # whatever a failed stop left behind
        assert stopped.returncode == 0, stopped.stderr
        assert not left, f"`local.sh stop` left {left}"


def trial_results(storage: Path) -> dict[str, list[dict]]:
    """Each trial's per-epoch rows (Tune's result.json), by trial folder; its last row, which reports how
    fit ended and repeats the last epoch's metrics, is left out."""
    rows = {}
    for f in storage.glob("t/*/result.json"):
        lines = [line for line in f.read_text().splitlines() if line.strip()]
        parsed = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row being written
                continue
            if STATUS_KEY not in row:
                parsed.append(row)
        rows[f.parent.name] = parsed
    return rows


def test_a_worker_node_killed_mid_sweep_its_trials_resume_on_the_other_node(tmp_path, few_digits_root, cluster):
    env, address = cluster
    state = Path(env["ATTZOOM_CLUSTER_DIR"])
    workers = {int((state / f"worker-{i}.pid").read_text()) for i in (1, 2)}
    storage = tmp_path / "ray_results"
    spec = write_spec(ROOT / "tune_jobs" / "specs" / f".test-{tmp_path.name}.toml", few_digits_root, trials=2,
                      epochs=EPOCHS, variants=("attzoom",), max_concurrent=2, cpus=1, max_retries=2)
    try:
        submitted = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "submit", str(spec), "--address", address,
                                    "--storage", str(storage), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                                   env={**env, "RAY_AUTH_TOKEN_PATH": str(state / "token")}, cwd=tmp_path,
                                   capture_output=True, text=True, timeout=180)
    finally:
        spec.unlink()
    assert submitted.returncode == 0, submitted.stderr
    assert "INFO" not in submitted.stderr, submitted.stderr  # Ray's packaging lines: with -v only
    assert (state / "token").read_text().strip() not in submitted.stdout + submitted.stderr  # never printed
    job_id = submitted.stdout.strip()

    victim = {}

    def a_worker_runs_a_trial_past_its_first_epoch() -> bool:
        for trial, rows in trial_results(storage).items():
            if not rows or not 1 <= rows[-1]["epoch"] <= EPOCHS - 2:
                continue
            try:
                sid = os.getsid(rows[-1]["pid"])
            except OSError:
                continue
            if sid in workers:
                victim.update(trial=trial, sid=sid, pid=rows[-1]["pid"], epochs_before=rows[-1]["epoch"])
                return True
        return False

    wait_for(a_worker_runs_a_trial_past_its_first_epoch, timeout=150, every=0.5)
    kill_session(victim["sid"])  # the node's raylet, agents and the trial's process, at once
    status = subprocess.run(["bash", str(LOCAL_SH), "status"], env=env, capture_output=True, text=True, timeout=60)
    dead = next(i for i in (1, 2) if int((state / f"worker-{i}.pid").read_text()) == victim["sid"])
    assert f"worker-{dead}: gone" in status.stdout and f"worker-{3 - dead}: running" in status.stdout, status.stdout

    logs = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "logs", job_id, "--address", address],
                          env={**env, "RAY_AUTH_TOKEN_PATH": str(state / "token")}, capture_output=True, text=True,
                          timeout=300)
    assert f"job {job_id}: SUCCEEDED" in logs.stderr, logs.stdout[-4000:] + logs.stderr[-2000:]
    assert "| tiny_resnet.cluttered-digits.attzoom | 2 | 0 | 0 |" in logs.stdout

    # exactly N trials per study, one FINISHED MLflow run per trial, epochs 1..E once each
    assert_exactly_once(tmp_path, trials_per_study=2, epochs=EPOCHS, studies=1)

    # the killed trial went on from its checkpoint in another process on the surviving node
    rows = trial_results(storage)[victim["trial"]]
    epochs = [r["epoch"] for r in rows]
    assert epochs == list(range(1, EPOCHS + 1)), f"the killed trial restarted or repeated epochs: {epochs}"
    before = [r for r in rows if r["pid"] == victim["pid"]]
    after = [r for r in rows if r["pid"] != victim["pid"]]
    assert before and after, "the trial was not moved"
    assert max(r["epoch"] for r in before) < min(r["epoch"] for r in after)
    # MLflow: that trial's run has each epoch once, the first one logged before the kill
    client, runs = trial_runs(tmp_path)
    run = next(r for r in runs if r.data.tags[TRIAL] == trial_id_of(victim["trial"]))
    history = sorted(client.get_metric_history(run.info.run_id, "val_top1"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, EPOCHS + 1))
    assert "failures" not in run.data.metrics  # a lost node is no error of the trial's own

    # a driver here joins with the token file alone, as `start` prints: Ray sent no token without RAY_AUTH_MODE=token,
    # and `attzoom resume --address` was refused after twenty lines of retries (a resume of the ended sweep now
    # joins nothing: "had finished already"; a confirm run joins and trains)
    confirmed = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "confirm", "t", "--seeds", "1", "--storage",
                                str(storage), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--address",
                                f"127.0.0.1:{env['ATTZOOM_RAY_PORT']}"],
                               env={**env, "RAY_AUTH_TOKEN_PATH": str(state / "token")}, cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
    assert confirmed.returncode == 0 and "confirm runs of t are complete" in confirmed.stdout, \
        confirmed.stdout[-2000:] + confirmed.stderr[-3000:]
    assert "INFO" not in confirmed.stderr  # Ray's "Connecting to existing Ray cluster" and Tune's lines: with -v only

    # ... and as a job, from a machine that cannot see the storage: `submit` had no way to resume a sweep, and
    # submitting its spec again failed in the job ("already exists")
    token = {**env, "RAY_AUTH_TOKEN_PATH": str(state / "token")}
    submitted = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "submit", "--resume", "t", "--storage",
                                str(storage), "--address", address], env=token, cwd=tmp_path, capture_output=True,
                               text=True, timeout=180)
    assert submitted.returncode == 0, submitted.stderr
    logs = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "logs", submitted.stdout.strip(), "--address",
                           address], env=token, capture_output=True, text=True, timeout=300)
    assert "SUCCEEDED" in logs.stderr and "sweep t had finished already: nothing to run" in logs.stdout, \
        logs.stdout[-3000:] + logs.stderr[-2000:]
    assert_exactly_once(tmp_path, trials_per_study=2, epochs=EPOCHS, studies=1)
    # a fixed cluster: its head's v1 monitor reports a read-only autoscaler, which adds no GPU (the sweep of a GPU
    # spec is refused, not left waiting)
    ceiling = subprocess.run([sys.executable, "-c", "import ray; from tune_jobs.ray_session import gpu_ceiling; "
                              f"ray.init(address='127.0.0.1:{env['ATTZOOM_RAY_PORT']}'); print(gpu_ceiling())"],
                             env={**token, "RAY_AUTH_MODE": "token"}, cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert ceiling.stdout.strip().splitlines()[-1:] == ["None"], ceiling.stdout + ceiling.stderr[-2000:]
    # Ray's own CLI (`ray job stop` in the README) with what `start` prints to export
    listed = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "list", "--address", address],
                            env={**token, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and job_id in listed.stdout, listed.stderr[-2000:]


def test_start_refuses_the_dashboards_fixed_metrics_port_before_starting_anything(tmp_path):
    env = {**cluster_env(tmp_path / "cluster"), "ATTZOOM_DASHBOARD_PORT": "44227"}
    try:
        started = subprocess.run(["bash", str(LOCAL_SH), "start"], env=env, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(env["ATTZOOM_RAY_TEMP"], ignore_errors=True)
    assert started.returncode == 2, started.stderr
    assert started.stderr.strip().count("\n") == 0 and "44227" in started.stderr
    assert not list((tmp_path / "cluster").glob("*.pid"))


GPU_CEILING = """
import json, ray
from ray.core.generated import autoscaler_pb2
from ray.experimental.internal_kv import _internal_kv_put
from tune_jobs.ray_session import AUTOSCALING_STATUS, gpu_ceiling

ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1",
         configure_logging=False)
seen = [gpu_ceiling()]  # no autoscaler
for types in (["node_4f1d2c"], ["ray.head.default", "gpu-workers"]):  # v1's report: read-only (a fixed cluster), real
    report = {"active_nodes": {types[0]: 1}, "pending_launches": dict.fromkeys(types[1:], 1)}
    _internal_kv_put(AUTOSCALING_STATUS, json.dumps({"time": 1.0, "autoscaler_report": report}), overwrite=True)
    seen.append(gpu_ceiling())
config = autoscaler_pb2.ClusterConfig()  # what autoscaler v2 stores: its node groups
group = config.node_group_configs.add(name="gpu-workers", max_count=8)
group.resources["CPU"], group.resources["GPU"] = 12, 1
ray._private.worker.global_worker.gcs_client.internal_kv_put(
    ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), config.SerializeToString(), True,
    ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())
seen.append(gpu_ceiling())
print(seen)
"""


def test_the_gpu_ceiling_is_read_from_what_rays_autoscalers_store():
    # a real Ray GCS holding what each autoscaler writes (no autoscaler with a node provider runs here: the fake
    # multi-node provider's defaults file is not in Ray's wheel)
    done = subprocess.run([sys.executable, "-c", GPU_CEILING], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "[None, None, inf, 8.0]", done.stderr[-3000:]
