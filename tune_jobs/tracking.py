"""The MLflow store of a sweep, as its driver writes it (the layout itself: tune_jobs/layout.py).

Resume-safe by construction: runs are found-or-created by tags (the study's, the trial id),
and an epoch is logged only if that step is not in the run yet, so a driver killed and
resumed at any moment never leaves a second run or a doubled epoch behind. Only the sweep's
driver writes (tune_jobs/mlflow_callback.py); trial processes never open the store.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from . import layout, naming
from .layout import ERROR, FAILURES, NOTE, PARENT, ROLE, STATUS, STUDY, TRIAL, experiment_name
from .spec import (Spec, SpecError, Study, check_store_exists, database_answers, database_backend, hide_password,
                   local_path, shared_spec_json, sqlite_file, sqlite_tables)


def prepare_store(tracking_uri: str, sweep: str, storage: str | None = None, tags: dict | None = None) -> str:
    """The sweep's experiment id; the store (migrated if new) and the experiment, with ``tags``, are created if
    missing. Of two drivers creating it at once, one makes it and the other finds it.

    Artifacts (the best checkpoints) go beside a SQLite store; with a database URL (PostgreSQL), under the
    sweep's ``storage`` (MLflow's default would be ./mlruns of whatever folder the driver ran in); a
    tracking server keeps its own.
    """
    from mlflow.exceptions import MlflowException

    client = open_store(tracking_uri)
    if found := client.get_experiment_by_name(experiment_name(sweep)):
        return found.experiment_id
    try:
        return client.create_experiment(experiment_name(sweep), tags={**naming.experiment_tags(sweep), **(tags or {})},
                                        artifact_location=artifact_location(tracking_uri, sweep, storage))
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(experiment_name(sweep)).experiment_id


def artifact_location(tracking_uri: str, sweep: str, storage: str | None) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        return (local_path(tracking_uri) / "mlartifacts" / sweep).resolve().as_uri()
    if tracking_uri.startswith(("http://", "https://")) or not storage:
        return None
    if "://" in storage:  # without a query (?endpoint_override=...: pyarrow's; MLflow has MLFLOW_S3_ENDPOINT_URL)
        return f"{storage.partition('?')[0].rstrip('/')}/mlartifacts/{sweep}"
    return (Path(storage).expanduser() / "mlartifacts" / sweep).resolve().as_uri()


def open_store(tracking_uri: str) -> MlflowClient:
    """A client on a ready store; a new database store is created by one process at a time.

    Two processes migrating one fresh database (a sweep and `attzoom status` or `attzoom ui`)
    collide on its tables; on SQLite the loser leaves alembic's temporary tables behind, which
    breaks every later migration of that file: the store is lost. A lock (a file beside a SQLite
    store, an advisory lock on PostgreSQL) serialises the first open; MLflow then keeps the store
    for the rest of the process.
    """
    with _first_open_lock(tracking_uri):
        return MlflowClient(tracking_uri)  # builds the store, migrating it if it is new


@contextmanager
def _first_open_lock(tracking_uri: str):
    if (database := sqlite_file(tracking_uri)) is not None:
        from filelock import FileLock

        if database.is_file() and not os.access(database.parent, os.W_OK):
            yield  # a store on a read-only disk is only read: no migration to serialise, and no lock file to make
            return

        with FileLock(f"{database}.lock"):
            yield
    elif database_backend(tracking_uri) == "postgresql":
        import sqlalchemy

        engine = sqlalchemy.create_engine(tracking_uri, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": PG_LOCK_KEY})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": PG_LOCK_KEY})
        finally:
            engine.dispose()
    else:
        yield


def study_tags(spec: Spec, study: Study) -> dict[str, str]:
    return layout.study_tags(spec.name, study.backbone, study.dataset, study.variant)


def prepare_tracking(spec: Spec, address: str | None = None, check_owner: Callable[[str], None] | None = None,
                     reopen: bool = False) -> tuple[str, dict[str, str]]:
    """The store, the sweep's experiment and every study's parent run: (experiment id, {study: run id}).

    ``address``: the driver's --address as its hints name it ("" for a local Ray), kept for `attzoom status`, which
    reads only the store; None leaves the recorded one (a restored logger does not know it). ``check_owner`` hears
    the storage the experiment names (its spec's, from its creation on) before this driver writes anything: it
    raises where that is another sweep's (sweep.check_owner). ``reopen``: a driver that runs the trials opens
    the parent runs of studies an earlier one left unfinished (KILLED, while their trials run again)."""
    shared = shared_spec_json(spec)
    experiment_id = prepare_store(spec.tracking_uri, spec.name, spec.storage, tags={layout.SPEC: shared})
    client = MlflowClient(spec.tracking_uri)
    if check_owner:
        check_owner(recorded_storage(client.get_experiment(experiment_id)))
    # also on an older sweep's experiment
    tags = {layout.SPEC: shared, **naming.experiment_tags(spec.name)}
    if address is not None:
        tags[layout.ADDRESS] = address
    for key, value in tags.items():
        client.set_experiment_tag(experiment_id, key, value)
    stop_leftover_runs(client, experiment_id)
    parents = study_runs(spec.tracking_uri, experiment_id, spec)
    for run_id in parents.values() if reopen else ():
        if client.get_run(run_id).info.status == "KILLED":
            client.update_run(run_id, status="RUNNING")
    return experiment_id, parents


def stop_leftover_runs(client: MlflowClient, experiment_id: str) -> None:
    """KILLED for the trial and confirm runs a killed driver left RUNNING: this driver holds the sweep's lease and
    has opened none yet, so none of them runs (status said "running" for them); a resume opens its trials' again."""
    for role in (layout.TRIAL_ROLE, layout.CONFIRM_ROLE):
        running = f"{layout.runs_filter(role)} and attributes.status = 'RUNNING'"
        for run in client.search_runs([experiment_id], running, max_results=layout.MAX_RUNS):
            client.set_terminated(run.info.run_id, "KILLED")


def stored_spec(tracking_uri: str, sweep: str) -> str | None:
    """The spec JSON a sweep stored in its experiment, or None; a missing SQLite file is not created."""
    experiment = sweep_experiment(tracking_uri, sweep)
    return experiment.tags.get(layout.SPEC) if experiment else None


def sweep_experiment(tracking_uri: str, sweep: str):
    """The sweep's MLflow experiment, or None; a missing SQLite file is not created."""
    database = sqlite_file(tracking_uri)
    if database is not None and not database.is_file():
        return None
    return open_store(tracking_uri).get_experiment_by_name(experiment_name(sweep))


def drop_run(client: MlflowClient, run_id: str, why: str) -> None:
    """Delete a run the sweep itself gives up (a trial started over, an orphan), tagged first with why: status and
    the closing line name the runs a user deleted in the UI (summary.deleted_runs), never these."""
    client.set_tag(run_id, layout.DROPPED, why)
    client.delete_run(run_id)


def check_not_deleted(experiment, tracking_uri: str) -> None:
    """MLflow keeps a deleted experiment's name, and refuses every write to it: the sweep would start, then stop at
    its first write (a new sweep of that name) or end in a traceback (a resume)."""
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        store = shlex.quote(hide_password(tracking_uri))
        where = "THE_SERVERS_DATABASE" if tracking_uri.startswith(("http://", "https://")) else store
        # MLflow 3's gc wants the tracking URI too ("Tracking URL is not set" without it): mlflow_command sets it
        gc = mlflow_command(tracking_uri, f"gc --backend-store-uri {where} --experiment-ids {experiment.experiment_id}")
        raise SpecError(f"the sweep's MLflow experiment {experiment.name} (id {experiment.experiment_id}) is deleted "
                        f"in {hide_password(tracking_uri)}, which keeps its name: restore it in the MLflow UI to go "
                        f"on with it, remove it for good with `{gc}`, or give the sweep another name")


def deleted_experiment(sweep: str, experiment, tracking_uri: str) -> str:
    """A sweep whose experiment was deleted in the MLflow UI, and the command that restores it."""
    return (f"the MLflow experiment {experiment.name} of sweep {sweep!r} (id {experiment.experiment_id}) is deleted "
            f"in {hide_password(tracking_uri)}; restore it in the MLflow UI or with "
            f"`{mlflow_command(tracking_uri, f'experiments restore --experiment-id {experiment.experiment_id}')}`")


def named_sweep(client: MlflowClient, sweep: str, tracking_uri: str, experiments: list) -> list:
    """The experiment of ``sweep`` among the store's ``experiments`` (active ones), for `status NAME` and `ui NAME`;
    SpecError when there is none: one deleted in the UI says so, else the sweeps there are named (report: runs.py)."""
    if named := [e for e in experiments if layout.sweep_of(e.name) == sweep]:
        return named
    if (gone := client.get_experiment_by_name(layout.experiment_name(sweep))) is not None:
        raise SpecError(deleted_experiment(sweep, gone, tracking_uri))
    raise SpecError(layout.no_sweep_named(sweep, hide_password(tracking_uri), [e.name for e in experiments]))


def mlflow_command(tracking_uri: str, command: str) -> str:
    """An MLflow CLI command on this store, as a shell takes it (that CLI reads the store from MLFLOW_TRACKING_URI)."""
    from .cli import executable

    return f"MLFLOW_TRACKING_URI={shlex.quote(hide_password(tracking_uri))} {executable('mlflow')} {command}"


def earlier_sweep(tracking_uri: str, sweep: str) -> str | None:
    """The storage of a sweep of this name whose experiment already holds trial runs ("" if it did not say);
    None when there is none. Nothing is created (a new store has no sweep yet); a store that does not answer or
    refuses the read: SpecError, at once (not after MLflow's minutes of retries)."""
    from .infra import short_error

    database = sqlite_file(tracking_uri)
    if database is not None:
        if not database.is_file() or "experiments" not in sqlite_tables(database):
            return None
    elif tracking_uri.startswith(("http://", "https://")):
        check_store_exists(tracking_uri)
    elif database_backend(tracking_uri) in ("postgresql", "mysql") and \
            not database_answers(tracking_uri, "--tracking-uri"):
        return None
    try:
        client = open_store(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name(sweep))
        check_not_deleted(experiment, tracking_uri)
        if experiment is None or not client.search_runs([experiment.experiment_id],
                                                        layout.runs_filter(layout.TRIAL_ROLE), max_results=1):
            return None
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - a server that answers but refuses (401, 5xx): one line, not a traceback
        raise SpecError(f"cannot read the tracking store {hide_password(tracking_uri)} ({short_error(e)}); check "
                        "that it is an MLflow store you may read, or fix --tracking-uri") from None
    return recorded_storage(experiment)


def recorded_storage(experiment) -> str:
    """The storage of the sweep whose spec the experiment holds; "" where it does not say (an older version's)."""
    try:
        saved = json.loads(experiment.tags.get(layout.SPEC) or "{}")
    except ValueError:
        return ""
    return saved.get("storage", "") if isinstance(saved, dict) else ""


def study_runs(tracking_uri: str, experiment_id: str, spec: Spec) -> dict[str, str]:
    """Find or create the parent run of every study: {study name: run id}."""
    client = MlflowClient(tracking_uri)
    runs = {}
    for study in spec.studies:
        role = {ROLE: layout.STUDY_ROLE}
        note = naming.study_note(spec.name, study.backbone, study.dataset, study.variant, spec.trials)
        runs[study.name] = find_or_create(client, experiment_id, {**study_tags(spec, study), **role, NOTE: note},
                                          {**role, STUDY: study.name},
                                          naming.study_run_name(study.backbone, study.dataset, study.variant),
                                          update=True)  # a study run named by an older version is renamed
    return runs


def find_or_create(client: MlflowClient, experiment_id: str, tags: dict, keys: dict,
                   run_name: str | Callable[[], tuple[str, dict]], update: bool = False) -> str:
    """The run whose tags match ``keys``, else a new one with ``tags`` and the driver's source (naming.source_tags).

    ``run_name`` names a new run; a function gives (name, more tags) and is called only when the run is created: a
    run found again (a resumed or retried trial) keeps its name. With ``update`` a found run takes the name and
    ``tags`` where they differ.
    """
    filters = " and ".join(layout.tag_filter(k, v) for k, v in keys.items())
    found = client.search_runs([experiment_id], filters, max_results=1)
    if found:
        run = found[0]
        if update and isinstance(run_name, str) and run.info.run_name != run_name:
            client.update_run(run.info.run_id, name=run_name)
        changed = [RunTag(k, v) for k, v in tags.items() if update and run.data.tags.get(k) != v]
        if changed:
            _retry(client.log_batch, run.info.run_id, tags=changed)
        return run.info.run_id
    name, more = run_name() if callable(run_name) else (run_name, {})
    return client.create_run(experiment_id, tags={**naming.source_tags(), **tags, **more}, run_name=name).info.run_id


@dataclass(frozen=True)
class RunSummary:
    """What a trial run's summary metrics say (layout.SUMMARY_METRICS): epochs logged and the best so far."""

    epochs: int = 0
    best: dict | None = None  # {"epoch", "val_top1", "val_top5"}

    def after(self, step: int, metrics: dict) -> RunSummary:
        epoch = {"epoch": step, "val_top1": metrics.get("val_top1"), "val_top5": metrics.get("val_top5", 0.0)}
        better = epoch["val_top1"] is not None and layout.improves(epoch, self.best)
        return RunSummary(step, epoch if better else self.best)

    def changes(self, before: RunSummary) -> dict[str, float]:
        """The summary metrics to log with this epoch: the count always, the best only when it moved."""
        metrics = {layout.EPOCHS_DONE: self.epochs}
        if self.best != before.best:
            metrics.update({layout.BEST_TOP1: self.best["val_top1"], layout.BEST_TOP5: self.best["val_top5"],
                            layout.BEST_EPOCH: self.best["epoch"]})
        return metrics


def run_summary(client: MlflowClient, run) -> RunSummary:
    """A run's summary from its latest metrics; a run written before summaries existed is read from its history."""
    metrics = run.data.metrics
    if layout.EPOCHS_DONE in metrics or "val_top1" not in metrics:
        return RunSummary(int(metrics.get(layout.EPOCHS_DONE, 0)), layout.summary_of(metrics))
    top1, top5 = (history(client, run.info.run_id, key) for key in ("val_top1", "val_top5"))
    return RunSummary(max(top1), layout.best_epoch(top1, top5))


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """One metric of one run by epoch (step)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@dataclass
class TrialRuns:
    """Every trial's run, written by the sweep's driver alone (tune_jobs/mlflow_callback.py).

    A run is found or created by its trial id, so a retried, moved or resumed trial logs into
    its one run; an epoch is logged only if the run lacks that step, so an epoch re-run after
    a crash is never logged twice.
    """

    tracking_uri: str
    experiment_id: str
    parent_runs: dict
    runs: dict = field(default_factory=dict)  # trial id -> run id
    summaries: dict = field(default_factory=dict)  # trial id -> RunSummary of its run

    def __post_init__(self):
        self.client = open_store(self.tracking_uri)

    def open(self, trial_id: str, study: str, tags: dict, params: dict, role: str = layout.TRIAL_ROLE,
             sampled: list[str] | None = None) -> None:
        """``sampled``: the params the searcher drew, which the run's description names (None: a write an older
        version journaled, which named every searchable one)."""
        run_tags = {**tags, TRIAL: trial_id, ROLE: role, PARENT: self.parent_runs[study]}
        drawn = params if sampled is None else {k: v for k, v in params.items() if k in sampled}
        run_id = find_or_create(self.client, self.experiment_id, run_tags, {TRIAL: trial_id},
                                lambda: self._name(trial_id, study, run_tags, drawn))
        existing = self.client.get_run(run_id).data
        new = [Param(k, str(v)) for k, v in sorted(params.items()) if k not in existing.params]
        _retry(self.client.log_batch, run_id, params=new)
        self._retried(run_id, existing.tags)
        self.client.update_run(run_id, status="RUNNING")
        self._known(trial_id, run_id)

    def _retried(self, run_id: str, tags: dict) -> None:
        """A failed run opened again (Tune retries it): its error becomes an earlier attempt's, or the run would
        show an error, and an "error" status, once it has finished. ``failures`` still counts every attempt."""
        if ERROR in tags:
            _retry(self.client.log_batch, run_id, tags=[RunTag(layout.EARLIER_ERROR, tags[ERROR])])
            _retry(self.client.delete_tag, run_id, ERROR)
        if tags.get(STATUS) == layout.ERROR_STATUS:
            _retry(self.client.delete_tag, run_id, STATUS)

    def _name(self, trial_id: str, study: str, tags: dict, params: dict) -> tuple[str, dict]:
        """A new run's (name, more tags): a trial is numbered within its study in creation order, counting deleted
        runs too (a trial that starts over keeps its number, and no later trial takes one that was used)."""
        sweep, variant = tags.get(layout.SWEEP, "?"), tags.get(layout.VARIANT) or study.rsplit(".", 1)[-1]
        if tags[ROLE] == layout.CONFIRM_ROLE:
            seed = tags.get(layout.SEED, "?")
            return naming.confirm_run_name(variant, seed, trial_id), {NOTE: naming.confirm_note(sweep, study, seed)}
        from mlflow.entities import ViewType

        runs = self.client.search_runs([self.experiment_id], f"{layout.tag_filter(STUDY, study)} and "
                                       f"{layout.tag_filter(ROLE, tags[ROLE])}", run_view_type=ViewType.ALL,
                                       max_results=layout.MAX_RUNS)
        numbers = {r.data.tags.get(TRIAL): int(r.data.tags[layout.TRIAL_NUMBER]) for r in runs
                   if r.data.tags.get(layout.TRIAL_NUMBER, "").isdigit()}
        others = {r.data.tags.get(TRIAL) for r in runs} - {trial_id}  # runs of an older version have no number
        number = numbers.get(trial_id) or max(len(others), *numbers.values(), 0) + 1
        return naming.trial_run_name(variant, number, trial_id), {
            layout.TRIAL_NUMBER: str(number), NOTE: naming.trial_note(sweep, study, number, params)}

    def _known(self, trial_id: str, run_id: str) -> str:
        self.runs[trial_id] = run_id
        self.summaries[trial_id] = run_summary(self.client, self.client.get_run(run_id))
        return run_id

    def run_of(self, trial_id: str) -> str:
        """The trial's run; one opened by an earlier driver (whose last writes this one makes) is looked up."""
        if trial_id in self.runs:
            return self.runs[trial_id]
        found = self.client.search_runs([self.experiment_id], layout.tag_filter(TRIAL, trial_id), max_results=1)
        if not found:
            raise LookupError(f"no MLflow run for trial {trial_id} in experiment {self.experiment_id}")
        return self._known(trial_id, found[0].info.run_id)

    def log_epoch(self, trial_id: str, step: int, metrics: dict, tags: dict) -> None:
        """All of an epoch's metrics in one call (SQLite serialises writers), once per step."""
        run_id = self.run_of(trial_id)
        summary = self.summaries[trial_id]
        if step <= summary.epochs:  # epochs arrive in order: a resumed trial re-runs those after its checkpoint
            return
        new = summary.after(step, metrics)
        now = int(time.time() * 1000)
        try:
            _retry(self.client.log_batch, run_id, metrics=[Metric(k, float(v), now, step)
                                                           for k, v in {**metrics, **new.changes(summary)}.items()],
                   tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception:
            self.runs.pop(trial_id, None)  # the store may have taken it before the reply was lost: ask it again
            raise
        self.summaries[trial_id] = new

    def finish(self, trial_id: str, status: str, best_checkpoint: Path | None, tags: dict | None = None) -> None:
        """FINISHED with how fit ended (the status the trial reported, or pruned) and its best checkpoint."""
        run_id = self.run_of(trial_id)
        if best_checkpoint and best_checkpoint.exists():
            _retry(self.client.log_artifact, run_id, str(best_checkpoint), layout.CHECKPOINT_DIR)
        _retry(self.client.log_batch, run_id, tags=[RunTag(k, v) for k, v in {**(tags or {}), STATUS: status}.items()])
        self.client.set_terminated(run_id, "FINISHED")

    def drop(self, trial_id: str) -> None:
        """Delete the trial's run (it starts over); the next open makes a new one. Made again: nothing to do."""
        found = self.client.search_runs([self.experiment_id], layout.tag_filter(TRIAL, trial_id))
        for run in found:
            drop_run(self.client, run.info.run_id, "restart")
        self.runs.pop(trial_id, None)
        self.summaries.pop(trial_id, None)

    def stop(self, trial_id: str) -> None:
        """KILLED: stopped with its sweep (Ctrl-C); the next driver opens it RUNNING again. Only a RUNNING run: a
        finished or failed one stays as it ended, and a trial that never opened one has nothing to stop."""
        found = self.client.search_runs([self.experiment_id], layout.tag_filter(TRIAL, trial_id), max_results=1)
        if found and found[0].info.status == "RUNNING":
            self.client.set_terminated(found[0].info.run_id, "KILLED")
        self.runs.pop(trial_id, None)

    def fail(self, trial_id: str, message: str, attempt: int) -> None:
        """FAILED with the error in a tag; ``failures`` counts the attempts (Tune may retry the trial), each once."""
        run_id = self.run_of(trial_id)
        counted = {m.step for m in self.client.get_metric_history(run_id, FAILURES)}
        metrics = [] if attempt in counted else [Metric(FAILURES, attempt, int(time.time() * 1000), attempt)]
        _retry(self.client.log_batch, run_id, metrics=metrics,
               tags=[RunTag(ERROR, message[:4000]), RunTag(STATUS, layout.ERROR_STATUS)])
        self.client.set_terminated(run_id, "FAILED")
        del self.runs[trial_id]  # a retry opens it again, RUNNING


PG_LOCK_KEY = 0x617474_7a6f6f6d  # "attzoom": the advisory lock that serialises a new PostgreSQL store's creation
DATABASE_DOWN = re.compile(r"OperationalError\b.*(connection refused|could not connect|connection to server|"
                           r"server closed the connection|the database system is (starting up|shutting down))",
                           re.IGNORECASE | re.DOTALL)


def unreachable(error: BaseException) -> bool:
    """Whether an MLflow call failed because the tracking server did not answer (worth waiting out)."""
    import requests

    if isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    text = str(error)
    if DATABASE_DOWN.search(text):  # a database store (PostgreSQL) that is down or restarting
        return True
    return text.startswith("API request to ") and bool(
        re.search(r"failed with (timeout )?exception|error code 50[234]", text))


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """SQLite answers 'database is locked' while another trial writes; wait and try again."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - only lock errors are retried
            if "locked" not in str(e).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)
