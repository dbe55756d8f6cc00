"""What per-study ASHA saves: the same sweep with and without early stopping, one run, real CLI.

Both sweeps are the demo spec (cluttered digits, no download) with the same seed and trials per
study, each run by ``attzoom sweep`` in a fresh folder with a ``[scheduler]`` table added: one with
``kind = "none"`` (the paper's protocol: every trial until its epochs or its patience end), one with
``kind = "asha"`` (the grace period and reduction factor given here, by default the spec's). From
their MLflow stores: the epochs trained (the trial runs' epochs_done) and each study's best val
top-1. Issue 16's target: at least 2.5x fewer epochs, and the best val top-1 within seed noise.

Seed noise is measured, not assumed: ``attzoom confirm`` re-trains the plain sweep's best config
of each study with K new seeds (1..K, without the sweep's own), and a study's best is judged
within noise when the two searches' bests differ by at most two standard deviations of those
seeds' best val top-1 (the spread one config shows from its seed alone). Prints one JSON object;
progress goes to stderr.

    .venv/bin/python benchmarks/early_stop.py [--trials 12] [--seeds 3] [--grace-period 1] [--reduction-factor 4]
        [--epochs 8] [--patience 3]   # the trial length: the demo's by default, the paper's is 50 and 5
        [--seed 0]                    # the sweep's seed (the demo spec's by default)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tune_jobs.layout import BEST_TOP1, CONFIRM_ROLE, EPOCHS_DONE, PRUNED_STATUS, STATUS, STUDY, TRIAL_ROLE  # noqa: E402
from tune_jobs.layout import experiment_name, runs_filter  # noqa: E402
from benchmarks.common import log  # noqa: E402
from tune_jobs.spec import EarlyStopping  # noqa: E402

DEMO = ROOT / "tune_jobs" / "specs" / "demo.toml"


def cli(*args: str, cwd: Path) -> float:
    """Run an attzoom command to its end; its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tune_jobs.cli", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"attzoom {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return round(time.perf_counter() - started, 1)


def runs_of(tracking_uri: str, role: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name("demo"))
    return client.search_runs([experiment.experiment_id], runs_filter(role), max_results=10_000)


def sweep(folder: Path, scheduler: str, args) -> dict:
    """One sweep of the demo spec; what its trials trained and found, per study."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    spec = folder / "spec.toml"  # the spec with a [scheduler] table (the demo has none) and the trial length
    text = args.spec.read_text()
    for key in ("patience", "seed"):
        text, found = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {getattr(args, key)}", text, count=1)
        if not found:
            raise SystemExit(f"{args.spec} has no top-level {key} line to set")
    spec.write_text(f"{text}\n[scheduler]\nkind = \"{scheduler}\"\n"
                    f"grace_period = {args.grace_period}\nreduction_factor = {args.reduction_factor}\n")
    log(f"sweep with [scheduler] kind = {scheduler} ...")
    wall = cli("sweep", str(spec), "--trials", str(args.trials), "--epochs", str(args.epochs), "--storage",
               str(folder / "ray_results"), "--tracking-uri", uri, "--data-root", str(args.data_root), cwd=folder)
    studies: dict[str, dict] = {}
    for run in runs_of(uri, TRIAL_ROLE):
        study = studies.setdefault(run.data.tags[STUDY], {"trials": 0, "pruned": 0, "epochs": 0, "best_val_top1": 0.0})
        study["trials"] += 1
        study["pruned"] += run.data.tags.get(STATUS) == PRUNED_STATUS
        study["epochs"] += int(run.data.metrics.get(EPOCHS_DONE, 0))
        study["best_val_top1"] = round(max(study["best_val_top1"], run.data.metrics.get(BEST_TOP1, 0.0)), 2)
    return {"wall_s": wall, "epochs": sum(s["epochs"] for s in studies.values()), "studies": studies,
            "tracking_uri": uri}


def seed_noise(folder: Path, plain: dict, seeds: int) -> dict[str, dict]:
    """Each study's best config of the plain sweep, re-trained with K new seeds: the seeds' best val top-1."""
    log(f"attzoom confirm with {seeds} seeds ...")
    cli("confirm", "demo", "--seeds", str(seeds), "--storage", str(folder / "ray_results"), "--tracking-uri",
        plain["tracking_uri"], cwd=folder)
    by_study: dict[str, list[float]] = {}
    for run in runs_of(plain["tracking_uri"], CONFIRM_ROLE):
        by_study.setdefault(run.data.tags[STUDY], []).append(run.data.metrics[BEST_TOP1])
    return {study: {"seeds": sorted(round(v, 2) for v in values), "std": round(statistics.stdev(values), 2)}
            for study, values in by_study.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEMO)
    parser.add_argument("--trials", type=int, default=12, help="trials per study (default 12)")
    parser.add_argument("--seeds", type=int, default=3, help="confirm seeds for the noise (default 3)")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data")
    parser.add_argument("--grace-period", type=int, default=EarlyStopping.grace_period)
    parser.add_argument("--reduction-factor", type=float, default=EarlyStopping.reduction_factor)
    parser.add_argument("--epochs", type=int, help="epochs per trial (default: the spec's)")
    parser.add_argument("--patience", type=int, help="early-stopping patience (default: the spec's)")
    parser.add_argument("--seed", type=int, help="the sweep's seed, its sampler's and trials' (default: the spec's)")
    args = parser.parse_args()
    spec = tomllib.loads(args.spec.read_text())
    args.epochs, args.patience = args.epochs or spec["epochs"], args.patience or spec["patience"]
    args.seed = spec["seed"] if args.seed is None else args.seed
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir, asha_dir = Path(tmp, "none"), Path(tmp, "asha")
        plain_dir.mkdir()
        asha_dir.mkdir()
        plain = sweep(plain_dir, "none", args)
        asha = sweep(asha_dir, "asha", args)
        noise = seed_noise(plain_dir, plain, args.seeds)
    studies = {}
    for name, found in plain["studies"].items():
        delta = round(asha["studies"][name]["best_val_top1"] - found["best_val_top1"], 2)
        studies[name] = {"best_val_top1_none": found["best_val_top1"],
                         "best_val_top1_asha": asha["studies"][name]["best_val_top1"], "delta": delta,
                         "seed_std": noise[name]["std"], "seed_best_val_top1": noise[name]["seeds"],
                         "within_seed_noise": abs(delta) <= 2 * noise[name]["std"]}
    for result in (plain, asha):
        result.pop("tracking_uri")
    print(json.dumps({
        "benchmark": "the demo sweep with and without per-study ASHA, same seed and trials",
        "spec": str(args.spec.relative_to(ROOT) if args.spec.is_relative_to(ROOT) else args.spec),
        "trials_per_study": args.trials, "epochs": args.epochs, "patience": args.patience, "seed": args.seed,
        "grace_period": args.grace_period,
        "reduction_factor": args.reduction_factor, "none": plain, "asha": asha,
        "epochs_ratio": round(plain["epochs"] / asha["epochs"], 2),
        "studies": studies,
        "noise_rule": "|best(asha) - best(none)| <= 2 x std of the plain best config's confirm seeds",
        "targets": {"epochs_ratio_at_least": 2.5, "best_within_seed_noise": True},
    }, indent=2))


if __name__ == "__main__":
    main()
