"""Benchmark on a CUDA GPU: training throughput per trial, eager vs compiled as CUDA graphs, alone and packed.

Each part is one JSON section (``--parts`` picks); each compares the eager step with the
compiled one (``compile`` on: torch.compile with CUDA graphs, TrainConfig.cuda_graphs) in one run.

- ``fit``: ``attzoom.train.fit`` for resnet50, baseline vs attzoom (position stem, the paper's
  ImageNet stem) on a CIFAR-100-shaped set at 32 px: random uint8 images, 100 classes, 45,000
  train / 5,000 validation (throughput does not depend on pixel values), with a checkpoint
  folder as in a sweep. ``images_per_s`` is training images over the wall time from one
  epoch's report to the next (augmentation, validation, checkpoint writes and the report all
  included), the median from epoch 2 on (epoch 1 holds cuDNN autotuning and compilation).
- ``steps``: training steps alone (forward, backward, optimizer; no augmentation, no
  validation) for every paper backbone x {baseline, attzoom} x {32, 64 px}, batch 128, AMP and
  channels_last: images/s and the seconds one epoch of CIFAR-100 (45k) or Tiny-ImageNet (90k)
  would take. Compiled too for ``--graph-backbones`` (default resnet50: compiling all takes long).
  ``fit_share_of_steps``: the fit part's images/s over these, per variant and mode (target >= 0.9).
- ``packed``: the fit part's attzoom trial, compiled, as 1 process alone, then 4 processes at
  once with ``gpu_memory_fraction=0.25`` and 8 with 0.125 (``--packs``; how fractional-GPU trials
  share a GPU); aggregate images/s over the one. ``--mps`` repeats the 4 under NVIDIA MPS when
  ``nvidia-cuda-mps-control`` is on the PATH (a daemon of this user, in a temporary folder).

    python benchmarks/gpu.py --out gpu.json        # on a machine with a GPU, about 15 minutes on an H100
                                                   # (--early-stop early_stop.json: ASHA's savings in the projection)
    python benchmarks/gpu.py --quick --device cpu  # a smoke run of the script itself (compiles on the CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attzoom.config import TrainConfig  # noqa: E402
from attzoom.data import ImageSet, Splits  # noqa: E402
from attzoom.train import compile_model, fit, make_model, make_optimizer, make_runtime, mark_step  # noqa: E402
from benchmarks.common import images_per_s_between, log, sync  # noqa: E402
from benchmarks.cost import PAPER, project  # noqa: E402

EPOCH_IMAGES = {32: 45_000, 64: 90_000}  # CIFAR-100 / Tiny-ImageNet training images after the validation split
MODES = {"eager": False, "graphs": True}  # TrainConfig.compile


def synthetic_splits(n_train: int, n_val: int, side: int = 32, classes: int = 100) -> Splits:
    gen = torch.Generator().manual_seed(0)

    def images(n: int) -> ImageSet:
        return ImageSet(torch.randint(0, 256, (n, 3, side, side), generator=gen, dtype=torch.uint8),
                        torch.randint(0, classes, (n,), generator=gen))

    return Splits(images(n_train), images(n_val), images(n_val), classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def fit_throughput(backbone: str, variant: str, compiled: bool, args, memory_fraction: float | None = None) -> dict:
    """One short trial through ``fit`` with checkpoints; images/s from one epoch's report to the next."""
    data = synthetic_splits(args.train_images, args.val_images)
    config = {"backbone": backbone, "dataset": "cifar100", "variant": variant, "epochs": args.epochs,
              "batch_size": args.batch, "device": args.device, "gpu_memory_fraction": memory_fraction,
              "compile": compiled}
    reports: list[float] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as checkpoints:
        result = fit(config, data, checkpoint_dir=checkpoints, callback=lambda metrics, _: reports.append(time.time()))
    rates = images_per_s_between(reports, args.train_images, args.batch)
    return {"backbone": backbone, "variant": variant, "compiled": compiled,
            "images_per_s": round(statistics.median(rates or [m["images_per_s"] for m in result.history]), 1),
            "images_per_s_between_reports": [round(r, 1) for r in rates],
            "epoch_time_s": [round(m["epoch_time"], 2) for m in result.history],
            "started": started, "steady_from": reports[0] if reports else started, "ended": time.time()}


