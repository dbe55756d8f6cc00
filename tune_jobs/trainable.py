"""The Tune trainable: one trial is one ``attzoom.train.fit``, reported and checkpointed every epoch.

The trial's folder (last.pt, best.pt) is the Tune checkpoint, so a trial restarted anywhere
(after a crash, a retry, or on another node) continues from its last epoch; it trains in a
``work/`` folder inside its own trial folder, never in the system's temp folder. Its last
report says how fit ended (STATUS_KEY). The trial touches no MLflow store: the driver logs
what it reports (tune_jobs/mlflow_callback.py). A try that fails because the storage takes no
more writes reports that instead of raising, and the driver stops the sweep (tune_jobs/infra.py).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune

from .infra import STORAGE_KEY, storage_problem
from .layout import TRIAL_ROLE
from .space import STUDY_KEY
from .spec import Spec

GPU_IDS_KEY, STATUS_KEY = "gpu_ids", "fit_status"
RESTART_KEY = "restarted"  # in a trial's report: its checkpoint could not be read, so it starts over (why)
STOP_WAIT_S = 600.0  # how long a try that reported a storage failure waits for the driver to stop it

EXIT_JOIN_S = 30.0  # how long a trial's exiting process waits for its training thread to stop

# A trial's worker imports this module before Tune restores the trial in it: Tune's "Restored on <ip> from
# checkpoint: Checkpoint(<path>)" for every resumed trial is then not forwarded to the driver, whose progress
# already says "resumed after epoch N" (progress.py).
logging.getLogger("ray.tune.trainable.trainable").setLevel(logging.WARNING)


@dataclass(frozen=True)
class SweepContext:
    """What a trial trains with: the validated spec (paths and URIs absolute) and the run's role."""

    spec: Spec
    role: str = TRIAL_ROLE  # CONFIRM_ROLE: a seed re-run of a study's best config (tune_jobs/confirm.py)


def stop_if_storage_failed(error: BaseException, metric: str) -> None:
    """If ``error`` comes from the storage, tell the driver and wait to be stopped (guard.py); else return."""
    folders = trial_folders()
    problem = storage_problem(error, *folders) if folders else None
    if problem is not None:
        tune.report({metric: 0.0, STORAGE_KEY: problem})
        time.sleep(STOP_WAIT_S)  # the driver stops every trial now; one that does not (an older driver) fails it


class ProcessExiting(Exception):
    """Raised in a trial's training thread, between two steps, when its process exits (Tune stops the trial)."""


_exiting = threading.Event()
_training: set[threading.Thread] = set()


def stop_if_exiting() -> None:
    if _exiting.is_set():
        raise ProcessExiting("the trial's process is exiting; its last finished epoch's checkpoint stands")


@functools.cache
def stop_training_at_exit() -> None:
    """Tune runs a trial in a daemon thread and lets the process exit while it trains (a sweep stopped with
    Ctrl-C or SIGTERM). Python then ends the thread mid-step, in torch's C++, which aborts the process: a crash dump
    of dozens of lines per trial in the driver's output. At exit the thread is stopped between two steps, and waited
    for, before Python finalises. Registered once per process (Tune reuses a trial's process for the next), as a
    threading exit hook where there is one: those run before atexit's, and one of them shuts down the thread pools
    that fit's epoch ends run in."""
    import concurrent.futures.thread  # noqa: F401 - its hook registered first: the hooks run last first

    register = getattr(threading, "_register_atexit", atexit.register)  # noqa: SLF001 - Python 3.9+
    register(_stop_training)
    sys.unraisablehook = _quiet_exit_in_callbacks


def _quiet_exit_in_callbacks(unraisable) -> None:
    """Ray's SIGTERM handler raises SystemExit wherever the main thread is. When it lands in a weakref or GC
    callback before the exit hook ignores SIGTERM (an idle trial process told to end), Python ignores it there and
    printed 9 lines, "Exception ignored in ... SystemExit: 1", into the sweep's output; the process ends either way.
    Every other ignored exception is printed as before."""
    if not issubclass(unraisable.exc_type, SystemExit):
        sys.__unraisablehook__(unraisable)


