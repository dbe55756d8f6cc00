"""Security: token authentication, secrets kept off command lines and logs, loopback-only servers,
weights-only checkpoint loading, and no writing outside the storage root.

The cluster checks share one real head started by cluster/local.sh (module fixture); they are
marked slow. The checkpoint and path checks run in-process and are fast.
"""

import contextlib
import io
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from test_cluster_local import LOCAL_SH, ROOT, cluster_env, free_port, kill_session, stop_cluster
from test_spec import base_spec, write_spec as write_spec_file
from test_sweep_e2e import _answers as answers, wait_for
from test_train import config as train_config
from test_train import small_splits

slow = pytest.mark.slow


def listening(pids: set[int], port: int | None = None) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of the LISTEN sockets of ``pids`` (on ``port`` if given)."""
    found = []
    for c in psutil.net_connections("inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids and (port is None or c.laddr.port == port):
            try:
                name = psutil.Process(c.pid).name()
            except psutil.NoSuchProcess:
                continue
            found.append((c.pid, name, c.laddr.ip, c.laddr.port))
    return found


def session_pids(sid: int) -> set[int]:
    pids = set()
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                pids.add(p.pid)
        except OSError:
            pass
    return pids


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


# ---------------------------------------------------------------- a real head with token auth


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    state = tmp_path_factory.mktemp("sec") / "cluster"
    env = {**cluster_env(state), "ATTZOOM_HEAD_CPUS": "1"}
    started = subprocess.run(["bash", str(LOCAL_SH), "start", "--workers", "0"], env=env, capture_output=True,
                             text=True, timeout=240)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield env, f"http://127.0.0.1:{env['ATTZOOM_DASHBOARD_PORT']}", state
    finally:
        stop_cluster(env)


def get(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@slow
def test_the_token_file_is_private_and_the_jobs_api_refuses_requests_without_it(head):
    _, address, state = head
    token_file = state / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert len(token) == 64
    assert get(f"{address}/api/jobs/") == 401
    assert get(f"{address}/api/jobs/", token="0" * 64) in (401, 403)
    assert get(f"{address}/api/jobs/", token=token) == 200


@slow
def test_the_dashboard_and_jobs_api_listen_on_loopback_only(head):
    env, _, state = head
    sid = int((state / "head.pid").read_text())
    sockets = listening(session_pids(sid), int(env["ATTZOOM_DASHBOARD_PORT"]))
    assert sockets, "nothing listens on the dashboard port"
    assert {ip for _, _, ip, _ in sockets} <= LOOPBACK, sockets


CLIENT_PROBE = """
import sys, ray
try:
    ray.util.connect(sys.argv[1], connection_retries=0)
    print("CONNECTED")
except ConnectionError:
    print("REFUSED")
"""


def ray_client_answer(address: str, env: dict) -> str:
    """CONNECTED or REFUSED: what a Ray Client connecting to ``address`` with ``env`` gets."""
    probe = subprocess.run([sys.executable, "-c", CLIENT_PROBE, address], env=env, capture_output=True, text=True,
                           timeout=120)
    words = probe.stdout.split()
    return words[-1] if words else probe.stderr[-2000:]  # the error, when the probe itself broke


@slow
def test_the_ray_client_and_the_node_agent_refuse_requests_without_the_token(head, tmp_path):
    """The head's other ways to run code listen beyond loopback (Ray binds them to the node's address):
    the Ray Client server and the node agent's job API. Both refuse a caller without the token."""
    env, _, state = head
    sid = int((state / "head.pid").read_text())
    client_port = int(env["ATTZOOM_CLIENT_PORT"])
    addresses = {ip.removeprefix("::ffff:") for _, _, ip, _ in listening(session_pids(sid), client_port)}
    assert addresses, "no Ray Client server"
    stranger = {"PATH": env["PATH"], "HOME": str(tmp_path)}  # no token anywhere: not in env, not in ~/.ray
    for ip in addresses:
        assert ray_client_answer(f"{ip}:{client_port}", stranger) == "REFUSED", ip
    member = {**stranger, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "token")}
    # a busy head can miss one no-retry connect; a member gets in within three, a stranger never
    answers = []
    while len(answers) < 3 and "CONNECTED" not in answers:
        answers.append(ray_client_answer(f"127.0.0.1:{client_port}", member))
    assert answers[-1] == "CONNECTED", answers

    agent_port = int(env["ATTZOOM_NODE_PORT_BASE"]) + 2  # cluster/local.sh: the head's agent HTTP port
    agent_ips = {ip for _, _, ip, _ in listening(session_pids(sid), agent_port)} - LOOPBACK
    token = (state / "token").read_text().strip()
    for ip in agent_ips or {"127.0.0.1"}:
        jobs = f"http://{ip}:{agent_port}/api/job_agent/jobs/nonexistent/logs"
        assert get(jobs) == 401
        assert get(jobs, token=token) != 401


