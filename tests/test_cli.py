"""The ``attzoom`` command as a user runs it: a real process, real data on disk."""

import subprocess
import sys

import pytest
import torch

from attzoom.cli import main


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


def test_train_prints_final_metrics_and_a_truncated_last_pt_is_one_line_naming_it_and_restart(tmp_path):
    args = ["train", "--dataset", "cluttered-digits", "--data-root", str(tmp_path / "data"), "--variant", "attzoom",
            "--batch-size", "256", "--no-augment", "--checkpoint-dir", str(tmp_path / "run"), "--epochs"]
    out = attzoom(*args, "1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "test top-1" in out.stdout and "val top-1" in out.stdout
    assert "attzoom" in out.stderr and "1/1" in out.stderr  # the progress bar
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["config"]["variant"] == "attzoom" and best["metrics"]["epoch"] == 1
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    out = attzoom(*args, "2", cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(last) in lines[0] and "--restart" in lines[0], out.stderr
    assert attzoom(*args, "2", "--restart", cwd=tmp_path).returncode == 0  # the way out it names works


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


def test_train_options_reach_the_config_compile_with_or_without_cuda_graphs():
    from attzoom.cli import build_parser, config_from_args

    parser = build_parser()
    assert not config_from_args(parser.parse_args(["train"])).compile
    graphs = config_from_args(parser.parse_args(["train", "--compile"]))
    assert graphs.compile and graphs.cuda_graphs
    plain = config_from_args(parser.parse_args(["train", "--compile", "--no-cuda-graphs"]))
    assert plain.compile and not plain.cuda_graphs
