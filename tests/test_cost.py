"""The paper protocol's projected GPU-hours (benchmarks/cost.py) from the stored H200 measurements."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cost import project  # noqa: E402

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
