"""Was AttZoom's gate doing anything? Per gated study: its threshold and how open the gate was.

Where sigmoid(A) reaches the threshold, f(A) = 1 and no gradient reaches the attention conv; a
gate open at (nearly) every position stays open, and the layer trains as the zoom-only control.
Each epoch's validation pass logs the share of fully open positions (``gate_open``, %) and the
mean of sigmoid(A) (``gate_sigma``); this reads them for each gated study's best trial and for
the seed re-runs of its config, and says so in words when the gate was open almost everywhere.
"""

from __future__ import annotations

import statistics

from tune_jobs.layout import SEED

from .runs import Sweep, curves

GATED = ("attzoom", "attention-only")
OPEN_LIMIT = 99.0  # % of positions: above it, the gate did (almost) nothing


def gate_rows(sweep: Sweep) -> tuple[list[dict], list[str]]:
    """One row per gated study with a finished trial; warnings for gates that stayed open."""
    gated = [s for s in sweep.studies if s.variant in GATED and s.best is not None]
    gates = curves(sweep.tracking_uri, [s.best.run_id for s in gated], keys=("gate_open", "gate_sigma"))
    rows, warnings = [], []
    for study in gated:
        row, warning = gate_row(gates[study.best.run_id], study, seed_gates(study))
        rows.append(row)
        warnings += [warning] if warning else []
    return rows, warnings


def seed_gates(study) -> list[float]:
    """The last epoch's gate_open of each finished seed re-run of the study's best config, by seed."""
    by_seed = {int(t.run.data.tags.get(SEED, 0)): t.run.data.metrics["gate_open"] for t in study.best_confirms
               if "gate_open" in t.run.data.metrics}  # metrics: each key's last value
    return [by_seed[k] for k in sorted(by_seed)]


def gate_row(gates: dict, study, seeds: list[float]) -> tuple[dict, str | None]:
    """The study's row (its best trial's gate at its best and last epoch, its seed re-runs'), and a warning."""
    best = study.best
    opened, sigma = gates["gate_open"], gates["gate_sigma"]
    row = {"study": study.name, "threshold": _threshold(best.params.get("threshold"))}
    if not opened:
        return {**row, "open at best epoch (%)": "not logged"}, None
    epoch, last = best.best["epoch"], opened[max(opened)]
    row.update({"open at best epoch (%)": _pct(opened.get(epoch)), "open at last epoch (%)": _pct(last),
                "mean σ(A) at best epoch": _num(sigma.get(epoch)),
                "mean σ(A) at last epoch": _num(sigma.get(max(opened))),
                "seed re-runs, open at last epoch (%)": ", ".join(f"{v:.1f}" for v in seeds) or "–"})
    return row, _open_gate_warning(study, row["threshold"], last, statistics.mean(seeds) if seeds else None)


def _open_gate_warning(study, threshold: str, last: float, seed_mean: float | None) -> str | None:
    """Words for a gate open above OPEN_LIMIT, judged on the evidence the verdict uses: the seed re-runs where there
    are some (a best trial's saturated gate alone then touches only its best-of-N row), else the best trial."""
    acted = "the zoom-only control" if study.variant == "attzoom" else "the baseline (no zoom, no attention)"
    limit = f"more than {OPEN_LIMIT:.0f} % of validation positions; gate threshold {threshold}"
    if seed_mean is not None and seed_mean <= OPEN_LIMIT:
        if last <= OPEN_LIMIT:
            return None
        return (f"{study.name}: the best trial's gate ended fully open (f(A) = 1) at {last:.1f} % ({limit}), its seed "
                f"re-runs' at {seed_mean:.1f} % on average: the seed verdict stands, but the best-of-N row compares a "
                f"best trial that acted as {acted}.")
    if seed_mean is None and last <= OPEN_LIMIT:
        return None
    where = f"{last:.1f} % in the best trial" + (f" and {seed_mean:.1f} % on average in its seed re-runs"
                                                 if seed_mean is not None else "")
    return (f"{study.name}: the gate ended fully open (f(A) = 1) at {where} ({limit}). Where it is open the attention "
            f"gets no gradient: {study.variant} acted as {acted} here, so compare it with that, not only with the "
            "baseline.")


def _threshold(value: str | None) -> str:
    try:
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return "–"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
