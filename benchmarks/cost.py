"""The paper protocol's GPU-hours, projected from measurements: gpu.py's throughput, early_stop.py's savings.

    GPU-hours = sum over the 24 studies of  trials x epochs per trial x seconds per epoch / 3600

- seconds per epoch: gpu.py's ``steps`` part (training steps alone, per backbone, variant and
  image size: CIFAR-100 at 32 px, Tiny-ImageNet at 64 px) times the cost of a whole ``fit`` epoch
  over its steps (augmentation, validation, checkpoints), measured by its ``fit`` part on ResNet-50
  for each variant and applied to every backbone;
- epochs per trial: 50 epochs with patience 5 stop about half-way (an assumption, not a
  measurement); with ASHA, that divided by early_stop.py's measured ratio of epochs;
- packing: n 1/n-GPU trials on one GPU divide the hours by gpu.py's best ``packed`` ratio;
- compiled steps (CUDA graphs): measured per backbone where gpu.py compiled it (``--graph-backbones``),
  else the eager steps scaled by what compiling did for ResNet-50 at the same image size.

    .venv/bin/python benchmarks/cost.py benchmarks/results/gpu-h200-2026-11-26.json \\
        [--early-stop benchmarks/results/early_stop-cpu-2026-11-30.json]
    .venv/bin/python benchmarks/cost.py gpu-fit-steps.json gpu-packed.json   # parts from two runs

gpu.py runs the same projection at the end of a full run (``--early-stop`` there too).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PAPER = {"backbones": ("resnet50", "densenet121", "mobilenetv1", "seresnet50", "cbam_resnet50", "resnext50"),
         "sides": (32, 64), "variants": ("baseline", "attzoom"), "trials": 30, "epochs": 50}
EPOCHS_RUN_SHARE = 0.5  # patience 5 stops a 50-epoch trial about half-way (assumed)


def project(gpu: dict, early_stop: dict | None = None) -> dict:
    """GPU-hours of the paper protocol from a gpu.py report (and an early_stop.py report), with what they rest on.

    A report with an eager and a compiled ("graphs") mode projects the compiled one; one from before
    that split (2026-11-26) has a single mode."""
    mode = "graphs" if "graphs" in gpu["fit"] else None
    fit_runs = gpu["fit"][mode]["runs"] if mode else gpu["fit"]["runs"]
    eager, steps = (gpu["steps"]["eager"], gpu["steps"][mode]) if mode else (gpu["steps"], gpu["steps"])
    fit_factor = {variant: steps["resnet50@32"][variant]["images_per_s"] / fit_runs[variant]["images_per_s"]
                  for variant in PAPER["variants"]}
    epoch_s = sum(step_epoch_s(eager, steps, f"{backbone}@{side}", f"resnet50@{side}", variant) * fit_factor[variant]
                  for backbone in PAPER["backbones"] for side in PAPER["sides"] for variant in PAPER["variants"])
    epochs_run = PAPER["epochs"] * EPOCHS_RUN_SHARE
    hours = PAPER["trials"] * epochs_run * epoch_s / 3600
    packing = gpu["packed"]["aggregate_ratio"] if "packed" in gpu else None
    projected = {"device": gpu["device"], "mode": mode or "eager",
                 "fit_over_steps": {k: round(v, 2) for k, v in fit_factor.items()},
                 "epochs_per_trial": epochs_run, "gpu_hours": round(hours)}
    if packing:
        projected.update(packing_ratio=packing, gpu_hours_packed=round(hours / packing))
    if early_stop:
        ratio = early_stop["epochs_ratio"]
        projected.update(asha_epochs_ratio=ratio, gpu_hours_asha=round(hours / ratio))
        if packing:
            projected["gpu_hours_asha_packed"] = round(hours / ratio / packing)
    return projected


def step_epoch_s(eager: dict, steps: dict, key: str, reference: str, variant: str) -> float:
    """Seconds per epoch of bare steps: measured in this mode, or else the eager time scaled by what the
    mode did for the reference backbone (ResNet-50) at the same image size."""
    if key in steps:
        return steps[key][variant]["epoch_s"]
    return eager[key][variant]["epoch_s"] * steps[reference][variant]["epoch_s"] / eager[reference][variant]["epoch_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gpu", type=Path, nargs="+",
                        help="gpu.py JSON reports that hold its fit, steps and packed parts between them")
    parser.add_argument("--early-stop", type=Path, help="an early_stop.py JSON report")
    args = parser.parse_args()
    early_stop = json.loads(args.early_stop.read_text()) if args.early_stop else None
    report: dict = {}
    for path in args.gpu:  # parts measured in separate runs (benchmarks/gpu_session.sh) join into one report
        report.update(json.loads(path.read_text()))
    print(json.dumps(project(report, early_stop), indent=2))


if __name__ == "__main__":
    main()
