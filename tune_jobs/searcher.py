"""One Tune Searcher over many studies: each study its own seeded OptunaSearch (TPE).

A sweep is several studies that share one cluster. Running them as one Tune experiment
lets one searcher keep the cluster busy: each new trial goes to the study with the fewest
trials so far, results go back to the study that owns the trial, and FINISHED comes once
every study has its N trials. The global cap on concurrent trials lives here too (rather
than in a ConcurrencyLimiter, whose live-trial set is not saved) so that after a restore
the trials Tune resumes still count against the cap and still report to their study.
"""

from __future__ import annotations

import pickle
from collections import Counter

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from .space import STUDY_KEY


class MultiStudySearcher(Searcher):
    def __init__(self, spaces: dict, trials_per_study: int, max_concurrent: int, metric: str, mode: str = "max",
                 seed: int = 0):
        super().__init__(metric=metric, mode=mode)
        self.trials_per_study = trials_per_study
        self.max_concurrent = max_concurrent
        self.searches = {name: OptunaSearch(space=space, metric=metric, mode=mode, seed=seed + i, study_name=name)
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
