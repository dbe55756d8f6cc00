"""Read a sweep back from MLflow alone: its studies (parent runs) and trials (child runs).

The report must work on a laptop that has only the tracking URI, so nothing here needs
the sweep spec, the Tune results or Ray. The layout read is the one the sweep's driver
writes, named in tune_jobs/layout.py (plain data, no Ray): one experiment per sweep, a
parent run per study, a child run per trial with per-epoch metrics (step = epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tune_jobs import layout
from tune_jobs.layout import GPU_IDS, MAX_RUNS, STUDY, best_epoch, experiment_name, no_sweep_named
from tune_jobs.space import same_config, searched_values
from tune_jobs.spec import hide_password
from tune_jobs.tracking import deleted_experiment

from .errors import ReportError
from .history import histories


@dataclass
class Trial:
    """One trial run: its parsed params, its per-epoch history and where its best epoch is."""

    run: Run
    history: dict[str, dict[int, float]]  # metric -> {epoch: value}
    best: dict | None  # {"epoch", "val_top1", "val_top5"}, None before the first epoch

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def status(self) -> str:
        return self.run.info.status

    @property
    def params(self) -> dict[str, str]:
        return self.run.data.params

    @property
    def epochs(self) -> int:
        return len(self.history.get("val_top1", {}))

    @property
    def hours(self) -> float:
        return sum(self.history.get("epoch_time", {}).values()) / 3600

    @property
    def gpus(self) -> float | None:
        """GPUs this trial held: its memory share when it shared one, else its GPU ids; None when unknown."""
        fraction = self.params.get("gpu_memory_fraction")
        if fraction not in (None, "None", ""):
            return float(fraction)
        ids = self.run.data.tags.get(GPU_IDS)
        if ids is None:
            return None
        return float(len([i for i in ids.split(",") if i.strip()]))


@dataclass
class Study:
    """One (backbone, dataset, variant) Optuna study: its parent run and its trials by start time."""

    name: str
    backbone: str
    dataset: str
    variant: str
    parent: Run | None
    trials: list[Trial] = field(default_factory=list)
    confirms: list[Trial] = field(default_factory=list)  # seed re-runs of its best config (attzoom confirm)

    @property
    def finished(self) -> bool:
        return self.parent is not None and self.parent.info.status == "FINISHED"

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)

    @property
    def running(self) -> int:
        """Trials still open: not finished, failed or stopped (KILLED: a Ctrl-C'd sweep's, waiting for a resume)."""
        return len(self.trials) - self.count("FINISHED") - self.count("FAILED") - self.count("KILLED")

    @property
    def pruned(self) -> int:
        """Finished trials the scheduler (ASHA) stopped early: counted as finished, with fewer epochs."""
        return sum(layout.stopped_early(t.status, t.run.data.tags) for t in self.trials)

    @property
    def best(self) -> Trial | None:
        """The finished trial whose best epoch ranks highest (layout.best_of; trials are in start order)."""
        return layout.best_of((t, t.best) for t in self.trials if t.status == "FINISHED")

    @property
    def best_confirms(self) -> list[Trial]:
        """Its finished seed re-runs of its best trial's config: not those of an earlier best that a resume beat, nor
        those with the seed the best trial itself trained with (an older confirm trained it: tune_jobs.confirm)."""
        return self._confirms_of_best(own_seed=False)

    @property
    def repeated_confirms(self) -> list[Trial]:
        """Finished re-runs of its best config with the best trial's own seed: the selected trial again."""
        return self._confirms_of_best(own_seed=True)

    @property
    def unfinished_confirm_seeds(self) -> list[str]:
        """Seeds of its best config whose confirm runs all stopped, failed or still run: a confirm cut short."""
        finished = {t.run.data.tags.get(layout.SEED) for t in self._confirms_of_best()}
        return sorted({t.run.data.tags.get(layout.SEED, "?") for t in self._confirms_of_best(finished=False)}
                      - finished, key=lambda seed: (len(seed), seed))

    def _confirms_of_best(self, finished: bool = True, own_seed: bool | None = None) -> list[Trial]:
        """Its confirm runs of its best config, finished or not; ``own_seed``: only those with (True) or without
        (False) the seed the best trial trained with."""
        best = self.best
        if best is None:
            return []
        config, seed = searched_values(best.params), best.params.get("seed")
        return [t for t in self.confirms
                if (t.status == "FINISHED") == finished and same_config(t.params, config)
                and (own_seed is None or (t.run.data.tags.get(layout.SEED) == seed) == own_seed)]


