"""MLflow bookkeeping: one experiment per sweep, a parent run per study, a child run per trial.

Resume-safe by construction: runs are found-or-created by tags (``attzoom.study``,
``attzoom.trial_id``), and an epoch is logged only if that step is not in the run yet,
so a driver killed and resumed at any moment never leaves a second run or a doubled
epoch behind. Only the sweep's driver writes trial runs (tune_jobs/runlog.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .spec import Spec, Study, local_path, sqlite_file

SWEEP, STUDY, TRIAL, ROLE, ERROR = "attzoom.sweep", "attzoom.study", "attzoom.trial_id", "attzoom.role", "attzoom.error"
GPU_IDS, SEED = "attzoom.gpu_ids", "attzoom.seed"  # the trial's GPUs; a confirm run's seed
PARENT = "mlflow.parentRunId"


def experiment_name(sweep: str) -> str:
    return f"attzoom-{sweep}"


def prepare_store(tracking_uri: str, sweep: str) -> str:
    """Create (and migrate) the store and the sweep's experiment once, in the driver, before any trial."""
    client = open_store(tracking_uri)
    found = client.get_experiment_by_name(experiment_name(sweep))
    if found:
        return found.experiment_id
    folder = local_path(tracking_uri) if tracking_uri.startswith("sqlite:///") else None
    artifacts = (folder / "mlartifacts" / sweep).resolve().as_uri() if folder else None
    return client.create_experiment(experiment_name(sweep), artifact_location=artifacts)


def open_store(tracking_uri: str) -> MlflowClient:
    """A client on a ready store; a new SQLite store is created by one process at a time.

    Two processes migrating one fresh SQLite file (a sweep and `attzoom status`, two trials)
    collide on its tables, and the loser leaves alembic's temporary tables behind, which breaks
    every later migration of that file: the store is lost. A lock file beside it serialises
    the first open; MLflow then keeps the store for the rest of the process.
    """
    database = sqlite_file(tracking_uri)
    if database is None:
        return MlflowClient(tracking_uri)
    from filelock import FileLock

    with FileLock(f"{database}.lock"):
        return MlflowClient(tracking_uri)  # builds the store, migrating it if it is new


def study_tags(spec: Spec, study: Study) -> dict[str, str]:
    return {SWEEP: spec.name, STUDY: study.name, "backbone": study.backbone, "dataset": study.dataset,
            "variant": study.variant}


def prepare_tracking(spec: Spec) -> tuple[str, dict[str, str]]:
    """The store, the sweep's experiment and every study's parent run: (experiment id, {study: run id})."""
    experiment_id = prepare_store(spec.tracking_uri, spec.name)
    return experiment_id, study_runs(spec.tracking_uri, experiment_id, spec)


def study_runs(tracking_uri: str, experiment_id: str, spec: Spec) -> dict[str, str]:
    """Find or create the parent run of every study: {study name: run id}."""
    client = MlflowClient(tracking_uri)
    runs = {}
    for study in spec.studies:
        tags = {**study_tags(spec, study), ROLE: "study"}
        runs[study.name] = find_or_create(client, experiment_id, tags, {ROLE: "study", STUDY: study.name},
                                          run_name=study.name)
    return runs


def find_or_create(client: MlflowClient, experiment_id: str, tags: dict, keys: dict, run_name: str) -> str:
    filters = " and ".join(f"tags.`{k}` = '{v}'" for k, v in keys.items())
    found = client.search_runs([experiment_id], filters, max_results=1)
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id


def best_score(client: MlflowClient, run_id: str) -> tuple[float, float] | None:
    """(val_top1, val_top5) of a run's best epoch: highest top-1 over its history, ties by top-5."""
    top5 = {m.step: m.value for m in client.get_metric_history(run_id, "val_top5")}
    return max(((m.value, top5.get(m.step, 0.0)) for m in client.get_metric_history(run_id, "val_top1")),
               default=None)


@dataclass
class TrialRuns:
    """Every trial's run, written by the sweep's driver alone (tune_jobs/runlog.py).

    A run is found or created by its trial id, so a retried, moved or resumed trial logs into
    its one run; an epoch is logged only if the run lacks that step, so an epoch re-run after
    a crash is never logged twice.
    """

    tracking_uri: str
    experiment_id: str
    parent_runs: dict
    runs: dict = field(default_factory=dict)  # trial id -> run id
    logged: dict = field(default_factory=dict)  # trial id -> epochs the run has

    def __post_init__(self):
        self.client = open_store(self.tracking_uri)

    def is_open(self, trial_id: str) -> bool:
        return trial_id in self.runs

    def open(self, trial_id: str, study: str, tags: dict, params: dict, role: str = "trial") -> None:
        run_tags = {**tags, TRIAL: trial_id, ROLE: role, PARENT: self.parent_runs[study]}
        run_id = find_or_create(self.client, self.experiment_id, run_tags, {TRIAL: trial_id}, run_name=trial_id)
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in sorted(params.items()) if k not in existing]
        _retry(self.client.log_batch, run_id, params=new)
        self.client.update_run(run_id, status="RUNNING")
        self.runs[trial_id] = run_id
        self.logged[trial_id] = {m.step for m in self.client.get_metric_history(run_id, "val_top1")}

    def log_epoch(self, trial_id: str, step: int, metrics: dict, tags: dict) -> None:
        """All of an epoch's metrics in one call (SQLite serialises writers), once per step."""
        if step in self.logged[trial_id]:
            return
        now = int(time.time() * 1000)
        _retry(self.client.log_batch, self.runs[trial_id], metrics=[Metric(k, float(v), now, step)
                                                                     for k, v in metrics.items()],
               tags=[RunTag(k, v) for k, v in tags.items()])
        self.logged[trial_id].add(step)

    def fit_status(self, trial_id: str, epochs: int) -> str:
        """How fit ended, from the epochs it finished: none means it diverged in its first."""
        done = self.logged[trial_id]
        return "diverged" if not done else "completed" if max(done) >= epochs else "early_stopped"

    def finish(self, trial_id: str, status: str, best_checkpoint: Path | None) -> None:
        run_id = self.runs[trial_id]
        if best_checkpoint and best_checkpoint.exists():
            _retry(self.client.log_artifact, run_id, str(best_checkpoint), "checkpoint")
        _retry(self.client.log_batch, run_id, tags=[RunTag("attzoom.status", status)])
        self.client.set_terminated(run_id, "FINISHED")

    def fail(self, trial_id: str, message: str) -> None:
        """FAILED with the error in a tag; ``failures`` counts the attempts (Tune may retry the trial)."""
        run_id = self.runs[trial_id]
        attempt = len(self.client.get_metric_history(run_id, "failures")) + 1
        _retry(self.client.log_batch, run_id, metrics=[Metric("failures", attempt, int(time.time() * 1000), attempt)],
               tags=[RunTag(ERROR, message[:4000]), RunTag("attzoom.status", "error")])
        self.client.set_terminated(run_id, "FAILED")
        del self.runs[trial_id]  # a retry opens it again, RUNNING


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """SQLite answers 'database is locked' while another trial writes; wait and try again."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - only lock errors are retried
            if "locked" not in str(e).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)
