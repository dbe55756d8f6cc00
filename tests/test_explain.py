"""``attzoom explain`` on real trained runs in a real MLflow SQLite store (no Ray, no mocks).

Two tiny_resnet models (baseline and attzoom after the stem) are trained for one epoch on
cluttered digits and logged as trial runs with ``checkpoint/best.pt``, as tune_jobs lays them out.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from attzoom.data import ImageSet, Splits, load
from attzoom.models import find_attzoom
from attzoom.train import fit, load_checkpoint_model
from dashboards.explain import (attention_maps, explain, figure, logged_pngs, target_layer,
                                zoom_view)
from dashboards.html import page
from dashboards.report import build
from tune_jobs.layout import PARENT, ROLE, STUDY, SWEEP, TRIAL, experiment_name
from tune_jobs.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    data_root = tmp / "data"
    data = load("cluttered-digits", data_root)
    few = Splits(ImageSet(data.train.images[:64], data.train.labels[:64]),
                 ImageSet(data.val.images[:32], data.val.labels[:32]), data.test, data.num_classes, data.mean, data.std)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment(experiment_name("ex"), artifact_location=(tmp / "artifacts").as_uri())
    ids = {}
    for variant in ("baseline", "attzoom"):
        config = {"backbone": "tiny_resnet", "dataset": "cluttered-digits", "variant": variant, "epochs": 1,
                  "augment": False, "batch_size": 32, "data_root": str(data_root)}
        fit(config, data=few, checkpoint_dir=tmp / variant)
        study = f"tiny_resnet.cluttered-digits.{variant}"
        tags = {SWEEP: "ex", STUDY: study, "backbone": "tiny_resnet", "dataset": "cluttered-digits",
                "variant": variant}
        parent = client.create_run(eid, tags={**tags, ROLE: "study"}, run_name=study).info.run_id
        run_id = client.create_run(eid, tags={**tags, ROLE: "trial", TRIAL: f"{variant}-1",
                                              PARENT: parent}).info.run_id
        client.log_metric(run_id, "val_top1", 50.0, step=1)
        client.log_metric(run_id, "val_top5", 90.0, step=1)
        client.log_metric(run_id, "test_top1", 40.0)
        client.log_metric(run_id, "test_top5", 80.0)
        client.log_artifact(run_id, str(tmp / variant / "best.pt"), "checkpoint")
        client.set_terminated(run_id, "FINISHED")
        client.set_terminated(parent, "FINISHED")
        ids[variant], ids[f"{variant}_parent"] = run_id, parent
    return {"uri": uri, "tmp": tmp, "data_root": data_root, **ids}


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_attention_is_the_layers_own_f_of_a(runs):
    e = explain(runs["uri"], runs["attzoom"], 5)
    model, _, _ = load_checkpoint_model(runs["tmp"] / "attzoom" / "best.pt")
    layer = find_attzoom(model)
    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    data = load("cluttered-digits", runs["data_root"])
    x = (data.val.images[:5].float() / 255 - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(
        data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        model(x)
        expected = layer.attention_map(seen[0])
    hook.remove()
    assert e.attention.shape == (5, 1, 8, 8)  # 32 px, the stem's stride 4: f(A) at the stem's output
    torch.testing.assert_close(e.attention, expected)
    torch.testing.assert_close(attention_maps(model, x), expected)
    assert ((expected < 0.5) | (expected == 1)).all()  # f: kept at 1 where A >= t, else A itself
    assert torch.equal(e.images, data.val.images[:5])
    assert e.cams.shape == (5, 32, 32) and 0 <= e.cams.min() and e.cams.max() <= 1
    assert e.zoomed.shape == (5, 3, 32, 32) and e.zoomed.dtype == torch.uint8


def test_baseline_has_no_attention_panel(runs):
    e = explain(runs["uri"], runs["baseline"], 3)
    assert e.attention is None and e.zoomed is None
    assert e.columns == ["input", "Grad-CAM"]
    assert e.target_layer == "layer2[-1]"  # tiny_resnet on 32 px: layer3 is 2x2, layer2 the last >= 4x4


def test_target_layer_prefers_the_last_stage_on_large_inputs(runs):
    model, _, _ = load_checkpoint_model(runs["tmp"] / "baseline" / "best.pt")
    name, layer = target_layer(model, "tiny_resnet", 128)
    assert name == "layer4[-1]" and layer is model.layer4[-1]


def test_zoom_view_expands_high_attention_rows_and_columns():
    images = torch.arange(16, dtype=torch.uint8).view(1, 1, 1, 16).expand(1, 3, 16, 16).contiguous() * 10
    assert torch.equal(zoom_view(images, torch.ones(1, 1, 4, 4)), images)  # uniform f(A): unchanged
    attention = torch.full((1, 1, 16, 16), 0.05)
    attention[..., 8:12] = 1.0  # columns 8..11 hold most of the attention
    zoomed = zoom_view(images, attention)
    covered = ((zoomed[0, 0, 0] >= 80) & (zoomed[0, 0, 0] <= 110)).sum().item()
    assert covered > 8  # 4 of 16 input columns fill more than half of the output
    assert torch.equal(zoomed[:, :, 0], zoomed[:, :, 15])  # rows: f(A) is constant along them, no vertical warp


def test_cli_side_by_side_grid_and_artifacts(runs, tmp_path, capsys):
    out = tmp_path / "pair"
    code = main(["explain", runs["baseline"], runs["attzoom"], "--images", "3", "--out", str(out),
                 "--tracking-uri", runs["uri"]])
    assert code == 0, capsys.readouterr().err
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1
    width, height = png_size(pngs[0])
    assert width > 1.5 * height  # 6 columns (baseline: input, Grad-CAM; attzoom: those, f(A), zoom view), 3 rows
    assert np.asarray(Image.open(pngs[0])).std() > 0
    for run in ("baseline", "attzoom"):
        logged = logged_pngs(runs["uri"], runs[run])
        assert [name for name, _ in logged] == [pngs[0].name]
        assert logged[0][1] == pngs[0].read_bytes()


def test_subprocess_single_run_default_out_and_report_embeds_it(runs, tmp_path):
    result = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "explain", runs["attzoom"], "--images", "2",
                             "--tracking-uri", runs["uri"]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    pngs = list((tmp_path / "reports" / "explain" / runs["attzoom"]).glob("*.png"))
    assert len(pngs) == 1 and png_size(pngs[0])[0] > png_size(pngs[0])[1]
    report = build(runs["uri"], "ex")
    captions = [caption for section, caption, _ in report.images if section == "explain"]
    assert any(pngs[0].name in c for c in captions)
    assert page(report).count("data:image/png;base64,") >= len(captions) >= 1


def test_the_grid_labels_classes_and_predictions_and_gives_f_of_a_a_colour_scale(runs):
    e = explain(runs["uri"], runs["attzoom"], 2)
    data = load("cluttered-digits", runs["data_root"])
    model, _, _ = load_checkpoint_model(runs["tmp"] / "attzoom" / "best.pt")
    x = (data.val.images[:2].float() / 255 - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(
        data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(e.predicted, model.eval()(x).argmax(1)) and torch.equal(e.labels, data.val.labels[:2])
    fig = figure([e])
    rows = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel().startswith("true")]
    assert rows == [f"true {int(e.labels[i])}\npredicted {int(e.predicted[i])}" for i in range(2)]  # digits: numbers
    names = [f"class {k}" for k in range(10)]  # a data set whose files name its classes (datafiles.class_names)
    named = [ax.get_ylabel() for ax in figure([replace(e, names=names)]).axes if ax.get_ylabel().startswith("true")]
    assert named == [f"true {int(e.labels[i])} class {int(e.labels[i])}\npredicted {int(e.predicted[i])} class "
                     f"{int(e.predicted[i])}" for i in range(2)]
    [bar] = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert bar.get_ylabel() == "f(A): 1 = gate fully open"
    gates = [im for ax in fig.axes for im in ax.get_images() if im.get_array().ndim == 2]  # f(A), not pictures
    assert len(gates) == 2 and all(im.get_clim() == (0, 1) and im.get_cmap().name == "viridis" for im in gates)


def test_a_study_parent_run_is_one_line_naming_its_best_trial(runs, capsys):
    # it said "has no checkpoint/best.pt artifact; explain a finished trial run" of a run the report lists
    code = main(["explain", runs["attzoom_parent"], "--tracking-uri", runs["uri"]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "parent run of study tiny_resnet.cluttered-digits.attzoom" in err and runs["attzoom"] in err, err


def test_unknown_run_is_one_line_exit_2(runs, capsys):
    code = main(["explain", "0" * 32, "--tracking-uri", runs["uri"]])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "no run" in err and "0" * 32 in err


def test_a_run_is_named_by_the_tune_trial_id_its_name_shows(runs, tmp_path, capsys):
    # run names show "<variant> #<n> (<trial id>)"; given that id, explain said there was no such run
    code = main(["explain", "attzoom-1", "--images", "1", "--out", str(tmp_path / "by-trial"),
                 "--tracking-uri", runs["uri"]])
    assert code == 0, capsys.readouterr().err
    [png_file] = (tmp_path / "by-trial").glob("*.png")
    assert png_file.name in [name for name, _ in logged_pngs(runs["uri"], runs["attzoom"])]
    code = main(["explain", "attzoom-1", runs["attzoom"], "--tracking-uri", runs["uri"]])
    err = capsys.readouterr().err
    assert code == 2 and "the same run twice" in err, err
    client = MlflowClient(runs["uri"])
    other = client.create_experiment(experiment_name("other"))
    twin = client.create_run(other, tags={SWEEP: "other", TRIAL: "attzoom-1"}).info.run_id
    try:
        code = main(["explain", "attzoom-1", "--tracking-uri", runs["uri"]])
    finally:
        client.delete_experiment(other)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and runs["attzoom"] in err and twin in err, err


def test_the_same_run_twice_is_refused_in_one_line(runs, tmp_path, capsys):
    # it drew a grid comparing a run with itself and logged it to that run
    code = main(["explain", runs["attzoom"], runs["attzoom"], "--out", str(tmp_path / "same"),
                 "--tracking-uri", runs["uri"]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "the same run twice" in err and not (tmp_path / "same").exists()


def test_runs_of_two_data_sets_are_not_drawn_as_a_comparison(runs, tmp_path, capsys):
    # a Tiny-ImageNet run beside a CIFAR-100 run: exit 0, a grid of different images row by row, logged to both
    client = MlflowClient(runs["uri"])
    client.set_tag(runs["baseline"], "dataset", "tinyimagenet")
    try:
        code = main(["explain", runs["baseline"], runs["attzoom"], "--out", str(tmp_path / "two"),
                     "--tracking-uri", runs["uri"]])
    finally:
        client.set_tag(runs["baseline"], "dataset", "cluttered-digits")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{runs['baseline']} on tinyimagenet and {runs['attzoom']} on cluttered-digits" in err
    assert not (tmp_path / "two").exists()
