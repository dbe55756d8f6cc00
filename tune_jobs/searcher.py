"""One Tune Searcher over many studies: each study its own seeded OptunaSearch (TPE).

A sweep is several studies that share one cluster. Running them as one Tune experiment
lets one searcher keep the cluster busy: each new trial goes to the study with the fewest
trials so far, results go back to the study that owns the trial, and FINISHED comes once
every study has its N trials. The global cap on concurrent trials lives here too (rather
than in a ConcurrencyLimiter, whose live-trial set is not saved) so that after a restore
the trials Tune resumes still count against the cap and still report to their study.

With an Optuna storage URL each study lives there as ``<sweep>/<study>`` (tune_jobs/studies.py);
a restored searcher marks FAIL the trials a killed driver asked after its last snapshot. The
searcher's state and Tune's trial states are two files of one snapshot: a restore makes the
searcher agree with the trials Tune restores (MultiStudySearcher.agree_with).
"""

from __future__ import annotations

import pickle
import warnings
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from .infra import report_problem, short_error
from .layout import PRUNED_STATUS
from .snapshots import SnapshotTrial, snapshot_trials
from .space import STUDY_KEY
from .spec import hide_password
from .studies import TUNE_TRIAL_ATTR, open_storage, optuna_study_name, settle_restored, trial_of
from .trainable import RESTART_KEY, STATUS_KEY


