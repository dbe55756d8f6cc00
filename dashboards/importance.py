"""Optuna's view of a study rebuilt from MLflow: optimisation history and hyperparameter importance.

The sweep's own Optuna state lives inside Ray Tune's searcher checkpoint, which a laptop
does not have; the trial runs hold everything importance needs (params, and the best
validation top-1 as the objective), so an in-memory study is rebuilt from them with the
paper's conditional space (momentum only for SGD, step size only for StepLR; Sec. 5.3).
Only what was searched counts: a parameter with a single value in a study was fixed.
"""

from __future__ import annotations

import math

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from attzoom.names import POSITIONS
from tune_jobs.naming import counted
from tune_jobs.space import SEARCHABLE
from tune_jobs.spec import SearchSpace

from .runs import Study, Trial

_PAPER = SearchSpace()  # the paper's ranges, as tune_jobs searches them by default
_KINDS_AND_RANGES = {
    "batch_size": ("int-choice", _PAPER.batch_sizes), "lr": ("log", _PAPER.lr),
    "weight_decay": ("log", _PAPER.weight_decay), "optimizer": ("choice", _PAPER.optimizers),
    "momentum": ("float", _PAPER.momentum), "scheduler": ("choice", _PAPER.schedulers),
    "step_size": ("int", _PAPER.step_size), "threshold": ("float", (0.0, 1.0)), "position": ("choice", POSITIONS),
}
# name -> (kind, range or choices, the (parameter, value) under which it exists)
SPACE = {name: (*_KINDS_AND_RANGES[name], condition) for name, condition in SEARCHABLE.items()}


def optuna_study(study: Study) -> optuna.Study:
    """An in-memory Optuna study: finished trials COMPLETE (value = best val top-1), failed ones FAIL."""
    searched = searched_params(study)
    distributions = {name: distribution(name, [_parse(name, t.params[name]) for t in study.trials
                                               if name in t.params]) for name in searched}
    result = optuna.create_study(direction="maximize", study_name=study.name)
    for trial in study.trials:
        if trial.status not in ("FINISHED", "FAILED"):
            continue
        params = {name: _parse(name, trial.params[name]) for name in searched
                  if name in trial.params and _applies(name, trial)}
        done = trial.status == "FINISHED" and trial.best is not None
        result.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params},
            value=trial.best["val_top1"] if done else None, state=TrialState.COMPLETE if done else TrialState.FAIL,
            user_attrs={"run_id": trial.run_id}))
    return result


def searched_params(study: Study) -> list[str]:
    """The space's parameters that took more than one value across the study's trials."""
    names = []
    for name in SPACE:
        values = {t.params[name] for t in study.trials if name in t.params and _applies(name, t)}
        if len(values) > 1:
            names.append(name)
    return names


def _applies(name: str, trial: Trial) -> bool:
    condition = SPACE[name][2]
    return condition is None or trial.params.get(condition[0]) == condition[1]


def _parse(name: str, value: str):
    kind = SPACE[name][0]
    if kind in ("int", "int-choice"):
        return int(float(value))
    if kind in ("log", "float"):
        return float(value)
    return value


def distribution(name: str, values: list):
    """The paper's range for ``name``, widened to hold every observed value (a spec may narrow or widen it)."""
    kind, space, _ = SPACE[name]
    if kind in ("choice", "int-choice"):
        return CategoricalDistribution(sorted(set(space) | set(values)))
    low, high = min([space[0], *values]), max([space[1], *values])
    if kind == "int":
        return IntDistribution(int(low), int(high))
    log = kind == "log" and low > 0
    return FloatDistribution(low, high, log=log)


MIN_TRIALS = 20  # below this, fANOVA's ranking of 5-8 hyperparameters is mostly noise


def importances(study: optuna.Study) -> tuple[dict[str, float], str | None]:
    """({param: importance}, None), or ({}, why not) when the study cannot support an estimate."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) < MIN_TRIALS:
        return {}, (f"not shown: {counted(len(complete), 'finished trial')}; a ranking of the hyperparameters needs "
                    f"{MIN_TRIALS} or more")
    if not any(len(t.params) for t in complete):
        return {}, "no searched hyperparameter"
    try:
        scores = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError) as e:
        return {}, f"not estimable ({e})"
    return {k: v for k, v in scores.items() if not math.isnan(v)}, None


def absent(finished: list[int]) -> str:
    """Why no study has an importance figure: the finished trials each has against the MIN_TRIALS fANOVA needs."""
    if not finished:
        return "no importance figure: the sweep has no study yet"
    if max(finished) >= MIN_TRIALS:
        return "no importance figure: no study's ranking could be estimated (the table gives each study's reason)"
    have = str(finished[0]) if min(finished) == max(finished) else f"{min(finished)} to {max(finished)}"
    studies = "its one study has" if len(finished) == 1 else "this sweep's studies have"
    return (f"no importance figure: a ranking needs at least {MIN_TRIALS} finished trials per study; {studies} "
            f"{have}")


def history(study: optuna.Study) -> list[tuple[int, float, float]]:
    """(trial number from 1, its value, best so far) for completed trials, numbered by start time."""
    rows, best = [], -math.inf
    for number, trial in enumerate(study.trials):
        if trial.state != TrialState.COMPLETE:
            continue
        best = max(best, trial.value)
        rows.append((number + 1, trial.value, best))
    return rows
