"""The paper protocol's projected GPU-hours (benchmarks/cost.py) from the stored H200 measurements."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cost import PAPER, project  # noqa: E402

H200 = json.loads((ROOT / "benchmarks" / "results" / "gpu-h200-2026-11-26.json").read_text())


def test_the_projection_is_the_readmes_and_asha_and_packing_divide_it_by_what_was_measured():
    plain = project(H200)
    assert (plain["gpu_hours"], plain["gpu_hours_packed"]) == (194, 116)  # quoted in the README
    assert plain["fit_over_steps"] == {"baseline": 2.01, "attzoom": 2.26}  # fit epochs over bare steps, ResNet-50
    with_asha = project(H200, {"epochs_ratio": 2.0})
    assert with_asha["gpu_hours_asha"] == pytest.approx(plain["gpu_hours"] / 2, abs=1)
    assert with_asha["gpu_hours_asha_packed"] == pytest.approx(plain["gpu_hours"] / 2 / 1.667, abs=1)
    faster = json.loads(json.dumps(H200))
    for row in faster["steps"].values():  # steps twice as fast, fit keeping the same share of them
        for variant in ("baseline", "attzoom"):
            row[variant]["epoch_s"] /= 2
            row[variant]["images_per_s"] *= 2
    for run in faster["fit"]["runs"].values():
        run["images_per_s"] *= 2
    assert project(faster)["gpu_hours"] == pytest.approx(plain["gpu_hours"] / 2, abs=1)


def test_a_report_with_compiled_steps_projects_the_compiled_mode():
    """gpu.py now measures eager and compiled (CUDA graphs) in one run and compiles only some backbones'
    steps: the others scale as ResNet-50 did at the same image size."""
    eager = H200["steps"]
    graphs = {key: {variant: {**row[variant], "epoch_s": row[variant]["epoch_s"] / 3,
                              "images_per_s": row[variant]["images_per_s"] * 3} for variant in ("baseline", "attzoom")}
              for key, row in eager.items() if key.startswith("resnet50@")}
    fit = {"eager": H200["fit"], "graphs": {"runs": {variant: {**run, "images_per_s": run["images_per_s"] * 3}
                                                     for variant, run in H200["fit"]["runs"].items()}}}
    report = {**H200, "fit": fit, "steps": {"eager": eager, "graphs": graphs}}
    projected = project(report)
    assert projected["mode"] == "graphs" and projected["fit_over_steps"] == {"baseline": 2.01, "attzoom": 2.26}
    assert projected["gpu_hours"] == pytest.approx(project(H200)["gpu_hours"] / 3, abs=1)
    graphs["mobilenetv1@32"] = {variant: {**eager["mobilenetv1@32"][variant]} for variant in ("baseline", "attzoom")}
    assert project(report)["gpu_hours"] > projected["gpu_hours"]  # measured, not scaled: no faster compiled


def test_parts_measured_in_separate_runs_join_into_one_projection(tmp_path):
    """benchmarks/gpu_session.sh measures fit and steps in one command and packing in another."""
    first = tmp_path / "fit-steps.json"
    first.write_text(json.dumps({key: H200[key] for key in ("device", "fit", "steps")}))
    second = tmp_path / "packed.json"
    second.write_text(json.dumps({"device": H200["device"], "packed": H200["packed"]}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost.py"), str(first), str(second)],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["gpu_hours_packed"] == project(H200)["gpu_hours_packed"]


def test_a_short_session_joins_an_earlier_report_and_says_what_it_did_not_compile(tmp_path):
    """A GPU session that measured ResNet-50 at 32 px only (gpu_session.sh) takes the other backbones'
    eager steps from the 2026-11-26 report; sizes with no compiled ResNet-50 are assumed to gain nothing."""
    row = H200["steps"]["resnet50@32"]
    faster = {variant: {**row[variant], "epoch_s": row[variant]["epoch_s"] / 2,
                        "images_per_s": row[variant]["images_per_s"] * 2} for variant in ("baseline", "attzoom")}
    fit = {mode: {"runs": {variant: {**run, "images_per_s": run["images_per_s"] * factor}
                           for variant, run in H200["fit"]["runs"].items()}} for mode, factor in (("eager", 1),
                                                                                                   ("graphs", 2))}
    session = {"device": "NVIDIA H200", "fit": fit, "steps": {"eager": {"resnet50@32": row},
                                                              "graphs": {"resnet50@32": faster}}}
    (tmp_path / "session.json").write_text(json.dumps(session))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost.py"),
                           str(ROOT / "benchmarks" / "results" / "gpu-h200-2026-11-26.json"),
                           str(tmp_path / "session.json")], capture_output=True, text=True, check=True)
    projected = json.loads(done.stdout)
    assert projected["mode"] == "graphs" and projected["packing_ratio"] == H200["packed"]["aggregate_ratio"]
    skipped = projected["steps_not_measured_compiled"]
    assert "densenet121@32" in skipped["scaled_as_resnet50"] and "resnet50@64" in skipped["taken_as_eager"]
    at_32 = sum(H200["steps"][f"{b}@32"][v]["epoch_s"] for b in PAPER["backbones"] for v in ("baseline", "attzoom"))
    at_64 = sum(H200["steps"][f"{b}@64"][v]["epoch_s"] for b in PAPER["backbones"] for v in ("baseline", "attzoom"))
    share = (at_32 / 2 + at_64) / (at_32 + at_64)  # 32 px twice as fast, 64 px as eager
    assert projected["gpu_hours"] == pytest.approx(project(H200)["gpu_hours"] * share, rel=0.03)


def test_an_early_stop_run_at_the_papers_trial_length_replaces_the_assumed_epochs_per_trial():
    """early_stop.py at 50 epochs and patience 5 measured how long plain trials run: that, not the assumed
    half, is what the projection multiplies; a shorter run's ratio still applies on the assumption."""
    measured = json.loads((ROOT / "benchmarks" / "results" / "early_stop-cpu-2026-11-30-50epochs.json").read_text())
    plain = project(H200)
    at_length = project(H200, measured)
    per_trial = measured["none"]["epochs"] / (2 * measured["trials_per_study"])
    assert at_length["epochs_per_trial"] == round(per_trial, 1)
    assert at_length["epochs_per_trial_from"].startswith("measured")
    assert at_length["gpu_hours"] == pytest.approx(plain["gpu_hours"] * per_trial / 25, abs=1)
    assert at_length["gpu_hours_asha"] == pytest.approx(at_length["gpu_hours"] / measured["epochs_ratio"], abs=1)
    shorter = project(H200, {**measured, "epochs": 8, "patience": 3})
    assert shorter["epochs_per_trial"] == 25 and shorter["epochs_per_trial_from"].startswith("assumed")
