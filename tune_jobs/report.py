"""The end-of-sweep comparison: each study's best trial, scored on the held-back test split.

The best trial is chosen by validation top-1 (ties by top-5); only then is its best
checkpoint (an MLflow artifact) evaluated on the official test split, and the test
metrics are logged to its run so later reports read them instead of recomputing.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from .spec import Spec
from .tracking import ROLE, STUDY, experiment_name


def best_trials(spec: Spec) -> dict[str, dict]:
    """{study: {run_id, val_top1, val_top5, test_top1, test_top5, params}} for studies with a finished trial."""
    client = MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(spec.name))
    if experiment is None:
        return {}
    best: dict[str, dict] = {}
    for run in client.search_runs([experiment.experiment_id], f"tags.`{ROLE}` = 'trial' and status = 'FINISHED'",
                                  max_results=50_000):
        row = best_epoch(client, run.info.run_id)
        study = run.data.tags[STUDY]
        if row and (study not in best or (row["val_top1"], row["val_top5"]) >
                    (best[study]["val_top1"], best[study]["val_top5"])):
            best[study] = {**row, "run_id": run.info.run_id, "params": run.data.params}
    for row in best.values():
        row.update(test_metrics(client, row["run_id"], spec))
    return best


def best_epoch(client: MlflowClient, run_id: str) -> dict | None:
    top1 = {m.step: m.value for m in client.get_metric_history(run_id, "val_top1")}
    top5 = {m.step: m.value for m in client.get_metric_history(run_id, "val_top5")}
    if not top1:
        return None
    step = max(top1, key=lambda s: (top1[s], top5.get(s, 0.0)))
    return {"epoch": step, "val_top1": top1[step], "val_top5": top5.get(step, 0.0)}


def test_metrics(client: MlflowClient, run_id: str, spec: Spec) -> dict:
    """Test top-1/top-5 of the run's best checkpoint; computed once, then read from the run."""
    logged = client.get_run(run_id).data.metrics
    if "test_top1" in logged:
        return {"test_top1": logged["test_top1"], "test_top5": logged["test_top5"]}
    import tempfile
    from pathlib import Path

    from attzoom.data import load
    from attzoom.train import best_test_metrics

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(client.download_artifacts(run_id, "checkpoint/best.pt", tmp))
        import torch

        config = torch.load(path, map_location="cpu", weights_only=True)["config"]
        data = load(config["dataset"], config["data_root"], config["val_fraction"])
        scores = best_test_metrics(path.parent, data, "auto")
    client.log_metric(run_id, "test_top1", scores["top1"])
    client.log_metric(run_id, "test_top5", scores["top5"])
    return {"test_top1": scores["top1"], "test_top5": scores["top5"]}


def best_trials_table(spec: Spec) -> str:
    """Markdown: one row per (backbone, dataset, variant), with the difference from that pair's baseline."""
    best = best_trials(spec)
    lines = ["| backbone | dataset | variant | val top-1 | test top-1 | test top-5 | test top-1 vs baseline |",
             "|---|---|---|---:|---:|---:|---:|"]
    for study in spec.studies:
        row = best.get(study.name)
        if row is None:
            lines.append(f"| {study.backbone} | {study.dataset} | {study.variant} | - | - | - | (no finished trial) |")
            continue
        base = best.get(f"{study.backbone}.{study.dataset}.baseline")
        diff = "" if study.variant == "baseline" or base is None else f"{row['test_top1'] - base['test_top1']:+.2f}"
        lines.append(f"| {study.backbone} | {study.dataset} | {study.variant} | {row['val_top1']:.2f} | "
                     f"{row['test_top1']:.2f} | {row['test_top5']:.2f} | {diff} |")
    return "\n".join(lines)
