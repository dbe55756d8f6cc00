"""fit's throughput at two commits, one run: what a change to the training loop did, report to report.

Each side is a fresh process whose ``attzoom`` comes from a ``git worktree`` of its commit (the
working tree itself for ``--after .``), training the same short trial through ``fit`` with a
checkpoint folder, as a sweep's trial does: images/s is training images over the wall time from one
epoch's report to the next (augmentation, validation, checkpoint writes and the report included),
the median from epoch 2 on. The sides alternate ``--repeats`` times so that load hits both alike.

    .venv/bin/python benchmarks/fit_ab.py --before ff19942 [--after .] [--augment] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import images_per_s_between, log  # noqa: E402

WORKER = """
import json, sys, tempfile, time
import torch
from attzoom.data import ImageSet, Splits
from attzoom.train import fit
args = json.loads(sys.argv[1])
gen = torch.Generator().manual_seed(0)
def images(n):
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8),
                    torch.randint(0, 10, (n,), generator=gen))
data = Splits(images(args["train"]), images(args["val"]), images(args["val"]), 10, (0.5,) * 3, (0.25,) * 3)
reports = []
with tempfile.TemporaryDirectory() as folder:
    fit(args["config"], data, checkpoint_dir=folder, callback=lambda metrics, _: reports.append(time.perf_counter()))
print(json.dumps(reports))
"""  # runs against the side's own attzoom only, so it prints its report times and the rates are computed here


def measure(source: Path, args) -> float:
    config = {"backbone": args.backbone, "dataset": "cluttered-digits", "variant": args.variant,
              "batch_size": args.batch, "epochs": args.epochs, "augment": args.augment, "device": "cpu"}
    payload = json.dumps({"config": config, "train": args.train_images, "val": args.val_images})
    done = subprocess.run([sys.executable, "-c", WORKER, payload], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(source)})
    return statistics.median(images_per_s_between(json.loads(done.stdout), args.train_images, args.batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a commit")
    parser.add_argument("--after", default=".", help="a commit, or . for the working tree (default)")
    parser.add_argument("--backbone", default="tiny_resnet")
    parser.add_argument("--variant", default="attzoom")
    parser.add_argument("--augment", action="store_true", help="the paper's augmentation (AutoAugment included)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=9000)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        for side in ("before", "after"):
            rev = getattr(args, side)
            if rev == ".":
                sources[side] = ROOT
                continue
            sources[side] = Path(tmp, side)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(sources[side]), rev],
                           check=True, capture_output=True)
        try:
            rates = {"before": [], "after": []}
            for _ in range(args.repeats):
                for side in rates:
                    rates[side].append(round(measure(sources[side], args), 1))
                    log(f"{side}: {rates[side][-1]} images/s")
        finally:
            for side, source in sources.items():
                if source != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(source)],
                                   capture_output=True)
    before, after = (statistics.median(rates[side]) for side in ("before", "after"))
    print(json.dumps({"benchmark": "fit images/s, report to report, at two commits", "before": args.before,
                      "after": args.after, "backbone": args.backbone, "variant": args.variant,
                      "augment": args.augment, "batch": args.batch, "train_images": args.train_images,
                      "val_images": args.val_images, "images_per_s": rates,
                      "after_over_before": round(after / before, 3), "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
