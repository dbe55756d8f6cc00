"""The driver's copy of Tune's snapshot into a local storage folder: Tune's own copy against tune_jobs.snapshots.

At the paper's scale (720 trials) the driver's staging folder holds a multi-megabyte experiment state and a
folder per trial with the loggers' files. Tune copies all of it at every snapshot, overwriting in place; the sweep
writes each changed file beside its place, syncs the snapshot's own files to disk, checks that the experiment
state parses, and renames it (a kill leaves whole files), skipping files unchanged since its last copy. Between
two copies, the experiment state and the running trials' results change. Prints one JSON object: seconds per copy
for each, and their ratio.

    .venv/bin/python benchmarks/snapshot_sync.py [--trials 720] [--running 8] [--state-mb 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import log  # noqa: E402

LOGGER_FILES = ("params.json", "params.pkl", "progress.csv", "result.json")


def staging(folder: Path, trials: int, state_mb: float) -> None:
    for t in range(trials):
        trial = folder / f"trial-{t:04d}"
        trial.mkdir(parents=True)
        for name in LOGGER_FILES:
            (trial / name).write_text("x" * 3000)
    (folder / "experiment_state-0.json").write_text(state(state_mb, "y"))


def state(mb: float, fill: str) -> str:
    """An experiment state of about ``mb`` megabytes, JSON as Tune's (the sweep checks it parses before the rename)."""
    return json.dumps({"trial_data": [fill * 4000] * int(mb * 2 ** 20 / 4000)})


def between_copies(folder: Path, running: int, state_mb: float) -> None:
    """What a second of a sweep changes: the snapshot, and each running trial's results."""
    for t in range(running):
        with open(folder / f"trial-{t:04d}" / "result.json", "a") as f:
            f.write("{}\n")
    (folder / "experiment_state-0.json").write_text(state(state_mb, "z"))


def seconds_per_copy(copy, source: Path, running: int, state_mb: float, repeats: int) -> float:
    copy()  # the first copy writes everything for both
    total = 0.0
    for _ in range(repeats):
        between_copies(source, running, state_mb)
        started = time.perf_counter()
        copy()
        total += time.perf_counter() - started
    return total / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=720)
    parser.add_argument("--running", type=int, default=8)
    parser.add_argument("--state-mb", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import pyarrow.fs
    from ray.train._internal.storage import _upload_to_fs_path

    from tune_jobs.snapshots import replace_files

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "staging")
        staging(source, args.trials, args.state_mb)
        time.sleep(1.1)  # the files are quiet, as a finished trial's are
        log(f"staging folder: {args.trials} trials, {args.state_mb} MB experiment state")
        tune = seconds_per_copy(lambda: _upload_to_fs_path(str(source), pyarrow.fs.LocalFileSystem(),
                                                           f"{tmp}/tune"), source, args.running, args.state_mb,
                                args.repeats)
        sweep = seconds_per_copy(lambda: replace_files(str(source), f"{tmp}/sweep"), source, args.running,
                                 args.state_mb, args.repeats)
    print(json.dumps({"trials": args.trials, "running": args.running, "state_mb": args.state_mb,
                      "tune_overwrite_s": round(tune, 4), "whole_files_s": round(sweep, 4),
                      "speedup": round(tune / sweep, 2)}, indent=2))


if __name__ == "__main__":
    main()
