"""What the sweep service costs: the same trials as a plain loop over ``fit`` vs ``attzoom sweep``.

Both sides run in a fresh Python process (imports included) on the same fixed trial
config, so the only difference is the service: Ray start, trial actors, Optuna, per-epoch
MLflow logging and Tune checkpoints. The sweep runs with concurrency 1 so the two do the
same work one trial at a time. Prints one JSON object; the target is a ratio <= 1.10.

    .venv/bin/python benchmarks/overhead.py [--trials 5] [--epochs 16] [--repeats 3]

With ``--repeats R`` the two alternate R times (plain, sweep, plain, sweep, ...) so that load
from other processes hits both alike; the headline ratio is total sweep time over total plain time.
Each side's time is also split into its epochs (``epoch_time`` summed) and the rest: the
rest's difference, ``service_s_per_repeat``, is what the service adds, apart from how fast the
host happened to train.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# One fixed point of the search space, so every trial of the sweep trains the same config.
CONFIG = {"backbone": "tiny_resnet", "dataset": "cluttered-digits", "variant": "baseline", "batch_size": 64,
          "lr": 3e-3, "weight_decay": 1e-4, "optimizer": "adam", "scheduler": "cosine", "augment": False}

SPEC = """
name = "overhead"
trials = {trials}
epochs = {epochs}
patience = {epochs}
data_root = "{data}"
storage = "{work}/ray_results"
tracking_uri = "sqlite:///{work}/mlflow.db"
max_concurrent = 1
[matrix]
backbones = ["tiny_resnet"]
datasets = ["cluttered-digits"]
variants = ["baseline"]
[resources]
cpus = {cpus}
[train]
augment = false
[search]
batch_sizes = [64]
lr = [3e-3, 3e-3]
weight_decay = [1e-4, 1e-4]
optimizers = ["adam"]
schedulers = ["cosine"]
"""

PLAIN_LOOP = """
from attzoom.train import fit
config, trials, training = {config!r}, {trials}, 0.0
for seed in range(trials):
    result = fit({{**config, "epochs": {epochs}, "patience": {epochs}, "data_root": "{data}", "seed": 0}})
    training += sum(m["epoch_time"] for m in result.history)
print(training)
"""


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return time.perf_counter() - started, done.stdout


def sweep_training_s(work: Path) -> float:
    """The epochs' own time (``epoch_time``, train + validation) summed over the sweep's trial runs."""
    from mlflow.tracking import MlflowClient

    from tune_jobs import layout

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name(layout.experiment_name("overhead"))
    runs = client.search_runs([experiment.experiment_id], layout.runs_filter(layout.TRIAL_ROLE))
    return sum(m.value for r in runs for m in client.get_metric_history(r.info.run_id, "epoch_time"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=16, help="about 20 s of training per trial on 2 CPU cores")
    parser.add_argument("--repeats", type=int, default=1, help="alternate plain and sweep this many times")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    plain, sweep, plain_training, sweep_training = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-c", f"from attzoom.data import load; load('cluttered-digits', '{data}')"],
                       check=True)  # build the data cache outside both timings
        loop = PLAIN_LOOP.format(config=CONFIG, trials=args.trials, epochs=args.epochs, data=data)
        for repeat in range(args.repeats):
            work = Path(tmp) / f"run{repeat}"  # a fresh store and storage each time, as a new user has
            work.mkdir()
            spec = work / "overhead.toml"
            spec.write_text(SPEC.format(trials=args.trials, epochs=args.epochs, data=data, work=work, cpus=cpus))
            seconds, out = timed([sys.executable, "-c", loop], work)
            plain.append(seconds)
            plain_training.append(float(out.split()[-1]))
            sweep.append(timed([sys.executable, "-m", "tune_jobs.cli", "sweep", str(spec)], work)[0])
            sweep_training.append(sweep_training_s(work))
    plain_s, sweep_s = sum(plain), sum(sweep)
    print(json.dumps({
        "what": "same trials: plain loop over attzoom.train.fit vs `attzoom sweep` (concurrency 1), "
                "each a fresh process, Ray start and imports included",
        "trials": args.trials, "epochs_per_trial": args.epochs, "config": CONFIG, "cpus_per_trial": cpus,
        "repeats": args.repeats, "load_average_1m": round(os.getloadavg()[0], 2),
        "plain_loop_s": [round(t, 2) for t in plain], "sweep_s": [round(t, 2) for t in sweep],
        "ratio_per_repeat": [round(b / a, 3) for a, b in zip(plain, sweep)],
        "training_s_per_trial_plain": round(plain_s / args.repeats / args.trials, 2),
        "ratio": round(sweep_s / plain_s, 3), "target": 1.10, "target_met": sweep_s / plain_s <= 1.10,
        # Where the difference went: the epochs themselves (which host noise moves) or the rest (imports,
        # Ray, Tune, MLflow, checkpoints: what the service adds). Not the headline, which is wall time.
        "epochs_s": {"plain": [round(t, 2) for t in plain_training], "sweep": [round(t, 2) for t in sweep_training]},
        "outside_epochs_s": {"plain": [round(a - b, 2) for a, b in zip(plain, plain_training)],
                             "sweep": [round(a - b, 2) for a, b in zip(sweep, sweep_training)]},
        "service_s_per_repeat": round(((sweep_s - sum(sweep_training)) - (plain_s - sum(plain_training)))
                                      / args.repeats, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