def _stop_training() -> None:
    if threading.current_thread() is threading.main_thread():
        # Ray's raylet sends SIGTERM to a worker slow to exit, and Ray's handler raises SystemExit wherever the main
        # thread is: in this wait it ended the thread mid-step after all, in a callback it printed "Exception
        # ignored". The process is exiting anyway; the raylet SIGKILLs one that outlives its grace.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exiting.set()
    for thread in list(_training):
        thread.join(timeout=EXIT_JOIN_S)


def trial_trainable(function, sweep: SweepContext, **params):
    """What Tune runs for each trial: ``function(config, sweep=..., **params)`` with the trial's resources, named
    after ``function`` (a restored sweep's trainable must keep its name). The arguments travel in the closure,
    which Tune pickles into Ray's key-value store. Not tune.with_parameters: it puts them into Ray's object
    store, owned by the driver; a SIGTERM sent to every process (Slurm's scancel) ended the raylet, the driver
    tried to recover that object, found the store gone, and Ray's C++ ended it (exit 1) before its interrupt
    line, about one time in three."""
    def trial(config: dict) -> None:
        return function(config, sweep=sweep, **params)

    trial.__name__ = trial.__qualname__ = function.__name__
    return tune.with_resources(trial, {"cpu": sweep.spec.cpus, "gpu": sweep.spec.gpus})


