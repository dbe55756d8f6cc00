"""Was AttZoom's gate doing anything? Per gated study: its threshold and how open the gate was.

Where sigmoid(A) reaches the threshold, f(A) = 1 and no gradient reaches the attention conv; a
gate open at (nearly) every position stays open, and the layer trains as the zoom-only control.
Each epoch's validation pass logs the share of fully open positions (``gate_open``, %) and the
mean of sigmoid(A) (``gate_sigma``); this reads them for each gated study's best trial and for
the seed re-runs of its config, and says so in words when the gate was open almost everywhere.
"""

from __future__ import annotations

import statistics

from mlflow.tracking import MlflowClient

from tune_jobs import layout
from tune_jobs.layout import SEED, STUDY

from .runs import Sweep

GATED = ("attzoom", "attention-only")
OPEN_LIMIT = 99.0  # % of positions: above it, the gate did (almost) nothing


def gate_rows(sweep: Sweep) -> tuple[list[dict], list[str]]:
    """One row per gated study with a finished trial; warnings for gates that stayed open."""
    client = MlflowClient(sweep.tracking_uri)
    confirms = client.search_runs([sweep.experiment_id], layout.runs_filter(layout.CONFIRM_ROLE, finished=True),
                                  max_results=layout.MAX_RUNS)
    by_seed: dict[str, dict[int, float]] = {}
    for run in confirms:
        last = run.data.metrics.get("gate_open")  # the last epoch's value
        if last is not None:
            by_seed.setdefault(run.data.tags[STUDY], {})[int(run.data.tags.get(SEED, 0))] = last
    seeds = {study: [values[k] for k in sorted(values)] for study, values in by_seed.items()}
    rows, warnings = [], []
    for study in sweep.studies:
        best = study.best
        if study.variant not in GATED or best is None:
            continue
        opened = {m.step: m.value for m in client.get_metric_history(best.run_id, "gate_open")}
        sigma = {m.step: m.value for m in client.get_metric_history(best.run_id, "gate_sigma")}
        row = {"study": study.name, "threshold": best.params.get("threshold", "–")}
        if not opened:
            rows.append({**row, "open at best epoch (%)": "not logged"})
            continue
        epoch, last = best.best["epoch"], max(opened)
        row.update({"open at best epoch (%)": _pct(opened.get(epoch)), "open at last epoch (%)": _pct(opened[last]),
                    "mean σ(A) at best epoch": _num(sigma.get(epoch)),
                    "seeds 1.., open at last epoch (%)": ", ".join(f"{v:.1f}" for v in seeds.get(study.name, []))
                    or "–"})
        rows.append(row)
        ends = [opened[last], *seeds.get(study.name, [])]
        if statistics.mean(ends) > OPEN_LIMIT:
            warnings.append(f"{study.name}: the gate ended fully open (f(A) = 1) at {statistics.mean(ends):.1f} % of "
                            f"validation positions (threshold {row['threshold']}); AttZoom acted as zoom-only here, "
                            "so compare it with the zoom-only control, not only with the baseline.")
    return rows, warnings


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
