"""A sweep's Optuna studies in Optuna's own storage, so optuna-dashboard and optuna.load_study open them.

Each study is named ``<sweep>/<study>`` in an RDB storage (spec.optuna_storage_url: SQLite beside
the MLflow store by default, PostgreSQL on the cluster). Only the sweep's driver writes it: the
searcher asks and tells (tune_jobs/searcher.py), with every epoch's val top-1 as an intermediate
value, and the MLflow callback records each trial's run id (MLFLOW_RUN_ATTR). A trial's Tune id
is its user attribute TUNE_TRIAL_ATTR, which is how both find it again after a restart.
"""

from __future__ import annotations

import functools

import optuna

TUNE_TRIAL_ATTR = "tune_trial_id"
MLFLOW_RUN_ATTR = "mlflow_run_id"
DROPPED_ATTR = "dropped"  # why a trial is FAIL though it never failed: optuna-dashboard shows it beside the trial
ASKED_AFRESH = "asked by a driver stopped before its next snapshot; the sweep asked again in its place"


def optuna_study_name(sweep: str, study: str) -> str:
    return f"{sweep}/{study}"


@functools.lru_cache(maxsize=4)
def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The RDB storage at ``url``, created (and migrated) if new; connections are checked before use. One per
    process: the searcher and the MLflow callback's writer share it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in RDB" per study
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def trial_of(storage, study_id: int, tune_trial_id: str):
    """The Optuna trial (a FrozenTrial) that Tune trial ``tune_trial_id`` was last asked as, or None (a trial that
    failed for good and ran again on a resume was asked anew: searcher.StudySearch.rerun)."""
    return _latest(storage.get_all_trials(study_id, deepcopy=False)).get(tune_trial_id)


def _latest(trials) -> dict:
    """Tune trial id -> the last Optuna trial asked for it."""
    return {trial.user_attrs.get(TUNE_TRIAL_ATTR): trial for trial in sorted(trials, key=lambda t: t.number)}


def attach_run(url: str, study_name: str, tune_trial_id: str, run_id: str) -> int | None:
    """Record the trial's MLflow run id on its Optuna trial (while it runs: a finished trial is read-only); returns
    that trial's number, which its run is tagged with (None: no Optuna trial asked for it)."""
    storage = open_storage(url)
    study_id = storage.get_study_id_from_name(study_name)
    trial = trial_of(storage, study_id, tune_trial_id)
    if trial is not None and not trial.state.is_finished():
        storage.set_trial_user_attr(_storage_id(storage, study_id, trial), MLFLOW_RUN_ATTR, run_id)
    return None if trial is None else trial.number


def settle_restored(storage, study_name: str, live: set[str]) -> set[str]:
    """A restored searcher's study made to agree with the Tune trials it resumes, in one read of the study.

    RUNNING trials that no live Tune trial owns were asked by a killed driver after its last snapshot: they are
    marked FAIL, and the restored searcher asks afresh in their place. Returned: the live Tune trials whose Optuna
    trial has already finished (that driver told it after its last snapshot; Tune runs the trial on from its
    checkpoint, and Optuna refuses a second report or tell)."""
    study_id = storage.get_study_id_from_name(study_name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    latest = _latest(trials)
    told = set()
    for trial in trials:
        owner = trial.user_attrs.get(TUNE_TRIAL_ATTR)
        if trial.state == optuna.trial.TrialState.RUNNING and (owner not in live or latest[owner] is not trial):
            storage_id = _storage_id(storage, study_id, trial)
            storage.set_trial_user_attr(storage_id, DROPPED_ATTR, ASKED_AFRESH)
            storage.set_trial_state_values(storage_id, optuna.trial.TrialState.FAIL)
        elif trial.state.is_finished() and owner in live and latest[owner] is trial:
            told.add(owner)
    return told


def _storage_id(storage, study_id: int, trial) -> int:
    return storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
