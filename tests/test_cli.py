"""The ``attzoom`` command as a user runs it: a real process, real data on disk."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from attzoom.cli import main
from tune_jobs.cli import attzoom_executable


def attzoom(*args, cwd):
    return subprocess.run([sys.executable, "-m", "attzoom.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("args,expected", [
    (["--lr", "-1"], "lr must be in"),
    (["--backbone", "vgg"], "invalid choice: 'vgg'"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--kernel-size", "4"], "kernel_size must be odd"),
    (["--dataset", "cifar100", "--data-root", "nowhere/data"], "nowhere/data/cifar-100-python/train is missing"),
    (["--dataset", "tinyimagenet", "--data-root", "nowhere"], "tiny-imagenet-200/wnids.txt is missing"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_no_trace(tmp_path, args, expected):
    out = attzoom("train", *args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/, no data/, nothing


def test_main_returns_2_in_process_for_config_errors(capsys):
    assert main(["train", "--threshold", "1.5"]) == 2
    assert "threshold must be in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["status"], ["status", "--tracking-uri", "sqlite:///{tmp}/nowhere/dir/m.db"],
                                     ["ui", "--tracking-uri", "sqlite:///{tmp}/nowhere/m.db", "--port", "1"],
                                     ["report", "demo", "--tracking-uri", "sqlite:///{tmp}/nowhere/m.db"],
                                     ["explain", "abc", "--tracking-uri", "sqlite:///{tmp}/m.db"]])
def test_readers_on_a_missing_store_say_so_in_one_line_and_create_nothing(tmp_path, command):
    # bare `attzoom status` in an empty folder used to create ./mlflow.db and its lock file
    args = [part.format(tmp=tmp_path) for part in command]
    out = subprocess.run([sys.executable, "-m", "tune_jobs.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no tracking store at" in lines[0] and "--tracking-uri" in lines[0], out.stderr
    assert list(tmp_path.iterdir()) == []


def test_train_prints_final_metrics_and_a_truncated_or_another_configs_last_pt_is_one_line_naming_it(tmp_path,
                                                                                                       capsys,
                                                                                                       few_digits_root):
    args = ["train", "--dataset", "cluttered-digits", "--data-root", str(few_digits_root), "--variant", "attzoom",
            "--batch-size", "256", "--no-augment", "--checkpoint-dir", str(tmp_path / "run"), "--epochs"]
    out = attzoom(*args, "1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "test top-1" in out.stdout and "val top-1" in out.stdout
    assert "attzoom" in out.stderr and "1/1" in out.stderr  # the progress bar
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["config"]["variant"] == "attzoom" and best["metrics"]["epoch"] == 1
    # another config's last.pt: it printed the first run's result as this one's, exit 0 (in-process: no start-up)
    assert main([*args, "1", "--lr", "0.05"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "lr: 0.001 in it, 0.05 now" in lines[0] and "--restart" in lines[0], lines
    assert main([*args, "1"]) == 0  # its own command still resumes it; it had ended, which it says (it did not)
    again = capsys.readouterr().out
    assert again.startswith("completed after 1 epoch (its last.pt in") and "nothing trained now" in again
    assert again.split("; best epoch", 1)[-1] == out.stdout.split("; best epoch", 1)[-1]  # the same numbers
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    out = attzoom(*args, "1", cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(last) in lines[0] and "--restart" in lines[0], out.stderr
    assert attzoom(*args, "1", "--restart", cwd=tmp_path).returncode == 0  # the way out it names works


def test_ctrl_c_in_train_says_to_run_the_same_command_again(tmp_path, few_digits_root):
    # it said "continue with `attzoom resume`", which then wanted a sweep
    import signal
    import time

    def as_a_terminal_starts_it() -> None:  # Ctrl-C reaches it, whatever this test process inherited or set
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    run = tmp_path / "run"
    train = subprocess.Popen([sys.executable, "-m", "tune_jobs.cli", "train", "--dataset", "cluttered-digits",
                              "--data-root", str(few_digits_root), "--batch-size", "256", "--no-augment",
                              "--epochs", "50", "--checkpoint-dir", str(run)], cwd=tmp_path, stderr=subprocess.PIPE,
                             text=True, preexec_fn=as_a_terminal_starts_it)
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists() and train.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    masks = Path(f"/proc/{train.pid}/status").read_text() if train.poll() is None else "gone"
    train.send_signal(signal.SIGINT)
    _, err = train.communicate(timeout=120)
    here = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    signals = [line for line in masks.splitlines() if line.startswith("Sig")]
    assert train.returncode == 130, f"{here} {signals}\n{err[-3000:]}"
    assert err.strip().splitlines()[-1] == ("interrupted; run the same command again to resume from its last.pt "
                                            "(--restart starts over)")


def test_a_second_train_on_a_checkpoint_dir_in_use_is_one_line_exit_2_and_a_killed_ones_stops_nobody(
        tmp_path, capsys, few_digits_root):
    # both trained and wrote last.pt and best.pt into the same folder, without a word
    import signal
    import time

    run = tmp_path / "run"
    args = ["train", "--dataset", "cluttered-digits", "--data-root", str(few_digits_root), "--batch-size", "256",
            "--no-augment", "--checkpoint-dir", str(run)]
    first = subprocess.Popen([sys.executable, "-m", "attzoom.cli", *args, "--epochs", "50"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "last.pt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None and (run / "last.pt").exists(), "the first training did not start"
        started = time.monotonic()
        assert main([*args, "--epochs", "50"]) == 2
        assert time.monotonic() - started < 10  # at once: no data loaded, nothing trained
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("attzoom train: error: "), lines
        assert str(run) in lines[0] and "another training writes there now" in lines[0], lines
        assert "pass another --checkpoint-dir" in lines[0] and "in fit" not in lines[0], lines
        assert first.poll() is None  # the first goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert main([*args, "--epochs", "1", "--restart"]) == 0  # the killed one's lock died with its process


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers: a hung or firewalled tracking server."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.parametrize("server", ["closed", "silent"])
def test_readers_on_a_tracking_server_that_does_not_answer_say_so_in_one_line(tmp_path, server, silent_server):
    import socket

    if server == "closed":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            uri = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once it is closed
    else:
        uri = silent_server
    # MLflow itself would retry for minutes and end in a long traceback; the probe gives up after 5 s. The three
    # readers wait side by side.
    readers = [subprocess.Popen([sys.executable, "-m", "tune_jobs.cli", *command, "--tracking-uri", uri],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for command in (["status"], ["report", "demo"], ["explain", "abc"])]
    for reader in readers:
        _, err = reader.communicate(timeout=60)
        assert reader.returncode == 2, reader.args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"tracking server {uri} does not answer" in lines[0], (reader.args, err)
    assert list(tmp_path.iterdir()) == []


def test_readers_on_an_http_server_that_is_not_mlflow_say_so_in_one_line(tmp_path, capsys):
    # an MlflowException traceback with the server's HTML page, exit 1
    import threading
    from http.server import HTTPServer, SimpleHTTPRequestHandler

    from tune_jobs.cli import main as attzoom_main

    class Quiet(SimpleHTTPRequestHandler):  # python -m http.server, without its log lines on stderr
        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    try:
        for command in (["status"], ["report", "demo"]):
            assert attzoom_main([*command, "--tracking-uri", uri]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{uri} answers, but not as an MLflow tracking server" in err, err
    finally:
        server.shutdown()


def test_train_options_reach_the_config_compile_with_or_without_cuda_graphs():
    from attzoom.cli import build_parser, config_from_args

    parser = build_parser()
    assert not config_from_args(parser.parse_args(["train"])).compile
    graphs = config_from_args(parser.parse_args(["train", "--compile"]))
    assert graphs.compile and graphs.cuda_graphs
    plain = config_from_args(parser.parse_args(["train", "--compile", "--no-cuda-graphs"]))
    assert plain.compile and not plain.cuda_graphs


@pytest.fixture(scope="module")
def started_sweep(tmp_path_factory):
    """A real SQLite MLflow store holding sweep t1 as it looks once its first trial has started: a baseline and an
    AttZoom study, one trial running (one epoch logged), none finished."""
    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import PARENT, ROLE, SPEC, STUDY, SWEEP, TRIAL, experiment_name
    from tune_jobs.spec import Spec, spec_json

    tmp = tmp_path_factory.mktemp("started")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    spec = Spec(name="t1", backbones=("tiny_resnet",), datasets=("cluttered-digits",),
                variants=("baseline", "attzoom"), trials=4, tracking_uri=uri)
    eid = client.create_experiment(experiment_name("t1"), artifact_location=(tmp / "artifacts").as_uri(),
                                   tags={SPEC: spec_json(spec)})
    for variant in ("baseline", "attzoom"):
        study = f"tiny_resnet.cluttered-digits.{variant}"
        tags = {SWEEP: "t1", STUDY: study, "backbone": "tiny_resnet", "dataset": "cluttered-digits",
                "variant": variant}
        parent = client.create_run(eid, tags={**tags, ROLE: "study"}, run_name=study).info.run_id
    trial = client.create_run(eid, tags={**tags, ROLE: "trial", TRIAL: "a-1", PARENT: parent}).info.run_id
    client.log_metric(trial, "val_top1", 40.0, step=1)
    client.log_metric(trial, "val_top5", 80.0, step=1)
    return uri


def test_a_report_before_any_finished_trial_says_so_and_advises_no_confirm(started_sweep, tmp_path, capsys):
    # it said "best of 1 single-seed trials" and advised `attzoom confirm`, which refuses a sweep without one
    from tune_jobs.cli import main as attzoom_main

    assert attzoom_main(["report", "t1", "--tracking-uri", started_sweep, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "No trial of sweep t1 has finished" in text and f"attzoom status t1 --tracking-uri {started_sweep}" in text
    assert "attzoom confirm" not in text and "attzoom confirm" not in (tmp_path / "report.html").read_text()
    assert "attzoom confirm" not in capsys.readouterr().out


def test_status_lists_every_study_of_the_spec_against_its_n_trials(started_sweep, capsys):
    # it listed only the studies that had a run, and never said how many trials a study needs
    from tune_jobs.cli import main as attzoom_main

    assert attzoom_main(["status", "t1", "--tracking-uri", started_sweep]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "t1: in progress, 0 of 8 trials ended (4 per study)", lines  # its state and how far, first
    assert lines[1].startswith("  tiny_resnet.cluttered-digits.attzoom: finished 0, running 1, failed 0,"), lines
    assert not lines[1].endswith("done") and lines[2:] == ["  no trial yet: tiny_resnet.cluttered-digits.baseline"]
    # a misspelt name: it said "no sweep named 't2'" without the names there (report lists them)
    assert attzoom_main(["status", "t2", "--tracking-uri", started_sweep]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no sweep named 't2'" in err and "(sweeps there: t1)" in err, err


def test_status_says_how_many_finished_trials_the_scheduler_stopped_early(tmp_path, capsys):
    # an ASHA sweep's status said "finished 4" with no word of the 2 trials pruned at their first rung
    from mlflow.tracking import MlflowClient

    from tune_jobs.cli import main as attzoom_main
    from tune_jobs.layout import PRUNED_STATUS, ROLE, STATUS, STUDY, SWEEP, TRIAL, experiment_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment(experiment_name("a1"))
    for n, status in enumerate(["completed", PRUNED_STATUS, PRUNED_STATUS]):
        tags = {SWEEP: "a1", STUDY: "tiny_resnet.cluttered-digits.baseline", ROLE: "trial", TRIAL: f"t{n}"}
        run = client.create_run(eid, tags={**tags, STATUS: status}).info.run_id
        client.log_metric(run, "val_top1", 40.0 + n, step=1)
        client.set_terminated(run, "FINISHED")
    capsys.readouterr()
    assert attzoom_main(["status", "a1", "--tracking-uri", uri]) == 0
    assert "baseline: finished 3 (2 stopped early by the scheduler), running 0" in capsys.readouterr().out


def test_status_says_done_only_for_a_study_none_of_whose_trials_failed(tmp_path, capsys):
    # a study whose every trial failed was "done", beside a sweep that had ended "failed", exit 1
    from mlflow.tracking import MlflowClient

    from tune_jobs.cli import main as attzoom_main
    from tune_jobs.layout import ROLE, SPEC, STUDY, SWEEP, TRIAL, experiment_name
    from tune_jobs.spec import load_spec, shared_spec_json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = Path(__file__).resolve().parent.parent
    spec = replace(load_spec(root / "tune_jobs" / "specs" / "demo.toml"), name="f1", trials=2, tracking_uri=uri)
    client = MlflowClient(uri)
    eid = client.create_experiment(experiment_name("f1"), tags={SPEC: shared_spec_json(spec)})
    ends = {"baseline": ["FAILED", "FAILED"], "attzoom": ["FINISHED", "FAILED"]}
    for variant, statuses in ends.items():
        for n, status in enumerate(statuses):
            study = f"tiny_resnet.cluttered-digits.{variant}"
            run = client.create_run(eid, tags={SWEEP: "f1", STUDY: study, ROLE: "trial", TRIAL: f"{variant}{n}"})
            run = run.info.run_id
            client.set_terminated(run, status)
    capsys.readouterr()
    assert attzoom_main(["status", "f1", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "baseline: finished 0, running 0, failed 2, epochs 0, best val_top1 -, failed: no trial finished" in out
    assert "attzoom: finished 1, running 0, failed 1, epochs 0, best val_top1 -, ended with 1 failed" in out, out
    assert ", done" not in out
    assert out.index(".baseline:") < out.index(".attzoom:")  # the spec's order, as the sweep's table (was a-z)
    # a study with a run too many (a resume of an older version ran one more trial) counts N, not N + 1
    run = client.create_run(eid, tags={SWEEP: "f1", STUDY: "tiny_resnet.cluttered-digits.attzoom", ROLE: "trial",
                                       TRIAL: "attzoom2"}).info.run_id
    client.set_terminated(run, "FINISHED")
    assert attzoom_main(["status", "f1", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "f1: failed, 4 of 4 trials ended (2 per study)"


def test_status_reads_a_store_on_a_read_only_disk(started_sweep, tmp_path):
    # OSError: Read-only file system: 'mlflow.db.lock', a traceback
    import os
    import shutil

    from test_sweep_e2e import start

    if os.geteuid() == 0 and not shutil.which("capsh"):
        pytest.skip("root without capsh ignores permissions")
    store = tmp_path / "ro"
    store.mkdir()
    shutil.copy(started_sweep.removeprefix("sqlite:///"), store / "mlflow.db")
    store.chmod(0o555)
    try:
        status = start("status", "t1", "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", cwd=tmp_path,
                       stderr=subprocess.PIPE, without_override=True)  # as any other user: the folder is read-only
        out, err = status.communicate(timeout=120)
    finally:
        store.chmod(0o755)
    assert status.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "tiny_resnet.cluttered-digits.attzoom: finished 0, running 1" in out, out
    assert sorted(p.name for p in store.iterdir()) == ["mlflow.db"]


@pytest.mark.parametrize("command", ["report", "explain"])
@pytest.mark.parametrize("case", ["a file", "below a file", "read-only", "in /proc"])
def test_an_output_folder_that_cannot_be_written_is_one_line_exit_2_before_any_work(started_sweep, tmp_path, capsys,
                                                                                     command, case):
    import os

    from tune_jobs.cli import main as attzoom_main

    if case == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes a read-only folder anyway")
    (tmp_path / "afile").write_text("kept")
    (tmp_path / "ro").mkdir(mode=0o555)
    out = {"a file": tmp_path / "afile", "below a file": tmp_path / "afile" / "sub", "read-only": tmp_path / "ro",
           "in /proc": Path("/proc/attzoom-report")}[case]  # /proc passed the permission check, then a traceback
    # a real sweep for the report (it used to be computed, then end in a traceback); explain fails before its store
    args = ["t1", "--tracking-uri", started_sweep] if command == "report" else ["abc", "--tracking-uri",
                                                                                f"sqlite:///{tmp_path}/none.db"]
    assert attzoom_main([command, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}" in err and "pass --out with a folder" in err, err
    assert (tmp_path / "afile").read_text() == "kept" and list((tmp_path / "ro").iterdir()) == []


@pytest.mark.parametrize("option,value", [("--port", "99999"), ("--port", "-1"), ("--port", "0"),
                                          ("--optuna-port", "65536"), ("--port", "x")])
def test_ui_port_out_of_range_is_one_line_exit_2(tmp_path, capsys, option, value):
    import sqlite3

    from tune_jobs.cli import main as attzoom_main

    store = tmp_path / "mlflow.db"  # enough of a store to pass the readers' check: the ports came next (OverflowError)
    sqlite3.connect(store).execute("create table experiments (id integer)").connection.close()
    with pytest.raises(SystemExit) as exit:
        attzoom_main(["ui", "--tracking-uri", f"sqlite:///{store}", option, value])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and option in err and "1 to 65535" in err, err


def test_status_job_without_address_is_one_line_exit_2_at_once(tmp_path, capsys):
    # Ray looked for a local cluster instead: ~40 s of GCS warnings, then an RpcError traceback
    from tune_jobs.cli import main as attzoom_main

    assert attzoom_main(["status", "--job", "raysubmit_x", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--job needs --address" in err and "http://" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,expected", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda:99"], "device 'cuda:99': this machine has"),
    (["--checkpoint-dir", "afile"], "afile is a file"),
    (["--checkpoint-dir", "afile/run"], "afile is a file"),
])
def test_a_missing_device_or_a_file_as_checkpoint_dir_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args,
                                                                         expected):
    (tmp_path / "afile").write_text("")
    monkeypatch.chdir(tmp_path)
    assert main(["train", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert list(tmp_path.iterdir()) == [tmp_path / "afile"]  # nothing trained, no data made


def test_the_ui_hint_names_this_environments_attzoom_by_a_path_that_works_from_any_folder():
    # it said `.venv/bin/attzoom ui ...`, which only works in the project's folder
    from pathlib import Path

    from tune_jobs.cli import ui_command
    from tune_jobs.spec import Spec

    spec = Spec(name="t1", backbones=("tiny_resnet",), datasets=("cluttered-digits",), variants=("baseline",),
                tracking_uri="sqlite:////data/m.db")
    executable, rest = ui_command(spec).split(" ", 1)
    assert Path(executable).is_absolute() and Path(executable).is_file(), executable
    assert rest.startswith("ui t1 --tracking-uri sqlite:////data/m.db"), rest


def test_the_ui_hint_quotes_a_store_path_with_spaces_as_the_resume_hint_does():
    # `--tracking-uri sqlite:////tmp/sp ace/mlflow.db` split into two arguments when pasted (QA pass 10)
    import shlex

    from tune_jobs.cli import ui_command
    from tune_jobs.spec import Spec

    spec = Spec(name="t1", backbones=("tiny_resnet",), datasets=("cluttered-digits",), variants=("baseline",),
                tracking_uri="sqlite:////tmp/sp ace/ünï/mlflow.db", optuna_storage="sqlite:////tmp/o p/optuna.db")
    assert shlex.split(ui_command(spec))[1:] == ["ui", "t1", "--tracking-uri", "sqlite:////tmp/sp ace/ünï/mlflow.db",
                                                 "--optuna-storage", "sqlite:////tmp/o p/optuna.db"]


def one_study_sweep(tmp_path: Path, name: str):
    """(spec, client, experiment id) of a sweep of one study of 2 trials, its spec stored in its experiment (status
    reads N there), in a SQLite store under tmp_path; storage tmp_path/ray_results."""
    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import SPEC, experiment_name
    from tune_jobs.spec import Spec, spec_json

    spec = Spec(name=name, backbones=("tiny_resnet",), datasets=("cluttered-digits",), variants=("baseline",),
                trials=2, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", storage=str(tmp_path / "ray_results"))
    client = MlflowClient(spec.tracking_uri)
    return spec, client, client.create_experiment(experiment_name(name), tags={SPEC: spec_json(spec)})


def test_status_says_when_no_driver_runs_the_running_trials_and_how_to_run_failed_ones_again(tmp_path, capsys):
    # right after a kill -9 it said "running 1" as if the sweep went on
    from tune_jobs.cli import main as attzoom_main
    from tune_jobs.layout import ROLE, STUDY, SWEEP, TRIAL
    from tune_jobs.lease import sweep_lease

    spec, client, eid = one_study_sweep(tmp_path, "k")
    uri, storage = spec.tracking_uri, spec.storage
    client.create_run(eid, tags={SWEEP: "k", STUDY: spec.studies[0].name, ROLE: "trial", TRIAL: "a-1"})
    (tmp_path / "ray_results" / "k").mkdir(parents=True)
    with sweep_lease(storage, "k"):  # a driver runs it
        assert attzoom_main(["status", "k", "--tracking-uri", uri]) == 0
        assert "no driver" not in capsys.readouterr().out
    assert attzoom_main(["status", "k", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "running 1" in out and "no driver runs it now (it stopped or was killed)" in out
    assert f"continue with `{attzoom_executable()} resume k --storage {storage}`" in out

    resume = f"{attzoom_executable()} resume k --storage {storage}"
    # a trial stopped (Ctrl-C), one of two: the lines said what was left, not how to go on
    run_id = client.search_runs([eid])[0].info.run_id
    client.set_terminated(run_id, "KILLED")
    assert attzoom_main(["status", "k", "--tracking-uri", uri]) == 0
    assert f"no driver runs it now: continue it with `{resume}`" in capsys.readouterr().out
    # a failed trial (a resume runs it again): the per-study line said "a resume runs them again", without the command
    client.set_terminated(run_id, "FAILED")
    client.set_terminated(client.create_run(eid, tags={SWEEP: "k", STUDY: spec.studies[0].name, ROLE: "trial",
                                                       TRIAL: "b-1"}).info.run_id, "FINISHED")
    assert attzoom_main(["status", "k", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "no driver runs it now" not in out, out
    assert f"1 failed trial: once the cause is fixed, `{resume}` runs them again" in out, out


def test_status_json_gives_each_sweeps_state_counts_and_resume_command(tmp_path, capsys):
    # scripts (cron, schedulers) had only sentences to parse, and the exit code is 0 whatever the state
    from mlflow.tracking import MlflowClient

    from tune_jobs.cli import main as attzoom_main
    from tune_jobs.layout import ROLE, SPEC, STUDY, SWEEP, TRIAL, experiment_name
    from tune_jobs.lease import sweep_lease
    from tune_jobs.spec import Spec, spec_json

    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "ray_results")
    spec = Spec(name="j", backbones=("tiny_resnet",), datasets=("cluttered-digits",), variants=("baseline", "attzoom"),
                trials=2, tracking_uri=uri, storage=storage)
    client = MlflowClient(uri)
    eid = client.create_experiment(experiment_name("j"), tags={SPEC: spec_json(spec)})
    (tmp_path / "ray_results" / "j").mkdir(parents=True)
    baseline, attzoom = (s.name for s in spec.studies)

    def trial(study: str, status: str | None) -> None:
        tags = {SWEEP: "j", STUDY: study, ROLE: "trial", TRIAL: f"t{len(client.search_runs([eid]))}"}
        run_id = client.create_run(eid, tags=tags).info.run_id
        if status:
            client.set_terminated(run_id, status)

    def status() -> dict:
        assert attzoom_main(["status", "--json", "--tracking-uri", uri]) == 0
        return json.loads(capsys.readouterr().out)["sweeps"][0]

    trial(baseline, None)
    with sweep_lease(storage, "j"):  # a driver runs it
        now = status()
    assert now["sweep"] == "j" and now["state"] == "running" and now["trials_per_study"] == 2, now
    assert now["driver_gone"] is False and now["resume_command"] is None
    assert now["studies"][baseline]["state"] == "in progress" and now["studies"][baseline]["running"] == 1
    assert now["studies"][attzoom] == {"finished": 0, "pruned": 0, "running": 0, "failed": 0, "stopped": 0,
                                       "deleted": 0, "epochs": 0, "best_val_top1": None, "state": "waiting"}
    resume = f"{attzoom_executable()} resume j --storage {storage}"
    assert status()["state"] == "stopped" and status()["resume_command"] == resume  # its driver was killed
    client.set_terminated(client.search_runs([eid])[0].info.run_id, "FINISHED")
    trial(baseline, "FINISHED"), trial(attzoom, "FINISHED"), trial(attzoom, "FAILED")
    ended = status()
    assert ended["state"] == "ended with failures" and ended["resume_command"] == resume, ended
    assert ended["studies"][baseline]["state"] == "done" and ended["studies"][attzoom]["state"] == "ended with failures"
    with sweep_lease(storage, "j"):  # a resume retrying the failed trial: its run reads FAILED until it starts again
        assert status()["state"] == "running"
    assert attzoom_main(["status", "j", "--json", "--tracking-uri", f"sqlite:///{tmp_path / 'no.db'}"]) == 2
    capsys.readouterr()

    # a sweep whose storage this machine cannot see (another machine's path: it read "running" for ever); a study
    # with no finished trial; a sweep stored without its spec
    client.set_experiment_tag(eid, SPEC, spec_json(replace(spec, trials=4)))
    assert status()["state"] == "stopped"
    client.set_experiment_tag(eid, SPEC, spec_json(replace(spec, trials=4, storage="/elsewhere/ray_results")))
    elsewhere = status()
    assert elsewhere["state"] == "in progress" and elsewhere["driver_gone"] is None, elsewhere
    assert elsewhere["resume_command"] is None
    client.set_experiment_tag(eid, SPEC, spec_json(spec))
    for run in client.search_runs([eid], f"tags.`{STUDY}` = '{attzoom}' and attributes.status = 'FINISHED'"):
        client.set_terminated(run.info.run_id, "FAILED")  # attzoom: two failed, none finished
    failed = status()
    assert failed["state"] == "failed" and failed["studies"][attzoom]["state"] == "failed", failed
    client.delete_experiment_tag(eid, SPEC)
    unknown = status()
    assert unknown["state"] == "unknown" and unknown["trials_per_study"] is None and unknown["driver_gone"] is None
    assert {study["state"] for study in unknown["studies"].values()} == {"unknown"}, unknown


def test_hints_name_the_venvs_attzoom_quoted_and_a_jobs_plain(monkeypatch, tmp_path):
    # bare `attzoom` is not on PATH unless the venv is activated; a Ray job's hints are read on another machine
    import tune_jobs.cli as cli_module

    folder = tmp_path / "my venv" / "bin"
    folder.mkdir(parents=True)
    (folder / "attzoom").write_text("#!/bin/sh\n")
    monkeypatch.setattr(cli_module.sys, "executable", str(folder / "python"))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert attzoom_executable() == f"'{folder / 'attzoom'}'"  # a path with a space, pasted whole
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert attzoom_executable() == "attzoom"


# --- attzoom train: how to go on after Ctrl-C, a damaged last.pt, no Python-API hints -------------------------

def tiny_splits():
    """32 training and 16 validation images of 4 classes: an epoch of tiny_resnet in well under a second."""
    from attzoom.data import ImageSet, Splits

    gen = torch.Generator().manual_seed(0)

    def part(n):
        return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8),
                        torch.randint(4, (n,), generator=gen))

    return Splits(part(32), part(16), part(16), 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture
def train_in_process(tmp_path, monkeypatch, capsys):
    """``attzoom train`` in this process on tiny data, Ctrl-C pressed in epoch ``ctrl_c_in`` (None: never):
    returns (exit code, last line of stderr)."""
    from attzoom import train

    monkeypatch.setattr("attzoom.data.load", lambda *a: tiny_splits())
    one_epoch = train.train_one_epoch

    def attzoom_train(*args, ctrl_c_in=None):
        epochs = []

        def epoch(*a, **k):
            epochs.append(1)
            if len(epochs) == ctrl_c_in:
                raise KeyboardInterrupt
            return one_epoch(*a, **k)

        monkeypatch.setattr(train, "train_one_epoch", epoch)
        code = main(["train", "--checkpoint-dir", str(tmp_path / "run"), "--batch-size", "16", "--no-augment",
                     "--epochs", "3", *args])
        return code, capsys.readouterr().err.strip().splitlines()[-1]

    return attzoom_train


def test_ctrl_c_before_any_epoch_finished_says_the_same_command_starts_over(train_in_process, tmp_path):
    """It said 'run the same command again to resume from its last.pt' when there was none."""
    code, line = train_in_process(ctrl_c_in=1)
    assert code == 130 and not (tmp_path / "run" / "last.pt").exists()
    assert "before any epoch finished" in line and "starts again from the beginning" in line, line
    assert "resume" not in line
    code, line = train_in_process(ctrl_c_in=2)  # epoch 1 is in last.pt now
    assert (code, line) == (130, "interrupted; run the same command again to resume from its last.pt "
                                 "(--restart starts over)")
    code, line = train_in_process("--restart", ctrl_c_in=1)  # the old last.pt is ignored, as it will be again
    assert code == 130 and "starts again from the beginning" in line, line
    code, line = train_in_process("--restart", ctrl_c_in=2)  # a new last.pt, which --restart would ignore
    assert (code, line) == (130, "interrupted; run the same command without --restart to resume from its last.pt")


def test_train_errors_name_the_option_not_the_python_api(train_in_process, tmp_path, capsys):
    """'start over with --restart (resume=False in fit)': on the command line only --restart applies."""
    assert train_in_process("--epochs", "1")[0] == 0
    code, line = train_in_process("--epochs", "1", "--lr", "0.05")  # another config's last.pt
    assert code == 2 and "lr: 0.001 in it, 0.05 now" in line and "--restart" in line, line
    assert "in fit" not in line and "resume=False" not in line
    (tmp_path / "afile").write_text("")
    assert main(["train", "--checkpoint-dir", str(tmp_path / "afile" / "run")]) == 2
    line = capsys.readouterr().err.strip()
    assert "afile is a file" in line and "--checkpoint-dir" in line and "in fit" not in line, line


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", bytes(range(256)) * 8])
def test_a_last_pt_of_garbage_is_one_line_without_torchs_internals(train_in_process, tmp_path, content):
    """It quoted torch: 'mmap can only be used with files saved with torch.save(_use_new_zipfile_serialization=...'."""
    last = tmp_path / "run" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(content)
    code, line = train_in_process()
    assert code == 2 and str(last) in line and "--restart" in line, line
    assert "not a checkpoint torch can read (truncated or not a checkpoint)" in line, line
    assert "mmap" not in line and "torch.save" not in line and "in fit" not in line
    assert train_in_process("--restart", "--epochs", "1")[0] == 0  # the way out it names works


# --- attzoom train --help -------------------------------------------------------------------------------------

def test_train_help_explains_every_option_and_shows_the_defaults(capsys):
    """--epochs, --data-root, --kernel-size, --threshold and --zoom had no help, and no option showed its default."""
    import argparse

    from attzoom.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    options = [a for a in subparsers.choices["train"]._actions if a.dest != "help"]  # noqa: SLF001
    assert [a.option_strings for a in options if not a.help] == []
    takes_value = [a for a in options if a.nargs != 0]
    assert [a.option_strings for a in takes_value if "default" not in a.help] == []
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # as one line: argparse wraps where it likes
    for default in ("(default: 0.001)", "(default: 128)", "(default: 50)", "(default: data)", "(default: 0.5)"):
        assert default in text, default


def test_sweep_and_submit_help_say_that_the_specs_values_are_the_defaults():
    # --tracking-uri said "(default: sqlite:///mlflow.db)" though the spec's tracking_uri wins (paper.toml's is an
    # MLflow server), and --epochs, --data-root and resume's --storage had no help
    import argparse

    from tune_jobs.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    for command in ("sweep", "submit", "resume"):
        options = [a for a in subparsers.choices[command]._actions if a.option_strings and a.dest != "help"]  # noqa: SLF001
        assert [a.option_strings for a in options if not a.help] == [], command
    overrides = {a.dest: a.help for a in subparsers.choices["sweep"]._actions}  # noqa: SLF001
    for dest in ("storage", "tracking_uri", "optuna_storage", "trials", "epochs", "max_concurrent", "data_root"):
        assert "(default: the spec's" in overrides[dest], (dest, overrides[dest])


@pytest.mark.parametrize("argv,expected", [
    (["--resume", "t", "--storage", "ray_results"], "--resume needs --storage: the sweep's storage as an absolute"),
    (["--resume", "t"], "--resume needs --storage"),
    (["--resume", "t", "--storage", "/mnt/shared/r", "--trials", "3"], "leave out --trials"),
    (["tune_jobs/specs/demo.toml", "--resume", "t", "--storage", "/mnt/shared/r"], "leave out a spec"),
    ([], "give the spec to run, or --resume SWEEP"),
])
def test_submit_resume_is_refused_in_one_line_where_the_job_could_not_run(argv, expected, capsys):
    # before any cluster is reached: the address is never called
    from tune_jobs.cli import main as attzoom_main

    assert attzoom_main(["submit", *argv, "--address", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


@pytest.fixture
def jobs_api():
    """A Ray Jobs API that knows no job, as a cluster's answers it: /api/version, and 404 "Job X does not exist."."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import ray

    class Jobs(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/api/version":
                body, code = json.dumps({"version": "4", "ray_version": ray.__version__, "ray_commit": "x"}), 200
            else:
                body, code = f"Job {self.path.split('/')[3]} does not exist.", 404
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

    server = HTTPServer(("127.0.0.1", 0), Jobs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.parametrize("command", [["logs", "raysubmit_nope"], ["status", "--job", "raysubmit_nope"]])
def test_a_job_id_the_cluster_does_not_know_is_one_line_naming_it_and_how_to_list_them(jobs_api, tmp_path, capsys,
                                                                                       command):
    # logs: a 29-line aiohttp WSServerHandshakeError 404 traceback; status: RuntimeError "Job ... does not exist."
    from tune_jobs.cli import main as attzoom_main

    assert attzoom_main([*command, "--address", jobs_api, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
                        if command[0] == "status" else [*command, "--address", jobs_api]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no job 'raysubmit_nope'" in lines[0], lines
    assert lines[0].endswith(f"ray job list --address {jobs_api}`"), lines
    assert list(tmp_path.iterdir()) == []


def test_a_trial_run_deleted_in_the_mlflow_ui_is_said_and_not_resumed_for_ever(tmp_path, capsys):
    # status said "stopped ... continue it with resume"; the resume trained nothing and ended "the tracking store
    # records fewer trials than the sweep ran (see the MLflow messages above)", exit 1, and status said resume again
    from tune_jobs.cli import main as attzoom_main
    from tune_jobs.layout import ROLE, STUDY, SWEEP, TRIAL
    from tune_jobs.summary import closing, summarize
    from tune_jobs.tracking import drop_run

    spec, client, eid = one_study_sweep(tmp_path, "d")
    uri = spec.tracking_uri
    (tmp_path / "ray_results" / "d").mkdir(parents=True)
    [study] = (s.name for s in spec.studies)
    runs = [client.create_run(eid, tags={SWEEP: "d", STUDY: study, ROLE: "trial", TRIAL: f"t{n}"}).info.run_id
            for n in range(2)]
    for run in runs:
        client.set_terminated(run, "FINISHED")
    # a run the sweep gave up itself (an orphan, a trial started over): not one to restore
    orphan = client.create_run(eid, tags={SWEEP: "d", STUDY: study, ROLE: "trial", TRIAL: "t9"}).info.run_id
    drop_run(client, orphan, "orphan")
    assert attzoom_main(["status", "--json", "--tracking-uri", uri]) == 0
    assert json.loads(capsys.readouterr().out)["sweeps"][0]["state"] == "done"
    stopped = client.create_run(eid, tags={SWEEP: "d", STUDY: study, ROLE: "trial", TRIAL: "t8"}).info.run_id
    client.set_terminated(stopped, "KILLED")
    client.delete_run(runs[0])
    assert attzoom_main(["status", "--json", "--tracking-uri", uri]) == 0  # a KILLED trial: the resume goes on
    assert json.loads(capsys.readouterr().out)["sweeps"][0]["state"] == "stopped"
    drop_run(client, stopped, "orphan")

    assert attzoom_main(["status", "--json", "--tracking-uri", uri]) == 0
    [now] = json.loads(capsys.readouterr().out)["sweeps"]
    assert now["state"] == "runs deleted" and now["resume_command"] is None, now
    assert now["studies"][study]["deleted"] == 1 and now["studies"][study]["state"] == "runs deleted"
    assert attzoom_main(["status", "d", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "1 trial run deleted in MLflow (restore it in the MLflow UI to count it)" in out and "resume" not in out
    line, code = closing(spec, summarize(client, eid), 12.0)
    assert code == 1 and line.startswith("sweep d ended in 12 s, but 1 of its trial runs is deleted in MLflow"), line
    restore = line.split("`")[1]  # the command it gives runs as written
    done = subprocess.run(restore, shell=True, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert closing(spec, summarize(client, eid), 12.0) == ("sweep d done in 12 s", 0)
    assert attzoom_main(["status", "--json", "--tracking-uri", uri]) == 0
    assert json.loads(capsys.readouterr().out)["sweeps"][0]["state"] == "done"


def test_status_says_to_resume_a_cluster_sweep_with_its_address(tmp_path, capsys):
    # "no driver runs it now ... continue with `attzoom resume k --storage ...`": no --address, so following it moved
    # the cluster's sweep onto a private local Ray
    from mlflow.tracking import MlflowClient

    from tune_jobs.cli import main as attzoom_main
    from tune_jobs.layout import ROLE, STUDY, SWEEP, TRIAL
    from tune_jobs.spec import Spec
    from tune_jobs.tracking import prepare_tracking

    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "ray_results")
    spec = Spec(name="k", backbones=("tiny_resnet",), datasets=("cluttered-digits",), variants=("baseline",),
                trials=2, tracking_uri=uri, storage=storage)
    eid, _ = prepare_tracking(spec, "127.0.0.1:6379")  # what the driver records as it starts
    MlflowClient(uri).create_run(eid, tags={SWEEP: "k", STUDY: spec.studies[0].name, ROLE: "trial", TRIAL: "a-1"})
    (tmp_path / "ray_results" / "k").mkdir(parents=True)
    assert attzoom_main(["status", "k", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"continue with `{attzoom_executable()} resume k --storage {storage} --address 127.0.0.1:6379`" in out, out


def test_readers_on_a_server_that_answers_health_but_fails_reads_say_so_in_one_line(tmp_path, capsys):
    # behind a proxy path or broken: /health said OK, then the first read was an MlflowException traceback
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from tune_jobs.cli import main as attzoom_main

    class HealthOnly(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"OK" if ok else b"not here")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), HealthOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        assert attzoom_main(["status", "--tracking-uri", uri]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the tracking server {uri} answers /health but failed a read" in err, err


def test_submit_resume_refuses_a_relative_data_root(capsys):
    # it reached the job as given, which resolved it in its working dir's copy, from which data/ is left out
    from tune_jobs.cli import main as attzoom_main

    argv = ["submit", "--resume", "t", "--storage", "/mnt/shared/r", "--data-root", "data", "--address", "http://x:1"]
    assert attzoom_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data-root with --resume is the data sets' absolute path" in err, err


def test_status_of_a_store_without_a_sweep_says_so(tmp_path, capsys):
    # it printed nothing at all and exited 0, as if it had not run
    from tune_jobs.cli import main as attzoom_main
    from tune_jobs.tracking import open_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    open_store(uri).create_experiment("someone-elses")
    assert attzoom_main(["status", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out == f"no sweep in {uri} yet (a sweep's experiments are named attzoom-NAME); pass " \
                                      "--tracking-uri to read another store\n"


@pytest.mark.parametrize("command,unbuffered", [(["status", "--tracking-uri", "{uri}"], True),
                                                (["status", "--tracking-uri", "{uri}"], False),
                                                (["--help"], False)])  # unbuffered, argparse drops a failed write
def test_a_reader_that_stops_reading_ends_the_command_quietly_with_141(tmp_path, command, unbuffered):
    # `attzoom status | head -1`: a BrokenPipeError traceback, exit 1 (buffered: "Exception ignored in ...", exit 120)
    import os

    from tune_jobs.layout import experiment_name
    from tune_jobs.tracking import open_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("p1", "p2"):
        open_store(uri).create_experiment(experiment_name(name))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | ({"PYTHONUNBUFFERED": "1"} if unbuffered
                                                                             else {})
    reader = subprocess.Popen([sys.executable, "-m", "tune_jobs.cli", *[part.format(uri=uri) for part in command]],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    reader.stdout.close()  # as `head -1` after its line, before the command writes: each write finds no reader
    err = reader.stderr.read()
    assert reader.wait(timeout=120) == 141 and err == "", err


def test_a_broken_pipe_that_is_not_stdout_is_not_taken_for_a_reader_gone():
    # a pipe of Ray's, a server's or a child process's: exit 141 and silence would hide the failure
    code = ("import argparse, sys\nfrom attzoom.cli import run\nparser = argparse.ArgumentParser()\n"
            "def child_gone(args): raise BrokenPipeError(32, 'Broken pipe')\n"
            "parser.set_defaults(run=child_gone)\nsys.exit(run(parser, []))")
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 1 and done.stderr.strip().endswith("BrokenPipeError: [Errno 32] Broken pipe")


def test_sigterm_before_a_sweep_starts_is_an_interrupt_that_says_to_run_the_command_again(tmp_path):
    # a scheduler's SIGTERM (Slurm, systemd, `timeout`) while the sweep checks its stores: it ended the driver
    # silently with status -15, before the sweep had said how to go on
    import signal
    import socket

    from test_spec import base_spec, write_spec

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(120)
        spec = write_spec(tmp_path, {**base_spec(tmp_path), "tracking_uri": f"http://127.0.0.1:{server.getsockname()[1]}"})
        sweep = subprocess.Popen([sys.executable, "-m", "tune_jobs.cli", "sweep", str(spec)], cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        connection, _ = server.accept()  # the sweep asks the tracking server, which never answers
        sweep.send_signal(signal.SIGTERM)
        out, err = sweep.communicate(timeout=60)
        connection.close()
    assert sweep.returncode == 130 and out == "", err
    assert err == "interrupted; run the same command again\n", err
    assert not (tmp_path / "out").exists()  # nothing was stored
