"""How ``attzoom status`` and ``attzoom report`` scale with the store: the same sweep shape at two sizes, one run.

A store is filled the way the sweep's driver fills it (tune_jobs.tracking.TrialRuns: a parent run
per study, a child run per trial, every epoch's metrics in one batch, FINISHED with a status), with
synthetic learning curves; then each command runs as a user runs it, in a fresh process, and its
wall time is taken. Issue 15's targets, at 24 studies x 30 trials x 50 epochs: status <= 3 s,
report <= 20 s, and doubling the runs at most 2.2x either time. Prints one JSON object.

    .venv/bin/python benchmarks/store.py [--studies 24] [--trials 15] [--epochs 50]

The second size doubles the trials per study. ``fill`` is also usable on its own (a small store
for tests).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tune_jobs.layout import EPOCH_METRICS  # noqa: E402
from tune_jobs.spec import load_spec  # noqa: E402


def fill(tracking_uri: str, name: str, studies: int, trials: int, epochs: int, seed: int = 0) -> dict:
    """Write a finished sweep through the driver's own writer; returns what was written: the number of metric
    points, and per study the best val top-1 and the epochs."""
    from tune_jobs.tracking import TrialRuns, prepare_tracking, study_tags

    paper = load_spec(ROOT / "tune_jobs" / "specs" / "paper.toml")
    spec = replace(paper, name=name, tracking_uri=tracking_uri, trials=trials, epochs=epochs)
    chosen = spec.studies[:studies]
    experiment_id, parents = prepare_tracking(spec)
    runs = TrialRuns(tracking_uri, experiment_id, parents)
    rng, points, written = random.Random(seed), 0, {}
    for study in chosen:
        written[study.name] = {"best_top1": None, "epochs": 0}
        for t in range(trials):
            trial_id = f"{rng.getrandbits(32):08x}"
            runs.open(trial_id, study.name, study_tags(spec, study), {"lr": str(rng.uniform(1e-4, 1e-1))})
            ceiling = rng.uniform(20, 80)
            for epoch in range(1, epochs + 1):
                top1 = ceiling * (1 - math.exp(-epoch / 8)) + rng.gauss(0, 1)
                metrics = {"train_loss": 4 / epoch, "val_loss": 4 / epoch, "val_top1": top1,
                           "val_top5": min(100.0, top1 + 20), "lr": 1e-3, "epoch_time": 30.0, "images_per_s": 900.0}
                runs.log_epoch(trial_id, epoch, {k: v for k, v in metrics.items() if k in EPOCH_METRICS}, {})
                points += len(metrics)
                best = written[study.name]["best_top1"]
                written[study.name] = {"best_top1": max(top1, best if best is not None else top1),
                                       "epochs": written[study.name]["epochs"] + 1}
            runs.finish(trial_id, "completed", None)
    return {"metric_points": points, "studies": written}


def timed(*args: str, cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tune_jobs.cli", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return round(time.perf_counter() - started, 2)


def measure(studies: int, trials: int, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        started = time.perf_counter()
        points = fill(uri, "bench", studies, trials, epochs)["metric_points"]
        filled = round(time.perf_counter() - started, 1)
        return {"studies": studies, "trials_per_study": trials, "epochs": epochs, "runs": studies * trials,
                "metric_points": points, "fill_s": filled,
                "status_s": timed("status", "bench", "--tracking-uri", uri, cwd=folder),
                "report_s": timed("report", "bench", "--tracking-uri", uri, "--out", str(folder / "r"), cwd=folder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--trials", type=int, default=15, help="trials per study at the first size (doubled next)")
    parser.add_argument("--epochs", type=int, default=50)
    args = parser.parse_args()
    small = measure(args.studies, args.trials, args.epochs)
    large = measure(args.studies, 2 * args.trials, args.epochs)
    print(json.dumps({
        "benchmark": "status and report wall time at two store sizes (runs doubled)",
        "small": small, "large": large,
        "status_growth": round(large["status_s"] / small["status_s"], 2),
        "report_growth": round(large["report_s"] / small["report_s"], 2),
        "targets": {"status_s_at_720_runs": 3, "report_s_at_720_runs": 20, "growth_at_most": 2.2},
    }, indent=2))


if __name__ == "__main__":
    main()
