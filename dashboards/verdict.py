"""The report's headline: does AttZoom help this CNN on this data set, told from the strongest evidence there is.

With seed re-runs (``attzoom confirm``) of AttZoom's and another study's best configs, each
comparison is the difference of their seed means with its 95 % confidence interval, Welch's t
(made for a few seeds per side and unequal spreads): "beyond noise" when the interval excludes
zero, "within noise" when it does not. AttZoom is compared with the baseline and with every
control the sweep has (zoom-only, attention-only, resize2x), which tell whether a gain comes
from the gate or only from the larger resolution. Without seed re-runs the headline says that
it stands on one lucky-or-not trial per study, and gives the command that settles it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats as scipy_stats

from tune_jobs.layout import COMPARED_WITH, DECISIVE
from tune_jobs.spec import hide_password

from .published import published
from .runs import Sweep

AGAINST = COMPARED_WITH
LEVEL = 0.95
NO_DIFFERENCE = "–"  # a comparison with a side that has no test score yet (no finished trial, or none scored)
RULE = ("Test top-1 (%) of each study's best config re-trained with K new seeds (`attzoom confirm`), mean ± sample "
        "std over n seeds. Δ is AttZoom's seed mean minus the other's, with its 95 % confidence interval (Welch's "
        "t): beyond noise when the interval excludes 0, within noise when it does not.")


@dataclass(frozen=True)
class Seeds:
    """Test top-1 of one study's best config over its confirm seeds."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.mean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else math.nan

    def spread(self) -> str:
        return f"{self.mean:.2f} ± " + ("–" if math.isnan(self.std) else f"{self.std:.2f}")

    def __str__(self) -> str:
        return f"{self.spread()} (n={self.n})"


def difference(a: Seeds, b: Seeds, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean a - mean b, low, high) with Welch's t interval; NaN bounds with fewer than two seeds on a side."""
    diff = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return diff, math.nan, math.nan
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:  # identical scores on both sides: no estimate of the noise at all
        return diff, math.nan, math.nan
    dof = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    half = scipy_stats.t.ppf(0.5 + level / 2, dof) * se
    return diff, diff - half, diff + half


def with_interval(diff: float, low: float, high: float) -> str:
    """The difference and its interval; the difference alone where there is no interval (NaN bounds)."""
    return f"{diff:+.2f}" + ("" if math.isnan(low) or math.isnan(high) else f" [{low:+.2f}, {high:+.2f}]")


