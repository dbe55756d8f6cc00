"""How a sweep is laid out in MLflow: the one module that names its experiment, tags, roles and metrics.

The sweep's driver writes this layout (tune_jobs/tracking.py, tune_jobs/mlflow_callback.py) and
the reports read it back from the store alone (dashboards/), so both import these names
instead of spelling them (tests/test_layout.py fails on a tag key spelled anywhere else).
Plain data and pure functions: no torch, Ray or MLflow import, so a laptop with only the
tracking URI, and the CLI before it loads anything heavy, can use it.

    experiment  attzoom-<sweep>
    parent run  one per study:      role=study,   sweep, study, backbone, dataset, variant
    child run   one per trial:      role=trial,   + trial_id, trial_number, mlflow.parentRunId, gpu_ids
                one per confirm seed: role=confirm, + seed
    (run names, descriptions and the git source: tune_jobs/naming.py)
    metrics     per epoch (step = epoch): EPOCH_METRICS, and on trial runs the SUMMARY_METRICS that epoch
                changed; on the best trials: TEST_METRICS; on a parent when the sweep ends: STUDY_METRICS
"""

from __future__ import annotations

from typing import Iterable, TypeVar

from attzoom.names import METRICS as EPOCH_METRICS  # noqa: F401 - re-exported: what fit reports every epoch

EXPERIMENT_PREFIX = "attzoom-"

# Tag keys. Users filter on them in the MLflow UI (README), so renaming one breaks their saved searches.
SWEEP = "attzoom.sweep"
STUDY = "attzoom.study"
TRIAL = "attzoom.trial_id"
ROLE = "attzoom.role"
ERROR = "attzoom.error"  # a failed trial's exception, "Type: message"
EARLIER_ERROR = "attzoom.earlier_error"  # a retried trial's last failed attempt's error (its ERROR, moved)
STATUS = "attzoom.status"  # how fit ended, as the trial reported it: FIT_STATUSES, ERROR_STATUS
GPU_IDS = "attzoom.gpu_ids"  # the GPUs the trial's process was given ("" on CPU)
SEED = "attzoom.seed"  # a confirm run's seed
PARENT = "mlflow.parentRunId"  # MLflow's own: nests a trial's run under its study's
BACKBONE, DATASET, VARIANT = "backbone", "dataset", "variant"
LEASE = "attzoom.lease"  # on a sweep's lease experiment (cloud storage): the driver holding it, as JSON
SPEC = "attzoom.spec"  # on the experiment: the spec the sweep runs, as JSON (confirm needs no Tune folder)
ADDRESS = "attzoom.address"  # on the experiment: the --address its last driver joined ("" for a local Ray)
PRUNED_AT = "attzoom.pruned_at_epoch"  # a pruned trial's last epoch
TEST_DATA = "attzoom.test_data_root"  # the data root whose test split test_top1/test_top5 were computed on
OPTUNA_TRIAL = "attzoom.optuna_trial"  # the number optuna-dashboard shows for the trial (from 0)
DROPPED = "attzoom.dropped"  # why the sweep deleted a run itself (restart, orphan): not one a user deleted
TRIAL_NUMBER = "attzoom.trial_number"  # a trial's number within its study (1-based, creation order); names its run
# MLflow's own tags (mlflow/utils/mlflow_tags.py) that the sweep sets, for the MLflow UI.
NOTE = "mlflow.note.content"  # a run's (or the experiment's) description, shown above its details
GIT_COMMIT, SOURCE_NAME, SOURCE_TYPE = "mlflow.source.git.commit", "mlflow.source.name", "mlflow.source.type"
# On the experiment: which of the UI's two workflows it belongs to. MLflow 3.17's UI opens an experiment on its
# GenAI overview unless told otherwise; custom_model_development is its "Machine learning" kind (the runs table).
EXPERIMENT_KIND, ML_KIND = "mlflow.experimentKind", "custom_model_development"
# On the experiment: a view of the runs table (columns, order) that the printed address opens by its share key
# (MLflow's "share view" feature: the tag is prefix + key, the address names the key as viewStateShareKey).
SHARED_VIEW, RUNS_VIEW = "mlflow.sharedViewState.", "attzoom-runs"
TAGS = (SWEEP, STUDY, TRIAL, ROLE, ERROR, EARLIER_ERROR, STATUS, GPU_IDS, SEED, SPEC, ADDRESS, LEASE, PRUNED_AT,
        TRIAL_NUMBER, OPTUNA_TRIAL, DROPPED, TEST_DATA, NOTE, GIT_COMMIT, SOURCE_NAME, SOURCE_TYPE, EXPERIMENT_KIND,
        SHARED_VIEW)

# What the verdict compares an AttZoom study with (same backbone and data set): the baseline and each control.
COMPARED_WITH = ("baseline", "zoom-only", "attention-only", "resize2x")
DECISIVE = ("zoom-only", "resize2x")  # the controls that tell the attention from more pixels (DESIGN.md)

# Values of the ROLE tag.
STUDY_ROLE, TRIAL_ROLE, CONFIRM_ROLE = "study", "trial", "confirm"

# Values of the STATUS tag; the first three are what attzoom.train.fit returns.
FIT_STATUSES = ("completed", "early_stopped", "diverged")
ERROR_STATUS = "error"
PRUNED_STATUS = "pruned"  # stopped by the sweep's scheduler ([scheduler]): it trailed its study at a rung
UNKNOWN_STATUS = "unknown"  # a trial that completed without reporting one (none should)

