"""Benchmark on a CUDA GPU: training throughput per trial, baseline vs AttZoom, alone and four to a GPU.

Three parts, each one JSON section (``--parts`` picks):

- ``fit``: ``attzoom.train.fit`` for resnet50, baseline vs attzoom (position stem, the paper's
  ImageNet stem) on a CIFAR-100-shaped set at 32 px: random uint8 images, 100 classes, 45,000
  train / 5,000 validation (throughput does not depend on pixel values). AMP and channels_last
  as ``fit`` picks them on CUDA, the paper's augmentation on the GPU. ``images_per_s`` is what
  fit's callback reports (training images over the epoch's wall time, validation included),
  the median over epochs 2.. (epoch 1 holds cuDNN autotuning).
- ``steps``: training steps alone (forward, backward, optimizer; no augmentation, no
  validation) for every paper backbone x {baseline, attzoom} x {32, 64 px}, batch 128, AMP and
  channels_last: images/s and the seconds one epoch of CIFAR-100 (45k) or Tiny-ImageNet (90k)
  would take, for the README's GPU cost estimate.
- ``packed``: the fit part's attzoom trial run as 1 process alone, then as 4 processes at once
  with ``gpu_memory_fraction=0.25`` (how 0.25-GPU trials share a GPU); aggregate images/s of
  the four over the one. Their running intervals are reported to show they overlapped.

    python benchmarks/gpu.py > gpu.json          # on a machine with a GPU, about 5 minutes on an H100
                                                 # (--early-stop early_stop.json: ASHA's savings in the projection)
    python benchmarks/gpu.py --quick --device cpu  # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attzoom.config import TrainConfig  # noqa: E402
from attzoom.data import ImageSet, Splits  # noqa: E402
from attzoom.train import fit, make_model, make_optimizer, make_runtime  # noqa: E402
from benchmarks.common import log, sync  # noqa: E402
from benchmarks.cost import PAPER, project  # noqa: E402

EPOCH_IMAGES = {32: 45_000, 64: 90_000}  # CIFAR-100 / Tiny-ImageNet training images after the validation split


def synthetic_splits(n_train: int, n_val: int, side: int = 32, classes: int = 100) -> Splits:
    gen = torch.Generator().manual_seed(0)

    def images(n: int) -> ImageSet:
        return ImageSet(torch.randint(0, 256, (n, 3, side, side), generator=gen, dtype=torch.uint8),
                        torch.randint(0, classes, (n,), generator=gen))

    return Splits(images(n_train), images(n_val), images(n_val), classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def fit_throughput(backbone: str, variant: str, args, memory_fraction: float | None = None) -> dict:
    """One short trial through ``fit``; images/s as its callback reports them."""
    data = synthetic_splits(args.train_images, args.val_images)
    config = {"backbone": backbone, "dataset": "cifar100", "variant": variant, "epochs": args.epochs,
              "batch_size": args.batch, "device": args.device, "gpu_memory_fraction": memory_fraction}
    started = time.time()
    result = fit(config, data)
    ended = time.time()
    rates = [m["images_per_s"] for m in result.history]
    steady = rates[1:] or rates
    return {"backbone": backbone, "variant": variant, "images_per_s": round(statistics.median(steady), 1),
            "images_per_s_by_epoch": [round(r, 1) for r in rates],
            "epoch_time_s": [round(m["epoch_time"], 2) for m in result.history],
            "started": started, "ended": ended}


def part_fit(args) -> dict:
    runs = {variant: fit_throughput(args.backbone, variant, args) for variant in ("baseline", "attzoom")}
    for run in runs.values():
        log(f"fit {run['backbone']} {run['variant']}: {run['images_per_s']} images/s")
    return {"runs": runs,
            "attzoom_over_baseline_time": round(runs["baseline"]["images_per_s"] / runs["attzoom"]["images_per_s"], 3)}


def step_throughput(backbone: str, variant: str, side: int, args) -> dict:
    """Training steps as fit takes them on this device (its Runtime: AMP and channels_last on CUDA)."""
    cfg = TrainConfig(backbone=backbone, variant=variant, device=args.device, optimizer="sgd",
                      batch_size=args.batch)
    data = synthetic_splits(args.batch, 1, side)
    rt = make_runtime(cfg, data)
    device, cuda = rt.device, rt.device.type == "cuda"
    model = make_model(cfg, data.num_classes, rt)
    optimizer = make_optimizer(cfg, model)
    x, y = rt.prepare(data.train.images.to(device)), data.train.labels.to(device)

    def step() -> None:
        with rt.autocast():
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup_steps):
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


def part_steps(args) -> dict:
    table = {}
    for backbone in args.backbones:
        for side in (32, 64):
            row = {variant: step_throughput(backbone, variant, side, args) for variant in ("baseline", "attzoom")}
            row["attzoom_over_baseline_time"] = round(
                row["baseline"]["images_per_s"] / row["attzoom"]["images_per_s"], 3)
            table[f"{backbone}@{side}"] = row
            log(f"steps {backbone} {side}px: baseline {row['baseline']['images_per_s']} vs attzoom "
                f"{row['attzoom']['images_per_s']} images/s")
    return table


def part_packed(args) -> dict:
    """The attzoom trial alone, then four at once, each in its own process as Ray would run them."""
    def launch(count: int, fraction: float | None) -> list[dict]:
        cmd = [sys.executable, __file__, "--worker", "--device", args.device, "--backbone", args.backbone,
               "--epochs", str(args.epochs), "--batch", str(args.batch), "--train-images", str(args.train_images),
               "--val-images", str(args.val_images)] + (["--fraction", str(fraction)] if fraction else [])
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE) for _ in range(count)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError("a packed worker failed (its traceback is above)")
        return [json.loads(out) for out in outs]

    alone = launch(1, None)[0]
    four = launch(4, 0.25)
    overlap = min(r["ended"] for r in four) - max(r["started"] for r in four)
    total = sum(r["images_per_s"] for r in four)
    log(f"packed: alone {alone['images_per_s']} images/s; four at once {total:.1f} in all")
    return {"alone_images_per_s": alone["images_per_s"],
            "four_images_per_s_each": [r["images_per_s"] for r in four],
            "four_images_per_s_total": round(total, 1),
            "aggregate_ratio": round(total / alone["images_per_s"], 3),
            "all_four_overlap_s": round(overlap, 1)}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="fit,steps,packed")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--backbone", default="resnet50", help="for the fit and packed parts")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=45_000)
    parser.add_argument("--val-images", type=int, default=5_000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--out", help="also write the JSON here after each part")
    parser.add_argument("--early-stop", type=Path, help="an early_stop.py JSON: its epoch savings join the projection")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.backbones = PAPER["backbones"]
    if args.quick:
        args.backbone, args.backbones, args.epochs, args.batch = "tiny_resnet", ("tiny_resnet",), 2, 16
        args.train_images, args.val_images, args.steps, args.warmup_steps = 64, 32, 2, 1
    if args.worker:
        print(json.dumps(fit_throughput(args.backbone, "attzoom", args, args.fraction)))
        return

    device = torch.device(args.device)
    report = {"benchmark": "gpu_training_throughput",
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch": args.batch, "epochs": args.epochs, "quick": args.quick}
    started = time.perf_counter()
    parts = {"fit": part_fit, "steps": part_steps, "packed": part_packed}
    for name in args.parts.split(","):
        report[name] = parts[name](args)
        report["wall_s"] = round(time.perf_counter() - started, 1)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
    if {"fit", "steps", "packed"} <= report.keys() and not args.quick:  # the paper protocol's GPU-hours (cost.py)
        early_stop = json.loads(args.early_stop.read_text()) if args.early_stop else None
        report["paper_projection"] = project(report, early_stop)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
