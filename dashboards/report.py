"""``attzoom report``: a sweep's comparison report from its MLflow runs alone.

Writes ``best_trials.csv``, ``report.md`` and one self-contained ``report.html`` (the tables,
learning curves of the best trials, optimisation history and hyperparameter importance per
study, the chosen configs, compute spent). A partial sweep reports what exists and lists
its unfinished studies. Needs only the tracking URI: no spec, no Tune results, no Ray.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tune_jobs.layout import experiment_name
from tune_jobs.naming import counted
from tune_jobs.spec import hide_password

from . import figures, importance
from .confirm import confirm_rows, seed_scores
from .gates import gate_rows
from .published import published_config
from .runs import Study, Sweep, curves, load_sweep
from .table import best_trials, comparison, markdown, pair
from .verdict import RULE, headline, intro


@dataclass
class Report:
    sweep: Sweep
    best: pd.DataFrame
    tables: dict[str, list[dict]]
    best_rows: list[dict]
    configs: list[dict]
    compute: list[dict]
    unfinished: list[dict]
    notes: list[str]
    images: list[tuple[str, str, bytes]] = field(default_factory=list)  # (section, caption, png)
    importance: list[dict] = field(default_factory=list)  # per study: its top hyperparameters
    confirm: list[dict] = field(default_factory=list)  # per study: seed re-runs' mean +- std (attzoom confirm)
    verdict: list[dict] = field(default_factory=list)  # the headline: AttZoom vs baseline and controls (verdict.py)
    confirmed: bool = False  # every headline row stands on seed re-runs
    gates: list[dict] = field(default_factory=list)  # per gated study: threshold and how open the gate was
    warnings: list[str] = field(default_factory=list)  # said before anything else (gates that stayed open)
    generated: str = ""
    drawn: bool = False  # figures and importance were computed (build's with_figures)


def build(tracking_uri: str, sweep_name: str, data_root: str | None = None, with_figures: bool = True) -> Report:
    sweep = load_sweep(tracking_uri, sweep_name)
    best, notes = best_trials(sweep, data_root)
    report = Report(sweep, best, comparison(best) if not best.empty else {}, best_rows(best),
                    config_rows(sweep, best), compute_rows(sweep), unfinished_rows(sweep), notes,
                    generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    scores, confirm_notes = seed_scores(sweep, data_root)
    report.confirm, report.notes = confirm_rows(sweep, scores), report.notes + confirm_notes
    best_top1 = {} if best.empty else dict(zip(best.study, best.test_top1))
    report.verdict, report.confirmed = headline(sweep, scores, best_top1)
    report.gates, report.warnings = gate_rows(sweep)
    if with_figures:
        report.images, report.importance = draw(sweep)
        report.images += explain_images(sweep)
        report.drawn = True
    return report


def best_rows(best: pd.DataFrame) -> list[dict]:
    return [{"study": r.study, "trials (ok / failed / stopped / running)": f"{r.trials_finished} / {r.trials_failed} / "
             f"{r.trials_stopped} / {r.trials_running}"
             + (f" ({r.trials_pruned} stopped early by ASHA)" if r.trials_pruned else ""),
             "best trial": _text(r.trial_id),
             "epoch": "–" if pd.isna(r.best_epoch) else int(r.best_epoch),
             "val top-1 / top-5": pair(r.val_top1, r.val_top5), "test top-1 / top-5": pair(r.test_top1, r.test_top5),
             "run id": _text(r.run_id)} for r in best.itertuples()]


def _text(value) -> str:
    """A cell of a study without a finished trial is a dash, not pandas' "nan"."""
    return "–" if value is None or pd.isna(value) else str(value)


