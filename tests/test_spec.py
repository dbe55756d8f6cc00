"""Sweep specs: the shipped ones load, and every bad spec exits 2 with one line and leaves no trace.

The issue's rule: unknown keys, unknown names, bad ranges, non-positive counts, a GPU request
above what the cluster has, a data root without the data set, an unwritable storage or
tracking location each exit 2 with one line naming the key or path, before Ray starts, before
an MLflow run exists and before any directory is created. Most cases run ``main`` in-process
(with Ray and the MLflow store booby-trapped); a few run the real command to prove the exit
code and the clean working directory.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tune_jobs import cli
from tune_jobs.cli import attzoom_executable
from tune_jobs.spec import (EarlyStopping, SearchSpace, SpecError, load_spec, parse_spec, spec_from_json,
                            spec_json, validate)
from tune_jobs.sweep import preflight

SPECS = Path(cli.__file__).parent / "specs"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def base_spec(tmp_path: Path) -> dict:
    """A valid, tiny spec whose every location is a not-yet-existing folder under tmp_path."""
    out = tmp_path / "out"
    return {"name": "tiny", "trials": 1, "epochs": 1, "data_root": str(out / "data"),
            "storage": str(out / "ray_results"), "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
            "matrix": {"backbones": ["tiny_resnet"], "datasets": ["cluttered-digits"],
                       "variants": ["baseline", "attzoom"]},
            "resources": {"cpus": 1, "gpus": 0}}


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.toml") -> Path:
    top = [f"{k} = {toml_value(v)}" for k, v in spec.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {toml_value(vv)}" for kk, vv in v.items())
              for k, v in spec.items() if isinstance(v, dict)]
    path = tmp_path / name
    path.write_text("\n".join(top) + "\n" + "\n".join(tables) + "\n")
    return path


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def edit(spec: dict, key: str, value) -> dict:
    """Set 'key' or 'section.key' (value None deletes it)."""
    section, _, name = key.rpartition(".")
    table = spec.setdefault(section, {}) if section else spec
    if value is None:
        table.pop(name)
    else:
        table[name] = value
    return spec


# (key to set, value, what the one line must name). "{tmp}" is replaced by tmp_path.
BAD = {
    "unknown top-level key": ("epoch", 3, "'epoch'"),
    "unknown [matrix] key": ("matrix.backbone", ["tiny_resnet"], "matrix.backbone"),
    "unknown [search] key": ("search.learning_rate", [1e-4, 1e-2], "search.learning_rate"),
    "unknown [train] key": ("train.batch_size", 64, "train.batch_size"),  # searched: narrow search.batch_sizes
    "unknown [resources] key": ("resources.gpu", 1, "resources.gpu"),
    "unknown [failure] key": ("failure.retries", 1, "failure.retries"),
    "unknown backbone": ("matrix.backbones", ["tiny_resnet", "vgg16"], "matrix.backbones"),
    "unknown dataset": ("matrix.datasets", ["mnist"], "matrix.datasets"),
    "unknown variant": ("matrix.variants", ["baseline", "attzom"], "matrix.variants"),
    "backbones not a list": ("matrix.backbones", "tiny_resnet", "matrix.backbones"),
    "empty variants": ("matrix.variants", [], "variants"),
    "missing name": ("name", None, "name"),
    "trials 0": ("trials", 0, "trials"),
    "trials not an integer": ("trials", 2.5, "trials"),
    "epochs -1": ("epochs", -1, "epochs"),
    "max_concurrent 0": ("max_concurrent", 0, "max_concurrent"),
    "patience 0": ("patience", 0, "patience"),
    "seed not an integer": ("seed", "zero", "seed"),
    "seed negative": ("seed", -5, "seed"),  # Optuna's traceback once Ray had started
    "seed past 2**32": ("seed", 2**32, "seed"),
    "cpus nan": ("resources.cpus", float("nan"), "resources.cpus"),  # NaN passed every range check, then hung
    "gpus nan": ("resources.gpus", float("nan"), "resources.gpus"),
    "cpus more than this machine has": ("resources.cpus", 1000, "resources.cpus = 1000 but this machine has"),  # hung
    "outage deadline inf": ("failure.tracking_outage_minutes", float("inf"), "failure.tracking_outage_minutes"),
    "reduction factor inf": ("scheduler.reduction_factor", float("inf"), "scheduler.reduction_factor"),
    "threshold nan": ("train.threshold", float("nan"), "train.threshold"),
    "batch size listed twice": ("search.batch_sizes", [64, 64], "search.batch_sizes lists a choice twice"),
    "optimizer listed twice": ("search.optimizers", ["adam", "adam"], "search.optimizers lists a choice twice"),
    "max_retries -1": ("failure.max_retries", -1, "failure.max_retries"),
    "max_retries true": ("failure.max_retries", True, "failure.max_retries"),  # a bool passed as 1 to Tune
    "tracking_uri of no store": ("tracking_uri", "foo://bar", "tracking_uri"),
    "tracking_uri a folder": ("tracking_uri", "{tmp}/mlruns", "tracking_uri"),  # MLflow's frozen file store
    "tracking_uri an Optuna database": ("tracking_uri", "sqlite:///{tmp}/optuna.db", "not an MLflow tracking store"),
    "outage deadline 0": ("failure.tracking_outage_minutes", 0, "failure.tracking_outage_minutes"),
    "outage deadline text": ("failure.tracking_outage_minutes", "30m", "failure.tracking_outage_minutes"),
    "unknown metric": ("metric", "val_loss", "metric"),
    "unknown [scheduler] key": ("scheduler.brackets", 2, "scheduler.brackets"),
    "unknown scheduler kind": ("scheduler.kind", "hyperband", "scheduler.kind"),
    "grace period past the epochs": ("scheduler.grace_period", 2, "scheduler.grace_period"),  # epochs = 1
    "grace period 0": ("scheduler.grace_period", 0, "scheduler.grace_period"),
    "reduction factor 1": ("scheduler.reduction_factor", 1, "scheduler.reduction_factor"),
    "lr reversed": ("search.lr", [0.1, 1e-5], "search.lr"),
    "lr low 0 on a log scale": ("search.lr", [0.0, 0.1], "search.lr"),
    "weight_decay negative": ("search.weight_decay", [-1e-4, 1e-2], "search.weight_decay"),
    "momentum above 1": ("search.momentum", [0.9, 1.5], "search.momentum"),
    "batch size 0": ("search.batch_sizes", [0, 32], "search.batch_sizes"),
    "batch sizes not a list": ("search.batch_sizes", 32, "search.batch_sizes"),
    # it said 'must be a list such as ["a", "b"]' of a list of numbers, and quoted ranges as Python tuples
    "batch sizes as floats": ("search.batch_sizes", [32.0, 64.0], "such as [32, 64] (whole numbers), got [32.0, 64.0]"),
    "lr as strings": ("search.lr", ["1e-5", "1e-1"], "search.lr must be [low, high], two numbers with > 0"),
    "lr as strings, shown as given": ("search.lr", ["1e-5", "1e-1"], "got ['1e-5', '1e-1']"),
    "step_size not integers": ("search.step_size", [1.5, 30], "search.step_size"),
    "unknown optimizer": ("search.optimizers", ["adam", "lamb"], "search.optimizers"),
    "empty schedulers": ("search.schedulers", [], "search.schedulers"),
    "threshold above 1": ("search.threshold", [0.5, 1.2], "search.threshold"),
    "unknown position": ("search.positions", ["stem", "head"], "search.positions"),
    "cpus 0": ("resources.cpus", 0, "resources.cpus"),
    "gpus negative": ("resources.gpus", -0.25, "resources.gpus"),
    "gpus 1.5": ("resources.gpus", 1.5, "resources.gpus"),
    "gpus above this machine's": ("resources.gpus", 0.5, "resources.gpus"),
    "gpus above local_gpus": ("resources.local_gpus", 1, "resources.gpus"),  # with gpus = 2 below
    "train threshold 2": ("train.threshold", 2, "threshold"),
    "train kernel_size wrong type": ("train.kernel_size", "3", "train.kernel_size"),
    "train unknown position": ("train.position", "head", "position"),
    "train threshold also searched": ("train.threshold", 0.7, "train.threshold fixes what search.threshold searches"),
    "train position also searched": ("train.position", "stem", "train.position fixes what search.positions"),
    "train on cuda without a GPU": ("train.device", "cuda", "resources.gpus = 0"),  # every trial failed, "done"
    "name with /": ("name", "a/b", "name"),
    "name ..": ("name", "..", "name"),
    "name traversal": ("name", "../escape", "name"),
    "storage not a string": ("storage", 5, "storage"),
    "storage under a file": ("storage", "{tmp}/f/sub", "{tmp}/f is a file"),
    "storage a file": ("storage", "{tmp}/f", "{tmp}/f is a file"),
    "storage in /proc": ("storage", "/proc/attzoom-x", "storage"),
    "tracking under a file": ("tracking_uri", "sqlite:///{tmp}/f/sub/mlflow.db", "tracking_uri"),
    "data root under a file": ("data_root", "{tmp}/f/data", "data_root"),
    "optuna storage under a file": ("optuna_storage", "sqlite:///{tmp}/f/sub/optuna.db", "optuna_storage"),
    "optuna database down": ("optuna_storage", "postgresql://127.0.0.1:1/x", "--optuna-storage"),  # blamed MLflow
    "tracking database down": ("tracking_uri", "postgresql://127.0.0.1:1/x", "--tracking-uri"),  # a traceback
    "data root without cifar100": ("matrix.datasets", ["cifar100"], "{tmp}/empty/cifar-100-python/train"),
    # each passed, then every trial failed, retried, in pages of tracebacks
    "cifar100 without its test file": ("matrix.datasets", ["cifar100"], "{tmp}/empty/cifar-100-python/test is missing"),
    "cifar100 cut short": ("matrix.datasets", ["cifar100"],
                           "CIFAR-100 file {tmp}/empty/cifar-100-python/train is truncated"),
    "tinyimagenet class without images": ("matrix.datasets", ["tinyimagenet"],
                                          "no images in {tmp}/empty/tiny-imagenet-200/train/n02/images for wnid n02"),
}


def bad_spec_file(tmp_path: Path, case: str) -> tuple[Path, str]:
    """Write the case's spec (and any file it needs); returns the spec path and the expected text."""
    key, value, expected = BAD[case]
    value = json.loads(json.dumps(value).replace("{tmp}", str(tmp_path)))
    spec = edit(base_spec(tmp_path), key, value)
    if "a file" in case:
        (tmp_path / "f").write_text("a regular file, not a folder")
    if case == "data root without cifar100" or case.startswith(("cifar100", "tinyimagenet")):
        (tmp_path / "empty").mkdir()
        spec["data_root"] = str(tmp_path / "empty")
    if case.startswith("cifar100"):
        from conftest import _write_cifar100

        _write_cifar100(tmp_path / "empty")
        train = tmp_path / "empty" / "cifar-100-python" / "train"
        if case == "cifar100 cut short":
            train.write_bytes(train.read_bytes()[:2000])
        else:
            (train.parent / "test").unlink()
    if case == "tinyimagenet class without images":
        tiny = tmp_path / "empty" / "tiny-imagenet-200"
        (tiny / "val").mkdir(parents=True)
        (tiny / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t63\t63\n")
        (tiny / "wnids.txt").write_text("n01\nn02\n")
        (tiny / "train" / "n01" / "images").mkdir(parents=True)
        (tiny / "train" / "n01" / "images" / "n01_0.JPEG").write_bytes(b"jpeg")
        (tiny / "train" / "n02" / "images").mkdir(parents=True)
    if case == "tracking_uri an Optuna database":  # a real one: MLflow would add its tables to it
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")
    if case.endswith("also searched"):  # the search won, silently: the baseline ran with 0.7, AttZoom with 0.39
        spec["search"] = {**spec.get("search", {}), "threshold": [0.3, 0.9], "positions": ["stem", "stage1"]}
    if case == "gpus above local_gpus":
        spec["resources"]["gpus"] = 2
    return write_spec(tmp_path, spec), expected.replace("{tmp}", str(tmp_path))


@pytest.fixture
def no_side_effects(monkeypatch):
    """Fail loudly if a bad spec gets as far as Ray or the MLflow store; pretend there is no GPU."""
    import ray
    import torch

    from tune_jobs import tracking

    def trap(*args, **kwargs):
        raise AssertionError("a bad spec reached Ray or MLflow")

    monkeypatch.setattr(ray, "init", trap)
    monkeypatch.setattr(tracking, "prepare_store", trap)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def assert_one_line(err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    assert lines[0].startswith("attzoom sweep: error: "), err
    assert expected in lines[0], err


def assert_refused(argv: list[str], root: Path, monkeypatch, capsys, expected: str) -> None:
    """`attzoom ARGV` run in ``root`` exits 2, prints one line naming ``expected`` and leaves ``root`` as it was."""
    before = tree(root)
    monkeypatch.chdir(root)
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line(err, expected)
    assert tree(root) == before


@pytest.mark.parametrize("case", BAD)
def test_bad_spec_exits_2_with_one_line_and_no_trace(tmp_path, monkeypatch, capsys, no_side_effects, case):
    spec_file, expected = bad_spec_file(tmp_path, case)
    assert_refused(["sweep", str(spec_file)], tmp_path, monkeypatch, capsys, expected)


@pytest.mark.parametrize("argv,expected", [
    (["--trials", "0"], "trials"),
    (["--epochs", "0"], "epochs"),
    (["--max-concurrent", "-1"], "max_concurrent"),
    (["--storage", "{tmp}/f/sub"], "storage"),
    (["--tracking-uri", "sqlite:///{tmp}/f/mlflow.db"], "tracking_uri"),
    (["--data-root", "{tmp}/f"], "data_root"),
    (["--address", "127.0.0.1:1"], "no Ray cluster answers at --address 127.0.0.1:1"),  # hung on the GCS for minutes
    (["--address", "headnode"], "is no Ray cluster address"),
    # Ray's ConnectionError came after the spec, the experiment and RUNNING parent runs were stored: the name was
    # taken, and the line blamed the tracking store, exit 3
    (["--address", "auto"], "--address auto found no Ray instance on this machine; start one"),
])
def test_bad_command_line_override_exits_2(tmp_path, monkeypatch, capsys, no_side_effects, argv, expected):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-ray-here"))  # where `ray start` notes its address
    spec_file = write_spec(tmp_path, base_spec(tmp_path))
    (tmp_path / "f").write_text("a regular file")
    overrides = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert_refused(["sweep", str(spec_file), *overrides], tmp_path, monkeypatch, capsys, expected)


def test_a_bad_value_from_an_option_is_not_blamed_on_the_spec_file_alone(tmp_path, monkeypatch, capsys):
    spec_file = write_spec(tmp_path, base_spec(tmp_path))  # said "spec.toml: trials must be ..." for --trials 0
    assert_refused(["sweep", str(spec_file), "--trials", "0"], tmp_path, monkeypatch, capsys,
                   f"{spec_file} with --trials 0: trials must be a positive integer")


@pytest.mark.parametrize("text,expected", [
    ('name = "x"\n[matrix\nbackbones = 1\n', "not valid TOML"),
    ("name = 'x'\nmatrix = 3\n", "[matrix] must be a table"),
    ('name = "x"\n\n[matrix]\nbackbones = ["tiny_resnet"]\n', "[matrix] datasets is missing"),
])
def test_malformed_spec_file_exits_2(tmp_path, monkeypatch, capsys, no_side_effects, text, expected):
    (tmp_path / "spec.toml").write_text(text)
    assert_refused(["sweep", "spec.toml"], tmp_path, monkeypatch, capsys, expected)


def test_missing_spec_file_and_folder_as_spec_exit_2(tmp_path, monkeypatch, capsys, no_side_effects):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.toml").mkdir()
    for name in ("nowhere.toml", "folder.toml"):
        assert cli.main(["sweep", name]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert_one_line(err, name)
    assert tree(tmp_path) == {"folder.toml"}


def sweep_process(spec_file: Path, *args: str, cwd: Path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # "no GPU on this machine", whatever machine runs the tests
    return subprocess.run([sys.executable, "-m", "tune_jobs.cli", "sweep", str(spec_file), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["unknown top-level key", "gpus above this machine's", "data root without cifar100",
                                  "storage under a file", "tracking under a file"])
def test_real_command_exits_2_before_ray_or_mlflow(tmp_path, case):
    """The command a user runs: exit code 2, one line, and the working folder exactly as it was.

    With a GPU request this machine cannot meet, Ray is never started: a local run checks
    this machine's GPUs before Ray, before MLflow (the default store would appear in cwd).
    """
    spec_file, expected = bad_spec_file(tmp_path, case)
    before = tree(tmp_path)
    out = sweep_process(spec_file, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert_one_line(out.stderr, expected)
    assert tree(tmp_path) == before


def test_real_command_override_trials_0_exits_2(tmp_path):
    spec_file = write_spec(tmp_path, base_spec(tmp_path))
    out = sweep_process(spec_file, "--trials", "0", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert_one_line(out.stderr, "trials")
    assert tree(tmp_path) == {"spec.toml"}


def test_gpu_check_is_local_only(tmp_path, monkeypatch):
    """The pre-Ray GPU check applies to a local Ray instance; a cluster is checked once connected."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    spec = load_spec(write_spec(tmp_path, edit(base_spec(tmp_path), "resources.gpus", 0.25)))
    with pytest.raises(SpecError, match="resources.gpus = 0.25 but this machine has 0 GPU"):
        preflight(spec, local=True)
    preflight(spec)  # --address: the cluster may have GPUs
    preflight(replace(spec, local_gpus=1), local=True)  # a logical GPU for a local instance
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    preflight(spec, local=True)
    assert tree(tmp_path) == {"spec.toml"}


def test_valid_spec_passes_preflight_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = preflight(load_spec(write_spec(tmp_path, base_spec(tmp_path))), local=True)
    assert [s.name for s in spec.studies] == ["tiny_resnet.cluttered-digits.baseline",
                                              "tiny_resnet.cluttered-digits.attzoom"]
    assert tree(tmp_path) == {"spec.toml"}


def test_a_file_uri_storage_is_the_folder_it_names(tmp_path, monkeypatch):
    """storage = "file:///..." is a local folder: the saved spec (and the lease, the trial folders) go there, not
    under a folder called 'file:' in the working directory."""
    from tune_jobs.sweep import SPEC_FILE, experiment_dir, load_saved_spec, save_spec

    monkeypatch.chdir(tmp_path)
    uri = (tmp_path / "results").as_uri()
    spec = preflight(load_spec(write_spec(tmp_path, edit(base_spec(tmp_path), "storage", uri))))
    save_spec(spec)
    assert experiment_dir(spec) == tmp_path / "results" / spec.name
    assert (tmp_path / "results" / spec.name / SPEC_FILE).is_file() and not (tmp_path / "file:").exists()
    assert load_saved_spec(spec.name, uri).storage == str(tmp_path / "results")  # resume --storage file:///...


def test_a_spec_read_from_the_store_for_want_of_its_folder_says_so(tmp_path, capsys):
    # `confirm t --storage wrong` silently trained with the spec (and results folder) stored in MLflow
    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import SPEC, experiment_name
    from tune_jobs.spec import shared_spec_json
    from tune_jobs.sweep import load_saved_spec

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = preflight(load_spec(write_spec(tmp_path, edit(base_spec(tmp_path), "storage", str(tmp_path / "results")))))
    MlflowClient(uri).create_experiment(experiment_name(spec.name), tags={SPEC: shared_spec_json(spec)})
    capsys.readouterr()
    assert load_saved_spec(spec.name, str(tmp_path / "wrong"), uri).storage == str(tmp_path / "results")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "wrong" / spec.name) in err, err
    assert f"using the spec stored with sweep {spec.name!r}" in err and str(tmp_path / "results") in err, err


def test_cifar100_data_root_that_holds_it_passes(tmp_path, write_cifar100):
    write_cifar100(tmp_path / "data")
    spec = edit(edit(base_spec(tmp_path), "matrix.datasets", ["cifar100"]), "data_root", str(tmp_path / "data"))
    preflight(load_spec(write_spec(tmp_path, spec)))


def _damage(data: Path, damage: str) -> Path:
    """One of the defects the trial's loader refuses (tests/test_data.py), made in a fresh copy under ``data``;
    returns the path the refusal must name."""
    import pickle

    from conftest import _write_cifar100
    from test_data import WNIDS, _jpeg, write_tinyimagenet

    if damage.startswith("cifar"):
        part = _write_cifar100(data)["train"]
        bad = {"cifar-shape": {b"data": part[b"data"][:, :1000]}, "cifar-labels": {b"fine_labels": [200] * 50}}
        with open(data / "cifar-100-python" / "train", "wb") as f:
            pickle.dump({**part, **bad[damage]}, f)
        return data / "cifar-100-python" / "train"
    folder = write_tinyimagenet(data)
    image = folder / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_2.JPEG"
    if damage in ("garbage", "truncated", "empty"):
        raw = image.read_bytes()
        image.write_bytes({"garbage": b"not a jpeg" * 30, "truncated": raw[:300], "empty": b""}[damage])
    elif damage == "small":
        _jpeg(image, (0, 0, 0), size=32)
    elif damage == "val-missing":
        image = folder / "val" / "images" / "val_3.JPEG"
        image.unlink()
    elif damage == "unknown-wnid":
        image = folder / "val" / "val_annotations.txt"
        image.write_text(image.read_text().replace(WNIDS[0], "n09999999", 1))
    elif damage == "dangling-link":  # listed, but its stat fails: an OSError traceback
        image = image.with_name("linked.JPEG")
        image.symlink_to(data / "nowhere.JPEG")
    return image


@pytest.mark.parametrize("damage", ["cifar-shape", "cifar-labels", "garbage", "truncated", "empty", "small",
                                    "val-missing", "unknown-wnid", "dangling-link"])
def test_data_a_trial_would_refuse_is_refused_before_the_sweep(tmp_path, damage, capsys, no_side_effects):
    # the sweep started, and every trial of the data set failed, retried, in pages of tracebacks: the driver's
    # check looked for the files only
    damaged = _damage(tmp_path / "data", damage)
    dataset = "cifar100" if damage.startswith("cifar") else "tinyimagenet"
    spec = edit(edit(base_spec(tmp_path), "matrix.datasets", [dataset]), "data_root", str(tmp_path / "data"))
    capsys.readouterr()
    assert cli.main(["sweep", str(write_spec(tmp_path, spec))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data_root: " in err and str(damaged) in err and "copy " in err, err


@pytest.mark.parametrize("option", ["--storage", "--tracking-uri"])
def test_a_full_disk_is_refused_before_any_work_and_check_says_so(tmp_path, monkeypatch, capsys, option):
    # --check said "checked" with 8 KB free; the run then stopped at its lease's first write (ENOSPC, exit 3),
    # leaving an empty mlflow.db and optuna.db behind (QA pass 9). The disk's free space, as the OS reports it
    import shutil

    full = tmp_path / "full"
    full.mkdir()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=8192) if Path(p) == full else real(p))
    value = str(full / "ray_results") if option == "--storage" else f"sqlite:///{full / 'mlflow.db'}"
    spec = write_spec(tmp_path, base_spec(tmp_path))
    for extra in (["--check"], []):
        assert cli.main(["sweep", str(spec), option, value, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"the disk holding {full}" in err and "is full (0.0 MiB free)" in err, err
        assert f"choose another location with {option}" in err and list(full.iterdir()) == []
    # a FUSE mount that does not answer statfs reports 0 free of 0: no reading, not a full disk
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=0, total=0))
    assert cli.main(["sweep", str(spec), option, value, "--check"]) == 0


def test_a_read_only_data_root_serves_cluttered_digits_once_they_are_built_there(tmp_path, monkeypatch):
    # a team's shared data root, read-only to all but its owner: refused though every trial would have read the
    # digits from it (root may write anywhere: the folder's permission is what _writable says)
    from attzoom.datafiles import digits_cache
    from tune_jobs import spec as specs

    root = tmp_path / "shared"
    root.mkdir()
    spec = load_spec(write_spec(tmp_path, edit(base_spec(tmp_path), "data_root", str(root))))
    monkeypatch.setattr(specs, "_writable", lambda path: path != root)
    with pytest.raises(SpecError, match=f"data_root: {root} is not writable, and cluttered digits are generated"):
        preflight(spec)
    digits_cache(root).parent.mkdir()
    digits_cache(root).write_bytes(b"built by the folder's owner")
    assert preflight(spec).data_root == str(root)


def test_a_whole_tinyimagenet_copy_passes_and_is_checked_once_per_version(tmp_path, monkeypatch):
    from test_data import write_tinyimagenet

    from attzoom import datafiles

    folder = write_tinyimagenet(tmp_path / "data")
    spec = load_spec(write_spec(tmp_path, edit(edit(base_spec(tmp_path), "matrix.datasets", ["tinyimagenet"]),
                                               "data_root", str(tmp_path / "data"))))
    checked = []
    monkeypatch.setattr(datafiles, "check_images", lambda files: checked.append(len(files)))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    preflight(spec)
    preflight(spec)
    assert checked == [3 * 4 + 6]
    next(folder.glob("train/*/images/*.JPEG")).touch()  # another version of the files: checked again
    preflight(spec)
    assert checked == [18, 18]
    # noted in the user's cache folder, not in the process: each sweep's driver read every image again (110,000:
    # seconds, or minutes on a network volume). Where it cannot be noted, the check runs each time, and passes
    assert len(list((tmp_path / "cache" / "attzoom" / "checked").iterdir())) == 2  # one note per version
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    preflight(spec)
    preflight(spec)
    assert checked == [18, 18, 18, 18]


def test_a_cluster_without_gpus_now_is_refused_only_where_no_autoscaler_can_add_them(tmp_path):
    # `ray up` / KubeRay clusters start with no GPU worker (min_workers 0): the paper sweep was refused at once
    import math

    from tune_jobs.spec import check_cluster_gpus

    spec = load_spec(write_spec(tmp_path, edit(base_spec(tmp_path), "resources.gpus", 0.25)))
    where = "the cluster at 10.0.0.1:6379"
    with pytest.raises(SpecError, match="resources.gpus = 0.25 but the cluster at 10.0.0.1:6379 has 0 GPU"):
        check_cluster_gpus(spec, 0, where)  # no autoscaler: it would wait forever
    with pytest.raises(SpecError, match="and its autoscaler adds at most 0; lower resources.gpus"):
        check_cluster_gpus(spec, 0, where, ceiling=0.0)  # autoscaler v2 without a GPU node group
    for ceiling in (8.0, math.inf):  # v2's node groups allow 8; v1 does not say
        assert check_cluster_gpus(spec, 0, where, ceiling) == (f"{where} has 0 GPU(s) now; the trials (resources.gpus "
                                                               "= 0.25) wait for its autoscaler to start GPU nodes")
    assert check_cluster_gpus(spec, 1, where) is None


def test_a_gpu_memory_cap_above_a_trials_share_is_refused_and_one_below_is_kept(tmp_path):
    # gpus = 0.25 with gpu_memory_fraction = 0.9 passed, and the 0.9 was replaced by 0.25 without a word
    from tune_jobs.space import STUDY_KEY
    from tune_jobs.trainable import SweepContext, trial_config

    def shared(cap):
        raw = edit(base_spec(tmp_path), "resources.gpus", 0.25)
        return load_spec(write_spec(tmp_path, edit(raw, "train.gpu_memory_fraction", cap) if cap else raw))

    with pytest.raises(SpecError, match=r"train.gpu_memory_fraction = 0.9 is more than a trial's share of its GPU "
                                        r"\(resources.gpus = 0.25\), which caps it; drop it or set it to 0.25"):
        shared(0.9)
    for asked, kept in ((0.2, 0.2), (None, 0.25)):
        spec = shared(asked)
        config = {STUDY_KEY: spec.studies[0].name, "lr": 1e-3, "batch_size": 32}
        assert trial_config(config, SweepContext(spec))[2].gpu_memory_fraction == kept


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine where torch sees no GPU")
def test_a_trial_given_a_gpu_that_torch_cannot_use_fails_instead_of_training_on_the_cpu(tmp_path):
    # device "auto" fell back to the CPU without a word (a node whose NVIDIA driver is too old for torch's CUDA)
    from tune_jobs.trainable import check_gpu_usable

    spec = load_spec(write_spec(tmp_path, edit(base_spec(tmp_path), "resources.gpus", 0.25)))
    with pytest.raises(RuntimeError, match=r"resources.gpus = 0.25 but torch .* sees no usable GPU on .*nvidia-smi"):
        check_gpu_usable(spec, "auto")
    check_gpu_usable(replace(spec, local_gpus=1), "auto")  # logical GPUs of a local run: packing tried on CPUs
    check_gpu_usable(spec, "cpu")  # asked for by name
    check_gpu_usable(replace(spec, gpus=0), "auto")


def test_paper_spec_is_the_papers_protocol():
    spec = load_spec(SPECS / "paper.toml")
    assert len(spec.studies) == 24 == len({s.name for s in spec.studies})
    assert set(spec.backbones) == {"resnet50", "densenet121", "mobilenetv1", "seresnet50", "cbam_resnet50",
                                   "resnext50"}
    assert spec.datasets == ("cifar100", "tinyimagenet") and spec.variants == ("baseline", "attzoom")
    assert (spec.trials, spec.epochs, spec.patience, spec.metric) == (30, 50, 5, "val_top1")
    assert spec.gpus == 0.25 and spec.scheduler.kind == "none"  # every trial to its end, as in the paper
    # the shipped space is the default one plus AttZoom's threshold, which the paper does not fix ...
    assert spec.search == replace(SearchSpace(), threshold=(0.3, 0.9))
    s = spec.search  # ... which is the paper's (Sec. 5.3)
    assert s.batch_sizes == (32, 64, 128, 256)
    assert (s.lr, s.weight_decay, s.momentum, s.step_size) == ((1e-5, 1e-1), (1e-6, 1e-2), (0.7, 1.0), (10, 30))
    assert set(s.optimizers) == {"adam", "sgd"}
    assert set(s.schedulers) == {"cosine", "step", "plateau", "onecycle"}
    assert s.threshold == (0.3, 0.9) and s.positions is None


def test_paper_spec_with_the_controls_switched_on_validates():
    import tomllib

    raw = tomllib.loads((SPECS / "paper.toml").read_text())
    raw["matrix"]["variants"] = ["baseline", "attzoom", "zoom-only", "attention-only", "resize2x"]
    raw["search"].update(threshold=[0.3, 0.7], positions=["stem", "stage1"])
    del raw["train"]["position"]  # searched now (a fixed one as well is refused)
    spec = parse_spec(raw)
    validate(spec)
    assert len(spec.studies) == 60


def test_demo_spec_is_small_and_needs_no_gpu_or_download(tmp_path, monkeypatch):
    spec = load_spec(SPECS / "demo.toml")
    assert spec.datasets == ("cluttered-digits",) and spec.variants == ("baseline", "attzoom")
    assert len(spec.studies) == 2 and spec.gpus == 0
    assert spec.trials * len(spec.studies) <= 16 and spec.epochs <= 10
    monkeypatch.chdir(tmp_path)
    preflight(spec, local=True)
    assert tree(tmp_path) == set()


def test_shipped_specs_search_attzooms_threshold_and_controls_is_the_demo_with_every_variant():
    from dataclasses import replace

    demo, paper, controls = (load_spec(SPECS / f"{name}.toml") for name in ("demo", "paper", "controls"))
    assert demo.search.threshold and paper.search.threshold  # the paper does not fix it: it is part of the question
    assert controls.variants == ("baseline", "attzoom", "zoom-only", "attention-only", "resize2x")
    assert replace(controls, name="demo", variants=demo.variants) == demo


def test_an_unknown_scheduler_on_the_command_line_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys,
                                                                         no_side_effects):
    spec_file = write_spec(tmp_path, base_spec(tmp_path))
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as exit:
        cli.main(["sweep", str(spec_file), "--scheduler", "pbt"])
    assert exit.value.code == 2 and tree(tmp_path) == before
    assert_one_line(capsys.readouterr().err, "argument --scheduler: invalid choice: 'pbt' (choose from 'none', 'asha')")


def test_early_stopping_is_off_unless_asked_and_travels_with_the_saved_spec(tmp_path):
    spec = load_spec(write_spec(tmp_path, base_spec(tmp_path)))
    assert spec.scheduler == EarlyStopping() and spec.scheduler.kind == "none"  # the paper's protocol
    asked = load_spec(write_spec(tmp_path, {**base_spec(tmp_path), "epochs": 8,
                                            "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 4}}))
    assert asked.scheduler == EarlyStopping("asha", 2, 4)
    assert spec_from_json(spec_json(asked), "saved") == asked  # resume and confirm read it back
    assert load_spec(write_spec(tmp_path, base_spec(tmp_path)), scheduler="asha").scheduler.kind == "asha"
    older = json.loads(spec_json(spec))
    del older["scheduler"]  # saved before [scheduler] existed
    assert spec_from_json(json.dumps(older), "saved").scheduler == EarlyStopping()


def test_a_saved_spec_with_a_choice_listed_twice_still_loads(tmp_path):
    # a sweep started before spec files refused duplicates must stay resumable (its spec cannot change either)
    raw = json.loads(spec_json(load_spec(write_spec(tmp_path, base_spec(tmp_path)))))
    raw["search"]["optimizers"] = ["adam", "adam", "sgd"]
    assert spec_from_json(json.dumps(raw), "saved").search.optimizers == ("adam", "adam", "sgd")


@pytest.mark.parametrize("edit,expected", [
    (lambda text: text[:40], "not valid JSON"),
    (lambda text: json.dumps({**json.loads(text), "bogus": 1}), "unknown key 'bogus'"),
    (lambda text: json.dumps({**json.loads(text), "search": {**json.loads(text)["search"], "lrr": 1}}),
     "unknown key 'search.lrr'"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "search"}), "no 'search' table"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "variants"}), "'variants' is missing"),
    (lambda text: "[1, 2]", "no 'search' table"),
    (lambda text: json.dumps({**json.loads(text), "train": {"devise": "cpu"}}), "unknown key 'train.devise'"),
    (lambda text: json.dumps({**json.loads(text), "backbones": []}), "matrix.backbones is empty"),
])
def test_an_edited_saved_spec_that_is_no_spec_is_one_line(tmp_path, edit, expected):
    # resume and confirm ended in JSONDecodeError, TypeError or KeyError tracebacks
    text = spec_json(load_spec(write_spec(tmp_path, base_spec(tmp_path))))
    with pytest.raises(SpecError, match=re.escape(expected)) as error:
        spec_from_json(edit(text), "ray_results/tiny/attzoom-spec.json")
    assert str(error.value).startswith("ray_results/tiny/attzoom-spec.json: ") and "\n" not in str(error.value)


@pytest.mark.parametrize("change,expected", [({"trials": 3}, "trials: 1 then, 3 now"),
                                             ({"variants": ["attzoom"]}, "variants: ['baseline', 'attzoom'] then")])
def test_a_resume_of_a_saved_spec_edited_since_the_start_is_refused_before_any_work(tmp_path, monkeypatch, capsys,
                                                                                     no_side_effects, change,
                                                                                     expected):
    # it ran the restored search with its old N, then said "interrupted: 3 of 4 trials ended" for good, and left
    # the edited spec in the store and a KILLED parent run for a study that never ran
    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import SPEC, experiment_name
    from tune_jobs.spec import shared_spec_json
    from tune_jobs.sweep import save_spec

    spec = preflight(load_spec(write_spec(tmp_path, base_spec(tmp_path))))
    MlflowClient(spec.tracking_uri).create_experiment(experiment_name(spec.name), tags={SPEC: shared_spec_json(spec)})
    save_spec(replace(spec, **{k: tuple(v) if isinstance(v, list) else v for k, v in change.items()}))
    capsys.readouterr()
    for command in ("resume", "confirm"):  # confirm stored the edited spec, which the next resume then passed
        assert cli.main([command, spec.name, "--storage", spec.storage, *(["--tracking-uri", spec.tracking_uri]
                                                                          if command == "confirm" else [])]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "undo the change" in err, err
    save_spec(replace(spec, max_concurrent=1, data_root=str(tmp_path / "moved")))  # where and how much: may change
    from tune_jobs.sweep import check_unchanged_since_start, load_saved_spec

    check_unchanged_since_start(load_saved_spec(spec.name, spec.storage))


def test_sweep_continue_with_a_spec_that_changes_the_search_is_refused_before_any_work(tmp_path, capsys,
                                                                                        no_side_effects):
    # `sweep --continue` goes on with a started sweep as resume does: on the search as it began, compared with the
    # spec saved in its folder even when the tracking store has no word on it (a server restarting, another URI)
    import optuna

    from tune_jobs.lease import sweep_lease
    from tune_jobs.spec import optuna_storage_url
    from tune_jobs.studies import optuna_study_name
    from tune_jobs.sweep import save_spec

    spec = preflight(load_spec(write_spec(tmp_path, base_spec(tmp_path))))
    save_spec(spec)
    (Path(spec.storage) / spec.name / "experiment_state-1.json").write_text("{}")  # Ray started it
    edited = write_spec(tmp_path, edit(base_spec(tmp_path), "trials", 3))
    before = tree(tmp_path)
    capsys.readouterr()
    assert cli.main(["sweep", str(edited), "--continue"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{edited}, with the options given, is not the spec sweep tiny started with " \
        "(trials: 1 then, 3 now)" in err and "undo the change" in err, err
    # without --continue: it advised a resume, which then ran the search as it began and said "done" (QA-11)
    assert cli.main(["sweep", str(edited)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "started with another search (trials: 1 then, 3 now); a resume continues it as " \
        f"it began, not with this spec: give this sweep another name in {edited}" in err, err
    assert "--continue" not in err and "resume tiny" not in err, err
    assert tree(tmp_path) - {"out/mlflow.db.lock", "out/mlflow.db"} == before

    unchanged = write_spec(tmp_path, base_spec(tmp_path))
    assert cli.main(["sweep", str(unchanged)]) == 2
    err = capsys.readouterr().err
    assert f"continue it with `{attzoom_executable()} resume tiny --storage {spec.storage}` (or add --continue to " \
        "this command) or change name in" in err, err
    # --check: what the resume would check before its work, the stores it began in and no driver at work
    assert cli.main(["sweep", str(unchanged), "--continue", "--check"]) == 2
    assert "the Optuna storage" in capsys.readouterr().err  # its studies are gone: a resume is refused
    for study in spec.studies:
        optuna.create_study(study_name=optuna_study_name(spec.name, study.name), storage=optuna_storage_url(spec))
    with sweep_lease(spec.storage, spec.name, tracking_uri=spec.tracking_uri):
        assert cli.main(["sweep", str(unchanged), "--continue", "--check"]) == 2
        err = capsys.readouterr().err
        assert f"sweep 'tiny' cannot be continued: it is running now (pid {os.getpid()}" in err, err
    assert cli.main(["sweep", str(unchanged), "--continue", "--check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("started sweep tiny: ") and out.endswith("without --check to continue it\n"), out
    assert "note: no zoom-only" not in out  # its matrix is kept: adding variants is no advice for it


def test_confirm_reads_and_writes_the_store_its_tracking_uri_names_and_a_missing_one_is_one_line(tmp_path, capsys,
                                                                                                no_side_effects):
    # `confirm --tracking-uri sqlite:///other.db` trained its seeds into the spec's mlflow.db and said nothing (QA-11)
    from argparse import Namespace

    from mlflow.tracking import MlflowClient

    from tune_jobs.confirm import confirmed_spec
    from tune_jobs.sweep import save_spec

    spec = preflight(load_spec(write_spec(tmp_path, base_spec(tmp_path))))
    save_spec(spec)
    other = tmp_path / "other.db"
    capsys.readouterr()
    assert cli.main(["confirm", spec.name, "--storage", spec.storage, "--tracking-uri", f"sqlite:///{other}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no tracking store at {other}" in err, err
    assert not other.exists()
    MlflowClient(f"sqlite:///{other}").search_experiments()  # a store there now (the same server by another URI)
    args = Namespace(sweep=spec.name, storage=spec.storage, tracking_uri=f"sqlite:///{other}", data_root=None)
    assert confirmed_spec(args).tracking_uri == f"sqlite:///{other}"
    assert confirmed_spec(Namespace(**{**vars(args), "tracking_uri": None})).tracking_uri == spec.tracking_uri


def test_a_sweep_whose_mlflow_experiment_was_deleted_is_one_line_before_any_work(tmp_path, capsys, no_side_effects):
    # MLflow keeps a deleted experiment's name: a new sweep of that name started Ray and trained, then stopped at its
    # first write (exit 3, "continue with attzoom resume"); that resume ended in a traceback
    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import SPEC, experiment_name
    from tune_jobs.spec import shared_spec_json
    from tune_jobs.sweep import save_spec

    spec = preflight(load_spec(write_spec(tmp_path, base_spec(tmp_path))))
    client = MlflowClient(spec.tracking_uri)
    experiment = client.create_experiment(experiment_name(spec.name), tags={SPEC: shared_spec_json(spec)})
    client.delete_experiment(experiment)
    capsys.readouterr()
    assert cli.main(["sweep", str(tmp_path / "spec.toml")]) == 2
    save_spec(spec)
    assert cli.main(["resume", spec.name, "--storage", spec.storage]) == 2
    for line in capsys.readouterr().err.strip().splitlines():
        assert f"MLflow experiment attzoom-{spec.name} (id {experiment}) is deleted" in line, line
        assert "restore it in the MLflow UI" in line and f"--experiment-ids {experiment}`" in line, line
    # a started sweep (its folder holds more than its spec): `sweep` said "continue it with resume", which then
    # said this
    (Path(spec.storage) / spec.name / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    assert cli.main(["sweep", str(tmp_path / "spec.toml")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"(id {experiment}) is deleted" in line, line
    # its command runs as written (MLflow 3's gc refused it: "Tracking URL is not set")
    gc = line.split("remove it for good with `")[1].split("`")[0]
    done = subprocess.run(gc, shell=True, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert client.get_experiment_by_name(experiment_name(spec.name)) is None


def test_a_new_sweep_refuses_the_optuna_studies_an_earlier_sweep_of_its_name_left(tmp_path, capsys, no_side_effects):
    # its experiment deleted and gc'd, its folder removed: the new sweep added its trials to the old studies (and TPE
    # started from them), so optuna-dashboard showed 4 trials where MLflow showed the new sweep's 2
    import optuna

    from tune_jobs.spec import optuna_storage_url
    from tune_jobs.studies import optuna_study_name

    spec_file = write_spec(tmp_path, base_spec(tmp_path))
    spec = preflight(load_spec(spec_file))
    url = optuna_storage_url(spec)
    Path(spec.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    names = [optuna_study_name(spec.name, study.name) for study in spec.studies]
    optuna.create_study(study_name=names[0], storage=url)  # one with no trial (a sweep stopped before its first)
    assert cli.main(["sweep", str(spec_file), "--check"]) == 0
    for name in names:
        study = optuna.create_study(study_name=name, storage=url, load_if_exists=True)
        study.optimize(lambda trial: 1.0, n_trials=1)
    capsys.readouterr()
    for command in (["sweep", str(spec_file), "--check"], ["sweep", str(spec_file)]):
        assert cli.main(command) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert f"holds 2 studies of an earlier sweep named {spec.name!r} ({names[0]!r}: 1 trial)" in line, line
        assert f"change name in {spec_file}" in line, line
    delete = line.split("or delete them (`")[1].split("`")[0]
    for name in names:  # the command it gives, for each study
        done = subprocess.run(delete.replace(shlex.quote(names[0]), shlex.quote(name)), shell=True,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    assert cli.main(["sweep", str(spec_file), "--check"]) == 0


def test_a_resume_takes_the_data_sets_new_place(tmp_path, capsys, no_side_effects):
    # it said "set data_root to where it is", and resume had no option for it: only editing attzoom-spec.json did
    from conftest import _write_cifar100

    from tune_jobs.sweep import load_saved_spec, save_spec

    _write_cifar100(tmp_path / "data")
    spec = preflight(load_spec(write_spec(tmp_path, {**base_spec(tmp_path), "data_root": str(tmp_path / "data"),
                                                     "matrix": {**base_spec(tmp_path)["matrix"],
                                                                "datasets": ["cifar100"]}})))
    save_spec(spec)
    (tmp_path / "data").rename(tmp_path / "moved")
    capsys.readouterr()
    assert cli.main(["resume", spec.name, "--storage", spec.storage]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not hold cifar100" in err and "(--data-root)" in err, err
    with pytest.raises(AssertionError, match="reached Ray or MLflow"):  # past every check, to the sweep itself
        cli.main(["resume", spec.name, "--storage", spec.storage, "--data-root", str(tmp_path / "moved")])
    assert load_saved_spec(spec.name, spec.storage).data_root == str(tmp_path / "moved")


def test_a_resume_whose_stores_are_gone_is_refused_before_any_work_and_creates_none(tmp_path, capsys):
    # a moved mlflow.db was made afresh and empty: the resumed trials' runs held only the epochs still to come and the
    # sweep said "done" with wrong bests; a moved optuna.db ended in a Tune traceback and a driver that hung
    import optuna
    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import SPEC, experiment_name
    from tune_jobs.spec import shared_spec_json
    from tune_jobs.studies import optuna_study_name
    from tune_jobs.sweep import save_spec

    spec = preflight(load_spec(write_spec(tmp_path, base_spec(tmp_path))))
    save_spec(spec)
    (Path(spec.storage) / spec.name / "experiment_state-2026-11-30_19-00-00.json").write_text("{}")  # Tune's
    database = Path(spec.tracking_uri[len("sqlite:///"):])
    from tune_jobs.sweep import check_stores_kept

    check_stores_kept(spec, searcher=False)  # stopped before its first trial: it may not have made its experiment
    (Path(spec.storage) / spec.name / f"{spec.studies[0].name}-1a2b3c4d").mkdir()  # a trial started: its run too
    resume = ["resume", spec.name, "--storage", spec.storage]
    capsys.readouterr()
    assert cli.main(resume) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the tracking store sqlite:///" in err and "holds no experiment of sweep" in err
    assert "put it back where it was" in err and not database.exists(), err

    MlflowClient(spec.tracking_uri).create_experiment(experiment_name(spec.name), tags={SPEC: shared_spec_json(spec)})
    assert cli.main(resume) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the Optuna storage sqlite:///" in err and "optuna.db holds no study" in err, err
    assert not (database.parent / "optuna.db").exists()

    url = f"sqlite:///{database.parent / 'optuna.db'}"
    for study in spec.studies:
        optuna.create_study(storage=url, study_name=optuna_study_name(spec.name, study.name))
    check_stores_kept(spec)  # both stores where they were: the resume goes on


def test_overrides_win_over_the_file(tmp_path):
    spec = load_spec(write_spec(tmp_path, base_spec(tmp_path)), trials=4, epochs=None, max_concurrent=3)
    assert (spec.trials, spec.epochs, spec.max_concurrent) == (4, 1, 3)


@pytest.mark.parametrize("url,shown", [
    ("postgresql+psycopg://u:pw@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
    ("postgresql://u:p/s#s?x@h/db", "postgresql://u:***@h/db"),  # SQLAlchemy reads the password "p/s#s?x"
    ("mysql://u:@h/db", "mysql://u:***@h/db"),
    ("http://admin:pw@127.0.0.1:5000", "http://admin:***@127.0.0.1:5000"),
    ("postgresql://u@h/db?sslmode=require&password=pw", "postgresql://u@h/db?sslmode=require&password=***"),
    ("sqlite:////tmp/a:b@c.db", "sqlite:////tmp/a:b@c.db"),
    ("http://[::1]:5000", "http://[::1]:5000"),
    ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
    ("API request to http://u:pw@h/api/2.0 failed", "API request to http://u:***@h/api/2.0 failed"),
])
def test_a_password_in_a_url_or_a_message_quoting_one_is_hidden(url, shown):
    from tune_jobs.spec import has_password, hide_password

    assert hide_password(url) == shown
    assert has_password(url) == (url != shown)


def test_a_spec_with_a_password_is_saved_for_its_user_only(tmp_path):
    from tune_jobs.sweep import SPEC_FILE, experiment_dir, save_spec

    spec = load_spec(write_spec(tmp_path, base_spec(tmp_path)))
    save_spec(spec)
    assert (experiment_dir(spec) / SPEC_FILE).stat().st_mode & 0o077  # the usual mode: others may read it
    save_spec(replace(spec, tracking_uri="postgresql://u:pw@127.0.0.1/db"))
    assert (experiment_dir(spec) / SPEC_FILE).stat().st_mode & 0o777 == 0o600


def test_the_saved_spec_is_replaced_whole_or_not_at_all(tmp_path):
    # every run and resume rewrites it; a rewrite cut short (a kill, a full disk) left a truncated file that resume
    # could not read, and no other copy to resume from
    from tune_jobs.storage import write_file

    write_file(str(tmp_path), "t", "spec.json", text='{"name": "t"}')
    with pytest.raises(UnicodeEncodeError):
        write_file(str(tmp_path), "t", "spec.json", text='{"name": "\ud800"}')  # fails midway through the write
    assert (tmp_path / "t" / "spec.json").read_text() == '{"name": "t"}'
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["spec.json"]


@pytest.mark.parametrize("command", ["status", "report"])
@pytest.mark.parametrize("content", ["optuna", "empty", "text"])
def test_readers_on_a_file_that_is_no_mlflow_store_say_so_and_leave_it_as_it_was(tmp_path, monkeypatch, capsys,
                                                                                 command, content):
    """`status --tracking-uri sqlite:///optuna.db` made MLflow's tables in the Optuna studies' database."""
    database = tmp_path / "optuna.db"
    if content == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
    else:
        database.write_text("" if content == "empty" else "not a database")
    before = database.read_bytes()
    monkeypatch.chdir(tmp_path)
    argv = [command, *(["t"] if command == "report" else []), "--tracking-uri", f"sqlite:///{database}"]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(database) in lines[0] and "--tracking-uri" in lines[0], lines
    assert database.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db"]


@pytest.mark.parametrize("command, earlier", [("sweep", "under another storage"), ("sweep", "its Tune folder gone"),
                                              ("sweep", "on cloud storage"), ("demo", "under another storage")])
def test_a_new_sweep_with_the_name_of_one_that_has_runs_in_the_store_is_refused(tmp_path, monkeypatch, capsys,
                                                                              request, command, earlier):
    """`sweep` (or `demo`) with another --storage than the first sweep of that name ran, then deleted every run of
    the first as its orphans and added its trials to the same Optuna studies."""
    from mlflow.tracking import MlflowClient

    from tune_jobs import layout

    name = "tiny" if command == "sweep" else "demo"
    spec = {**base_spec(tmp_path), "name": name}
    first = tmp_path / "first"
    (first / name).mkdir(parents=True)
    if earlier == "its Tune folder gone":
        first = Path(spec["storage"])
    elif earlier == "on cloud storage":
        _, bucket = request.getfixturevalue("s3")  # a real S3 server on loopback
        first = f"s3://{bucket}/ray_results"
        spec["storage"] = first  # the same storage, where no folder can be looked at
    client = MlflowClient(spec["tracking_uri"])
    experiment = client.create_experiment(layout.experiment_name(name),
                                          tags={layout.SPEC: json.dumps({**spec, "storage": str(first)})})
    run = client.create_run(experiment, tags={layout.ROLE: layout.TRIAL_ROLE, layout.TRIAL: "a1"})
    monkeypatch.setattr("ray.init", lambda *a, **k: pytest.fail("a sweep reusing the name started Ray"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # MLflow's lines as it made the store above
    if command == "sweep":
        argv = ["sweep", str(write_spec(tmp_path, spec))]
    else:
        argv = ["demo", "--storage", spec["storage"], "--tracking-uri", spec["tracking_uri"], "--data-root",
                spec["data_root"]]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "already has runs in the tracking store" in lines[0], lines
    if earlier == "its Tune folder gone":
        assert "Tune folder is gone" in lines[0] and "change name in" in lines[0]
    else:
        assert f"attzoom resume {name} --storage {first}" in lines[0]
    assert client.get_run(run.info.run_id).info.lifecycle_stage == "active"
    assert not Path(spec["storage"]).exists()


def test_a_sweep_stopped_while_ray_starts_can_be_resumed_as_its_ctrl_c_line_says(tmp_path, monkeypatch):
    """Ctrl-C in the first seconds said "continue with `attzoom resume`", which then found no sweep: the spec was
    saved only once Ray had started."""
    from tune_jobs import sweep
    from tune_jobs.sweep import check_new_sweep, load_saved_spec, run_sweep

    def ctrl_c_during_ray_start(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "start_ray", ctrl_c_during_ray_start)
    spec = load_spec(write_spec(tmp_path, base_spec(tmp_path)))
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_sweep(spec)
    storage = tmp_path / "out" / "ray_results"
    assert f"continue with: {attzoom_executable()} resume tiny --storage {storage}" in str(stopped.value)
    assert load_saved_spec("tiny", str(tmp_path / "out" / "ray_results")).name == "tiny"
    check_new_sweep(preflight(spec), Path("spec.toml"))  # running `sweep` again is fine too: nothing ran yet


def test_status_of_a_sweep_without_any_trial_run_says_so(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import experiment_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(experiment_name("early"))  # stopped before its first trial started
    capsys.readouterr()
    assert cli.main(["status", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out == "early:\n  no trial has started yet\n"


def test_check_prints_what_the_sweep_would_run_and_starts_and_stores_nothing(tmp_path, monkeypatch, capsys,
                                                                            no_side_effects):
    # there was no way to see a spec's size and stores, or to check it, without starting it
    spec_file = write_spec(tmp_path, edit(base_spec(tmp_path), "scheduler.kind", "asha"))
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", str(spec_file), "--check", "--trials", "3"]) == 0
    out = capsys.readouterr().out
    spec = load_spec(spec_file, trials=3)
    trials = len(spec.studies) * 3
    from tune_jobs.naming import counted

    assert out.startswith(f"sweep {spec.name}: {len(spec.studies)} studies x 3 trials = {trials} trials of up to "
                          f"{counted(spec.epochs, 'epoch')} ("), out
    assert "early stopping of hopeless trials: asha" in out and f"tracking   {spec.tracking_uri}" in out, out
    assert "nothing was started or stored" in out.splitlines()[-1]
    assert tree(tmp_path) == before
    assert cli.main(["sweep", str(spec_file), "--check", "--trials", "0"]) == 2  # a bad spec: refused as ever


def test_check_says_what_the_matrix_cannot_show_and_how_many_trials_fit_here(tmp_path, monkeypatch, capsys,
                                                                             no_side_effects):
    # the report said after the sweep that the controls were not run and a gain over the baseline shows nothing;
    # --check said nothing, and nothing that a cap above this machine's CPUs only queues trials
    monkeypatch.chdir(tmp_path)
    cpus = os.cpu_count()
    for variants, concurrent, said in (
            (["baseline", "attzoom"], 1, ["no zoom-only or resize2x control, so the report cannot tell"]),
            (["attzoom", "resize2x"], 1, ['no baseline study', "no zoom-only control"]),
            (["baseline", "attzoom", "zoom-only", "resize2x"], cpus + 1,
             [f"max_concurrent = {cpus + 1}, but this machine's {cpus} CPUs fit {cpus} trials at once (1 CPU each)"]),
            (["baseline", "attzoom", "zoom-only", "resize2x"], cpus, []),
            (["baseline"], 1, [])):  # tuning baselines alone: nothing to compare, nothing missing
        spec = edit(edit(base_spec(tmp_path), "matrix.variants", variants), "max_concurrent", concurrent)
        assert cli.main(["sweep", str(write_spec(tmp_path, spec)), "--check"]) == 0
        notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
        assert len(notes) == len(said) and all(s in n for s, n in zip(said, notes)), (variants, notes)
    # GPUs count too: 2 half-GPU trials on one GPU, asked for 4 at once
    spec = {**edit(base_spec(tmp_path), "max_concurrent", 4), "resources": {"cpus": 0.25, "gpus": 0.5,
                                                                            "local_gpus": 1}}
    assert cli.main(["sweep", str(write_spec(tmp_path, spec)), "--check"]) == 0
    assert "this machine's 1 GPU fit 2 trials at once (0.5 GPU each)" in capsys.readouterr().out


# --- --address: the hints name it; one that is no Ray cluster is one line, exit 2, before any folder --------------

@pytest.fixture
def not_ray():
    """Ports where something answers that is not a Ray GCS: an HTTP server (a dashboard) and a silent listener."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    http = HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    yield {"http": f"127.0.0.1:{http.server_port}", "silent": f"127.0.0.1:{silent.getsockname()[1]}"}
    http.shutdown()
    silent.close()


@pytest.mark.parametrize("kind,expected", [
    ("jobs api", "is a Jobs API address, which `attzoom submit` takes"),
    ("http", "answers, but not as a Ray cluster (it does not speak gRPC"),
    ("silent", "answers, but not as a Ray cluster (no answer to gRPC's handshake within"),
])
def test_an_address_that_is_no_ray_gcs_is_one_line_exit_2_before_any_folder(tmp_path, capsys, not_ray, kind, expected):
    # a Jobs API URL: ValueError traceback, exit 1, an empty storage folder; a dashboard's port: Ray retried 120 s+
    import time

    address = f"http://{not_ray['http']}" if kind == "jobs api" else not_ray[kind]
    spec_file = write_spec(tmp_path, base_spec(tmp_path))
    started = time.monotonic()
    assert cli.main(["sweep", str(spec_file), "--address", address]) == 2
    assert time.monotonic() - started < 30
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "HOST:6379" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_cluster_that_refuses_the_driver_is_one_line_exit_2_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    # it said "stopped: tracking store sqlite:///... unreachable (ConnectionError: Failed to connect to Ray cluster",
    # exit 3, with a resume that found no sweep; the lease had made the storage folder
    from tune_jobs import ray_session, sweep

    def ray_init_fails(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")

    monkeypatch.setattr(sweep, "check_address", lambda address: None)  # something answered at the port
    monkeypatch.setattr("ray.init", ray_init_fails)
    monkeypatch.setattr(ray_session, "stop_ray", lambda: None)
    assert cli.main(["sweep", str(write_spec(tmp_path, base_spec(tmp_path))), "--address", "10.0.0.5:6379"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot join the Ray cluster at --address 10.0.0.5:6379" in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("address,in_a_job,hint", [
    ("127.0.0.1:6379", False, " --address 127.0.0.1:6379"),
    ("ray://head:10001", False, " --address ray://head:10001"),
    # a job's driver (or one on the head given auto): its hint is read elsewhere, through `attzoom logs` or `status`
    ("auto", False, " --address http://127.0.0.1:8265"), ("10.0.0.5:6379", True, " --address http://127.0.0.1:8265"),
])
def test_ctrl_c_on_a_cluster_says_to_resume_with_its_address(tmp_path, monkeypatch, address, in_a_job, hint):
    # the line left --address out: following it moved the cluster's sweep onto a private local Ray
    from tune_jobs import sweep

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "check_address", lambda address: None)
    monkeypatch.setattr(sweep, "start_ray", lambda spec, address: None)  # joined
    monkeypatch.setattr(sweep, "stop_ray", lambda: None)
    monkeypatch.setattr(sweep, "save_spec", ctrl_c)
    if in_a_job:  # `attzoom submit`: the job's driver runs on the head, where auto finds the cluster
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(KeyboardInterrupt) as stopped:
        sweep.run_sweep(load_spec(write_spec(tmp_path, base_spec(tmp_path))), address=address)
    assert str(stopped.value).endswith(f"resume tiny --storage {tmp_path / 'out' / 'ray_results'}{hint}"), stopped
    assert ("submit --resume tiny" in str(stopped.value)) == hint.endswith(":8265")


def recorded_sweep(tmp_path, address: str | None):
    """Sweep tiny as its driver left it: a trial folder in its storage, its experiment with a trial run, and the
    --address it ran with recorded (None: an older sweep, which recorded none)."""
    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import ROLE, TRIAL
    from tune_jobs.tracking import prepare_tracking

    spec = preflight(load_spec(write_spec(tmp_path, base_spec(tmp_path))))
    experiment_id, _ = prepare_tracking(spec, address)
    MlflowClient(spec.tracking_uri).create_run(experiment_id, tags={ROLE: "trial", TRIAL: "a-1"})
    (Path(spec.storage) / "tiny" / f"{spec.studies[0].name}-a").mkdir(parents=True)
    return spec


def test_the_duplicate_name_error_says_resume_with_the_address_or_that_the_sweep_runs_now(tmp_path):
    # it advised `attzoom resume` without --address, and for a sweep running right now, a resume the lease refuses
    from tune_jobs.lease import sweep_lease
    from tune_jobs.sweep import check_new_sweep

    spec = recorded_sweep(tmp_path, "127.0.0.1:6379")
    with pytest.raises(SpecError) as exists:
        check_new_sweep(spec, Path("spec.toml"))
    assert f"`{attzoom_executable()} resume tiny --storage {spec.storage} --address 127.0.0.1:6379`" in \
        str(exists.value)
    with sweep_lease(spec.storage, spec.name), pytest.raises(SpecError) as running:
        check_new_sweep(spec, Path("spec.toml"))
    message = str(running.value)
    assert f"it is running now (pid {os.getpid()} on " in message and "resume" not in message, message
    assert f"follow it with `{attzoom_executable()} status tiny --tracking-uri {spec.tracking_uri}`" in message


def test_the_recorded_address_follows_the_last_driver_and_a_local_one_records_none(tmp_path):
    from tune_jobs.sweep import recorded_address
    from tune_jobs.tracking import prepare_tracking

    spec = recorded_sweep(tmp_path, "auto")
    assert recorded_address(spec) == "auto"
    prepare_tracking(spec)  # a restored logger, which does not know it: kept
    assert recorded_address(spec) == "auto"
    prepare_tracking(spec, "")  # resumed on a local Ray
    assert recorded_address(spec) == ""


def test_two_drivers_of_one_name_with_different_storage_cannot_both_write_to_the_experiment(tmp_path):
    # started within seconds (the name check before the start saw no runs yet), both ran in one experiment and one
    # set of Optuna studies, and each deleted the other's runs as orphans: QA pass 9 lost every run of a sweep
    from mlflow.tracking import MlflowClient

    from tune_jobs.lease import sweep_lease
    from tune_jobs.sweep import _prepare_tracking, check_unchanged_since_start, save_spec
    from tune_jobs.tracking import recorded_storage, sweep_experiment

    first = preflight(load_spec(write_spec(tmp_path, base_spec(tmp_path))))
    second = replace(first, storage=str(tmp_path / "other"))
    save_spec(first)  # as each driver does, holding its storage's lease, before it prepares the store
    save_spec(second)
    with sweep_lease(first.storage, first.name, tracking_uri=first.tracking_uri):
        experiment_id, parents = _prepare_tracking(first, "")
        with sweep_lease(second.storage, second.name, tracking_uri=second.tracking_uri), \
                pytest.raises(SpecError) as refused:
            _prepare_tracking(second, "")
    message = str(refused.value)
    assert f"a sweep named 'tiny' with its results in {first.storage} is in the tracking store" in message, message
    assert "it is running now (pid " in message and message.endswith("or give this sweep another name"), message
    experiment = sweep_experiment(first.tracking_uri, first.name)
    assert recorded_storage(experiment) == first.storage  # the second wrote nothing, not even its spec
    assert len(MlflowClient(first.tracking_uri).search_runs([experiment_id])) == len(parents)

    (Path(first.storage) / first.name / "experiment_state-1.json").write_text("{}")  # the first has trials now
    for check in (lambda: _prepare_tracking(second, ""), lambda: check_unchanged_since_start(second)):  # a resume's
        with pytest.raises(SpecError, match=rf"continue it with `.*resume tiny --storage {first.storage}`"):
            check()
    (Path(first.storage) / first.name / "experiment_state-1.json").unlink()
    # the first stopped before its trials and its driver is gone, or its storage was moved: the name is free
    assert _prepare_tracking(second, "")[0] == experiment_id
    assert recorded_storage(sweep_experiment(first.tracking_uri, first.name)) == second.storage
    (tmp_path / "link").symlink_to(second.storage)  # the same folder by another path: the same sweep
    assert _prepare_tracking(replace(second, storage=str(tmp_path / "link")), "")[0] == experiment_id


def test_a_sweep_run_again_is_finished_already_only_when_every_trial_finished_and_no_driver_runs_it(tmp_path):
    # a script that runs its sweep again is told it is done (exit 0, nothing run); a study short of N trials, a
    # failed trial (resume retries it), a driver at work, or another search under the name are not done
    from mlflow.tracking import MlflowClient

    from tune_jobs.layout import ROLE, STUDY, SWEEP, TRIAL, TRIAL_ROLE
    from tune_jobs.lease import sweep_lease
    from tune_jobs.sweep import _prepare_tracking, finished_already, save_spec

    spec = preflight(load_spec(write_spec(tmp_path, edit(base_spec(tmp_path), "trials", 2))))
    save_spec(spec)
    with sweep_lease(spec.storage, spec.name, tracking_uri=spec.tracking_uri):
        experiment_id, parents = _prepare_tracking(spec, "")
    (Path(spec.storage) / spec.name / "experiment_state-1.json").write_text("{}")  # Tune's: it has run trials
    client = MlflowClient(spec.tracking_uri)

    def trial(study: str, status: str) -> str:
        tags = {SWEEP: spec.name, STUDY: study, ROLE: TRIAL_ROLE, TRIAL: f"t{len(client.search_runs([experiment_id]))}"}
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        client.set_terminated(run_id, status)
        return run_id

    attzoom, baseline = sorted(parents)  # by name: ...attzoom before ...baseline
    trial(attzoom, "FINISHED"), trial(attzoom, "FINISHED"), trial(baseline, "FINISHED")
    assert finished_already(spec) is None  # baseline has 1 of 2
    failed = trial(baseline, "FAILED")
    assert finished_already(spec) is None  # every study has N trials closed and a finished one, but one failed
    client.set_terminated(failed, "FINISHED")  # a resume retried it and it finished
    summary = finished_already(spec)
    assert summary is not None and summary[baseline]["finished"] == 2 and summary[baseline]["failed"] == 0
    assert finished_already(replace(spec, seed=spec.seed + 1)) is None  # another search under the name
    with sweep_lease(spec.storage, spec.name, tracking_uri=spec.tracking_uri):
        assert finished_already(spec) is None  # a driver runs it now
    assert finished_already(spec) is not None


def test_the_owner_check_on_cloud_storage_knows_its_own_lease_and_an_unreadable_storage_is_one_line(tmp_path, s3,
                                                                                                     monkeypatch):
    # on cloud storage the lease is one per name, in the tracking store: the check took this driver's own for another
    # driver's, and refused every new try after one that stopped past its spec; an unreadable folder was a traceback
    from tune_jobs import sweep
    from tune_jobs.lease import sweep_lease

    client, bucket = s3
    spec = preflight(load_spec(write_spec(tmp_path, base_spec(tmp_path))))
    earlier, mine = (replace(spec, storage=f"s3://{bucket}/{part}") for part in ("a", "b"))
    sweep.save_spec(earlier)  # a first try that stopped after its spec (too few CPUs, say)
    with sweep_lease(mine.storage, mine.name, tracking_uri=mine.tracking_uri):
        sweep.check_owner(mine, earlier.storage)
        client.put_object(Bucket=bucket, Key="a/tiny/experiment_state-1.json", Body=b"{}")
        with pytest.raises(SpecError, match=f"a sweep named 'tiny' with its results in s3://{bucket}/a is in"):
            sweep.check_owner(mine, earlier.storage)

    def unreadable(storage, *parts):
        raise PermissionError(13, "Permission denied", storage)

    monkeypatch.setattr(sweep, "folder_names", unreadable)  # another user's home folder, mode 700
    with pytest.raises(SpecError, match=r"names /home/alice/r as where sweep 'tiny' keeps its results, which cannot "
                                        r"be read here \(PermissionError: \[Errno 13\] Permission denied"):
        sweep.check_owner(spec, "/home/alice/r")


def test_of_two_drivers_creating_the_experiment_at_once_one_makes_it_and_the_other_finds_it(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tune_jobs import tracking
    from tune_jobs.layout import experiment_name

    spec = preflight(load_spec(write_spec(tmp_path, base_spec(tmp_path))))
    other = tracking.prepare_store(spec.tracking_uri, "other")  # the store exists
    looked = MlflowClient.get_experiment_by_name

    def made_meanwhile(client, name):  # the other driver creates it between this one's look and its create
        found = looked(client, name)
        if found is None:
            MlflowClient(spec.tracking_uri).create_experiment(name, tags={"by": "the other driver"})
        return found

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", made_meanwhile)
    made = tracking.prepare_store(spec.tracking_uri, spec.name, tags={"by": "this driver"})
    monkeypatch.undo()
    experiment = MlflowClient(spec.tracking_uri).get_experiment_by_name(experiment_name(spec.name))
    assert made == experiment.experiment_id != other and experiment.tags["by"] == "the other driver"


def test_confirms_hints_name_the_drivers_address(tmp_path):
    from tune_jobs.confirm import confirm_closing, confirm_command

    spec = preflight(load_spec(write_spec(tmp_path, base_spec(tmp_path))))
    assert confirm_command(spec, 3, "127.0.0.1:6379").endswith(" --seeds 3 --address 127.0.0.1:6379")
    assert confirm_command(spec, 3).endswith(" --seeds 3")
    line, _ = confirm_closing(spec, 3, [], [spec.studies[0].name], address="ray://head:10001")
    assert f"resume tiny --storage {spec.storage} --address ray://head:10001`" in line, line
    line, _ = confirm_closing(spec, 3, [(spec.studies[0].name, 2)], address="auto")
    assert line.split("retry them with `", 1)[1].startswith(confirm_command(spec, 3, "auto")), line


KILLED_WRITER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA cache_size = 1")  # the changed pages spill: the journal holds the old ones
connection.execute("BEGIN IMMEDIATE")
for i in range(50):
    connection.execute("INSERT INTO tags VALUES (?, randomblob(10000), 'no-such-run')", (f"k{i}",))
print("mid-write", flush=True)
time.sleep(60)
"""


def test_a_store_whose_writer_was_killed_mid_transaction_is_read_not_refused(tmp_path):
    # a driver SIGKILLed while MLflow wrote left a hot journal: the read-only check was refused ("attempt to write a
    # readonly database") and every resume was told to pass the store it had passed
    from mlflow.tracking import MlflowClient

    from tune_jobs.spec import check_tracking_store

    database = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").create_experiment("attzoom-t")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(database)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "mid-write\n"
    writer.kill()
    writer.wait(timeout=30)
    assert (tmp_path / "mlflow.db-journal").exists()
    check_tracking_store(f"sqlite:///{database}")
    assert not (tmp_path / "mlflow.db-journal").exists()  # rolled back, as MLflow's first write would
    assert MlflowClient(f"sqlite:///{database}").get_experiment_by_name("attzoom-t") is not None
