"""tune_jobs/layout.py is the one place that names a sweep's MLflow layout, and its rules are the ones used."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from test_dashboards import ADAM, SGD, SweepWriter
from tune_jobs import layout

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("attzoom", "tune_jobs", "dashboards", "benchmarks", "tests", "cluster", "dev.py")


def python_files():
    for name in SOURCES:
        path = ROOT / name
        yield from [path] if path.is_file() else sorted(path.rglob("*.py"))


def string_literals(tree: ast.AST):
    """Every string constant of a module but its docstrings (which may name a tag to explain it)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_tag_key_is_spelled_outside_the_layout_module():
    keys = (*layout.TAGS, layout.PARENT)
    found = []
    for path in python_files():
        if path == ROOT / "tune_jobs" / "layout.py":
            continue
        for line, text in string_literals(ast.parse(path.read_text(), str(path))):
            found += [f"{path.relative_to(ROOT)}:{line}: {key}" for key in keys if key in text]
    assert not found, "import these from tune_jobs.layout instead:\n" + "\n".join(found)


def test_the_guard_sees_a_spelled_tag_key():
    code = f"ROLE = {layout.ROLE!r}\n"
    assert [text for _, text in string_literals(ast.parse(code))] == [layout.ROLE]


def test_the_readme_names_only_tags_that_exist():
    # users copy these filters into the MLflow UI; a renamed tag must not leave the README naming the old one
    modules = {f"attzoom.{path.stem}" for path in (ROOT / "attzoom").glob("*.py")}
    tags = set(re.findall(r"attzoom\.[a-z_]+", (ROOT / "README.md").read_text())) - modules
    assert tags and tags <= set(layout.TAGS), sorted(tags - set(layout.TAGS))


def test_the_layout_module_loads_no_torch_ray_or_mlflow():
    probe = ("import sys, tune_jobs.layout; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'mlflow', 'optuna'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_best_epoch_is_the_first_with_the_highest_top1_as_in_best_pt_not_the_last():
    """Training keeps best.pt only on a strictly higher top-1 (train.EarlyStopping): a later epoch that ties on top-1
    with a better top-5 is not the checkpoint the test split scores, so it is not the best epoch either."""
    assert layout.best_epoch({1: 50.0, 2: 70.0, 3: 70.0, 4: 60.0}, {1: 80.0, 2: 90.0, 3: 91.0, 4: 99.0}) == \
        {"epoch": 2, "val_top1": 70.0, "val_top5": 90.0}
    assert layout.best_epoch({}, {}) is None


def test_the_run_summary_follows_the_epoch_best_pt_holds():
    from attzoom.train import EarlyStopping
    from tune_jobs.tracking import RunSummary

    stopping, summary = EarlyStopping(patience=5), RunSummary()
    for step, (top1, top5) in enumerate([(80.0, 90.0), (80.0, 95.0), (70.0, 99.0)], start=1):
        stopping.update(step, top1)
        summary = summary.after(step, {"val_top1": top1, "val_top5": top5})
    assert summary.best == {"epoch": stopping.best_epoch, "val_top1": 80.0, "val_top5": 90.0}
    assert stopping.best_epoch == 1


def test_best_of_takes_the_earliest_of_tied_trials_and_never_one_without_an_epoch():
    epoch = {"epoch": 1, "val_top1": 60.0, "val_top5": 90.0}
    assert layout.best_of([("none", None), ("a", epoch), ("b", dict(epoch)), ("c", {**epoch, "val_top5": 89.0})]) == "a"
    assert layout.best_of([("none", None)]) is None


def test_confirm_and_the_report_pick_the_same_best_trial(tmp_path):
    """Two trials tie on top-1 and top-5: both readers take the earlier one (confirm used to take the later)."""
    from dashboards.runs import load_sweep
    from tune_jobs.confirm import best_params

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    writer = SweepWriter(uri, "tie", tmp_path / "artifacts")
    study = writer.study("tiny_resnet", "cluttered-digits", "baseline")
    writer.trial(study, "early", [(50, 80), (70, 90)], ADAM)
    writer.trial(study, "late", [(70, 90)], SGD)
    writer.trial(study, "running", [(99, 99)], SGD, status="RUNNING")  # not finished: never the best
    [report_study] = load_sweep(uri, "tie").studies
    assert report_study.best.run.data.tags[layout.TRIAL] == "early"
    experiment = MlflowClient(uri).get_experiment_by_name(layout.experiment_name("tie")).experiment_id
    assert best_params(uri, experiment) == {study: {"batch_size": 64, "lr": 1e-3, "weight_decay": 1e-5,
                                                    "optimizer": "adam", "momentum": 0.9, "scheduler": "cosine",
                                                    "step_size": 30}}
