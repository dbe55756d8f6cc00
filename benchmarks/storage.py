"""What removing ended trials' last.pt saves: the same sweep with and without it, one run, real CLI.

Both sweeps are the demo spec (cluttered digits, no download; ``--backbone`` swaps the network) with the same
seed, each run by ``attzoom sweep`` in a fresh folder. In one, the driver's ``tune_jobs.reclaim`` removes nothing
(its ``remove_ended_last_pts`` replaced before the CLI runs), as before the change. The sweep folder's bytes are
sampled every half second while each runs: the peak, and what is left at the end. Prints one JSON object (the
ratios are without / with); progress goes to stderr.

    .venv/bin/python benchmarks/storage.py [--trials 4] [--epochs 2] [--backbone tiny_resnet]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import log  # noqa: E402

DEMO = ROOT / "tune_jobs" / "specs" / "demo.toml"
KEEP_ALL = "import tune_jobs.reclaim as r; r.remove_ended_last_pts = lambda *a: set(); "  # as before the change
CLI = "import sys; from tune_jobs.cli import main; sys.exit(main(sys.argv[1:]))"


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(bytes, last.pt files) under ``folder``; files that go while it is walked are skipped."""
    total, last_pts = 0, 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(parent, name)).st_size
            except OSError:
                continue
            last_pts += name == "last.pt"
    return total, last_pts


def sweep(folder: Path, keep_all: bool, args) -> dict:
    """Run the demo sweep in ``folder``; the sweep folder's peak and final bytes."""
    spec = DEMO.read_text()
    spec = re.sub(r'backbones = \[.*?\]', f'backbones = ["{args.backbone}"]', spec)
    spec = spec.replace('data_root = "data"', f'data_root = "{ROOT / "data"}"')
    (folder / "spec.toml").write_text(spec)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], folder_bytes(folder / "ray_results" / "demo")[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    code = (KEEP_ALL if keep_all else "") + CLI
    ran = subprocess.run([sys.executable, "-c", code, "sweep", "spec.toml", "--trials", str(args.trials),
                          "--epochs", str(args.epochs)], cwd=folder, capture_output=True, text=True)
    done.set()
    sampler.join()
    if ran.returncode != 0:
        raise RuntimeError(f"the sweep failed:\n{ran.stderr[-3000:]}")
    final, last_pts = folder_bytes(folder / "ray_results" / "demo")
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_bytes": max(peak[0], final),
            "final_bytes": final, "last_pt_files_left": last_pts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per study (default: 4)")
    parser.add_argument("--epochs", type=int, default=2, help="most epochs per trial (default: 2)")
    parser.add_argument("--backbone", default="tiny_resnet", help="the network (default: tiny_resnet)")
    args = parser.parse_args()
    report = {"benchmark": "storage", "trials_per_study": args.trials, "epochs": args.epochs,
              "backbone": args.backbone}
    for name, keep_all in (("keep_all", True), ("reclaim", False)):
        with tempfile.TemporaryDirectory(prefix=f"attzoom-storage-{name}-") as folder:
            log(f"{name}: sweep of {args.trials} trials per study, {args.epochs} epochs ...")
            report[name] = sweep(Path(folder), keep_all, args)
            log(f"{name}: {report[name]}")
    for key in ("peak_bytes", "final_bytes"):
        report[f"{key.split('_')[0]}_ratio"] = round(report["keep_all"][key] / report["reclaim"][key], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
