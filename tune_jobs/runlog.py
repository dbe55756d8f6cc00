"""The sweep driver's Tune callback that logs every trial to MLflow.

Trials report to Tune; the driver alone writes their runs. A trial process then loads no
MLflow and opens no store (about 1.4 s off the start of every trial process), and trials on
any node of a cluster are logged into the driver's store, a local SQLite file included.

Resume safety: Tune calls these hooks in its control loop before the experiment snapshot
that records the result's checkpoint. A driver killed after logging an epoch but before the
snapshot restarts the trial from an earlier checkpoint; the re-run epoch is skipped
(TrialRuns logs each step once). A driver killed before logging also never snapshotted that
checkpoint, so the epoch runs again and is logged then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ray import cloudpickle, tune
from ray.exceptions import RayTaskError

from attzoom.names import METRICS

from .trainable import GPU_IDS_KEY, STATUS_KEY, SweepContext, trial_config
from .tracking import GPU_IDS, SEED, TrialRuns, prepare_tracking, study_tags

# (experiment id, {study: parent run id}); the sweep prepares the store while Ray and the first trial start
Store = Callable[[], tuple[str, dict[str, str]]]
# confirm trials carry (study, seed) in their config: it maps one to the sweep config and context it runs with
Resolve = Callable[[dict], tuple[dict, SweepContext]]


class TrialLogger(tune.Callback):
    """One MLflow child run per trial: params when it starts, metrics per epoch, status and best.pt at the end."""

    def __init__(self, sweep: SweepContext, store: Store, resolve: Resolve | None = None):
        self.sweep, self.store, self.resolve = sweep, store, resolve
        self._runs: TrialRuns | None = None

    def __getstate__(self) -> dict:
        # Tune pickles the run config. The store connection and the pending preparation stay in this process; a
        # logger restored from that pickle (a resumed sweep) finds the experiment and the parent runs again.
        return {**self.__dict__, "_runs": None, "store": None}

    @property
    def runs(self) -> TrialRuns:
        if self._runs is None:
            experiment_id, parents = self.store() if self.store else prepare_tracking(self.sweep.spec)
            self._runs = TrialRuns(self.sweep.spec.tracking_uri, experiment_id, parents)
        return self._runs

    def on_trial_start(self, iteration, trials, trial, **info):
        self._open(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result or STATUS_KEY in result:  # the last line of a diverged trial repeats an epoch
            return
        self._open(trial)
        tags = {GPU_IDS: result[GPU_IDS_KEY]} if GPU_IDS_KEY in result else {}
        self.runs.log_epoch(trial.trial_id, int(result["epoch"]), {k: result[k] for k in METRICS if k in result},
                            tags)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed try that Tune retries; a lost process or node is no error of the trial's own."""
        error = trial_error(trial)
        if isinstance(error, RayTaskError):
            self._open(trial)
            self.runs.fail(trial.trial_id, describe(error))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._open(trial)
        self.runs.fail(trial.trial_id, describe(trial_error(trial)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._open(trial)
        _, sweep = self._resolve(trial)
        status = (trial.last_result or {}).get(STATUS_KEY) or self.runs.fit_status(trial.trial_id, sweep.spec.epochs)
        if trial.checkpoint is None:
            self.runs.finish(trial.trial_id, status, None)
            return
        with trial.checkpoint.as_directory() as folder:  # the persisted checkpoint, downloaded if remote
            self.runs.finish(trial.trial_id, status, Path(folder) / "best.pt")

    def _resolve(self, trial) -> tuple[dict, SweepContext]:
        return self.resolve(trial.config) if self.resolve else (trial.config, self.sweep)

    def _open(self, trial) -> None:
        if self.runs.is_open(trial.trial_id):
            return
        config, sweep = self._resolve(trial)
        study, params, train_config = trial_config(config, sweep)
        tags = study_tags(sweep.spec, study)
        if sweep.role == "confirm":
            tags[SEED] = str(train_config.seed)
        self.runs.open(trial.trial_id, study.name, tags, {**train_config.to_dict(), **params}, sweep.role)


def trial_error(trial) -> BaseException:
    """The exception of the trial's latest failure, as Tune saved it beside the trial."""
    path = Path(trial.pickled_error_file) if trial.pickled_error_file else None
    if path and path.is_file():
        try:
            return cloudpickle.loads(path.read_bytes())
        except Exception:  # noqa: BLE001 - an error that cannot be rebuilt here is still an error
            pass
    text = Path(trial.error_file).read_text().strip() if trial.error_file and Path(trial.error_file).is_file() else ""
    return RuntimeError(text.splitlines()[-1] if text else "unknown error")


def describe(error: BaseException) -> str:
    """``Type: message`` of what the trial raised, not Ray's wrapper around it."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"