def test_no_command_takes_a_token_on_the_command_line():
    from tune_jobs.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("submit", "logs", "status"):
        options = [o for a in commands[name]._actions for o in a.option_strings]
        assert not [o for o in options if "token" in o or "secret" in o or "password" in o], (name, options)


@pytest.mark.parametrize("option,key", [("--tracking-uri", "tracking_uri"), ("--optuna-storage", "optuna_storage")])
def test_submit_refuses_a_database_password_that_would_ride_on_the_jobs_command_line(tmp_path, option, key):
    spec = ROOT / "tune_jobs" / "specs" / f".test-pw-{tmp_path.name}.toml"
    write_spec_file(spec.parent, {**base_spec(tmp_path), "name": "pw"}, spec.name)
    url = "postgresql+psycopg://attzoom:pw-s3cret@127.0.0.1:1/mlflow"
    try:
        out = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "submit", str(spec), "--address",
                              "http://127.0.0.1:1", option, url], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    finally:
        spec.unlink()
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "PGPASSWORD" in lines[0], out.stderr
    assert "pw-s3cret" not in out.stdout + out.stderr


@slow
def test_submit_reads_the_token_from_the_environment_and_never_prints_or_ships_it(head, tmp_path):
    env, address, state = head
    token = (state / "token").read_text().strip()
    spec = ROOT / "tune_jobs" / "specs" / f".test-sec-{tmp_path.name}.toml"
    write_spec_file(spec.parent, {**base_spec(tmp_path), "name": "sec"}, spec.name)
    user = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    user.update(RAY_AUTH_TOKEN=token, RAY_AUTH_TOKEN_PATH=str(tmp_path / "absent"))
    try:
        submitted = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "submit", str(spec), "--address", address,
                                    "--storage", "ray_results"], env=user, cwd=tmp_path, capture_output=True, text=True,
                                   timeout=180)
    finally:
        spec.unlink()
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert token not in submitted.stdout + submitted.stderr
    # a relative path names this machine's folder in the job: said, as it is wrong on a cluster elsewhere
    assert f"relative paths were made absolute on this machine: storage {tmp_path / 'ray_results'};" in \
        submitted.stderr, submitted.stderr

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    try:
        info = client.get_job_info(job_id)
        assert token not in info.entrypoint and token not in json.dumps(info.runtime_env or {})
        # a `ray job stop` gives the sweep time to stop as after Ctrl-C before Ray's SIGKILL (3 s by default)
        assert info.runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "60"
        status = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "status", "--job", job_id, "--address",
                                 address, "--tracking-uri", f"sqlite:///{tmp_path / 'status.db'}"],
                                env=user, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and f"job {job_id}:" in status.stdout, status.stderr
        assert token not in status.stdout + status.stderr
        without = {k: v for k, v in user.items() if k != "RAY_AUTH_TOKEN"}  # no token anywhere: refused, told how
        refused = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "status", "--job", job_id, "--address",
                                  address], env=without, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "needs its token" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    finally:
        client.stop_job(job_id)


# ---------------------------------------------------------------- servers a local user starts


