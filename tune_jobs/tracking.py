"""MLflow bookkeeping: one experiment per sweep, a parent run per study, a child run per trial.

Resume-safe by construction: runs are found-or-created by tags (``attzoom.study``,
``attzoom.trial_id``), and a trial logs an epoch only if that step is not in the run
yet, so a trial killed between logging and checkpointing, or before its first
checkpoint, never leaves a second run or a doubled epoch behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .spec import Spec, Study, local_path, sqlite_file

SWEEP, STUDY, TRIAL, ROLE, ERROR = "attzoom.sweep", "attzoom.study", "attzoom.trial_id", "attzoom.role", "attzoom.error"
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
class TrialTracker:
    """A trial's MLflow run; its id is kept in the trial's checkpoint folder (``mlflow.json``)."""

    client: MlflowClient
    run_id: str
    logged: set[int]

    @classmethod
    def open(cls, tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str, tags: dict,
             params: dict, workdir: Path, role: str = "trial") -> "TrialTracker":
        client = open_store(tracking_uri)
        saved = workdir / "mlflow.json"
        if saved.exists():
            run_id = json.loads(saved.read_text())["run_id"]
        else:
            run_tags = {**tags, TRIAL: trial_id, ROLE: role, PARENT: parent_run_id}
            run_id = find_or_create(client, experiment_id, run_tags, {TRIAL: trial_id}, run_name=trial_id)
            existing = client.get_run(run_id).data.params
            new = [Param(k, str(v)) for k, v in sorted(params.items()) if k not in existing]
            _retry(client.log_batch, run_id, params=new)
            workdir.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({"run_id": run_id}))
        client.update_run(run_id, status="RUNNING")
        logged = {m.step for m in client.get_metric_history(run_id, "val_top1")}
        return cls(client, run_id, logged)

    def log_epoch(self, metrics: dict) -> None:
        """All of an epoch's metrics in one call (SQLite serialises writers), once per step."""
        step = int(metrics["epoch"])
        if step in self.logged:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]
        _retry(self.client.log_batch, self.run_id, metrics=batch)
        self.logged.add(step)

    def finish(self, status: str, best_checkpoint: Path | None) -> None:
        if best_checkpoint and best_checkpoint.exists():
            _retry(self.client.log_artifact, self.run_id, str(best_checkpoint), "checkpoint")
        _retry(self.client.log_batch, self.run_id, tags=[RunTag("attzoom.status", status)])
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, error: BaseException) -> None:
        """FAILED with the error in a tag; ``failures`` counts the attempts (Tune may retry the trial)."""
        message = f"{type(error).__name__}: {error}"[:4000]
        attempt = len(self.client.get_metric_history(self.run_id, "failures")) + 1
        _retry(self.client.log_batch, self.run_id, metrics=[Metric("failures", attempt, int(time.time() * 1000),
                                                                   attempt)],
               tags=[RunTag(ERROR, message), RunTag("attzoom.status", "error")])
        self.client.set_terminated(self.run_id, "FAILED")


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """SQLite answers 'database is locked' while another trial writes; wait and try again."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - only lock errors are retried
            if "locked" not in str(e).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)
