"""The best trial of every study and the comparison shaped like the paper's Tables 1 and 2.

Our numbers are test-set top-1 / top-5 (%) of each study's best trial, the trial chosen on
validation top-1 (between trials, ties by top-5; a trial's best epoch is its first at its best
top-1, the epoch of its checkpoint); each variant is compared with the baseline of the same
backbone and data set, and the paper's published numbers stand beside ours where it has them.
"""

from __future__ import annotations

import math

import pandas as pd

from tune_jobs.layout import TRIAL
from tune_jobs.space import GATED, SEARCHABLE

from .published import protocol_differences, published
from .runs import Sweep
from .testset import test_metrics

HYPERPARAMETERS = (*SEARCHABLE, "epochs")


def best_trials(sweep: Sweep, data_root: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One row per study (best trial, its test scores, difference from baseline, paper's numbers); notes."""
    rows, notes = [], []
    for study in sweep.studies:
        best = study.best
        row = {"study": study.name, "backbone": study.backbone, "dataset": study.dataset, "variant": study.variant,
               "study_finished": study.finished, "trials_finished": study.count("FINISHED"),
               "trials_failed": study.count("FAILED"),
               "trials_stopped": study.count("KILLED"), "trials_running": study.running,
               "trials_pruned": study.pruned,
               "run_id": None, "trial_id": None, "best_epoch": math.nan, "val_top1": math.nan, "val_top5": math.nan,
               "test_top1": math.nan, "test_top5": math.nan}
        if best is not None:
            scores, note = test_metrics(sweep.tracking_uri, best.run_id, data_root)
            if note:
                notes.append(f"{study.name}: {note}")
            row.update(run_id=best.run_id, trial_id=best.run.data.tags.get(TRIAL), best_epoch=best.best["epoch"],
                       val_top1=best.best["val_top1"], val_top5=best.best["val_top5"], **scores)
            row.update({key: best.params.get(key) if applies(key, best.params, study.variant) else None
                        for key in HYPERPARAMETERS})
        paper = published(study.backbone, study.dataset, study.variant)
        if paper and best is not None and (differences := protocol_differences(best.params)):
            notes.append(f"{study.name}: its best trial was trained with {', '.join(differences)}; the paper's "
                         "numbers beside it were not (ImageNet stem, augmentation, 50 epochs, patience 5), so the gap "
                         "to them measures the protocol as much as the layer")
        row["paper_top1"], row["paper_top5"] = (paper[0], paper[1] if paper[1] is not None else math.nan) if paper \
            else (math.nan, math.nan)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, notes
    frame["best_epoch"] = frame["best_epoch"].astype("Int64")  # whole epochs in the CSV, also beside a missing one
    base = frame[frame.variant == "baseline"].set_index(["backbone", "dataset"])
    for k in ("top1", "top5"):
        reference = [base[f"test_{k}"].get((b, d), math.nan) for b, d in zip(frame.backbone, frame.dataset)]
        frame[f"test_{k}_vs_baseline"] = (frame[f"test_{k}"] - reference).where(frame.variant != "baseline")
    return frame, notes


def applies(key: str, params: dict, variant: str) -> bool:
    """Whether a logged setting had any effect: every run logs its full config, but momentum acts only with SGD,
    step_size only with StepLR, the threshold only with a gate and the position only where a layer is inserted."""
    condition = SEARCHABLE.get(key)
    if condition and params.get(condition[0]) != condition[1]:
        return False
    if key == "threshold":
        return variant in GATED
    return key != "position" or variant != "baseline"


def comparison(frame: pd.DataFrame) -> dict[str, list[dict[str, str]]]:
    """Per data set, one row per backbone: baseline, then each variant and its difference (test %)."""
    tables = {}
    for dataset, part in frame.groupby("dataset", sort=True):
        variants = ["baseline"] + sorted(v for v in part.variant.unique() if v != "baseline")
        has_paper = part.paper_top1.notna().any()
        rows = []
        for backbone, group in part.groupby("backbone", sort=True):
            by_variant = group.set_index("variant")
            row = {"backbone": backbone}
            for variant in variants:
                if variant not in by_variant.index:
                    row[variant] = "–"
                    if variant != "baseline":
                        row[f"{variant} Δ"] = "–"
                    continue
                r = by_variant.loc[variant]
                row[variant] = pair(r.test_top1, r.test_top5)
                if variant != "baseline":
                    row[f"{variant} Δ"] = pair(r.test_top1_vs_baseline, r.test_top5_vs_baseline, signed=True)
            if has_paper:
                paper_base = published(backbone, dataset, "baseline")
                paper_att = published(backbone, dataset, "attzoom")
                row["paper baseline"] = pair(*paper_base) if paper_base else "–"
                row["paper attzoom"] = pair(*paper_att) if paper_att else "–"
                row["paper attzoom Δ"] = pair(paper_att[0] - paper_base[0],
                                              _minus(paper_att[1], paper_base[1]), signed=True) \
                    if paper_base and paper_att else "–"
            rows.append(row)
        tables[dataset] = rows
    return tables


def _minus(a, b):
    return None if a is None or b is None else a - b


def number(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def pair(top1, top5, signed: bool = False) -> str:
    """'top-1 / top-5' as the paper prints them; a missing number is a dash."""
    return f"{number(top1, signed)} / {number(top5, signed)}"


def markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of string cells (pandas' to_markdown needs tabulate)."""
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i, _ in enumerate(columns)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)