@slow
def test_a_local_sweeps_ray_listens_on_loopback_only_with_token_auth(tmp_path):
    """What the private Ray of `attzoom sweep` opens: no dashboard, no Jobs API, and every one of Ray's own
    services (GCS, raylet and object manager, the node's agents, metrics endpoints) on loopback
    (ray_session.loopback_only). Token authentication is on as well (token in ~/.ray/auth_token), said by the
    sweep rather than by Ray's start-up warning that invites users to turn it off."""
    spec = write_spec_file(tmp_path, base_spec(tmp_path))
    script = textwrap.dedent(f"""
        import json, os, sys, psutil
        from tune_jobs.spec import load_spec
        from tune_jobs.ray_session import start_ray
        import ray
        start_ray(load_spec({str(spec)!r}), None)
        sid = os.getsid(0)
        out = []
        for c in psutil.net_connections("inet"):
            if c.status == "LISTEN" and c.pid:
                try:
                    if os.getsid(c.pid) == sid:
                        p = psutil.Process(c.pid)
                        name = "driver" if c.pid == os.getpid() else p.name()  # its core worker's gRPC
                        out.append([name, " ".join(p.cmdline())[:300], c.laddr.ip, c.laddr.port])
                except OSError:
                    pass
        print("SOCKETS" + json.dumps(out))
        from ray._raylet import AuthenticationMode, get_authentication_mode
        print("AUTH" + str(get_authentication_mode() == AuthenticationMode.TOKEN))
        ray.shutdown()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path / "home")  # a user's first sweep: Ray makes its token file
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180, start_new_session=True, preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr[-3000:]
    token = tmp_path / "home" / ".ray" / "auth_token"  # with umask 022 Ray made it readable by every local user
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    sockets = json.loads(done.stdout.split("SOCKETS", 1)[1].splitlines()[0])
    assert sockets
    assert not [s for s in sockets if s[3] in (8265, 5000)], sockets  # no dashboard UI, no Jobs API

    exposed = [(name, ip, port, cmdline[:120]) for name, cmdline, ip, port in sockets if ip not in LOOPBACK]
    assert not exposed, exposed
    assert done.stdout.split("AUTH", 1)[1].startswith("True"), "a local sweep's Ray runs without authentication"
    assert "RAY_AUTH_MODE=disabled" not in done.stderr, "Ray's start-up line tells users to turn authentication off"


def test_a_token_file_others_can_read_is_made_private_with_a_line_saying_so(tmp_path, monkeypatch):
    from tune_jobs.ray_session import private_auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a" * 64)
    token.chmod(0o644)  # made by Ray (ray.init, `ray get-auth-token --generate`) under umask 022
    said = io.StringIO()
    private_auth_token(said)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == "a" * 64  # the same token
    assert said.getvalue() == f"attzoom: {token} (Ray's token) was readable by other users; made it private\n"
    private_auth_token(said)  # private already: nothing more said
    assert said.getvalue().count("\n") == 1


@slow
def test_attzoom_ui_listens_on_loopback_only(tmp_path):
    from tune_jobs.tracking import open_store

    open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the UI shows a store, it never creates one
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "tune_jobs.cli", "ui", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)], cwd=tmp_path,
                          start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: listening(session_pids(ui.pid), port), timeout=120, every=0.5)
        sockets = listening(session_pids(ui.pid))
        assert {ip for _, _, ip, _ in sockets} <= LOOPBACK, sockets
        assert get(f"http://127.0.0.1:{port}/health") == 200
    finally:
        ui.send_signal(signal.SIGINT)  # as Ctrl-C: a kill -9 of the whole session left its private folder in /tmp
        with contextlib.suppress(subprocess.TimeoutExpired):
            ui.wait(timeout=60)
        kill_session(ui.pid)
        ui.wait(timeout=30)


# ---------------------------------------------------------------- checkpoints: weights only


class Payload:
    """Unpickling this runs os.makedirs(marker): the proof that a loader executed pickled code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def evil_checkpoint(path: Path, marker: Path, template: dict) -> Path:
    torch.save({**template, "evil": Payload(marker)}, path)
    assert not marker.exists()
    return path


def test_a_checkpoint_carrying_a_pickled_object_is_refused_by_load_checkpoint_model(tmp_path):
    from attzoom.train import fit, load_checkpoint_model

    fit(train_config(epochs=1), data=small_splits(), checkpoint_dir=tmp_path / "run")
    good = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    marker = tmp_path / "pwned"
    path = evil_checkpoint(tmp_path / "evil.pt", marker, good)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint_model(path)
    assert not marker.exists()


def test_resuming_from_a_checkpoint_carrying_a_pickled_object_is_refused(tmp_path):
    from attzoom.config import CheckpointError
    from attzoom.train import fit

    fit(train_config(epochs=1), data=small_splits(), checkpoint_dir=tmp_path / "run")
    last = tmp_path / "run" / "last.pt"
    marker = tmp_path / "pwned"
    evil_checkpoint(last, marker, torch.load(last, weights_only=True))
    with pytest.raises(CheckpointError, match="--restart") as refused:
        fit(train_config(epochs=2), data=small_splits(), checkpoint_dir=tmp_path / "run", resume=True)
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)  # weights_only refused it, unrun
    assert not marker.exists()


