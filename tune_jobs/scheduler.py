"""Early stopping of hopeless trials ([scheduler] kind = "asha"), with rungs kept per study.

Tune's ASHA keeps one set of rungs for the whole experiment, and a sweep is one experiment
over many studies: a ResNet-50 on Tiny-ImageNet would be stopped for trailing MobileNets on
CIFAR-100. StudyASHA holds one Tune AsyncHyperBandScheduler per study and hands each trial
to its own study's.

A pruned trial is a finished trial of its study. When the scheduler stops it, the trial's
last result is marked with STATUS_KEY = PRUNED_STATUS (by PrunedTrials, a callback that runs
after the MLflow logger has logged that epoch), so everything that asks "did the trial end?"
(trainable.reported_end and ended, the MLflow run's status, the progress display) sees it end
there; the searcher tells Optuna it was PRUNED (value: its last epoch's).

Tune saves no scheduler in its experiment snapshots: on a resume it would start with empty
rungs. PrunedTrials carries the scheduler's state in the snapshot (Tune saves callback state
with the trials of the same snapshot), and Tune restores it before it re-adds the trials.
"""

from __future__ import annotations

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from .layout import PRUNED_STATUS
from .space import STUDY_KEY
from .spec import Spec
from .trainable import RESTART_KEY, STATUS_KEY


class StudyASHA(FIFOScheduler):
    """ASHA per study (by the trial's config[STUDY_KEY]); trials start in the order the searcher asks them."""

    def __init__(self, metric: str, mode: str, max_epochs: int, grace_period: int, reduction_factor: float):
        super().__init__()
        self.options = dict(time_attr="epoch", metric=metric, mode=mode, max_t=max_epochs, grace_period=grace_period,
                            reduction_factor=reduction_factor, stop_last_trials=False)
        self.max_epochs = max_epochs
        self.studies: dict[str, AsyncHyperBandScheduler] = {}
        self.pruned: dict[str, int] = {}  # trial id -> the epoch it was stopped after

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # metric and mode are the spec's, given above

    def _asha(self, trial) -> AsyncHyperBandScheduler:
        study = trial.config[STUDY_KEY]
        if study not in self.studies:
            self.studies[study] = AsyncHyperBandScheduler(**self.options)
        return self.studies[study]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        epoch = result.get("epoch")
        # only a finished epoch counts: not the report that says how fit ended (it repeats the last epoch), not
        # a restart's; and a trial at its last epoch ends by itself
        if epoch is None or STATUS_KEY in result or RESTART_KEY in result or epoch >= self.max_epochs:
            return TrialScheduler.CONTINUE
        if trial.trial_id in self.pruned:  # stopped just before a kill whose snapshot still had it running: its
            return TrialScheduler.STOP  # rung is recorded, so ASHA alone would let it train to the end
        decision = self._asha(trial).on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            self.pruned[trial.trial_id] = int(epoch)
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._forget(trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._forget(trial)

    def _forget(self, trial) -> None:
        """Its rung values stay (later trials are measured against them); only its bracket entry goes."""
        self._asha(trial)._trial_info.pop(trial.trial_id, None)  # noqa: SLF001 - ASHA's own trial -> bracket map

    def debug_string(self) -> str:
        return "\n".join(f"{study}: {asha.debug_string()}" for study, asha in self.studies.items())

    def state(self) -> dict:
        return {"studies": self.studies, "pruned": self.pruned}

    def load(self, state: dict) -> None:
        self.studies, self.pruned = state["studies"], state["pruned"]


class PrunedTrials(tune.Callback):
    """Marks a trial the scheduler stopped as ended (PRUNED_STATUS), and keeps the scheduler's state in Tune's
    experiment snapshots. Listed after the MLflow logger and the progress display, before Tune's file loggers."""

    def __init__(self, scheduler: StudyASHA):
        self.scheduler = scheduler

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # Tune hands every callback the same result and keeps it as the trial's last result afterwards
        if result.get("done") and STATUS_KEY not in result and trial.trial_id in self.scheduler.pruned:
            result[STATUS_KEY] = PRUNED_STATUS

    def get_state(self) -> dict:
        return self.scheduler.state()

    def set_state(self, state: dict) -> None:
        self.scheduler.load(state)


def early_stopping(spec: Spec) -> tuple[StudyASHA | None, list[tune.Callback]]:
    """The sweep's scheduler and the callback that goes with it; (None, []) for the paper's protocol."""
    if spec.scheduler.kind == "none":
        return None, []
    scheduler = StudyASHA(spec.metric, "max", spec.epochs, spec.scheduler.grace_period,
                          spec.scheduler.reduction_factor)
    return scheduler, [PrunedTrials(scheduler)]