TEST_METRICS = ("test_top1", "test_top5")  # the best checkpoint on the official test split, logged once
# not best_val_top1: the runs table ranked by it (and a filter on it) showed each study beside its best trial, twice
STUDY_METRICS = ("trials_finished", "trials_failed", "study_best_val_top1")
# On a trial or confirm run, logged with the epoch that changed them (step = epoch): the best epoch so far and
# how many epochs are done. Their latest values summarise the run, so a reader needs one search_runs per sweep
# instead of one metric history per run, and the MLflow UI's column shows the best epoch, not the last.
BEST_TOP1, BEST_TOP5, BEST_EPOCH, EPOCHS_DONE = "best_val_top1", "best_val_top5", "best_epoch", "epochs_done"
SUMMARY_METRICS = (BEST_TOP1, BEST_TOP5, BEST_EPOCH, EPOCHS_DONE)
FAILURES = "failures"  # on a trial run: its failed attempts so far (step = attempt)
CHECKPOINT_DIR = "checkpoint"  # a trial's best.pt is logged into this artifact folder
CHECKPOINT = f"{CHECKPOINT_DIR}/best.pt"
MAX_RUNS = 50_000  # more runs than any sweep has: one search_runs page reads them all

T = TypeVar("T")


def experiment_name(sweep: str) -> str:
    return f"{EXPERIMENT_PREFIX}{sweep}"


def lease_experiment(sweep: str) -> str:
    """The experiment that holds a sweep's lease when its storage is a cloud URI (tune_jobs/lease.py)."""
    return f"attzoom.lease/{sweep}"


def sweep_of(experiment: str) -> str | None:
    """The sweep an experiment holds, or None when it is not a sweep's."""
    return experiment[len(EXPERIMENT_PREFIX):] if experiment.startswith(EXPERIMENT_PREFIX) else None


def no_sweep_named(sweep: str, where: str, experiments: Iterable[str]) -> str:
    """`status` and `report` of a name the store (``where``, its password hidden) lacks: a typo shows beside the
    names of the sweeps there (``experiments``: the store's experiment names)."""
    known = sorted(filter(None, map(sweep_of, experiments)))
    return (f"no sweep named {sweep!r} in {where} (sweeps there: {', '.join(known) or 'none'}); check the name or "
            "pass --tracking-uri")


def study_name(backbone: str, dataset: str, variant: str) -> str:
    return f"{backbone}.{dataset}.{variant}"


def study_tags(sweep: str, backbone: str, dataset: str, variant: str) -> dict[str, str]:
    """The tags a study's parent run and every one of its trial runs carry."""
    return {SWEEP: sweep, STUDY: study_name(backbone, dataset, variant), BACKBONE: backbone, DATASET: dataset,
            VARIANT: variant}


def runs_filter(role: str, finished: bool = False) -> str:
    """A search_runs filter for the runs of one role (only FINISHED ones with ``finished``)."""
    text = f"tags.`{ROLE}` = '{role}'"
    return f"{text} and attributes.status = 'FINISHED'" if finished else text


def tag_filter(key: str, value: str) -> str:
    return f"tags.`{key}` = '{value}'"


def best_epoch(top1: dict[int, float], top5: dict[int, float]) -> dict | None:
    """The first epoch with the highest validation top-1: the epoch ``best.pt`` holds (training keeps a new best
    only on a strictly higher top-1, so a later epoch that ties on top-1 with a better top-5 is not in it).

    The maximum over the run's history, not the last logged value (what MLflow's own sort and
    filters use): with early stopping the last epochs are the ones that did not improve.
    Returns {"epoch", "val_top1", "val_top5"}, or None before the first epoch.
    """
    if not top1:
        return None
    step = max(top1, key=lambda s: (top1[s], -s))
    return {"epoch": step, "val_top1": top1[step], "val_top5": top5.get(step, 0.0)}


def summary_of(metrics: dict[str, float]) -> dict | None:
    """A run's best epoch ({"epoch", "val_top1", "val_top5"}) from its latest metrics, or None when the run has
    no summary: it has no epoch yet, or an older version wrote it (read its history then: best_epoch)."""
    if BEST_TOP1 not in metrics:
        return None
    return {"epoch": int(metrics[BEST_EPOCH]), "val_top1": metrics[BEST_TOP1], "val_top5": metrics[BEST_TOP5]}


def improves(epoch: dict, best: dict | None) -> bool:
    """Whether an epoch beats the best so far by best_epoch's rule (a strictly higher top-1; the earlier stays)."""
    return best is None or epoch["val_top1"] > best["val_top1"]


def best_of(candidates: Iterable[tuple[T, dict | None]]) -> T | None:
    """The best trial of a study: the highest best epoch (top-1, ties by top-5), then the earliest given.

    ``candidates`` are (trial, its best_epoch) in start order; trials without an epoch never win.
    """
    best, best_key = None, None
    for trial, epoch in candidates:
        if epoch is not None and (best_key is None or (epoch["val_top1"], epoch["val_top5"]) > best_key):
            best, best_key = trial, (epoch["val_top1"], epoch["val_top5"])
    return best


def stopped_early(status: str, tags: dict) -> bool:
    """A trial run the scheduler stopped at a rung ([scheduler]): it counts as finished, with fewer epochs."""
    return status == "FINISHED" and tags.get(STATUS) == PRUNED_STATUS
