"""Per-study summary of a sweep, read from its MLflow runs: what ``status`` prints and a sweep ends with.

A study is done when its finished and failed trials reach the spec's N; its parent run
then closes FINISHED with the counts and the best validation top-1 (layout.STUDY_METRICS),
else KILLED, so the MLflow UI shows which studies a resume still has to complete.
"""

from __future__ import annotations

import sys
from collections import defaultdict

from mlflow.tracking import MlflowClient

from . import layout
from .layout import STUDY
from .spec import Spec, hide_password
from .tracking import mlflow_command, run_summary


# a trial run's MLflow status as the summary counts it; KILLED: stopped with its sweep (Ctrl-C), resume goes on
RUN_STATES = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "stopped"}


def summarize(client: MlflowClient, experiment_id: str) -> dict:
    """Per study: finished (of them pruned) / running / failed trial runs, epochs done and the best validation
    top-1 so far.

    One search_runs: each run's summary metrics are in its latest metrics (tracking.run_summary).
    """
    rows = defaultdict(lambda: {"finished": 0, "running": 0, "failed": 0, "stopped": 0, "pruned": 0, "epochs": 0,
                                "best_top1": None, "deleted": 0, "deleted_runs": []})
    for run in client.search_runs([experiment_id], layout.runs_filter(layout.TRIAL_ROLE), max_results=layout.MAX_RUNS):
        row = rows[run.data.tags[STUDY]]
        row[RUN_STATES.get(run.info.status, "running")] += 1
        row["pruned"] += layout.stopped_early(run.info.status, run.data.tags)
        summary = run_summary(client, run)
        row["epochs"] += summary.epochs
        if summary.best is not None and (row["best_top1"] is None or summary.best["val_top1"] > row["best_top1"]):
            row["best_top1"] = summary.best["val_top1"]
    for run in deleted_runs(client, experiment_id):  # deleted in the UI: counted apart, so that a lost trial is said
        rows[run.data.tags[STUDY]]["deleted"] += 1
        rows[run.data.tags[STUDY]]["deleted_runs"].append(run.info.run_id)
    return dict(rows)


def deleted_runs(client: MlflowClient, experiment_id: str, role: str = layout.TRIAL_ROLE) -> list:
    """The sweep's runs of ``role`` (trial or confirm runs) deleted in the MLflow UI (kept until `mlflow gc`): the
    sweep ran them, and no resume runs them again (each trial keeps its one run, deleted or not)."""
    from mlflow.entities import ViewType

    runs = client.search_runs([experiment_id], layout.runs_filter(role), ViewType.DELETED_ONLY,
                              max_results=layout.MAX_RUNS)
    return [run for run in runs if layout.DROPPED not in run.data.tags]  # those the sweep gave up itself: not lost


def restore_runs(tracking_uri: str, run_ids: list[str]) -> str:
    """How to restore deleted runs: the MLflow UI, or MLflow's CLI."""
    command = mlflow_command(tracking_uri, f"runs restore --run-id {run_ids[0]}")
    return (f"restore {'it' if len(run_ids) == 1 else 'them'} in the MLflow UI (its deleted runs) or with "
            f"`{command}`" + ("" if len(run_ids) == 1 else f" and so for {', '.join(run_ids[1:])}"))


def finish_studies(spec: Spec, experiment_id: str, parents: dict) -> dict:
    """Close each study's parent run with its counts and best trial; return the summary. Each driver's values are
    logged at the step of the trials closed so far: an interrupted study's chart shows its progress over resumes."""
    client = MlflowClient(spec.tracking_uri)
    summary = summarize(client, experiment_id)
    finished, failed, best = layout.STUDY_METRICS
    for name, run_id in parents.items():
        row = summary.get(name, {})
        metrics = {finished: row.get("finished", 0), failed: row.get("failed", 0)}
        if row.get("best_top1") is not None:
            metrics[best] = row["best_top1"]
        for key, value in metrics.items():
            client.log_metric(run_id, key, value, step=closed(row))
        client.set_terminated(run_id, "FINISHED" if closed(row) >= spec.trials else "KILLED")
    return summary


def print_summary(spec: Spec, summary: dict, out=sys.stdout) -> None:
    lines = ["| study | finished | failed | running | best val top-1 |", "|---|---:|---:|---:|---:|"]
    for study in spec.studies:
        row = summary.get(study.name, {})
        best = row.get("best_top1")
        lines.append(f"| {study.name} | {row.get('finished', 0)} | {row.get('failed', 0)} | {row.get('running', 0)} "
                     f"| {'-' if best is None else f'{best:.2f}'} |")
    print("\n".join(lines), file=out)


def closing(spec: Spec, summary: dict, elapsed_s: float, address: str | None = None) -> tuple[str, int]:
    """The sweep's last line and exit code: "done" only when every study's N trials are closed in the tracking
    store and none failed; 1 when a study has no finished trial at all (the comparison has nothing to compare)
    or the store lacks trials the sweep ran (their runs are lost: nothing to resume). Failed trials come with the
    command that runs them again (``address``: the driver's --address, which it names)."""
    from .sweep import driver_address, resume_command

    failed = sum(row.get("failed", 0) for row in summary.values())
    empty = [s.name for s in spec.studies if not summary.get(s.name, {}).get("finished")]
    errors = (f"each failed trial's error is in its MLflow run (tag {layout.ERROR}) and in its error.txt under "
              f"{spec.storage}/{spec.name}")
    if failed:
        errors += f"; once the cause is fixed, `{resume_command(spec, driver_address(address))}` runs them again"
    short = unrecorded(spec, summary)
    if short and (gone := [run for row in summary.values() for run in row.get("deleted_runs", [])]):
        return (f"sweep {spec.name} ended in {elapsed_s:.0f} s, but {len(gone)} of its trial runs "
                f"{'is' if len(gone) == 1 else 'are'} deleted in MLflow, and it counts only the runs it can read "
                f"({'; '.join(short)}); {restore_runs(spec.tracking_uri, gone)}"), 1
    if empty:
        return (f"sweep {spec.name} failed after {elapsed_s:.0f} s: no trial of {', '.join(empty)} finished "
                f"({failed} of {sum(map(closed, summary.values()))} trials "
                f"failed); {errors}"), 1
    if short:
        return (f"sweep {spec.name} ended in {elapsed_s:.0f} s, but the tracking store "
                f"{hide_password(spec.tracking_uri)} records fewer trials than the sweep ran: {'; '.join(short)} "
                "(see the MLflow messages above)"), 1
    if failed:
        return f"sweep {spec.name} ended in {elapsed_s:.0f} s with {failed} failed trial(s); {errors}", 0
    return f"sweep {spec.name} done in {elapsed_s:.0f} s", 0


def complete(spec: Spec, summary: dict) -> bool:
    """Whether closing says "done": every study's N trials closed in the store, none failed."""
    return not unrecorded(spec, summary) and not any(row.get("failed", 0) for row in summary.values())


def unrecorded(spec: Spec, summary: dict) -> list[str]:
    """Studies whose trial runs in the store are fewer than N finished or failed, at a sweep's normal end."""
    counts = {s.name: closed(summary.get(s.name, {})) for s in spec.studies}
    return [f"{name} has {n} of {spec.trials}" for name, n in counts.items() if n < spec.trials]


def closed(row: dict) -> int:
    """A study's trials that have ended, finished or failed: it is done once they reach N."""
    return row.get("finished", 0) + row.get("failed", 0)