def part_fit(args, report: dict, save) -> None:
    section = report["fit"] = {}
    for mode, compiled in MODES.items():
        section[mode] = {"runs": {}}
        runs = section[mode]["runs"]
        for variant in PAPER["variants"]:
            runs[variant] = fit_throughput(args.backbone, variant, compiled, args)
            log(f"fit {mode} {args.backbone} {variant}: {runs[variant]['images_per_s']} images/s")
            save()
        section[mode]["attzoom_over_baseline_time"] = round(
            runs["baseline"]["images_per_s"] / runs["attzoom"]["images_per_s"], 3)
    section["graphs_over_eager"] = {variant: round(section["graphs"]["runs"][variant]["images_per_s"]
                                                   / section["eager"]["runs"][variant]["images_per_s"], 3)
                                    for variant in PAPER["variants"]}


def step_throughput(backbone: str, variant: str, side: int, compiled: bool, args) -> dict:
    """Training steps as fit takes them on this device (its Runtime, optimizer and compiled model)."""
    cfg = TrainConfig(backbone=backbone, variant=variant, device=args.device, optimizer="sgd",
                      batch_size=args.batch, compile=compiled)
    data = synthetic_splits(args.batch, 1, side)
    rt = make_runtime(cfg, data)
    device, cuda = rt.device, rt.device.type == "cuda"
    model = make_model(cfg, data.num_classes, rt)
    optimizer = make_optimizer(cfg, model)
    step_model = compile_model(model, cfg, rt) if compiled else model
    x, y = rt.prepare(data.train.images.to(device)), data.train.labels.to(device)

    def step() -> None:
        mark_step(step_model)
        with rt.autocast():
            loss = F.cross_entropy(step_model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup_steps + (3 if compiled else 0)):  # compiling, then recording the graphs
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    rate = args.steps * args.batch / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    return {"images_per_s": round(rate, 1), "epoch_s": round(EPOCH_IMAGES[side] / rate, 2),
            "peak_gib": None if peak is None else round(peak, 2)}


def steps_table(backbones, compiled: bool, args, table: dict, save) -> None:
    for backbone in backbones:
        for side in args.sides:
            row = {variant: step_throughput(backbone, variant, side, compiled, args) for variant in PAPER["variants"]}
            row["attzoom_over_baseline_time"] = round(
                row["baseline"]["images_per_s"] / row["attzoom"]["images_per_s"], 3)
            table[f"{backbone}@{side}"] = row
            log(f"steps {'graphs' if compiled else 'eager'} {backbone} {side}px: baseline "
                f"{row['baseline']['images_per_s']} vs attzoom {row['attzoom']['images_per_s']} images/s")
            save()


def part_steps(args, report: dict, save) -> None:
    section = report["steps"] = {"eager": {}, "graphs": {}}
    steps_table(args.backbones, False, args, section["eager"], save)
    steps_table(args.graph_backbones, True, args, section["graphs"], save)


def fit_share_of_steps(report: dict, backbone: str) -> dict:
    """fit's images/s over bare steps' at 32 px, per mode and variant (issue 16: >= 0.9 with graphs), for
    what both parts have measured so far."""
    shares = {}
    for mode in MODES:
        runs, row = report["fit"].get(mode, {}).get("runs", {}), report["steps"].get(mode, {}).get(f"{backbone}@32")
        if row:
            shares[mode] = {variant: round(runs[variant]["images_per_s"] / row[variant]["images_per_s"], 3)
                            for variant in runs}
    return shares


def part_packed(args, report: dict, save) -> None:
    """The compiled attzoom trial alone, then 4 and 8 at once, each in its own process as Ray would run them.
    Alone is the fit part's compiled attzoom run when this run has one (the same trial; a minute saved)."""
    alone = report.get("fit", {}).get("graphs", {}).get("runs", {}).get("attzoom") or launch_workers(args, 1, None)[0]
    section = report["packed"] = {"alone_images_per_s": alone["images_per_s"], "by_count": {}}
    for count in args.packs:
        section["by_count"][str(count)] = packing(args, count, 1 / count, alone)
        section["aggregate_ratio"] = max(p["aggregate_ratio"] for p in section["by_count"].values())
        save()
    if args.mps:
        count = args.packs[0]
        section[f"mps_{count}"] = with_mps(lambda env: packing(args, count, 1 / count, alone, env))


