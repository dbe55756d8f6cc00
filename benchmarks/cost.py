"""The paper protocol's GPU-hours, projected from measurements: gpu.py's throughput, early_stop.py's savings.

    GPU-hours = sum over the 24 studies of  trials x epochs per trial x seconds per epoch / 3600

- seconds per epoch: gpu.py's ``steps`` part (training steps alone, per backbone, variant and
  image size: CIFAR-100 at 32 px, Tiny-ImageNet at 64 px) times the cost of a whole ``fit`` epoch
  over its steps (augmentation, validation, checkpoints), measured by its ``fit`` part on ResNet-50
  for each variant and applied to every backbone;
- epochs per trial: what the plain sweep of an early_stop.py report trained per trial when that
  report ran the paper's trial length (50 epochs, patience 5; measured on the demo data), else
  assumed half of 50; with ASHA, that divided by the report's measured ratio of epochs;
- packing: n 1/n-GPU trials on one GPU divide the hours by gpu.py's best ``packed`` ratio;
- compiled steps (CUDA graphs): measured per backbone where gpu.py compiled it (``--graph-backbones``),
  else the eager steps scaled by what compiling did for ResNet-50 at the same image size, else (no
  compiled ResNet-50 at that size) the eager steps: no gain is assumed where none was measured.

Reports given together are joined, later over earlier: a short GPU session that measured ResNet-50
alone takes the other backbones' eager steps from an earlier report of the same device.

    .venv/bin/python benchmarks/cost.py benchmarks/results/gpu-h200-2026-11-26.json \\
        [--early-stop benchmarks/results/early_stop-cpu-2026-11-30-50epochs.json]
    .venv/bin/python benchmarks/cost.py benchmarks/results/gpu-h200-2026-11-26.json gpu.json   # joined

gpu.py runs the same projection at the end of a full run (``--early-stop`` there too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PAPER = {"backbones": ("resnet50", "densenet121", "mobilenetv1", "seresnet50", "cbam_resnet50", "resnext50"),
         "sides": (32, 64), "variants": ("baseline", "attzoom"), "trials": 30, "epochs": 50, "patience": 5}
EPOCHS_RUN_SHARE = 0.5  # patience 5 stops a 50-epoch trial about half-way (assumed where not measured)


def project(gpu: dict, early_stop: dict | None = None) -> dict:
    """GPU-hours of the paper protocol from a gpu.py report (and an early_stop.py report), with what they rest on.

    A report with a compiled ("graphs") fit projects the compiled mode, else the eager one."""
    gpu = normalized(gpu)
    mode = "graphs" if "graphs" in gpu["fit"] else "eager"
    fit_runs, eager, steps = gpu["fit"][mode]["runs"], gpu["steps"]["eager"], gpu["steps"].get(mode, {})
    fit_factor = {variant: steps["resnet50@32"][variant]["images_per_s"] / fit_runs[variant]["images_per_s"]
                  for variant in PAPER["variants"]}
    keys = [f"{backbone}@{side}" for backbone in PAPER["backbones"] for side in PAPER["sides"]]
    epoch_s = sum(step_epoch_s(eager, steps, key, variant) * fit_factor[variant]
                  for key in keys for variant in PAPER["variants"])
    epochs_run, epochs_from = trial_epochs(early_stop)
    hours = PAPER["trials"] * epochs_run * epoch_s / 3600
    packing = gpu["packed"]["aggregate_ratio"] if "packed" in gpu else None
    projected = {"device": gpu["device"], "mode": mode,
                 "fit_over_steps": {k: round(v, 2) for k, v in fit_factor.items()},
                 "epochs_per_trial": round(epochs_run, 1), "epochs_per_trial_from": epochs_from,
                 "gpu_hours": round(hours)}
    if mode != "eager":
        projected["steps_not_measured_compiled"] = {
            "scaled_as_resnet50": [k for k in keys if k not in steps and reference(k) in steps],
            "taken_as_eager": [k for k in keys if reference(k) not in steps]}
    if packing:
        projected.update(packing_ratio=packing, gpu_hours_packed=round(hours / packing))
    if early_stop:
        ratio = early_stop["epochs_ratio"]
        projected.update(asha_epochs_ratio=ratio, gpu_hours_asha=round(hours / ratio))
        if packing:
            projected["gpu_hours_asha_packed"] = round(hours / ratio / packing)
    return projected


def trial_epochs(early_stop: dict | None) -> tuple[float, str]:
    """Epochs one trial of the plain protocol trains, and where that number comes from."""
    if early_stop and (early_stop.get("epochs"), early_stop.get("patience")) == (PAPER["epochs"], PAPER["patience"]):
        plain = early_stop["none"]
        trials = sum(study["trials"] for study in plain["studies"].values())
        return plain["epochs"] / trials, "measured: early_stop.py's plain sweep at 50 epochs, patience 5 (demo data)"
    return PAPER["epochs"] * EPOCHS_RUN_SHARE, "assumed: patience 5 stops a trial about half-way"


def reference(key: str) -> str:
    """ResNet-50 at the same image size as ``key`` ("backbone@side"): what compiling did there scales the rest."""
    return "resnet50@" + key.split("@")[1]


def step_epoch_s(eager: dict, steps: dict, key: str, variant: str) -> float:
    """Seconds per epoch of bare steps: measured in this mode, or else the eager time scaled by what the
    mode did for ResNet-50 at the same image size (``reference``), or else (none compiled there) eager."""
    ref = reference(key)
    if key in steps:
        return steps[key][variant]["epoch_s"]
    if ref not in steps:
        return eager[key][variant]["epoch_s"]
    return eager[key][variant]["epoch_s"] * steps[ref][variant]["epoch_s"] / eager[ref][variant]["epoch_s"]


def normalized(report: dict) -> dict:
    """A report from before gpu.py measured eager and compiled apart (2026-11-26) as one of its eager mode."""
    fit, steps = report.get("fit", {}), report.get("steps", {})
    old_steps = steps and not {"eager", "graphs"} & steps.keys()
    return {**report, "fit": {"eager": fit} if "runs" in fit else fit,
            "steps": {"eager": steps} if old_steps else steps}


def joined(reports: list[dict]) -> dict:
    """Reports of separate runs as one, a later one's measurements over an earlier one's."""
    into: dict = {}
    for report in reports:
        _merge(into, normalized(report))
    return into


def _merge(into: dict, report: dict) -> None:
    for key, value in report.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gpu", type=Path, nargs="+",
                        help="gpu.py JSON reports that hold its fit, steps and packed parts between them")
    parser.add_argument("--early-stop", type=Path, help="an early_stop.py JSON report")
    args = parser.parse_args()
    early_stop = json.loads(args.early_stop.read_text()) if args.early_stop else None
    report = joined([json.loads(path.read_text()) for path in args.gpu])
    try:
        projected = project(report, early_stop)
    except KeyError as missing:
        print(f"cost.py: no report given has {missing} (gpu.py's steps or fit for it); add one that measured "
              "it, such as benchmarks/results/gpu-h200-2026-11-26.json", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({**projected, "reports": [str(path) for path in args.gpu]}, indent=2))


if __name__ == "__main__":
    main()
