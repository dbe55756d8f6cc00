"""Benchmark: batched uint8 augmentation (attzoom.augment.PaperAugment) vs torchvision's PIL per-sample pipeline.

Both produce normalised float tensors from CIFAR-shaped uint8 images with the paper's
augmentation (RandomCrop(32, padding=4), RandomHorizontalFlip, AutoAugment CIFAR10):

- batched: ``PaperAugment(image_size=32)(uint8 NCHW batch of 256, generator)`` followed by
  ``(x.float() / 255 - mean) / std``, as the training loop does;
- PIL: per item, ``Image.fromarray(hwc_uint8)`` (what torchvision's CIFAR100.__getitem__
  does) then ``Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(),
  AutoAugment(CIFAR10), ToTensor(), Normalize(mean, std)])`` from torchvision.transforms
  (v1), and ``torch.stack`` of each 256 results (the DataLoader's default collation).

Both run on one core (``torch.set_num_threads(1)``; PIL is single-threaded), so the
throughputs are images per second per core. Prints one JSON object to stdout.

    .venv/bin/python benchmarks/data.py            # default, well under 2 minutes on 2 cores
    .venv/bin/python benchmarks/data.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from attzoom.augment import PaperAugment  # noqa: E402
from benchmarks.common import log  # noqa: E402

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)  # CIFAR-100


def make_images(n: int, source: str, root: str) -> torch.Tensor:
    """(n, 3, 32, 32) uint8."""
    if source == "random":
        return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    from attzoom.data import load

    images = load(source, root).train.images
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    reps = -(-n // len(images))
    return images.repeat(reps, 1, 1, 1)[:n].contiguous()


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> normalised float, as the training loop does."""
    return (x.float() / 255 - mean) / std


def run_batched(images: torch.Tensor, batch_size: int, seed: int) -> float:
    """Seconds to augment and normalise all images in batches."""
    aug = PaperAugment(image_size=images.shape[-1])
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        x = aug(images[i:i + batch_size], gen)
        x = normalise(x, mean, std)
    return time.perf_counter() - start


def run_pil(hwc, batch_size: int, seed: int) -> float:
    """Seconds for Image.fromarray + the v1 transform per item, stacked per batch."""
    from PIL import Image
    from torchvision import transforms
    from torchvision.transforms import AutoAugmentPolicy

    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.AutoAugment(AutoAugmentPolicy.CIFAR10),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    torch.manual_seed(seed)  # v1 transforms draw from the global generator
    start = time.perf_counter()
    for i in range(0, len(hwc), batch_size):
        torch.stack([transform(Image.fromarray(a)) for a in hwc[i:i + batch_size]])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--images", type=int, default=None, help="images per timed pass (default 8192; 1024 quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per pipeline (default 5; 3 quick)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--source", default="random", help="'random' (uniform uint8) or a data set name for attzoom.data.load")
    parser.add_argument("--data-root", default="/tmp/azdata")
    args = parser.parse_args()
    args.images = args.images or (1024 if args.quick else 8192)
    args.repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(1)

    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    images = make_images(args.images, args.source, args.data_root)
    hwc = list(images.permute(0, 2, 3, 1).contiguous().numpy())  # CIFAR100.data layout, one array per item

    run_batched(images[:args.batch_size], args.batch_size, seed=123)  # warm-up
    run_pil(hwc[:64], args.batch_size, seed=123)
    batched_s, pil_s = [], []
    for r in range(args.repeats):  # alternate, so load from other processes hits both alike
        batched_s.append(run_batched(images, args.batch_size, seed=r))
        pil_s.append(run_pil(hwc, args.batch_size, seed=r))
        log(f"repeat {r}: batched {args.images / batched_s[-1]:.0f} img/s, PIL {args.images / pil_s[-1]:.0f} img/s")

    batched = args.images / statistics.median(batched_s)
    pil = args.images / statistics.median(pil_s)
    print(json.dumps({
        "benchmark": "augmentation_batched_vs_pil",
        "batched_pipeline": "attzoom.augment.PaperAugment(image_size=32) on uint8 NCHW batches, then (x.float()/255-mean)/std",
        "pil_pipeline": "per item: PIL.Image.fromarray(HWC uint8) [included in timing, as torchvision's CIFAR100.__getitem__ does] "
                        "+ transforms.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), "
                        "AutoAugment(CIFAR10), ToTensor(), Normalize(mean, std)]) (torchvision.transforms v1); "
                        "torch.stack per batch (default collation)",
        "data": f"{args.source}: {args.images} images of 3x32x32 uint8",
        "batch_size": args.batch_size,
        "threads": "torch.set_num_threads(1) for both; PIL is single-threaded, so each uses one core",
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
        "load_note": "1-minute load average at start and end; other processes on the CPUs skew timings",
        "torch": torch.__version__,
        "quick": args.quick,
        "repeats": args.repeats,
        "timing": "median over repeats of one pass over all images; pipelines alternate",
        "batched_images_per_s_per_core": round(batched, 1),
        "pil_images_per_s_per_core": round(pil, 1),
        "speedup": round(batched / pil, 3),
        "target": "batched >= 4x PIL per core",
        "target_met": batched / pil >= 4.0,
        "wall_s": round(time.perf_counter() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
