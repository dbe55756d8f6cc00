"""The Tune callback that writes MLflow: the sweep's driver logs every trial's run from what it reports.

Trials report to Tune; the driver alone writes their runs. A trial process then loads no
MLflow and opens no store (about 1.4 s off the start of every trial process), and trials on
any node of a cluster are logged into the driver's store, a local SQLite file included.

The hooks only queue their writes; one thread of the logger's own makes them, in order. A
trial then waits for no MLflow write between its epochs (about 8 ms each, on a local SQLite store).

Resume safety: Tune asks every callback for its state (get_state) while it saves an experiment
snapshot, before that snapshot, which names the checkpoint each trial restores from, can reach
storage; get_state waits until every queued write is made. So an epoch whose checkpoint a
snapshot records is in MLflow first. A driver killed with writes still queued never
snapshotted those checkpoints: the trial re-runs the epochs after them and they are logged then;
an epoch already logged is skipped (TrialRuns logs each step once).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ray import cloudpickle, tune
from ray.exceptions import RayTaskError

from .layout import CONFIRM_ROLE, EPOCH_METRICS, GPU_IDS, SEED, UNKNOWN_STATUS
from .trainable import GPU_IDS_KEY, STATUS_KEY, SweepContext, trial_config
from .tracking import TrialRuns, prepare_tracking, study_tags

# (experiment id, {study: parent run id}); the sweep prepares the store while Ray and the first trial start
Store = Callable[[], tuple[str, dict[str, str]]]
# confirm trials carry (study, seed) in their config: it maps one to the sweep config and context it runs with
Resolve = Callable[[dict], tuple[dict, SweepContext]]


class MlflowCallback(tune.Callback):
    """One MLflow child run per trial: params when it starts, metrics per epoch, status and best.pt at the end."""

    def __init__(self, sweep: SweepContext, store: Store, resolve: Resolve | None = None):
        self.sweep, self.store, self.resolve = sweep, store, resolve
        self._runs: TrialRuns | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._queued: list[Future] = []

    def __getstate__(self) -> dict:
        # Tune pickles the run config. The store connection, the writer and the pending preparation stay in this
        # process; a logger restored from that pickle (a resumed sweep) finds the experiment and parent runs again.
        return {**self.__dict__, "_runs": None, "store": None, "_writer": None, "_queued": []}

    @property
    def runs(self) -> TrialRuns:
        if self._runs is None:
            experiment_id, parents = self.store() if self.store else prepare_tracking(self.sweep.spec)
            self._runs = TrialRuns(self.sweep.spec.tracking_uri, experiment_id, parents)
        return self._runs

    def flush(self) -> None:
        """Wait until every queued write is made; raise the first that failed."""
        queued, self._queued = self._queued, []
        for write in queued:
            write.result()

    def get_state(self) -> None:
        self.flush()  # before the experiment snapshot can reach storage (the module's docstring)
        return None

    def on_experiment_end(self, trials, **info):
        self.flush()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._later(self._open, trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result or STATUS_KEY in result:  # a trial's last report (its status) repeats an epoch
            return
        tags = {GPU_IDS: result[GPU_IDS_KEY]} if GPU_IDS_KEY in result else {}
        self._later(self._log_epoch, trial.trial_id, trial.config, int(result["epoch"]),
                    {k: result[k] for k in EPOCH_METRICS if k in result}, tags)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed try that Tune retries; a lost process or node is no error of the trial's own."""
        error = trial_error(trial)
        if isinstance(error, RayTaskError):
            self._later(self._fail, trial.trial_id, trial.config, describe(error))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._later(self._fail, trial.trial_id, trial.config, describe(trial_error(trial)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        status = (trial.last_result or {}).get(STATUS_KEY, UNKNOWN_STATUS)  # every trial reports it last (trainable.py)
        self._later(self._finish, trial.trial_id, trial.config, status, trial.checkpoint)

    def _later(self, write: Callable, *args) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attzoom-mlflow")
        self._queued.append(self._writer.submit(write, *args))

    # --- the writes, made in the writer thread in the order the hooks ran ---------------------------------

    def _log_epoch(self, trial_id: str, config: dict, epoch: int, metrics: dict, tags: dict) -> None:
        self._open(trial_id, config)
        self.runs.log_epoch(trial_id, epoch, metrics, tags)

    def _fail(self, trial_id: str, config: dict, error: str) -> None:
        self._open(trial_id, config)
        self.runs.fail(trial_id, error)

    def _finish(self, trial_id: str, config: dict, status: str, checkpoint) -> None:
        self._open(trial_id, config)
        if checkpoint is None:
            self.runs.finish(trial_id, status, None)
            return
        with checkpoint.as_directory() as folder:  # the persisted checkpoint, downloaded if remote
            self.runs.finish(trial_id, status, Path(folder) / "best.pt")

    def _resolve(self, config: dict) -> tuple[dict, SweepContext]:
        return self.resolve(config) if self.resolve else (config, self.sweep)

    def _open(self, trial_id: str, config: dict) -> None:
        if self.runs.is_open(trial_id):
            return
        config, sweep = self._resolve(config)
        study, params, train_config = trial_config(config, sweep)
        tags = study_tags(sweep.spec, study)
        if sweep.role == CONFIRM_ROLE:
            tags[SEED] = str(train_config.seed)
        self.runs.open(trial_id, study.name, tags, {**train_config.to_dict(), **params}, sweep.role)


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
