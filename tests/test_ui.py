"""What a person sees first: run names and descriptions in MLflow, and `attzoom ui` with a real browser.

No mocks: a store written through the driver's own writer (tune_jobs.tracking.TrialRuns, as
benchmarks/store.py fills one: 2 studies x 2 trials x 2 epochs, a confirm run), the studies in
a real Optuna RDB storage as the sweep names them (``<sweep>/<study>``), `attzoom ui` started as
a user starts it, and its printed addresses opened in headless Chromium (one start per page:
its DOM and a screenshot, copied to /tmp/attzoom-ui-*.png).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from test_dashboards import chromium, run_chromium  # noqa: F401 - chromium is a fixture
from tune_jobs import layout, naming

ROOT = Path(__file__).resolve().parent.parent
START_S = 240  # `attzoom ui` prints its addresses once both servers answer (a minute on a busy 2-core machine)
STUDY_PARAMS = {"lr": "0.01", "batch_size": "64", "optimizer": "sgd", "momentum": "0.9", "scheduler": "cosine",
                "step_size": "30", "weight_decay": "1e-05"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished two-study sweep in a SQLite store, and its Optuna studies in optuna.db beside it."""
    import optuna

    from tune_jobs.spec import load_spec
    from tune_jobs.tracking import TrialRuns, prepare_tracking, study_tags

    folder = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    spec = replace(load_spec(ROOT / "tune_jobs" / "specs" / "demo.toml"), tracking_uri=uri, trials=2, epochs=2)
    experiment_id, parents = prepare_tracking(spec)
    runs = TrialRuns(uri, experiment_id, parents)
    trial_ids = {}
    for s, study in enumerate(spec.studies):
        for t in range(2):
            trial_id = trial_ids[study.variant, t + 1] = f"{s:04x}{t:04x}"
            runs.open(trial_id, study.name, study_tags(spec, study), STUDY_PARAMS)
            for epoch in (1, 2):
                runs.log_epoch(trial_id, epoch, {"val_top1": 30.0 + 10 * epoch + t, "val_top5": 80.0}, {})
            runs.finish(trial_id, "completed", None)
    baseline = spec.studies[0]
    runs.open(trial_ids["baseline", 1], baseline.name, study_tags(spec, baseline), STUDY_PARAMS)  # Tune retries it
    runs.finish(trial_ids["baseline", 1], "completed", None)
    attzoom = spec.studies[1]
    runs.open("c0ffee01", attzoom.name, {**study_tags(spec, attzoom), layout.SEED: "2"}, STUDY_PARAMS,
              role=layout.CONFIRM_ROLE)
    runs.client.update_run(parents[baseline.name], name=baseline.name)  # as an older version named a study's run
    runs.client.delete_tag(parents[baseline.name], layout.NOTE)
    assert prepare_tracking(spec) == (experiment_id, parents)  # a resumed sweep finds them again, renamed

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
    for study in spec.studies:
        optuna_study = optuna.create_study(study_name=f"{spec.name}/{study.name}", storage=storage,
                                           direction="maximize")
        for t in range(3):
            trial = optuna_study.ask()
            trial.suggest_float("lr", 1e-4, 1e-1, log=True)
            for epoch in (1, 2):
                trial.report(30.0 + 10 * epoch + t, epoch)
            trial.set_user_attr("mlflow_run_id", f"run-{t}")
            optuna_study.tell(trial, 50.0 + t)
    storage.engine.dispose()
    return {"spec": spec, "uri": uri, "experiment_id": experiment_id, "folder": folder, "trials": trial_ids}


