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


def optuna_study_name(sweep: str, study: str) -> str:
    return f"{sweep}/{study}"


@functools.lru_cache(maxsize=4)
def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The RDB storage at ``url``, created (and migrated) if new; connections are checked before use. One per
    process: the searcher and the MLflow callback's writer share it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in RDB" per study
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def trial_of(storage, study_id: int, tune_trial_id: str):
    """The Optuna trial (a FrozenTrial) that Tune trial ``tune_trial_id`` was asked as, or None."""
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        if trial.user_attrs.get(TUNE_TRIAL_ATTR) == tune_trial_id:
            return trial
    return None


def attach_run(url: str, study_name: str, tune_trial_id: str, run_id: str) -> None:
    """Record the trial's MLflow run id on its Optuna trial (while it runs: a finished trial is read-only)."""
    storage = open_storage(url)
    study_id = storage.get_study_id_from_name(study_name)
    trial = trial_of(storage, study_id, tune_trial_id)
    if trial is not None and not trial.state.is_finished():
        storage.set_trial_user_attr(_storage_id(storage, study_id, trial), MLFLOW_RUN_ATTR, run_id)


def fail_forgotten(storage, study_name: str, live: set[str]) -> int:
    """Mark FAIL the trials left RUNNING that no live Tune trial owns: a killed driver asked them after its
    last snapshot, and the restored searcher asks afresh in their place. Returns how many."""
    study_id = storage.get_study_id_from_name(study_name)
    forgotten = [t for t in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                 if t.user_attrs.get(TUNE_TRIAL_ATTR) not in live]
    for trial in forgotten:
        storage.set_trial_state_values(_storage_id(storage, study_id, trial), optuna.trial.TrialState.FAIL)
    return len(forgotten)


def told_before(storage, study_name: str, live: set[str]) -> set[str]:
    """The live Tune trials whose Optuna trial has already finished: a killed driver told it after its last
    snapshot, and Tune runs the trial on from its checkpoint (Optuna refuses a second report or tell)."""
    study_id = storage.get_study_id_from_name(study_name)
    finished = tuple(state for state in optuna.trial.TrialState if state.is_finished())
    return {t.user_attrs.get(TUNE_TRIAL_ATTR) for t in storage.get_all_trials(study_id, deepcopy=False, states=finished)
            } & live


def _storage_id(storage, study_id: int, trial) -> int:
    return storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