def describe_config(params: dict) -> dict[str, str]:
    """The paper's five choices, with SGD's momentum and StepLR's step size only where they apply."""
    if not params or params.get("optimizer") is None:
        return {}
    optimizer = params["optimizer"]
    if optimizer == "sgd" and params.get("momentum") is not None:
        optimizer += f" ({float(params['momentum']):.2f})"
    scheduler = params.get("scheduler", "?")
    if scheduler == "step" and params.get("step_size") is not None:
        scheduler += f" ({int(float(params['step_size']))})"
    return {"batch": str(params.get("batch_size")), "lr": f"{float(params['lr']):.2g}",
            "weight decay": f"{float(params['weight_decay']):.2g}", "optimizer": optimizer, "scheduler": scheduler}


def config_rows(sweep: Sweep, best: pd.DataFrame) -> list[dict]:
    rows = []
    for study in sweep.studies:
        trial = study.best
        ours = describe_config(trial.params) if trial else {}
        paper = describe_config(published_config(study.backbone, study.dataset, study.variant) or {})
        rows.append({"study": study.name, **{k: ours.get(k, "–") for k in ("batch", "lr", "weight decay",
                                                                             "optimizer", "scheduler")},
                     "paper's config": ", ".join(paper.values()) if paper else "–"})
    return rows


def compute_rows(sweep: Sweep) -> list[dict]:
    """Runs, epochs and hours per study (trials and confirm runs) from the logged epoch_time; GPU hours where the
    GPU share is known, "n/a (CPU)" where every run trained on the CPU."""
    rows, everything = [], []
    for study in sweep.studies:
        runs = [*study.trials, *study.confirms]
        everything += runs
        rows.append({"study": study.name, "trials": len(study.trials), "confirm runs": len(study.confirms),
                     **_spent(runs)})
    rows.append({"study": "total", "trials": sum(len(s.trials) for s in sweep.studies),
                 "confirm runs": sum(len(s.confirms) for s in sweep.studies), **_spent(everything)})
    return rows


def _spent(runs: list) -> dict:
    trained = [t for t in runs if t.epochs]  # a run stopped before its first epoch logged no GPU share
    if not trained:
        gpu = "–"  # nothing trained yet: no hours to weigh (it said 0.000)
    elif all(t.gpus == 0 for t in trained):
        gpu = "n/a (CPU)"
    elif all(t.gpus is not None for t in trained):
        gpu = f"{sum(t.hours * t.gpus for t in trained):.3f}"
    else:
        gpu = "unknown"
    return {"epochs": sum(t.epochs for t in runs), "hours": f"{sum(t.hours for t in runs):.3f}", "GPU hours": gpu}


def unfinished_rows(sweep: Sweep) -> list[dict]:
    return [{"study": s.name, "parent run": s.parent.info.status if s.parent else "missing",
             "finished": s.count("FINISHED"), "failed": s.count("FAILED"), "stopped": s.count("KILLED"),
             "running": s.running}
            for s in sweep.unfinished]


def draw(sweep: Sweep) -> tuple[list[tuple[str, str, bytes]], list[dict]]:
    """Learning curves and optimisation history per (data set, backbone); importance per study.

    The groups are drawn side by side in processes, one per core: at paper scale the figures and fANOVA are
    most of the report's time, and each group needs nothing of the others.
    """
    groups: dict[tuple[str, str], list[Study]] = {}
    for study in sweep.studies:
        groups.setdefault((study.dataset, study.backbone), []).append(study)
    found = curves(sweep.tracking_uri, [s.best.run_id for s in sweep.studies if s.best])  # one read, before forking
    tasks = [(f"{backbone} on {dataset}", studies, {s.variant: found[s.best.run_id] for s in studies if s.best})
             for (dataset, backbone), studies in groups.items()]
    workers = min(len(tasks), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=figure_processes()) as pool:
            drawn = list(pool.map(draw_group, *zip(*tasks)))
    else:
        drawn = [draw_group(*task) for task in tasks]
    return [image for images, _ in drawn for image in images], [row for _, rows in drawn for row in rows]