# ---------------------------------------------------------------- nothing written outside storage


@pytest.mark.parametrize("name", ["../evil", "a/b", "/etc/evil", "..", ".hidden", "a\\b", "x\n", "a b", ""])
def test_sweep_names_that_could_leave_the_storage_root_exit_2_with_one_line(tmp_path, capsys, name):
    from tune_jobs import cli

    spec = write_spec_file(tmp_path, {**base_spec(tmp_path), "name": name})
    assert cli.main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()


def test_trial_folders_and_mlflow_artifacts_stay_under_their_roots(tmp_path):
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from tune_jobs.spec import load_spec
    from tune_jobs.sweep import absolute, experiment_dir, trial_dirname
    from tune_jobs.tracking import prepare_store

    spec = absolute(load_spec(write_spec_file(tmp_path, base_spec(tmp_path))))
    storage = Path(spec.storage).resolve()
    folder = experiment_dir(spec).resolve()
    assert folder.parent == storage
    for study in spec.studies:
        name = trial_dirname(SimpleNamespace(config={"study": study.name}, trial_id="abc12_00000"))
        assert "/" not in name and ".." not in name and (folder / name).resolve().parent == folder
    experiment = MlflowClient(spec.tracking_uri).get_experiment(prepare_store(spec.tracking_uri, spec.name))
    artifacts = Path(experiment.artifact_location.removeprefix("file://")).resolve()
    assert artifacts.is_relative_to(Path(spec.tracking_uri.removeprefix("sqlite:///")).parent)


# ---------------------------------------------------------------- a real MLflow server with basic-auth

