"""A trial's ``last.pt`` is removed once the published experiment snapshot records that the trial ended.

``last.pt`` holds what a resume continues from (weights, optimizer and RNG state): about 0.3 GB for a ResNet-50,
~300 GB over the paper's 720 trials, kept for good though only an unfinished trial is ever continued. A trial's end
is safe to act on once the snapshot a resume restores says so: Tune then never restores that trial again. Ended
means its end reported (trainable.reported_end: done, early-stopped or pruned); a trial stopped with the sweep is
TERMINATED too and a resume continues it, and a failed one is run again from its checkpoint (resume_errored), so
both keep it. ``best.pt`` stays in every trial folder (its copy in MLflow is made from there). Local and shared
storage only: on cloud storage the checkpoints stay as they are.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray import tune

from .snapshots import snapshot_trials
from .spec import local_path
from .trainable import STATUS_KEY, reported_end

CHECK_EVERY_S = 10.0  # while an end waits for a snapshot; a look parses it whole: 0.12 s at 720 trials (13 MB)


def remove_ended_last_pts(sweep_folder: Path, done: set[str]) -> set[str]:
    """Remove the ``last.pt`` of each trial that the newest snapshot in ``sweep_folder`` records as ended, other
    than those in ``done``; return the ids of the ended trials. A file that cannot be removed (a read-only storage,
    which stops the sweep on its own) is left for a later try."""
    try:
        trials = snapshot_trials(str(sweep_folder)) or {}
    except Exception:  # noqa: BLE001 - none readable now (a storage gone, a file of another shape): a later look;
        return set()  # freeing space never stops a sweep
    ended = set()
    for trial_id, trial in trials.items():
        if trial_id in done or not reported_end(trial) or not trial.folder:  # a snapshot's trial reads as Tune's
            continue
        try:
            for last in (sweep_folder / trial.folder).glob("checkpoint_*/last.pt"):
                last.unlink(missing_ok=True)
        except OSError:
            continue
        ended.add(trial_id)
    return ended


def after_fit(storage: str, experiment: str) -> None:
    """Once Tune's run has ended: the ends its last snapshot records (those of the last seconds, and all of a sweep
    begun by a version without the callback, which its restore does not add)."""
    if (root := local_path(storage)) is not None:
        remove_ended_last_pts(root / experiment, set())


class EndedTrialsLastPt(tune.Callback):
    """Removes ended trials' ``last.pt`` as the sweep goes, not only at its end: the storage then holds the resume
    states of the trials still running, not of all. A driver that starts or resumes looks once; then after a trial
    ends, until the published snapshot records it (every CHECK_EVERY_S at most)."""

    def __init__(self):
        self._ended: set[str] = set()  # trials that reported their end to this driver
        self._done: set[str] = set()  # ended trials whose last.pt is gone
        self._look, self._checked = True, float("-inf")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if STATUS_KEY in (trial.last_result or {}):
            self._ended.add(trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        due = self._look or self._ended - self._done
        if due and trials and time.monotonic() - self._checked >= CHECK_EVERY_S:
            self._checked, self._look = time.monotonic(), False
            if (folder := local_sweep_folder(trials[0])) is not None:
                self._done |= remove_ended_last_pts(folder, self._done)


def local_sweep_folder(trial) -> Path | None:
    """The sweep's folder as Tune has it now (a storage moved since the start included), if on a local file system."""
    from pyarrow.fs import LocalFileSystem

    storage = trial.storage
    return Path(storage.experiment_fs_path) if isinstance(storage.storage_filesystem, LocalFileSystem) else None