def figure_processes() -> multiprocessing.context.BaseContext:
    """Forked workers on Linux, where forking is safe and starts at once; spawned ones elsewhere: forking a
    process that has threads (MLflow's, matplotlib's) can hang or crash on macOS, and Windows cannot fork."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def draw_group(title: str, studies: list[Study], best_curves: dict) -> tuple[list, list[dict]]:
    """One (data set, backbone): its figures, and its studies' importance rows."""
    logging.getLogger("optuna").setLevel(logging.WARNING)
    images, ranked = [], []
    others = {s.variant: [t.history["val_top1"] for t in s.trials if t is not s.best] for s in studies}
    if best_curves:
        images.append(("curves", f"{title}: best trial of each variant (bold), every other trial (faint)",
                       figures.learning_curves(title, best_curves, others)))
    rebuilt = {s.variant: importance.optuna_study(s) for s in studies}
    histories = {variant: importance.history(study) for variant, study in rebuilt.items()}
    if any(histories.values()):
        images.append(("history", f"{title}: optimisation history", figures.optimisation_history(title, histories)))
    for study in studies:
        scores, why = importance.importances(rebuilt[study.variant])
        if scores:
            images.append(("importance", study.name, figures.importance_bars(study.name, scores)))
        finished = sum(t.state.name == "COMPLETE" for t in rebuilt[study.variant].trials)
        ranked.append({"study": study.name, "finished trials": finished, "importance (fANOVA)": ", ".join(
            f"{name} {score:.2f}" for name, score in scores.items()) if scores else why})
    return images, ranked


def explain_images(sweep: Sweep) -> list[tuple[str, str, bytes]]:
    """The ``attzoom explain`` grids logged to each study's best trial (``explain/*.png``), when there are any."""
    from .explain import logged_pngs

    shown: dict[bytes, tuple[list[str], str]] = {}  # a pair's grid is logged to both runs: show it once
    for study in sweep.studies:
        for name, png in logged_pngs(sweep.tracking_uri, study.best.run_id) if study.best else []:
            shown.setdefault(png, ([], name))[0].append(study.name)
    return [("explain", f"{', '.join(studies)}: {name}", png) for png, (studies, name) in shown.items()]


BEST_OF_N = ("Test top-1 / top-5 (%) of each study's best trial, chosen by its best validation top-1 over the epochs "
             "of every finished trial (between trials, ties by top-5, then the trial that started first); each "
             "trial's best epoch is its first at that top-1, the epoch of its kept checkpoint. Δ is the difference "
             "from the same backbone's baseline. One seed per trial: a best of N favours whichever study drew a "
             "lucky seed")
NO_VERDICT = ("there is no verdict: no AttZoom study has a baseline or control of the same backbone and data set to "
              "compare with")
GATES = ("Share of validation positions where AttZoom's gate was fully open (f(A) = 1: no gradient reaches the "
         "attention there) and the mean of σ(A), for each gated study's best trial and its seed re-runs.")


def best_of_n_note(report: Report) -> str:
    """What the best-of-N tables stand on; it points at the verdict only where there is one, and says when N counts
    trials that ASHA stopped early."""
    text = BEST_OF_N + (" (see the verdict above)." if report.verdict else f"; {NO_VERDICT}.")
    pruned = sum(s.pruned for s in report.sweep.studies)
    if pruned:
        text += (f" N counts the {counted(pruned, 'trial')} that ASHA stopped early as finished, "
                 "though they trained fewer epochs (each study's count is under Best trial per study).")
    return text


def verdict_intro(report: Report) -> str:
    return intro(report.sweep, report.verdict, {row["study"]: len(row["seeds"].split(", ")) for row in report.confirm})