class StudySearch(OptunaSearch):
    """One study's TPE search: each epoch's metric is an intermediate value at that epoch, and a trial's
    value is its best epoch's (the checkpoint it keeps), as in the MLflow summary and the report."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.best: dict[str, float] = {}  # trial id -> its best epoch's metric so far
        self.told: set[str] = set()  # trials a killed driver told after its last snapshot (set on restore)
        self.failed: set[str] = set()  # trials told FAIL (failed for good), which a resume runs again (rerun)
        self.untold: dict[str, tuple] = {}  # trial -> (value, state) the storage refused: told again on restore

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if RESTART_KEY in result:
            self.best.pop(trial_id, None)  # it starts over from epoch 1 (Optuna keeps the first value per epoch)
        if "epoch" not in result or trial_id in self._completed_trials or trial_id in self.told:
            return
        value = result[self.metric]
        self.best[trial_id] = max(value, self.best.get(trial_id, value))
        with warnings.catch_warnings():  # an epoch re-run after a resume: Optuna keeps the first value
            warnings.simplefilter("ignore", UserWarning)
            self._stored(trial_id, "its epoch", self._ot_trials[trial_id].report, value, int(result["epoch"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.told or trial_id in self._completed_trials:
            self._completed_trials.add(trial_id)  # noqa: SLF001 - OptunaSearch's own record of told trials
            return
        if result and result.get(STATUS_KEY) == PRUNED_STATUS:  # stopped early (tune_jobs/scheduler.py)
            self.on_trial_result(trial_id, result)  # Tune gives a searcher no result it stops a trial on
            self._tell(trial_id, None, TrialState.PRUNED)  # valued at its last epoch (Optuna's rule)
            return
        value = (result or {}).get(self.metric)
        if value is not None and trial_id in self.best:
            value = max(value, self.best[trial_id])
        self._tell(trial_id, value, TrialState.COMPLETE if value is not None else
                   TrialState.FAIL if error else TrialState.PRUNED)

    def _tell(self, trial_id: str, value: float | None, state: TrialState) -> None:
        """OptunaSearch's tell, but one the storage refuses stops the sweep (OptunaSearch logged it and went on:
        the trial stayed RUNNING in the study, lost to TPE, and a resume marked it FAIL). The refused tell is kept
        with the searcher's state, which a snapshot may save before the sweep stops: the restore tells it again."""
        self.untold[trial_id] = (value, state)
        self.retell(trial_id)

    def retell(self, trial_id: str) -> None:
        value, state = self.untold[trial_id]
        if self._stored(trial_id, "its end", self._ot_study.tell, self._ot_trials[trial_id], value, state=state):
            del self.untold[trial_id]
            self._completed_trials.add(trial_id)  # noqa: SLF001
            if state == TrialState.FAIL:
                self.failed.add(trial_id)

    def rerun(self, trial_id: str) -> None:
        """A trial that failed for good, which a resume runs again from its checkpoint (Tune's resume_errored): a
        new Optuna trial with its params and the epochs it had reported takes its results, and the failed one stays
        as the attempt it was. Its results were dropped, so the study kept FAIL for a trial MLflow showed finished."""
        old = self._ot_trials.pop(trial_id)
        self._ot_study.enqueue_trial(old.params, skip_if_exists=False)
        self.suggest(trial_id)  # asks the enqueued params back
        new = self._ot_trials[trial_id]
        for step, value in sorted(self._ot_study._storage.get_trial(old._trial_id).intermediate_values.items()):
            new.report(value, step)
        self.failed.discard(trial_id)
        self._completed_trials.discard(trial_id)  # noqa: SLF001

    def forget(self, trial_id: str) -> None:
        """A trial Tune's restored snapshot does not have: it never runs (its Optuna trial, RUNNING, is marked FAIL
        on restore: studies.settle_restored)."""
        self._ot_trials.pop(trial_id, None)
        for record in (self.best, self.untold):
            record.pop(trial_id, None)
        for record in (self.failed, self.told, self._completed_trials):  # noqa: SLF001
            record.discard(trial_id)

    def adopt(self, trial_id: str, trial: SnapshotTrial) -> None:
        """A trial Tune restores as this searcher's older state never knew it (never asked, or failed where Tune
        ran it again to its end): it takes back the Optuna trial last asked for it, or (a study in memory only)
        a new one with its params."""
        self.forget(trial_id)
        storage = self._ot_study._storage  # noqa: SLF001
        asked = trial_of(storage, self._ot_study._study_id, trial_id)  # noqa: SLF001
        if asked is None:
            self._ot_study.enqueue_trial({k: v for k, v in trial.config.items() if k != STUDY_KEY},
                                         skip_if_exists=False)
            self.suggest(trial_id)
            return
        self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, asked._trial_id)  # noqa: SLF001
        if asked.state.is_finished():
            self._completed_trials.add(trial_id)  # noqa: SLF001
        if asked.state == TrialState.FAIL and trial.status != "TERMINATED":  # Tune runs it: a new Optuna trial
            self.failed.add(trial_id)

    def ended(self, trial_id: str, trial: SnapshotTrial) -> None:
        """A trial Tune had ended in the snapshot it restores, but this searcher was never told: Tune will not end
        it again, so it is told now, valued at its best epoch (as on_trial_complete values it)."""
        if trial_id in self._completed_trials or trial_id in self.untold:  # noqa: SLF001
            return
        stored = self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id)  # noqa: SLF001
        if stored.state.is_finished():
            self._completed_trials.add(trial_id)  # noqa: SLF001
            return
        values = [*stored.intermediate_values.values(), self.best.get(trial_id), trial.best(self.metric)]
        if values := [v for v in values if v is not None]:
            self.best[trial_id] = max(values)
        self.on_trial_complete(trial_id, trial.last_result or None)

    def failed_before(self) -> set[str]:
        """The trials told FAIL, read from the study: a searcher saved before it kept them (failed) had none."""
        storage = self._ot_study._storage
        return {t for t in self._completed_trials if t in self._ot_trials  # noqa: SLF001
                and storage.get_trial(self._ot_trials[t]._trial_id).state == TrialState.FAIL}

    def _stored(self, trial_id: str, what: str, write, *args, **kwargs) -> bool:
        """Make one write to the study; a failure is reported as the sweep's infrastructure problem (infra.py), so
        the sweep stops there (a refused tell is made again on restore: retell; a refused epoch value is lost to
        the study's curve only, which TPE does not read)."""
        try:
            write(*args, **kwargs)
            return True
        except Exception as e:  # noqa: BLE001 - a storage down or refusing; the guard stops the sweep
            where = hide_password(self._storage.url) if self._storage is not None else "in memory"
            report_problem(f"Optuna storage {where} failed to record {what} of trial {trial_id}: {short_error(e)}")
            return False