def test_runs_have_readable_names_descriptions_and_their_source(sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep["uri"])
    runs = client.search_runs([sweep["experiment_id"]])
    ids = sweep["trials"]
    names = ["tiny_resnet · cluttered-digits · baseline", "tiny_resnet · cluttered-digits · attzoom",
             f"baseline #1 ({ids['baseline', 1]})", f"baseline #2 ({ids['baseline', 2]})",
             f"attzoom #1 ({ids['attzoom', 1]})", f"attzoom #2 ({ids['attzoom', 2]})", "attzoom seed 2 (c0ffee01)"]
    assert sorted(r.info.run_name for r in runs) == sorted(names)  # the retried trial kept its one run and its name
    notes = {r.info.run_name: r.data.tags[layout.NOTE] for r in runs}
    assert "Study tiny_resnet.cluttered-digits.baseline of sweep demo" in notes[names[0]]
    assert notes[names[3]].startswith("Trial #2 of study tiny_resnet.cluttered-digits.baseline (sweep demo)")
    assert "batch_size 64, lr 0.01" in notes[names[3]] and "momentum 0.9" in notes[names[3]]
    assert "step_size" not in notes[names[3]]  # searched only with StepLR
    assert layout.BEST_TOP1 in notes[names[3]] and "Seed re-run 2" in notes[names[-1]]
    numbers = {r.info.run_name: r.data.tags.get(layout.TRIAL_NUMBER) for r in runs}
    assert [numbers[name] for name in names] == [None, None, "1", "2", "1", "2", None]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    for run in runs:
        assert run.data.tags[layout.SOURCE_TYPE] == "LOCAL" and run.data.tags[layout.SOURCE_NAME]
        assert run.data.tags.get(layout.GIT_COMMIT) == (commit.strip() or None)
    experiment = client.get_experiment(sweep["experiment_id"])
    assert experiment.tags[layout.EXPERIMENT_KIND] == layout.ML_KIND
    assert json.loads(experiment.tags[layout.SHARED_VIEW + layout.RUNS_VIEW])["selectedColumns"][0] == \
        f"metrics.`{layout.BEST_TOP1}`"


def test_a_trials_description_names_only_what_the_searcher_drew(tmp_path):
    # a baseline trial's said "one sample of the study's search space, ..., threshold 0.5, position stem": both fixed
    # by [train], and a baseline has no layer to use them
    from tune_jobs.spec import load_spec
    from tune_jobs.tracking import TrialRuns, prepare_tracking, study_tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = replace(load_spec(ROOT / "tune_jobs" / "specs" / "demo.toml"), tracking_uri=uri)
    runs = TrialRuns(uri, *prepare_tracking(spec))
    baseline = spec.studies[0]
    params = {**STUDY_PARAMS, "threshold": "0.5", "position": "stem"}
    runs.open("b0000001", baseline.name, study_tags(spec, baseline), params, sampled=["batch_size", "lr"])
    run = runs.client.get_run(runs.runs["b0000001"])
    note = run.data.tags[layout.NOTE]
    assert "search space, batch_size 64, lr 0.01; every setting" in note, note
    assert run.data.params["threshold"] == "0.5" and run.data.params["position"] == "stem"  # still under Parameters