def run_trial(config: dict, sweep: SweepContext) -> None:
    """Train one trial; a storage failure is reported to the driver, not raised (so no retry is charged)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch is noise
    study, _, train_config = trial_config(config, sweep)
    check_gpu_usable(sweep.spec, train_config.device)
    extra = {STUDY_KEY: study.name, GPU_IDS_KEY: ",".join(map(str, ray.get_gpu_ids()))}
    stop_training_at_exit()
    _training.add(threading.current_thread())
    try:
        _run(sweep, train_config, extra)
    finally:
        _training.discard(threading.current_thread())


def check_gpu_usable(spec: Spec, device: str) -> None:
    """A trial that Ray gave a GPU trains on it: where torch sees none (a driver too old for torch's CUDA build,
    a container without the GPU), ``device = "auto"`` fell back to the CPU, tens of times slower, without a
    word. Logical GPUs of a local run (resources.local_gpus, for trying GPU packing) are let through."""
    import torch

    if spec.gpus > 0 and spec.local_gpus is None and device == "auto" and not torch.cuda.is_available():
        raise RuntimeError(f"resources.gpus = {spec.gpus} but torch {torch.__version__} (CUDA "
                           f"{torch.version.cuda or 'none'}) sees no usable GPU on {socket.gethostname()} "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); check the "
                           "node's NVIDIA driver with nvidia-smi: it must support that CUDA version")


def _run(sweep: SweepContext, train_config: dict, extra: dict) -> None:
    from attzoom.config import CheckpointError
    from attzoom.train import fit  # in the trial process only: the driver never loads torch

    with working_folder(sweep.spec.metric) as work:
        checkpoint = tune.get_checkpoint()

        def report(metrics: dict, _checkpoint_dir) -> None:
            tune.report({**metrics, **extra}, checkpoint=tune.Checkpoint.from_directory(work))

        data = cached_data(train_config)
        try:
            restore(checkpoint, work)
            result = fit(train_config, data=data, callback=report, checkpoint_dir=work, resume=True,
                         between_steps=stop_if_exiting)
        except CheckpointError as damaged:
            if not checkpoint:
                raise
            # Tune keeps one checkpoint per trial, so there is none older to fall back to: the trial starts over,
            # and its run with it (the driver deletes the epochs it logged, mlflow_callback.py)
            tune.report({sweep.spec.metric: 0.0, **extra, RESTART_KEY: str(damaged)})
            for stale in work.iterdir():
                stale.unlink()
            result = fit(train_config, data=data, callback=report, checkpoint_dir=work, resume=False,
                         between_steps=stop_if_exiting)
        # fit reports finished epochs; the last report says how it ended, with the metrics Tune expects in every one
        last = result.history[-1] if result.history else {"epoch": 0, "val_top1": 0.0, "val_top5": 0.0}
        tune.report({**last, **extra, STATUS_KEY: result.status})


def restore(checkpoint: tune.Checkpoint | None, work: Path) -> None:
    """Tune's checkpoint of the trial into ``work``. One that is gone is a CheckpointError, as a damaged one is (fit
    raises that): Tune deletes a trial's older checkpoint as it registers a newer one, so a driver killed before its
    next experiment snapshot resumes the trial from a checkpoint that no longer exists."""
    from attzoom.config import CheckpointError
    from attzoom.train import LOCK_FILE

    if checkpoint is None:
        return
    try:
        checkpoint.to_directory(work)
    except FileNotFoundError as gone:
        raise CheckpointError(f"cannot resume from {checkpoint.path}: it is gone (the driver stopped after Tune "
                              "deleted it for a newer one)") from gone
    if not (work / "last.pt").is_file():  # else fit starts at epoch 1 unnoticed, under the epochs already logged
        raise CheckpointError(f"cannot resume from {checkpoint.path}: it holds no last.pt (an ended trial's, removed "
                              "once a snapshot recorded its end: reclaim.py, or a copy made without it)")
    # fit's lock file came with the folder: a copy of the saving try's, never a live lock (this try's folder is its
    # own), and where the storage lacks flock it is a marker naming that try's process, which would refuse this one
    (work / LOCK_FILE).unlink(missing_ok=True)


@contextmanager
def working_folder(metric: str):
    """Where this try of the trial writes last.pt and best.pt: an empty ``work/`` in the trial's own folder.

    That is the trial's folder under the Tune storage when the storage is a local or shared path,
    else Ray's working folder of the trial on this node (not its staging folder, which the driver
    uploads to cloud storage while the trial writes and removes files there). A try that was killed leaves it there, not
    in the system's temp folder for good; the next try empties it before restoring the checkpoint,
    and a try that ends removes it (the Tune checkpoint holds the same files). A try that fails is
    checked for a storage failure first, while its files still take up the space they took.
    """
    folders = trial_folders()
    folder = (folders[0] if folders else Path(tune.get_context().get_storage().trial_working_directory)) / "work"
    try:
        if folder.exists():
            shutil.rmtree(folder)  # a storage that refuses this is a storage failure, reported as such
        folder.mkdir(parents=True)
        yield folder
    except Exception as error:
        stop_if_storage_failed(error, metric)
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ended(results) -> int:
    """Trials of a finished ``tuner.fit()`` that reported how fit ended or failed for good (the rest Tune stopped)."""
    return sum(1 for r in results if r.error is not None or STATUS_KEY in (r.metrics or {}))


def reported_end(trial) -> bool:
    """The trial reported how fit ended (STATUS_KEY); one stopped with the sweep is TERMINATED too, but did not."""
    return trial.status == "TERMINATED" and STATUS_KEY in (trial.last_result or {})


def trial_folders() -> tuple[Path, Path] | None:
    """(this trial's folder, the storage root) when the Tune storage is a local or shared path, else None."""
    from pyarrow.fs import LocalFileSystem

    storage = tune.get_context().get_storage()
    if not isinstance(storage.storage_filesystem, LocalFileSystem):
        return None
    return Path(storage.trial_fs_path), Path(storage.storage_fs_path)


def trial_config(config: dict, sweep: SweepContext):
    """(study, sampled params, TrainConfig) of a trial: what it trains and what its run records."""
    study = next(s for s in sweep.spec.studies if s.name == config[STUDY_KEY])
    params = {k: v for k, v in config.items() if k != STUDY_KEY}
    train_config = sweep.spec.train_config(study, params)
    if 0 < sweep.spec.gpus < 1:  # a trial sharing a GPU keeps to its share of the memory, or to less if asked
        train_config.gpu_memory_fraction = min(train_config.gpu_memory_fraction or 1.0, sweep.spec.gpus)
    return study, params, train_config


@functools.lru_cache(maxsize=2)
def _load(dataset: str, root: str, val_fraction: float):
    """Never a download: the sweep checked the data before it started, and every trial would fetch it at once into
    the shared root (a data set gone since is the trial's one-line DataError)."""
    from attzoom.data import load

    return load(dataset, root, val_fraction, download=False)


def cached_data(config):
    """A reused trial process (reuse_actors) keeps its data set in memory for the next trial."""
    return _load(config.dataset, config.data_root, config.val_fraction)
