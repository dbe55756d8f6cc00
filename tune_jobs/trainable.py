"""The Tune trainable: one trial is one ``attzoom.train.fit``, reported and checkpointed every epoch.

The trial's folder (last.pt, best.pt) is the Tune checkpoint, so a trial restarted anywhere
(after a crash, a retry, or on another node) continues from its last epoch; it trains in a
``work/`` folder inside its own trial folder, never in the system's temp folder. Its last
report says how fit ended (STATUS_KEY). The trial touches no MLflow store: the driver logs
what it reports (tune_jobs/mlflow_callback.py).
"""

from __future__ import annotations

import functools
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune

from .layout import TRIAL_ROLE
from .space import STUDY_KEY
from .spec import Spec

GPU_IDS_KEY, STATUS_KEY = "gpu_ids", "fit_status"


@dataclass(frozen=True)
class SweepContext:
    """What a trial trains with: the validated spec (paths and URIs absolute) and the run's role."""

    spec: Spec
    role: str = TRIAL_ROLE  # CONFIRM_ROLE: a seed re-run of a study's best config (tune_jobs/confirm.py)


def run_trial(config: dict, sweep: SweepContext) -> None:
    from attzoom.train import fit  # in the trial process only: the driver never loads torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch is noise
    study, _, train_config = trial_config(config, sweep)
    extra = {STUDY_KEY: study.name, GPU_IDS_KEY: ",".join(map(str, ray.get_gpu_ids()))}
    with working_folder() as work:
        checkpoint = tune.get_checkpoint()
        if checkpoint:
            checkpoint.to_directory(work)

        def report(metrics: dict, _checkpoint_dir) -> None:
            tune.report({**metrics, **extra}, checkpoint=tune.Checkpoint.from_directory(work))

        result = fit(train_config, data=cached_data(train_config), callback=report, checkpoint_dir=work, resume=True)
        # fit reports finished epochs; the last report says how it ended, with the metrics Tune expects in every one
        last = result.history[-1] if result.history else {"epoch": 0, "val_top1": 0.0, "val_top5": 0.0}
        tune.report({**last, **extra, STATUS_KEY: result.status})


@contextmanager
def working_folder():
    """Where this try of the trial writes last.pt and best.pt: an empty ``work/`` in the trial's own folder.

    That is the trial's folder under the Tune storage when the storage is a local or shared path,
    else Ray's working folder of the trial on this node. A try that was killed leaves it there, not
    in the system's temp folder for good; the next try empties it before restoring the checkpoint,
    and a try that ends removes it (the Tune checkpoint holds the same files).
    """
    from pyarrow.fs import LocalFileSystem

    storage = tune.get_context().get_storage()
    local = isinstance(storage.storage_filesystem, LocalFileSystem)
    folder = Path(storage.trial_fs_path if local else tune.get_context().get_trial_dir()) / "work"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def trial_config(config: dict, sweep: SweepContext):
    """(study, sampled params, TrainConfig) of a trial: what it trains and what its run records."""
    study = next(s for s in sweep.spec.studies if s.name == config[STUDY_KEY])
    params = {k: v for k, v in config.items() if k != STUDY_KEY}
    train_config = sweep.spec.train_config(study, params)
    if 0 < sweep.spec.gpus < 1:
        train_config.gpu_memory_fraction = sweep.spec.gpus
    return study, params, train_config


@functools.lru_cache(maxsize=2)
def _load(dataset: str, root: str, val_fraction: float):
    from attzoom.data import load

    return load(dataset, root, val_fraction)


def cached_data(config):
    """A reused trial process (reuse_actors) keeps its data set in memory for the next trial."""
    return _load(config.dataset, config.data_root, config.val_fraction)
