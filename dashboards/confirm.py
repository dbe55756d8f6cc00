"""Seed noise: mean +- std of test top-1 over the ``attzoom confirm`` re-runs of each study's best config.

Rule for "beyond seed noise": a variant's difference from its baseline (same backbone and data
set) in mean test top-1 is *beyond* seed noise when |diff| > 2 * pooled std, the pooled std being
sqrt((s_baseline^2 + s_variant^2) / 2) with each s the sample std (ddof 1) over that study's seeds;
otherwise it is *within*. With fewer than two seeds on either side there is no noise estimate
and the verdict is "unknown". Test scores come from each confirm run's best checkpoint
(evaluated once on the official test split and logged to the run, as for best trials).
"""

from __future__ import annotations

import math
import statistics

from mlflow.tracking import MlflowClient

from tune_jobs import layout
from tune_jobs.layout import SEED, STUDY

from .runs import Sweep
from .testset import test_metrics

NOISE_FACTOR = 2.0
NOISE_RULE = ("Each study's best config re-trained with seeds 1..K (`attzoom confirm`): mean ± sample std of test "
              "top-1 (%) over the seeds. A difference from the baseline is beyond seed noise when |Δ| > 2 × pooled "
              "std (sqrt of the mean of the two variances), within it otherwise; unknown with fewer than 2 seeds.")


def seed_scores(sweep: Sweep, data_root: str | None = None) -> tuple[dict[str, dict[int, float]], list[str]]:
    """{study: {seed: test top-1}} over finished confirm runs; notes for runs that could not be scored."""
    client = MlflowClient(sweep.tracking_uri)
    runs = client.search_runs([sweep.experiment_id], layout.runs_filter(layout.CONFIRM_ROLE, finished=True),
                              max_results=layout.MAX_RUNS)
    scores: dict[str, dict[int, float]] = {}
    notes = []
    for run in runs:
        result, note = test_metrics(sweep.tracking_uri, run.info.run_id, data_root)
        if note:
            notes.append(f"confirm {run.data.tags[STUDY]} seed {run.data.tags.get(SEED)}: {note}")
        elif not math.isnan(result["test_top1"]):
            scores.setdefault(run.data.tags[STUDY], {})[int(run.data.tags[SEED])] = result["test_top1"]
    return scores, notes


def confirm_rows(sweep: Sweep, data_root: str | None = None) -> tuple[list[dict], list[str]]:
    """One row per study with confirm runs: seeds, mean +- std, difference from baseline and its verdict."""
    scores, notes = seed_scores(sweep, data_root)
    stats = {name: (statistics.mean(v.values()), statistics.stdev(v.values()) if len(v) > 1 else math.nan, sorted(v))
             for name, v in scores.items()}
    baselines = {(s.backbone, s.dataset): s.name for s in sweep.studies if s.variant == "baseline"}
    rows = []
    for study in sweep.studies:
        if study.name not in stats:
            continue
        mean, std, seeds = stats[study.name]
        row = {"study": study.name, "seeds": ", ".join(map(str, seeds)), "test top-1 mean ± std": f"{mean:.2f} ± "
               f"{std:.2f}" if not math.isnan(std) else f"{mean:.2f} ± –", "Δ vs baseline": "–", "seed noise": "–"}
        base = baselines.get((study.backbone, study.dataset))
        if study.variant != "baseline" and base in stats:
            b_mean, b_std, _ = stats[base]
            diff = mean - b_mean
            row["Δ vs baseline"] = f"{diff:+.2f}"
            row["seed noise"] = verdict(diff, b_std, std)
        rows.append(row)
    return rows, notes


def verdict(diff: float, std_a: float, std_b: float) -> str:
    """'beyond' when |diff| > NOISE_FACTOR * pooled std, 'within' otherwise, 'unknown' without two stds."""
    if math.isnan(std_a) or math.isnan(std_b):
        return "unknown"
    pooled = math.sqrt((std_a ** 2 + std_b ** 2) / 2)
    return "beyond" if abs(diff) > NOISE_FACTOR * pooled else "within"