LOGIN = ("admin", "attzoom-admin-pw-7")  # MLflow asks for 12 characters at least
LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """One `mlflow server --app-name basic-auth` (as cluster/mlflow runs it), holding sweep srv4 with one run:
    every login check below shares it."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (mlflow[auth]; pyproject's "
                        "test extra)")
    folder = tmp_path_factory.mktemp("auth-mlflow")
    (folder / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{folder}/auth.db\n"
                                     f"admin_username = {LOGIN[0]}\nadmin_password = {LOGIN[1]}\n")
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri",
                                   f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
                                   str(folder / "mlartifacts")], cwd=folder, env=env, start_new_session=True,
                                  stdout=log, stderr=log)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for(lambda: server.poll() is not None or answers(f"{uri}/health"), timeout=180, every=0.3)
        assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
        with pytest.MonkeyPatch.context() as patch:
            for name, value in zip(LOGIN_ENV, LOGIN):
                patch.setenv(name, value)
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri)
            run_id = client.create_run(client.create_experiment("attzoom-srv4")).info.run_id
        yield {"uri": uri, "port": port, "run_id": run_id, "folder": folder}
    finally:
        kill_session(server.pid)


def reader(*args: str, login: tuple[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """An attzoom command run as a user runs it, with ``login`` (else none) in MLFLOW_TRACKING_USERNAME/PASSWORD."""
    env = {k: v for k, v in os.environ.items() if k not in LOGIN_ENV}
    env.update(zip(LOGIN_ENV, login) if login else {})
    return subprocess.run([sys.executable, "-m", "tune_jobs.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_tracking_uri_carrying_its_login_is_read_as_mlflow_reads_it(auth_server):
    """http://user:password@host: the health probe sends the login as basic auth instead of taking it for the host,
    and nothing prints the password."""
    uri = auth_server["uri"].replace("http://", f"http://{LOGIN[0]}:{LOGIN[1]}@")
    done = reader("status", "srv4", "--tracking-uri", uri)
    assert done.returncode == 0 and "srv4" in done.stdout, done.stderr[-2000:]
    assert LOGIN[1] not in done.stdout + done.stderr


def test_readers_say_in_one_line_that_the_server_refused_the_login(auth_server, tmp_path):
    """status, report, explain and ui with a wrong password, and status with none: one line, exit 2, before any work
    (explain said "no run" of a run that exists)."""
    uri, wrong = auth_server["uri"], (LOGIN[0], "not-the-password")
    for args, login in ((["status"], None), (["status"], wrong), (["report", "srv4", "--out", str(tmp_path)], wrong),
                        (["explain", auth_server["run_id"], "--out", str(tmp_path)], wrong),
                        (["ui", "srv4", "--port", str(free_port()), "--optuna-port", str(free_port())], wrong)):
        done = reader(*args, "--tracking-uri", uri, login=login)
        why = "wrong user name or password" if login else "no login given"
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (args, done.stderr[-3000:])
        assert f"{uri} refused the login (HTTP 401, {why}); set MLFLOW_TRACKING_USERNAME and " in done.stderr, args
    assert list(tmp_path.iterdir()) == []


def test_ui_beside_an_mlflow_server_prints_its_addresses_and_starts_only_optuna_dashboard(auth_server, tmp_path):
    """The command a sweep prints: no local MLflow UI (MLflow refused an http store for its model registry and ui
    exited 1), the server's own runs-table link without the login; without an Optuna storage nothing starts."""
    import optuna

    from test_ui import Ui
    from tune_jobs.spec import split_login

    uri, port = auth_server["uri"], free_port()
    experiment = json.load(urllib.request.urlopen(urllib.request.Request(
        f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=attzoom-srv4",
        headers=split_login(uri.replace("//", f"//{LOGIN[0]}:{LOGIN[1]}@"))[1]), timeout=30))["experiment"]
    link = f"  srv4  runs table: {uri}/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning"
    done = reader("ui", "srv4", "--tracking-uri", uri.replace("//", f"//{LOGIN[0]}:{LOGIN[1]}@"))
    assert done.returncode == 0 and f"MLflow UI (the tracking server's own): {uri}\n{link}" in done.stdout, done
    assert "nothing to start" in done.stdout and LOGIN[1] not in done.stdout + done.stderr
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(storage=storage, study_name="srv4/tiny_resnet.digits.baseline")
    env = {**os.environ, **dict(zip(LOGIN_ENV, LOGIN))}
    ui = Ui("srv4", "--tracking-uri", uri, "--optuna-storage", storage, "--optuna-port", str(port),
            log=tmp_path / "stderr.txt", env=env)
    try:
        output = ui.wait_for("Ctrl-C")
        assert link in output and f"optuna-dashboard: http://127.0.0.1:{port}/dashboard/" in output, output
        names = {Path(part).name for p in ui.servers() for part in p.cmdline()[:2]}
        assert "optuna-dashboard" in names and "mlflow" not in names, names
        ui.process.send_signal(signal.SIGINT)
        assert ui.process.wait(60) == 0
    finally:
        ui.stop()