@dataclass
class Sweep:
    name: str
    tracking_uri: str
    experiment_id: str
    studies: list[Study]

    @property
    def unfinished(self) -> list[Study]:
        return [s for s in self.studies if not s.finished]


def load_sweep(tracking_uri: str, sweep: str) -> Sweep:
    """Every study and trial of a sweep, as the tracking store holds it now (finished or not)."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(sweep))
    if experiment is None:
        raise ReportError(no_sweep_named(sweep, hide_password(tracking_uri),
                                         [e.name for e in client.search_experiments()]))
    if experiment.lifecycle_stage == "deleted":  # its runs read as none: an empty report, exit 0
        raise ReportError(deleted_experiment(sweep, experiment, tracking_uri))
    eid = experiment.experiment_id
    studies: dict[str, Study] = {}
    for run in client.search_runs([eid], layout.runs_filter(layout.STUDY_ROLE), max_results=MAX_RUNS):
        studies[run.data.tags[STUDY]] = _study(run.data.tags, run)
    trials = client.search_runs([eid], layout.runs_filter(layout.TRIAL_ROLE), max_results=MAX_RUNS,
                                order_by=["attributes.start_time ASC"])
    confirms = client.search_runs([eid], layout.runs_filter(layout.CONFIRM_ROLE), max_results=MAX_RUNS,
                                  order_by=["attributes.start_time ASC"])
    runs = [*trials, *confirms]
    for run, (trial_history, best) in zip(runs, _histories(client, runs)):
        name = run.data.tags[STUDY]
        study = studies.setdefault(name, _study(run.data.tags, None))
        trial = Trial(run, trial_history, best)
        (study.confirms if run.data.tags.get(layout.ROLE) == layout.CONFIRM_ROLE else study.trials).append(trial)
    ordered = sorted(studies.values(), key=lambda s: (s.dataset, s.backbone, s.variant != "baseline", s.variant))
    return Sweep(sweep, tracking_uri, eid, ordered)


def _summary(run: Run, top1: dict[int, float]) -> dict | None:
    """The run's summary, unless it names another epoch than the one best.pt holds (its history says which): a
    version before this rule summed a later top-1 tie with a better top-5 as the best epoch."""
    summary = layout.summary_of(run.data.metrics)
    if summary is not None and top1 and summary["epoch"] != best_epoch(top1, {})["epoch"]:
        return None
    return summary


def _study(tags: dict, parent: Run | None) -> Study:
    return Study(tags[STUDY], tags.get(layout.BACKBONE, "?"), tags.get(layout.DATASET, "?"),
                 tags.get(layout.VARIANT, "?"), parent)


def _histories(client: MlflowClient, runs: list[Run]) -> list[tuple[dict[str, dict[int, float]], dict]]:
    """Each run's (history, best epoch): val_top1 and epoch_time by epoch, in one bulk read per metric; the best
    epoch from its summary, or, for runs without a summary it can take (none, or an older version's: _summary),
    from their history, with val_top5 read for those runs only."""
    ids = [run.info.run_id for run in runs]
    by_key = {key: histories(client, ids, key) for key in ("val_top1", "epoch_time")}
    summaries = [_summary(run, by_key["val_top1"].get(run_id, {})) for run, run_id in zip(runs, ids)]
    unsummarised = [run_id for run_id, summary in zip(ids, summaries) if summary is None]
    by_key["val_top5"] = histories(client, unsummarised, "val_top5") if unsummarised else {}
    found = [{key: by_run.get(run_id, {}) for key, by_run in by_key.items()} for run_id in ids]
    return [(history, summary or best_epoch(history["val_top1"], history["val_top5"]))
            for history, summary in zip(found, summaries)]


def curves(tracking_uri: str, run_ids: list[str], keys=("val_top1", "train_loss")) -> dict[str, dict]:
    """{run id: {metric: {epoch: value}}} of a few metrics of some runs (the learning curves of best trials)."""
    client = MlflowClient(tracking_uri)
    by_key = {key: histories(client, run_ids, key) for key in keys}
    return {run_id: {key: by_key[key][run_id] for key in keys} for run_id in run_ids}