class MultiStudySearcher(Searcher):
    def __init__(self, spaces: dict, trials_per_study: int, max_concurrent: int, metric: str, mode: str = "max",
                 seed: int = 0, storage_url: str | None = None, sweep: str = "sweep"):
        super().__init__(metric=metric, mode=mode)
        self.trials_per_study = trials_per_study
        self.max_concurrent = max_concurrent
        storage = open_storage(storage_url) if storage_url else None
        self.searches = {name: StudySearch(space=space, metric=metric, mode=mode, seed=seed + i, storage=storage,
                                           study_name=optuna_study_name(sweep, name) if storage else name)
                         for i, (name, space) in enumerate(spaces.items())}
        self.owner: dict[str, str] = {}  # trial id -> study name
        self.live: set[str] = set()

    def suggest(self, trial_id: str):
        if len(self.live) >= self.max_concurrent:
            return None
        counts = Counter(self.owner.values())
        open_studies = [s for s in self.searches if counts[s] < self.trials_per_study]
        if not open_studies:
            return Searcher.FINISHED
        study = min(open_studies, key=lambda s: counts[s])  # ties: spec order
        config = self.searches[study].suggest(trial_id)
        self.owner[trial_id] = study
        self.live.add(trial_id)
        return {**config, STUDY_KEY: study}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner and self.metric in result:
            self.searches[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.owner:
            return
        self.live.discard(trial_id)
        self.searches[self.owner[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True

    def trial_counts(self) -> dict[str, int]:
        counts = Counter(self.owner.values())
        return {s: counts[s] for s in self.searches}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        for search in self.searches.values():
            if "failed" not in search.__dict__:  # a searcher saved before failed trials were kept
                search.failed = search.failed_before()
            search.__dict__.setdefault("untold", {})
        if (trials := snapshot_trials(str(Path(checkpoint_path).parent))) is not None:  # Tune restores them from there
            self.agree_with(trials)
        for search in self.searches.values():
            for trial_id in list(search.untold):
                search.retell(trial_id)
            if search._storage is not None:  # noqa: SLF001 - None: the study lives in memory only
                # a failed trial's Optuna trial is finished, but no result of its rerun may be dropped as told
                search.told = settle_restored(search._storage, search._study_name,  # noqa: SLF001
                                              self.live - search.failed)
            for trial_id in sorted(search.failed):  # Tune runs them again (resume_errored): the cap counts them
                search.rerun(trial_id)
                self.live.add(trial_id)

    def agree_with(self, trials: dict[str, SnapshotTrial]) -> None:
        """Tune's trial states rule: a driver stopped between writing them and the searcher's state restores the
        two from different moments. Trials Tune lacks are forgotten (their slots are asked afresh); trials it has
        are owned by their study (a study whose trial nobody owned asked one too many), told if Tune had ended
        them; the trials Tune runs on are the live ones (failed ones join them as they are run again)."""
        for trial_id in set(self.owner) - set(trials):
            self.searches[self.owner.pop(trial_id)].forget(trial_id)
        for trial_id, trial in trials.items():
            search = self.searches.get(self.owner.get(trial_id, trial.study))
            if search is None:
                continue
            if trial_id not in self.owner or (trial.status == "TERMINATED" and trial_id in search.failed):
                self.owner[trial_id] = self.owner.get(trial_id, trial.study)
                search.adopt(trial_id, trial)
            if trial.status == "TERMINATED":
                search.ended(trial_id, trial)
        self.live = {t for t, trial in trials.items() if t in self.owner and trial.status != "TERMINATED"
                     and t not in self.searches[self.owner[t]].failed}