def packing(args, count: int, fraction: float, alone: dict, env: dict | None = None) -> dict:
    runs = launch_workers(args, count, fraction, env)
    total = sum(r["images_per_s"] for r in runs)
    log(f"packed: alone {alone['images_per_s']} images/s; {count} at once {total:.1f} in all")
    return {"images_per_s_each": [r["images_per_s"] for r in runs], "images_per_s_total": round(total, 1),
            "aggregate_ratio": round(total / alone["images_per_s"], 3),
            # how long all of them were past their first epoch together: the rates were measured side by side
            "steady_overlap_s": round(min(r["ended"] for r in runs) - max(r["steady_from"] for r in runs), 1)}


def launch_workers(args, count: int, fraction: float | None, env: dict | None = None) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", "--device", args.device, "--backbone", args.backbone,
           "--epochs", str(args.epochs), "--batch", str(args.batch), "--train-images", str(args.train_images),
           "--val-images", str(args.val_images)] + (["--fraction", str(fraction)] if fraction else [])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env) for _ in range(count)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a packed worker failed (its traceback is above)")
    return [json.loads(out) for out in outs]


def with_mps(measure) -> dict:
    """``measure(env)`` with an NVIDIA MPS daemon of this user running, or why it could not run."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        return {"skipped": "nvidia-cuda-mps-control is not on the PATH"}
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": f"{folder}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{folder}/log"}
        for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
            os.makedirs(env[key])
        started = subprocess.run([control, "-d"], env=env, capture_output=True, text=True)
        if started.returncode:
            return {"skipped": f"nvidia-cuda-mps-control -d failed: {started.stderr.strip()[:200]}"}
        try:
            return measure(env)
        finally:
            subprocess.run([control], input="quit\n", env=env, text=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="fit,steps,packed")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--backbone", default="resnet50", help="for the fit and packed parts")
    parser.add_argument("--backbones", default=",".join(PAPER["backbones"]), help="the steps part's (comma-separated)")
    parser.add_argument("--graph-backbones", default="resnet50", help="steps compiled for these (comma-separated)")
    parser.add_argument("--sides", default="32,64", help="the steps part's image sizes (comma-separated)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=45_000)
    parser.add_argument("--val-images", type=int, default=5_000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--packs", default="4,8", help="trials per GPU to try, each with a 1/n memory share")
    parser.add_argument("--mps", action="store_true", help="also pack the first of --packs under NVIDIA MPS")
    parser.add_argument("--out", help="also write the JSON here after each part")
    parser.add_argument("--early-stop", type=Path, help="an early_stop.py JSON: its epoch savings join the projection")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.backbones, args.graph_backbones = tuple(args.backbones.split(",")), tuple(args.graph_backbones.split(","))
    args.packs = [int(count) for count in args.packs.split(",")]
    args.sides = tuple(int(side) for side in args.sides.split(","))
    if args.quick:
        args.backbone, args.backbones, args.graph_backbones = "tiny_resnet", ("tiny_resnet",), ("tiny_resnet",)
        args.packs = [2]
        args.epochs, args.batch, args.train_images, args.val_images, args.steps, args.warmup_steps = 3, 16, 64, 32, 2, 1
    if args.worker:
        print(json.dumps(fit_throughput(args.backbone, "attzoom", True, args, args.fraction)))
        return

    device = torch.device(args.device)
    report = {"benchmark": "gpu_training_throughput",
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch": args.batch, "epochs": args.epochs, "quick": args.quick}
    started = time.perf_counter()

    def save() -> None:
        """After each measurement: a run cut short by its time limit still leaves what it measured."""
        report["wall_s"] = round(time.perf_counter() - started, 1)
        if {"fit", "steps"} <= report.keys():
            report["fit_share_of_steps"] = fit_share_of_steps(report, args.backbone)
        if args.out:
            partial = Path(f"{args.out}.part")
            partial.write_text(json.dumps(report, indent=2))
            partial.replace(args.out)

    parts = {"fit": part_fit, "steps": part_steps, "packed": part_packed}
    for name in args.parts.split(","):
        parts[name](args, report, save)
        save()
    if {"fit", "steps", "packed"} <= report.keys() and not args.quick:  # the paper protocol's GPU-hours (cost.py)
        early_stop = json.loads(args.early_stop.read_text()) if args.early_stop else None
        try:
            report["paper_projection"] = project(report, early_stop)
        except KeyError as missing:
            log(f"no projection: this run did not measure {missing}; cost.py joins it with an earlier report")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
