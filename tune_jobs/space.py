"""The paper's conditional search space, written define-by-run for OptunaSearch.

Momentum exists only for SGD and the step size only for StepLR, so the space is a
function of the trial rather than a flat dict. It is a small class, not a closure,
so that OptunaSearch can pickle it with the searcher state on every experiment snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

from attzoom.config import TrainConfig

from .spec import SearchSpace, Study

GATED = ("attzoom", "attention-only")
STUDY_KEY = "study"  # the key of a trial's Tune config that names its study (the searcher adds it)
# Every parameter a study may search, and the (parameter, value) under which it exists (Sec. 5.3).
SEARCHABLE = {"batch_size": None, "lr": None, "weight_decay": None, "optimizer": None,
              "momentum": ("optimizer", "sgd"), "scheduler": None, "step_size": ("scheduler", "step"),
              "threshold": None, "position": None}


def searched_values(params: dict[str, str]) -> dict:
    """The searchable part of a run's logged TrainConfig, typed back from MLflow's strings: what makes a confirm
    run a re-run of a trial's config, whatever their seeds."""
    return TrainConfig.parse_params({k: v for k, v in params.items() if k in SEARCHABLE})


def same_config(params: dict[str, str], config: dict) -> bool:
    """Whether a run's logged params hold ``config`` (searched values), on the keys both know: a run logged before
    a parameter became searchable is not told apart by it."""
    values = searched_values(params)
    return all(values[k] == v for k, v in config.items() if k in values)


@dataclass(frozen=True)
class StudySpace:
    search: SearchSpace
    variant: str

    def __call__(self, trial) -> None:
        s = self.search
        trial.suggest_categorical("batch_size", list(s.batch_sizes))
        trial.suggest_float("lr", *s.lr, log=True)
        trial.suggest_float("weight_decay", *s.weight_decay, log=True)
        if trial.suggest_categorical("optimizer", list(s.optimizers)) == "sgd":
            trial.suggest_float("momentum", *s.momentum)
        if trial.suggest_categorical("scheduler", list(s.schedulers)) == "step":
            trial.suggest_int("step_size", *s.step_size)
        if s.threshold and self.variant in GATED:
            trial.suggest_float("threshold", *s.threshold)
        if s.positions and self.variant != "baseline":
            trial.suggest_categorical("position", list(s.positions))


def study_space(search: SearchSpace, study: Study) -> StudySpace:
    return StudySpace(search, study.variant)