def test_git_absent_leaves_the_commit_out(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on it
    assert naming.git_commit(ROOT) is None
    assert naming.git_commit(tmp_path) is None  # git there or not, no repository


# --- attzoom ui ----------------------------------------------------------------------------------

class Ui:
    """`attzoom ui` as a user starts it; its stdout lines are read as they come."""

    def __init__(self, *args: str, log: Path, env: dict[str, str] | None = None):
        self.log = log.open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "tune_jobs.cli", "ui", *args], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout] and None,
                         daemon=True).start()

    def wait_for(self, text: str, timeout: float = START_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.out.append(self.lines.get(timeout=1).rstrip("\n"))
            except queue.Empty:
                assert self.process.poll() is None, self.failure(f"exited {self.process.returncode}")
                continue
            if text in self.out[-1]:
                return "\n".join(self.out)
        raise AssertionError(self.failure(f"no {text!r} within {timeout} s"))

    def failure(self, what: str) -> str:
        self.log.flush()
        return f"attzoom ui {what}; stdout:\n" + "\n".join(self.out) + "\nstderr:\n" + \
            Path(self.log.name).read_text()[-3000:]

    def servers(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def listening(port: int) -> list[str]:
    return [c.laddr.ip for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


@pytest.fixture(scope="module")
def ui(sweep, tmp_path_factory):
    ports, home = (free_port(), free_port()), tmp_path_factory.mktemp("home")  # a home of its own: nothing goes there
    env = {**{k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}, "HOME": str(home)}
    running = Ui("demo", "--tracking-uri", sweep["uri"], "--port", str(ports[0]), "--optuna-port", str(ports[1]),
                 log=tmp_path_factory.mktemp("ui-log") / "stderr.txt", env=env)
    try:
        output = running.wait_for("Ctrl-C")
        yield {"ui": running, "output": output, "ports": ports, "home": home}
    finally:
        running.stop()


def open_page(chromium: str, url: str, folder: Path, name: str) -> str:  # noqa: F811 - chromium is the fixture
    """The page's DOM after its scripts ran, and its screenshot (one Chromium start)."""
    shot = folder / f"{name}.png"
    done = run_chromium(chromium, folder / f"profile-{name}", "--hide-scrollbars", "--window-size=1600,900",
                        "--virtual-time-budget=20000", f"--screenshot={shot}", "--dump-dom", url)
    assert done.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", done.stderr[-2000:]
    shutil.copy(shot, f"/tmp/attzoom-ui-{name}.png")
    print(f"screenshot of {url}: /tmp/attzoom-ui-{name}.png")
    return done.stdout


def test_ui_prints_both_addresses_on_127_0_0_1(ui, sweep):
    mlflow_port, optuna_port = ui["ports"]
    output = ui["output"]
    print(output)
    assert f"MLflow UI: http://127.0.0.1:{mlflow_port}\n" in output
    assert (f"demo  runs table: http://127.0.0.1:{mlflow_port}/#/experiments/{sweep['experiment_id']}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={layout.RUNS_VIEW}") in output
    assert f"optuna-dashboard: http://127.0.0.1:{optuna_port}/dashboard/" in output
    assert listening(mlflow_port) == ["127.0.0.1"] and listening(optuna_port) == ["127.0.0.1"]


def test_the_stores_urls_stay_off_the_servers_command_lines(ui, sweep):
    """A store's URL may hold a database password, and every local user can read a process's command line (not
    its environment, nor a file only its user can read)."""
    servers = ui["ui"].servers()
    assert {"mlflow", "optuna-dashboard"} <= {Path(part).name for p in servers for part in p.cmdline()[:2]}
    for process in servers:
        command = " ".join(process.cmdline())
        assert sweep["uri"] not in command and "optuna.db" not in command, command


def test_mlflow_address_opens_the_runs_table_with_the_run_names_and_best_epoch(ui, chromium, tmp_path):  # noqa: F811
    address = re.search(r"runs table: (\S+)", ui["output"]).group(1)
    dom = open_page(chromium, address, tmp_path, "mlflow-runs-table")
    assert "<title>Runs - Experiment" in dom and "Overview - Experiment" not in dom and "Token Usage" not in dom
    for name in ("tiny_resnet · cluttered-digits · baseline", "tiny_resnet · cluttered-digits · attzoom",
                 "baseline #2 (00000001)", "attzoom #1 (00010000)", "attzoom seed 2 (c0ffee01)"):
        assert name in dom, name
    assert "best_val_top1" in dom and "Sort: best_val_top1" in dom.replace("<!-- -->", "")


def test_optuna_dashboard_lists_the_sweeps_studies(ui, chromium, tmp_path):  # noqa: F811
    base = f"http://127.0.0.1:{ui['ports'][1]}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{base}/api/studies", timeout=30) as response:
        studies = json.load(response)["study_summaries"]
    expected = {"demo/tiny_resnet.cluttered-digits.baseline", "demo/tiny_resnet.cluttered-digits.attzoom"}
    assert {s["study_name"] for s in studies} == expected
    dom = open_page(chromium, f"{base}/dashboard/", tmp_path, "optuna-dashboard-studies")
    assert all(name in dom for name in expected)


def test_when_one_server_ends_the_other_is_stopped_and_ui_exits_non_zero(ui):
    running = ui["ui"]
    servers = running.servers()
    dashboard = next(p for p in servers if "optuna-dashboard" in " ".join(p.cmdline()))
    dashboard.kill()
    assert running.process.wait(60) == 1
    assert psutil.wait_procs(servers, timeout=30)[1] == []  # every process of both servers is gone
    assert listening(ui["ports"][0]) == []


def test_without_v_the_servers_print_no_info_lines_and_nothing_goes_into_home(ui):
    """README: other libraries' INFO logs only with -v (warnings and errors show); gunicorn, optuna-dashboard's
    server, keeps its control socket out of ~/.gunicorn."""
    ui["ui"].stop()  # ended by the test above, else by Ctrl-C: the servers' whole output, their stopping too
    log = Path(ui["ui"].log.name).read_text()
    assert "INFO" not in log and "DeprecationWarning" not in log and "Uvicorn running" not in log, log
    assert "Security middleware" not in log  # MLflow's hint on opening the server to other hosts
    assert "Registry store URI" not in ui["output"]
    assert not (ui["home"] / ".gunicorn").exists()


def running_ones(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``processes`` still running after up to ``timeout`` s (a zombie is not: an init that reaps no
    orphans, as some containers' does, keeps one)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_kill_9_of_ui_stops_both_servers_and_removes_its_folder_and_with_v_they_log_info(sweep, tmp_path):
    """Left running, they would hold their ports (the next `attzoom ui` refused) and the folder its storage URL."""
    ports = free_port(), free_port()
    running = Ui("-v", "--tracking-uri", sweep["uri"], "--port", str(ports[0]), "--optuna-port", str(ports[1]),
                 log=tmp_path / "stderr.txt")
    servers = []
    try:
        running.wait_for("Ctrl-C")
        servers = running.servers()
        config = next(Path(part) for p in servers for part in p.cmdline() if part.endswith(".toml"))
        running.process.kill()
        assert running_ones(servers, timeout=15) == [] and listening(ports[0]) == listening(ports[1]) == []
        assert not config.parent.exists()
        log = (tmp_path / "stderr.txt").read_text()
        assert "[INFO] Starting gunicorn" in log and "Uvicorn running on" in log  # -v: the servers' INFO lines
    finally:
        running.stop()
        for process in servers:  # left running
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def test_without_an_optuna_storage_only_mlflow_starts_and_ctrl_c_stops_it(sweep, tmp_path):
    store = tmp_path / "mlflow.db"
    shutil.copy(sweep["folder"] / "mlflow.db", store)  # no optuna.db beside this one
    port = free_port()
    running = Ui("--tracking-uri", f"sqlite:///{store}", "--port", str(port), "--optuna-port", str(free_port()),
                 log=tmp_path / "stderr.txt")
    try:
        output = running.wait_for("Ctrl-C")
        missing = f"no Optuna storage at {tmp_path / 'optuna.db'} (a sweep keeps its studies there)"
        assert f"{missing}; starting only the MLflow UI" in output
        assert f"  demo  runs table: http://127.0.0.1:{port}/#/experiments/" in output  # every sweep of the store
        assert "optuna-dashboard" not in output
        servers = running.servers()
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(60) == 0
        assert psutil.wait_procs(servers, timeout=30)[1] == [] and listening(port) == []
    finally:
        running.stop()


def test_ui_refuses_an_unknown_sweep_and_a_taken_port_before_starting_anything(sweep):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the unknown name beside the names there, as status and report list them
        for args, message in ((["nosuch", "--port", str(free_port())], "no sweep named 'nosuch' in "),
                              (["nosuch", "--port", str(free_port())], "(sweeps there: demo)"),
                              (["--port", str(port)], f"port {port} on 127.0.0.1 is in use")):
            done = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "ui", *args, "--tracking-uri", sweep["uri"],
                                   "--optuna-port", str(free_port())], cwd=ROOT, capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_a_trial_that_starts_over_keeps_its_number_and_a_new_trial_takes_the_next(sweep):
    # last: the screenshots above show the finished sweep
    from mlflow.tracking import MlflowClient

    from tune_jobs.tracking import TrialRuns, prepare_tracking, study_tags

    spec = sweep["spec"]
    experiment_id, parents = prepare_tracking(spec)
    runs, study = TrialRuns(sweep["uri"], experiment_id, parents), spec.studies[0]
    restarted = sweep["trials"]["baseline", 2]
    runs.drop(restarted)  # its checkpoint was damaged: it starts over in a new run
    for trial_id in (restarted, "0000beef"):
        runs.open(trial_id, study.name, study_tags(spec, study), STUDY_PARAMS)
    client = MlflowClient(sweep["uri"])
    names = {r.info.run_name for r in client.search_runs([experiment_id], layout.tag_filter(layout.STUDY, study.name))}
    assert {f"baseline #2 ({restarted})", "baseline #3 (0000beef)"} <= names
