"""The Tune callback that writes MLflow: the sweep's driver logs every trial's run from what it reports.

Trials report to Tune; the driver alone writes their runs. A trial process then loads no
MLflow and opens no store (about 1.4 s off the start of every trial process), and trials on
any node of a cluster are logged into the driver's store, a local SQLite file included.

The hooks only put their writes in the sweep's outbox (tune_jobs/outbox.py): a journal file
beside the sweep, whose one writer thread makes them in order. A trial then waits for no MLflow
write between its epochs, and a tracking server that is down is waited out while trials train.

Resume safety: Tune asks every callback for its state (get_state) while it saves an experiment
snapshot, before that snapshot, which names the checkpoint each trial restores from, can reach
storage; get_state makes the journal durable. So an epoch whose checkpoint a snapshot records is
in the journal first, and the next driver makes whatever the journal still holds. A driver
killed before that snapshot never recorded those checkpoints: the trial re-runs the epochs after
them and they are logged then; an epoch already logged is skipped (TrialRuns logs each step once).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable

from ray import cloudpickle, tune
from ray.exceptions import RayTaskError

from .infra import problem, short_error
from .layout import (CONFIRM_ROLE, EPOCH_METRICS, GPU_IDS, OPTUNA_TRIAL, PRUNED_AT, PRUNED_STATUS, SEED, TRIAL_ROLE,
                     UNKNOWN_STATUS)
from .outbox import Outbox
from .spec import local_path, optuna_storage_url
from .studies import attach_run, optuna_study_name
from .trainable import GPU_IDS_KEY, RESTART_KEY, STATUS_KEY, SweepContext, reported_end, trial_config
from .tracking import TrialRuns, prepare_tracking, study_tags, unreachable

# (experiment id, {study: parent run id}); the sweep prepares the store while Ray and the first trial start
Store = Callable[[], tuple[str, dict[str, str]]]
# confirm trials carry (study, seed) in their config: it maps one, with the driver's context, to the sweep config and
# context it runs with (the context is passed, not pickled with it: a restored confirm goes on with this driver's)
Resolve = Callable[[dict, SweepContext], tuple[dict, SweepContext]]
JOURNAL = "mlflow-outbox.jsonl"
STOP_SETTLE_S = 10.0  # how long a stopped sweep waits for its last MLflow writes (not while the store is down)


def journal_path(spec) -> Path:
    """The outbox's journal: in the sweep's Tune folder, or, for cloud storage, in a local folder of the driver
    named after the sweep, its storage and its store (two sweeps of one name elsewhere keep apart); there the
    experiment snapshots carry its unmade writes to another host as well (get_state)."""
    folder = local_path(spec.storage)
    if folder is None:
        where = hashlib.sha256(f"{spec.storage}\n{spec.tracking_uri}".encode()).hexdigest()[:12]
        return Path.home() / ".cache" / "attzoom" / f"{spec.name}-{where}" / JOURNAL
    return folder / spec.name / JOURNAL


def make_kept_writes(sweep: SweepContext, store: Store) -> None:
    """Make the writes an earlier driver left in the journal before reading the store (confirm does)."""
    path = journal_path(sweep.spec)
    if path.is_file() and path.stat().st_size:
        box = MlflowCallback(sweep, store).outbox
        box.drain()
        box.close()


_driver: dict[str, SweepContext] = {}  # by role: the context of the driver that restores a logger (adopt)


def adopt(context: SweepContext) -> None:
    """A logger that Tune restores from the experiment (a resume) takes this driver's context, not the first
    driver's: where things are may have changed (``resume --data-root``), and the store tag, the trials' params
    and the outbox follow the spec the sweep goes on with."""
    _driver[context.role] = context


class MlflowCallback(tune.Callback):
    """One MLflow child run per trial: params when it starts, metrics per epoch, status and best.pt at the end."""

    def __init__(self, sweep: SweepContext, store: Store, resolve: Resolve | None = None):
        self.sweep, self.store, self.resolve = sweep, store, resolve
        self._runs: TrialRuns | None = None
        self._outbox: Outbox | None = None
        self._opened: set[str] = set()  # trials whose run this driver has queued an open for
        self._kept: list[dict] | None = None  # cloud storage: the writes the restored experiment snapshot carried

    def __getstate__(self) -> dict:
        # Tune pickles the run config. The store connection, the outbox and the pending preparation stay in this
        # process; a logger restored from that pickle (a resumed sweep) finds the experiment and parent runs again.
        return {**self.__dict__, "_runs": None, "store": None, "_outbox": None, "_opened": set(), "_kept": None}

    def __setstate__(self, state: dict) -> None:
        # a logger pickled by an older version (before the outbox) lacks the newer fields
        self.__dict__.update({"_outbox": None, "_opened": set(), "_kept": None, **state})
        current = _driver.get(self.sweep.role)
        if current is not None and current.spec.name == self.sweep.spec.name:
            self.sweep = current

    @property
    def runs(self) -> TrialRuns:
        if self._runs is None:
            try:
                experiment_id, parents = self.store() if self.store else prepare_tracking(self.sweep.spec)
            except Exception:
                self.store = None  # a preparation that failed (the server was down) is made again next time
                raise
            self._runs = TrialRuns(self.sweep.spec.tracking_uri, experiment_id, parents)
        return self._runs

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            spec = self.sweep.spec
            self._outbox = Outbox(journal_path(spec), self._make, unreachable, spec.tracking_uri,
                                  spec.tracking_outage_minutes * 60, kept=self._kept)
        return self._outbox

    def setup(self, **info):
        self.outbox  # noqa: B018 - writes an earlier driver left are made from the start

    def get_state(self) -> dict | None:
        """Called before each experiment snapshot reaches the storage. The journal is synced first (the module's
        docstring); on cloud storage, where the journal stays on this host, the snapshot carries its writes too,
        so a driver that resumes on another host (a retried job) makes them (set_state)."""
        self.outbox.sync()
        return {"unmade": self.outbox.unmade()} if local_path(self.sweep.spec.storage) is None else None

    def set_state(self, state: dict) -> None:
        self._kept = state.get("unmade")  # before setup, which opens the outbox

    def on_experiment_end(self, trials, **info):
        """At the end of the sweep, wait for every write (a summary follows). When the run is stopped (a failure,
        Ctrl-C), the stopped trials' runs are marked so and the writes get a few seconds, never an outage: the
        journal keeps the rest for the next driver."""
        if problem() is None and all(t.status == "ERROR" or reported_end(t) for t in trials):
            self.outbox.drain()
        else:
            for trial in trials:  # stopped with the sweep: their runs end KILLED, after their last writes, until a
                if trial.status != "ERROR" and not reported_end(trial) and (  # resume
                        trial.last_result or trial.trial_id in self._opened):
                    self.outbox.put({"op": "stop", "trial": trial.trial_id})
            self.outbox.settle(STOP_SETTLE_S)  # status then shows them stopped, not running (no outage waited)
        self.outbox.close()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._open(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if RESTART_KEY in result:
            self._restart(trial, result[RESTART_KEY])
        if "epoch" not in result or STATUS_KEY in result:  # a trial's last report (its status) repeats an epoch
            return
        self._open(trial)
        tags = {GPU_IDS: result[GPU_IDS_KEY]} if GPU_IDS_KEY in result else {}
        self.outbox.put({"op": "epoch", "trial": trial.trial_id, "step": int(result["epoch"]),
                         "metrics": {k: float(result[k]) for k in EPOCH_METRICS if k in result}, "tags": tags})

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed try that Tune retries; a lost process or node is no error of the trial's own."""
        error = trial_error(trial)
        if isinstance(error, RayTaskError):
            self._fail(trial, describe(error))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._fail(trial, describe(trial_error(trial)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._open(trial)
        last = trial.last_result or {}
        status = last.get(STATUS_KEY, UNKNOWN_STATUS)  # every trial reports it last (trainable.py), or is pruned
        tags = {PRUNED_AT: str(last.get("epoch"))} if status == PRUNED_STATUS else {}  # (tune_jobs/scheduler.py)
        self.outbox.put({"op": "finish", "trial": trial.trial_id, "status": status, "tags": tags,
                         "checkpoint": checkpoint_uri(trial.checkpoint, self.sweep.spec.storage)})

    def _open(self, trial) -> None:
        if trial.trial_id in self._opened:
            return
        config, sweep = self.resolve(trial.config, self.sweep) if self.resolve else (trial.config, self.sweep)
        study, params, train_config = trial_config(config, sweep)
        tags = study_tags(sweep.spec, study)
        if sweep.role == CONFIRM_ROLE:
            tags[SEED] = str(train_config.seed)
        sampled = sorted(params)  # what its description names: the rest is fixed by the spec's [train]
        params = {k: str(v) for k, v in {**train_config.to_dict(), **params}.items()}
        self.outbox.put({"op": "open", "trial": trial.trial_id, "study": study.name, "tags": tags,
                         "params": params, "role": sweep.role, "sampled": sampled})
        self._opened.add(trial.trial_id)

    def _restart(self, trial, reason: str) -> None:
        """The trial starts over from epoch 1: its run goes with the epochs it logged, a new one takes its place."""
        print(f"trial {trial.trial_id}: {reason.split(';')[0]}; Tune keeps no older checkpoint, so the trial starts "
              "over from epoch 1 in a new run", file=sys.stderr, flush=True)
        self.outbox.put({"op": "restart", "trial": trial.trial_id})
        self._opened.discard(trial.trial_id)

    def _fail(self, trial, error: str) -> None:
        self._open(trial)
        self.outbox.put({"op": "fail", "trial": trial.trial_id, "error": error,
                         "attempt": trial.num_failures})
        self._opened.discard(trial.trial_id)  # a retry opens the run again, RUNNING

    # --- the writes, made by the outbox's thread in the order the hooks ran -----------------------------

    def _make(self, write: dict) -> None:
        try:
            self._apply(write)
        except LookupError as e:  # its run is gone (deleted in the UI) or of another store: it can never be made
            print(f"skipping a kept MLflow write for trial {write.get('trial')} ({write.get('op')}): {e}",
                  file=sys.stderr, flush=True)

    def _apply(self, write: dict) -> None:
        trial, op = write["trial"], write["op"]
        if op == "open":
            self.runs.open(trial, write["study"], write["tags"], write["params"], write["role"], write.get("sampled"))
            if write["role"] == TRIAL_ROLE:
                self._attach(trial, write["study"])
        elif op == "epoch":
            self.runs.log_epoch(trial, write["step"], write["metrics"], write["tags"])
        elif op == "fail":
            self.runs.fail(trial, write["error"], write["attempt"])
        elif op == "restart":
            self.runs.drop(trial)
        elif op == "stop":
            self.runs.stop(trial)
        elif write["checkpoint"] is None:
            self.runs.finish(trial, write["status"], None, write.get("tags"))
        else:
            with tune.Checkpoint(write["checkpoint"]).as_directory() as folder:  # downloaded if remote
                self.runs.finish(trial, write["status"], Path(folder) / "best.pt", write.get("tags"))


    def _attach(self, trial: str, study: str) -> None:
        """The trial's Optuna trial records its MLflow run id, and the run its Optuna trial's number (the one
        optuna-dashboard shows: a run's #n counts from 1 in MLflow); a storage that fails here is said, not fatal
        (the searcher, which needs that storage, stops the sweep if it is really gone)."""
        spec = self.sweep.spec
        if url := optuna_storage_url(spec):
            try:
                run_id = self.runs.runs[trial]
                if (number := attach_run(url, optuna_study_name(spec.name, study), trial, run_id)) is not None:
                    self.runs.client.set_tag(run_id, OPTUNA_TRIAL, str(number))
            except Exception as e:  # noqa: BLE001
                print(f"trial {trial}: its MLflow run id was not recorded in the Optuna storage ({short_error(e)})",
                      file=sys.stderr, flush=True)


def checkpoint_uri(checkpoint, storage: str = "") -> str | None:
    """Where a persisted Tune checkpoint is, as a path or URI a later driver can open: on cloud storage with the
    storage URI's query (?endpoint_override=...), which pyarrow reads and the checkpoint's own path lacks."""
    if checkpoint is None:
        return None
    kind = checkpoint.filesystem.type_name
    if kind == "local":
        return checkpoint.path
    query = storage.partition("?")[2]
    return f"{kind}://{checkpoint.path}" + (f"?{query}" if query else "")


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
