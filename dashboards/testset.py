"""Test-set scores of a best trial: its ``best.pt`` evaluated once on the official test split.

The best trial is chosen on validation top-1 only; the test split is touched afterwards,
once per chosen checkpoint, and the scores are logged to the trial's run (``test_top1``,
``test_top5``) so later reports, and the MLflow UI, read them instead of recomputing.
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mlflow.tracking import MlflowClient

from tune_jobs.layout import CHECKPOINT

UNKNOWN = {"test_top1": math.nan, "test_top5": math.nan}


def test_metrics(tracking_uri: str, run_id: str, data_root: str | None = None) -> tuple[dict, str | None]:
    """({test_top1, test_top5}, None) or (NaNs, why not): read from the run, else computed and logged.

    ``data_root`` overrides the checkpoint's own (the laptop that writes the report may keep
    the data sets somewhere else than the cluster that trained). Nothing is downloaded.
    """
    client = MlflowClient(tracking_uri)
    logged = client.get_run(run_id).data.metrics
    if "test_top1" in logged and "test_top5" in logged:
        return {"test_top1": logged["test_top1"], "test_top5": logged["test_top5"]}, None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with quiet_downloads():
                path = Path(client.download_artifacts(run_id, CHECKPOINT, tmp))
        except Exception as e:  # noqa: BLE001 - any store error means: no checkpoint to score
            return dict(UNKNOWN), f"run {run_id} has no {CHECKPOINT} artifact ({type(e).__name__})"
        import torch  # only now: a report with no checkpoint to score never loads it (650 MB)

        from attzoom.data import DataError, load
        from attzoom.train import best_test_metrics

        config = torch.load(path, map_location="cpu", weights_only=True)["config"]
        try:
            data = load(config["dataset"], data_root or config["data_root"], config["val_fraction"], download=False)
        except DataError as e:
            return dict(UNKNOWN), f"test split of {config['dataset']} not found ({e}); pass --data-root"
        scores = best_test_metrics(path.parent, data, "auto")
    client.log_metric(run_id, "test_top1", scores["top1"])
    client.log_metric(run_id, "test_top5", scores["top5"])
    return {"test_top1": scores["top1"], "test_top5": scores["top5"]}, None


@contextmanager
def quiet_downloads():
    """No per-file progress bar in the middle of the report's terminal output."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved
