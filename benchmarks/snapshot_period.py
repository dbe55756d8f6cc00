"""The driver's snapshot work at the paper's scale: the old fixed one-second period against the period from cost.

Tune's loop asks its checkpoint manager for an experiment snapshot at every step; the manager takes one when
its period has passed. Here Tune's real manager, wrapped as a sweep wraps it (tune_jobs/snapshots.py), is asked
every 50 ms for ``--seconds``, with a save that writes what Tune writes at ``--trials`` trials (~20 KB of JSON
state per trial, as measured in a 720-trial sweep, and the searcher's pickle) beside that many trial folders,
published into a local storage folder as a sweep publishes it, while ``--running`` trials append to their
results. Once with ``TUNE_GLOBAL_CHECKPOINT_S=1`` (the fixed period sweeps had), once without (the period
from cost). Prints one JSON object: snapshots taken, the process's CPU seconds (all threads: the publish runs
in Tune's sync thread) and MB written per minute, and the ratio of CPU seconds.

    .venv/bin/python benchmarks/snapshot_period.py [--trials 720] [--seconds 60] [--running 8]

Tune's snapshots forced by trial checkpoints (one per checkpoint, whatever the period) are not part of this:
at the paper's epochs of tens of seconds they are a few per minute per running trial.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import log  # noqa: E402
from benchmarks.snapshot_sync import staging  # noqa: E402

TRIAL_STATE_KB = 19  # one trial's two JSON strings in a 720-trial sweep's experiment state
SEARCHER_KB = 1.5  # the searcher's pickle per trial, same sweep
ASKED_EVERY_S = 0.05


def tune_like_save(folder: Path, trials: int):
    """A save_to_dir writing an experiment state and a searcher state of the size Tune's are at ``trials``."""
    state = ["x" * (TRIAL_STATE_KB * 1024 // 2)] * 2
    searcher = {"trials": [b"y" * int(SEARCHER_KB * 1024)] * trials}

    def save_to_dir():
        path = folder / "experiment_state-0.json"
        with open(f"{path}.tmp", "w") as f:
            json.dump({"trial_data": [state] * trials, "runner_data": {}}, f)
        os.replace(f"{path}.tmp", path)
        with open(folder / "searcher-state-0.pkl", "wb") as f:
            pickle.dump(searcher, f)
    return save_to_dir


def one_side(tmp: Path, trials: int, seconds: float, running: int, fixed: bool) -> dict:
    import ray.train._internal.storage as ray_storage
    from ray.train._internal.storage import StorageContext
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    side = tmp / ("fixed" if fixed else "from-cost")
    ray_storage._get_ray_train_session_dir = lambda: str(side / "session")  # noqa: SLF001 - no Ray runs here
    if fixed:
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
    else:
        os.environ.pop("TUNE_GLOBAL_CHECKPOINT_S", None)
    storage = StorageContext(storage_path=str(side / "storage"), experiment_dir_name="paper")
    folder = Path(storage.experiment_driver_staging_path)
    staging(folder, trials, state_mb=0)
    manager = _ExperimentCheckpointManager(storage=storage,
                                           checkpoint_period=os.getenv("TUNE_GLOBAL_CHECKPOINT_S", "auto"))
    save = tune_like_save(folder, trials)
    published = Path(storage.experiment_fs_path) / "experiment_state-0.json"
    snapshots, versions, appended = 0, set(), time.monotonic()
    cpu, written = time.process_time(), _written()
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        before = manager._last_save_time  # noqa: SLF001
        manager.sync_up_experiment_state(save_fn=save)
        snapshots += manager._last_save_time != before  # noqa: SLF001
        if time.monotonic() - appended >= 1:  # the running trials' results, once a second
            appended = time.monotonic()
            for t in range(running):
                with open(folder / f"trial-{t:04d}" / "result.json", "a") as f:
                    f.write('{"epoch": 1}\n')
        if published.exists():
            versions.add(published.stat().st_mtime_ns)
        time.sleep(ASKED_EVERY_S)
    storage.syncer.wait()
    cpu = time.process_time() - cpu
    return {"snapshots": snapshots, "published": len(versions), "cpu_s": round(cpu, 2),
            "cpu_share": round(cpu / seconds, 3), "period_s": round(manager._checkpoint_period, 2),  # noqa: SLF001
            "mb_written_per_min": round((_written() - written) / 2 ** 20 * 60 / seconds, 1)}


def _written() -> int:
    """Bytes this process has written to storage (Linux), 0 where it is not known."""
    try:
        return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("write_bytes")).split()[1])
    except (OSError, StopIteration):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=720)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--running", type=int, default=8)
    args = parser.parse_args()

    from tune_jobs.snapshots import whole_file_snapshots

    whole_file_snapshots()
    with tempfile.TemporaryDirectory() as tmp:
        sides = {}
        for fixed in (True, False):
            log(f"{'fixed 1-s period' if fixed else 'period from cost'}: {args.trials} trials, {args.seconds:.0f} s")
            sides["fixed_1s" if fixed else "from_cost"] = one_side(Path(tmp), args.trials, args.seconds,
                                                                   args.running, fixed)
    print(json.dumps({"trials": args.trials, "seconds": args.seconds, "running": args.running, **sides,
                      "cpu_ratio_fixed_over_from_cost": round(sides["fixed_1s"]["cpu_s"]
                                                              / max(sides["from_cost"]["cpu_s"], 1e-9), 2)},
                     indent=2))


if __name__ == "__main__":
    main()
