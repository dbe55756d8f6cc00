"""Seed noise: mean +- std of test top-1 over the ``attzoom confirm`` re-runs of each study's best config.

A variant's difference from its baseline (same backbone and data set) is told with the rule of
the report's headline (dashboards/verdict.py): Welch's 95 % interval of the difference of seed
means, beyond noise when it excludes zero. Test scores come from each confirm run's best
checkpoint (evaluated once on the official test split and logged to the run, as for best trials).
"""

from __future__ import annotations

import math

from tune_jobs.layout import SEED, STUDY

from .runs import Sweep
from .testset import test_metrics
from .verdict import Seeds, difference, noise_verdict, with_interval


def seed_scores(sweep: Sweep, data_root: str | None = None) -> tuple[dict[str, dict[int, float]], list[str]]:
    """{study: {seed: test top-1}} over finished confirm runs of each study's best config; notes for runs that could
    not be scored or re-trained an earlier best."""
    scores: dict[str, dict[int, float]] = {}
    notes = []
    for study in sweep.studies:
        current, repeats = study.best_confirms, study.repeated_confirms
        stale = sum(t.status == "FINISHED" for t in study.confirms) - len(current) - len(repeats)
        if repeats:
            seeds = ", ".join(sorted({t.run.data.tags.get(SEED, "?") for t in repeats}))
            notes.append(f"{study.name}: the confirm run(s) of seed {seeds} left out: the sweep trained its best trial "
                         "with that seed, so they repeat the selected trial and its luck; `attzoom confirm` trains "
                         "another seed")
        if cut := study.unfinished_confirm_seeds:
            notes.append(f"{study.name}: confirm seed {', '.join(cut)} did not finish (stopped, failed or still "
                         f"running), so its seed mean stands on {len(current)} seed(s); run `attzoom confirm` again "
                         "with the same --seeds to finish it")
        if stale:
            runs = "runs" if stale > 1 else "run"
            notes.append(f"{study.name}: {stale} confirm {runs} re-trained an earlier best config, left out; "
                         "`attzoom confirm` trains the current one's seeds")
        notes += _score(sweep, [t.run for t in current], scores, data_root)
    return scores, notes


def _score(sweep: Sweep, runs: list, scores: dict[str, dict[int, float]], data_root: str | None) -> list[str]:
    """Adds each confirm run's test top-1 to ``scores``; notes for those without one."""
    notes = []
    for run in runs:
        result, note = test_metrics(sweep.tracking_uri, run.info.run_id, data_root)
        which = f"confirm {run.data.tags[STUDY]} seed {run.data.tags.get(SEED)}"
        if note:  # a score that could not be logged still counts; one that could not be computed does not
            notes.append(f"{which}: {note}")
        if not math.isnan(result["test_top1"]):
            scores.setdefault(run.data.tags[STUDY], {})[int(run.data.tags[SEED])] = result["test_top1"]
        elif not note:
            notes.append(f"{which}: no test score; left out")
    return notes


def confirm_rows(sweep: Sweep, scores: dict[str, dict[int, float]]) -> list[dict]:
    """One row per study with confirm runs: seeds, mean +- std, difference from baseline and its verdict."""
    seeds = {name: Seeds(tuple(v[k] for k in sorted(v))) for name, v in scores.items()}
    baselines = {(s.backbone, s.dataset): s.name for s in sweep.studies if s.variant == "baseline"}
    rows = []
    for study in sweep.studies:
        if study.name not in seeds:
            continue
        ours = seeds[study.name]
        row = {"study": study.name, "seeds": ", ".join(map(str, sorted(scores[study.name]))),
               "test top-1 mean ± std": ours.spread(), "Δ vs baseline [95 % CI]": "–",
               "seed noise": "–"}
        base = baselines.get((study.backbone, study.dataset))
        if study.variant != "baseline" and base in seeds:
            diff, low, high = difference(ours, seeds[base])
            row["Δ vs baseline [95 % CI]"] = with_interval(diff, low, high)
            row["seed noise"] = noise_verdict(low, high)
        rows.append(row)
    return rows