def noise_verdict(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "unknown (too few seeds, or no spread)"
    return "within noise" if low <= 0 <= high else "beyond noise"


def headline(sweep: Sweep, seeds: dict[str, dict[int, float]], best: dict[str, float]) -> tuple[list[dict], bool]:
    """One row per (backbone, data set, AttZoom vs another variant); whether every row is seed-confirmed.

    ``seeds``: {study: {seed: test top-1}} of confirm runs; ``best``: {study: test top-1 of its best trial}.
    """
    by_key = {(s.backbone, s.dataset, s.variant): s for s in sweep.studies}
    rows = []
    for study in sweep.studies:
        if study.variant == "attzoom":
            others = (by_key.get((study.backbone, study.dataset, variant)) for variant in AGAINST)
            rows += [compare(study, other, seeds, best) for other in others if other is not None]
    return rows, all(row["verdict"] != "not confirmed" for row in rows)


def compare(study, other, seeds: dict[str, dict[int, float]], best: dict[str, float]) -> dict:
    """AttZoom's study against another: from seed means when both have 2+ seeds, else from best trials, said so."""
    row = {"backbone": study.backbone, "data set": study.dataset, "AttZoom vs": other.variant}
    ours, theirs = seeds.get(study.name, {}), seeds.get(other.name, {})
    if len(ours) >= 2 and len(theirs) >= 2:
        a, b = Seeds(tuple(ours.values())), Seeds(tuple(theirs.values()))
        diff, low, high = difference(a, b)
        row.update({"AttZoom": str(a), "other": str(b), "Δ [95 % CI]": with_interval(diff, low, high),
                    "verdict": noise_verdict(low, high)})
    else:
        diff = best.get(study.name, math.nan) - best.get(other.name, math.nan)
        row.update({"AttZoom": _one(best.get(study.name)), "other": _one(best.get(other.name)),
                    "Δ [95 % CI]": NO_DIFFERENCE if math.isnan(diff) else f"{diff:+.2f} (best of N, 1 seed)",
                    "verdict": "not confirmed"})
    row["paper Δ"] = _paper_delta(study.backbone, study.dataset, other.variant)
    return row


def intro(sweep: Sweep, rows: list[dict], seeds: dict[str, int] | None = None) -> str:
    """What the verdict table stands on, in words; the command that confirms what is not confirmed yet; the
    comparisons the sweep cannot make, which no confirm run adds.
    ``seeds``: {study: its confirm runs}, to say why too few of them confirm nothing."""
    return " ".join(filter(None, (_standing(sweep, rows, seeds), _not_run(rows))))


def _standing(sweep: Sweep, rows: list[dict], seeds: dict[str, int] | None) -> str:
    """The evidence under the rows: seed means, best trials, or nothing yet."""
    unconfirmed = [row for row in rows if row["verdict"] == "not confirmed"]
    if not unconfirmed:
        return RULE
    store = hide_password(sweep.tracking_uri)
    progress = f"`attzoom status {sweep.name} --tracking-uri {store}` shows their progress"
    if not any(s.best for s in sweep.studies):  # nothing to compare, and `attzoom confirm` would refuse it
        return (f"**No verdict yet.** No trial of sweep {sweep.name} has finished, so there is nothing to compare or "
                f"confirm; report again once trials have finished ({progress}).")
    compared = [row for row in unconfirmed if row["Δ [95 % CI]"] != NO_DIFFERENCE]
    gaps = _gaps(sweep, unconfirmed)
    if not compared:  # each row waits for a finished trial, or for its best trials' test scores: say each cause
        waits = [f"both sides of a comparison have a finished trial ({progress})"] if _idle(sweep, unconfirmed) else []
        if _unscored(sweep, unconfirmed):
            waits.append("the best trials can be scored (the notes say why not; a data set not found is fixed with "
                         "--data-root)")
        return f"**No comparison yet.** {gaps} Report again once {' and '.join(waits)}."
    command = f"`attzoom confirm {sweep.name} --tracking-uri {store} --seeds 3`, then report again."
    if sweep.unfinished:  # confirm refuses a sweep that runs or was cut short
        command = f"once the sweep has finished ({progress}), {command}"
    if few := [f"{s.name} ({seeds[s.name]})" for s in _sides(sweep, compared) if 0 < (seeds or {}).get(s.name, 0) < 2]:
        command += (f" The seed re-runs of {', '.join(few)} are too few to count: a comparison needs 2 or more on "
                    "each side.")
    trials = _best_of(sweep, compared)
    if len(unconfirmed) < len(rows):
        return (f"{RULE} Rows marked *not confirmed* lack seed re-runs on one side and compare each study's {trials} "
                f"instead, which is no evidence; to confirm them: {command}" + (f" {gaps}" if gaps else ""))
    return (f"**Unconfirmed.** These differences compare each study's {trials}, which favours whichever study drew "
            "a lucky seed; they are no evidence that AttZoom helps. For a verdict, re-train the best configs with 3 "
            f"seeds: {command}" + (f" {gaps}" if gaps else ""))


def _not_run(rows: list[dict]) -> str:
    """The baseline and decisive controls missing beside AttZoom, grouped by what is missing: a gain over the
    baseline alone may come from the doubled resolution, so it cannot show that the attention helps (DESIGN.md)."""
    have: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        have.setdefault((row["backbone"], row["data set"]), set()).add(row["AttZoom vs"])
    lacking: dict[tuple[str, ...], list[str]] = {}
    for (backbone, dataset), variants in have.items():
        if gone := tuple(v for v in ("baseline", *DECISIVE) if v not in variants):
            lacking.setdefault(gone, []).append(f"{backbone} on {dataset}")
    everywhere = len(lacking) == 1 and len(next(iter(lacking.values()), [])) == len(have)
    return " ".join(_lacks(gone, [] if everywhere else where) for gone, where in lacking.items())


def _lacks(gone: tuple[str, ...], where: list[str]) -> str:
    """What the missing studies ``gone`` (for ``where``, or the whole sweep when empty) leave unsaid."""
    scope = f" for {', '.join(where)}" if where else ""
    said = [f"There is no baseline to compare with{scope}: the sweep has no baseline study (the backbone "
            "unchanged), so the best-of-N tables below show no baseline and no Δ there."] if "baseline" in gone else []
    if controls := [v for v in gone if v != "baseline"]:
        said.append(f"The {' and '.join(controls)} control{'s were' if len(controls) > 1 else ' was'} not run{scope}, "
                    "so a gain of AttZoom cannot show that the attention helps: the layer also doubles the resolution "
                    f"the rest of the network sees, and AttZoom must beat {' and '.join(DECISIVE)}, which add that "
                    "resolution without the attention.")
    return " ".join(said)


def _sides(sweep: Sweep, rows: list[dict]) -> list:
    """The studies compared in ``rows``, AttZoom's and the other's, each once, in the sweep's order."""
    keys = {(row["backbone"], row["data set"], variant) for row in rows for variant in ("attzoom", row["AttZoom vs"])}
    return [s for s in sweep.studies if (s.backbone, s.dataset, s.variant) in keys]


def _best_of(sweep: Sweep, rows: list[dict]) -> str:
    """"best of N single-seed trials" with N as the compared studies have it (a range where they differ), and the
    trials among them that ASHA stopped early, which count as finished though they trained fewer epochs."""
    studies = _sides(sweep, rows)
    n = _span([s.count("FINISHED") for s in studies])  # best of N: of finished trials only
    pruned = [(s.name, s.pruned) for s in studies if s.pruned]
    trials = "single-seed trial" if n == "1" else "single-seed trials"
    if not pruned:
        return f"best of {n} {trials}"
    # per study, as N is: a sum over studies read as one study's share of N
    stopped = ", ".join(f"{k} in {name}" for name, k in pruned) if len(pruned) <= 2 else \
        f"{_span([s.pruned for s in studies])} per study"
    return f"best of {n} {trials} (of which ASHA stopped early, after fewer epochs: {stopped})"


def _span(counts: list[int]) -> str:
    """"4", or "2 to 4" where the studies differ."""
    return str(counts[0]) if min(counts) == max(counts) else f"{min(counts)} to {max(counts)}"


def _gaps(sweep: Sweep, rows: list[dict]) -> str:
    """Why some rows show no difference: a side without a finished trial, or best trials without a test score."""
    idle, unscored = _idle(sweep, rows), _unscored(sweep, rows)
    said = [f"No difference to show where {', '.join(idle)} {'has' if len(idle) == 1 else 'have'} no finished "
            "trial yet."] if idle else []
    if unscored:
        said.append(f"No difference to show for {len(unscored)} comparison(s) whose best trials lack a test score "
                    "(see the notes).")
    return " ".join(said)


def _idle(sweep: Sweep, rows: list[dict]) -> list[str]:
    """The studies without a finished trial on a side of a comparison that shows no difference."""
    return [s.name for s in _sides(sweep, _empty(rows)) if s.best is None]


def _unscored(sweep: Sweep, rows: list[dict]) -> list[dict]:
    """The comparisons that show no difference though both sides have a best trial: it lacks a test score."""
    return [row for row in _empty(rows) if all(s.best is not None for s in _sides(sweep, [row]))]


def _empty(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["Δ [95 % CI]"] == NO_DIFFERENCE]


def _one(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.2f} (best trial)"


def _paper_delta(backbone: str, dataset: str, variant: str) -> str:
    ours, theirs = published(backbone, dataset, "attzoom"), published(backbone, dataset, variant)
    return f"{ours[0] - theirs[0]:+.2f}" if ours and theirs else "–"
