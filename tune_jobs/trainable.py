"""The Tune trainable: one trial is one ``attzoom.train.fit``, reported and checkpointed every epoch.

The trial's folder (last.pt, best.pt, mlflow.json) is the Tune checkpoint, so a trial
restarted anywhere (after a crash, a retry, or on another node) continues from its
last epoch and logs into the same MLflow run.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune

from .searcher import STUDY_KEY
from .spec import Spec
from .tracking import TrialTracker, study_tags


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs from the driver; paths and URIs are absolute."""

    spec: Spec
    tracking_uri: str
    experiment_id: str
    parent_runs: dict
    role: str = "trial"  # "confirm": a seed re-run of a study's best config (tune_jobs/confirm.py)


def run_trial(config: dict, sweep: SweepContext) -> None:
    from attzoom.train import fit  # in the trial process only: the driver never loads torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch is noise
    study = next(s for s in sweep.spec.studies if s.name == config[STUDY_KEY])
    params = {k: v for k, v in config.items() if k != STUDY_KEY}
    train_config = sweep.spec.train_config(study, params)
    if 0 < sweep.spec.gpus < 1:
        train_config.gpu_memory_fraction = sweep.spec.gpus
    trial_id = tune.get_context().get_trial_id()
    with tempfile.TemporaryDirectory(prefix=f"attzoom-{trial_id}-") as tmp:
        workdir = Path(tmp)
        checkpoint = tune.get_checkpoint()
        if checkpoint:
            checkpoint.to_directory(tmp)
        tags = {**study_tags(sweep.spec, study), "attzoom.gpu_ids": ",".join(map(str, ray.get_gpu_ids()))}
        if sweep.role == "confirm":
            tags["attzoom.seed"] = str(train_config.seed)
        tracker = TrialTracker.open(sweep.tracking_uri, sweep.experiment_id, sweep.parent_runs[study.name],
                                    trial_id, tags, {**train_config.to_dict(), **params}, workdir,
                                    role=sweep.role)

        def report(metrics: dict, _checkpoint_dir) -> None:
            tracker.log_epoch(metrics)  # before the checkpoint: a kill in between re-runs the epoch, never re-logs
            tune.report({**metrics, STUDY_KEY: study.name}, checkpoint=tune.Checkpoint.from_directory(tmp))

        try:
            result = fit(train_config, data=cached_data(train_config), callback=report, checkpoint_dir=workdir,
                         resume=True)
        except Exception as error:
            tracker.fail(error)
            raise
        tracker.finish(result.status, workdir / "best.pt")


@functools.lru_cache(maxsize=2)
def _load(dataset: str, root: str, val_fraction: float):
    from attzoom.data import load

    return load(dataset, root, val_fraction)


def cached_data(config):
    """A reused trial process (reuse_actors) keeps its data set in memory for the next trial."""
    return _load(config.dataset, config.data_root, config.val_fraction)