def to_markdown(report: Report) -> str:
    sweep = report.sweep
    parts = [f"# AttZoom sweep report: {sweep.name}", "",
             f"Tracking store `{hide_password(sweep.tracking_uri)}`, experiment `{experiment_name(sweep.name)}`, "
             f"generated {report.generated}."]
    if figures := html_only(report):
        parts += ["", f"The figures ({figures}) are in `report.html` beside this file."]
    if report.unfinished:  # first: every number below may still change
        parts += ["", f"**Unfinished studies ({len(report.unfinished)}):** partial results below.", "",
                  markdown(report.unfinished)]
    if report.verdict:
        parts += ["", "## Verdict: does AttZoom help?", "", verdict_intro(report), "", markdown(report.verdict)]
    parts += [f"\n> **Warning:** {warning}" for warning in report.warnings]
    parts += ["", "## Best of N single-seed trials", "", best_of_n_note(report)]
    for dataset, rows in report.tables.items():
        parts += ["", f"### {dataset}", "", markdown(rows)]
    if report.gates:
        parts += ["", "## AttZoom's gate", "", GATES, "", markdown(report.gates)]
    parts += ["", "## Best trial per study", "", markdown(report.best_rows),
              "", "## Chosen configs", "", markdown(report.configs),
              "", "## Hyperparameter importance", "",
              importance_markdown(report),
              "", "## Compute spent", "", "Hours are summed epoch times as logged (training and validation); GPU "
              "hours weigh them by each trial's GPU share (its memory fraction or GPU ids), unknown where a run lacks "
              "both.", "",
              markdown(report.compute)]
    if report.confirm:
        parts += ["", "## Seed confirmation", "", RULE, "", markdown(report.confirm)]
    if report.notes:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(parts) + "\n"


def html_only(report: Report) -> str:
    """What report.html shows that this text cannot: its drawn figures, by kind (the Markdown said nothing of them)."""
    kinds = {kind for kind, _, png in report.images if png}
    names = [name for kind, name in FIGURES if kind in kinds]
    return ", ".join(names)


FIGURES = (("curves", "learning curves of the best trials"), ("history", "optimisation history"),
           ("importance", "hyperparameter importance"), ("explain", "where the networks look"))


def importance_markdown(report: Report) -> str:
    """The importance table, and why no study has a ranking when none has."""
    if not report.drawn:
        return f"({no_figure(report, 'importance')})"
    if any(kind == "importance" for kind, _, _ in report.images):
        return markdown(report.importance)
    return f"{markdown(report.importance)}\n\n({no_figure(report, 'importance')})"


def no_figure(report: Report, section: str) -> str:
    """Why a section has no figure, in its own words: one blanket "no finished trial yet" was read beside tables
    that counted finished trials."""
    if not report.drawn:
        return "not drawn: this report was built without its figures"
    if section == "importance":
        return importance.absent([row["finished trials"] for row in report.importance])
    return "no finished trial yet"  # curves and history are drawn from the first finished trial on


def write(report: Report, out: Path) -> dict[str, Path]:
    from .html import page

    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "best_trials.csv", "md": out / "report.md", "html": out / "report.html"}
    report.best.to_csv(paths["csv"], index=False)
    paths["md"].write_text(to_markdown(report))
    paths["html"].write_text(page(report))
    return paths


def write_report(tracking_uri: str, sweep: str, out: str | Path | None = None,
                 data_root: str | None = None) -> tuple[str, dict[str, Path]]:
    """Build and write the report to ``out`` (default ``reports/<sweep>``); returns (markdown, paths)."""
    report = build(tracking_uri, sweep, data_root)
    paths = write(report, Path(out) if out else Path("reports") / sweep)
    return to_markdown(report), paths


def comparison_markdown(tracking_uri: str, sweep: str, data_root: str | None = None) -> str:
    """The verdict, gate warnings and best-of-N tables (what the demo prints at its end)."""
    report = build(tracking_uri, sweep, data_root, with_figures=False)
    parts = [f"Verdict: {verdict_intro(report)}", markdown(report.verdict), ""] if report.verdict else []
    parts += [f"Warning: {warning}" for warning in report.warnings]
    parts += [f"Best of N single-seed trials, {dataset} (test top-1 / top-5 %):\n{markdown(rows)}\n"
              for dataset, rows in report.tables.items()]
    return "\n".join(parts)
