"""Test-set scores of a best trial: its ``best.pt`` evaluated once on the official test split.

The best trial is chosen on validation top-1 only; the test split is touched afterwards,
once per chosen checkpoint, and the scores are logged to the trial's run (``test_top1``,
``test_top5``) so later reports, and the MLflow UI, read them instead of recomputing.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from tune_jobs.layout import CHECKPOINT, TEST_DATA

UNKNOWN = {"test_top1": math.nan, "test_top5": math.nan}


def test_metrics(tracking_uri: str, run_id: str, data_root: str | None = None) -> tuple[dict, str | None]:
    """({test_top1, test_top5}, a note or None), or (NaNs, why not): read from the run, else computed and logged
    with the data root they were computed on.

    ``data_root`` overrides the checkpoint's own (the laptop that writes the report may keep
    the data sets somewhere else than the cluster that trained); scores computed on another one are computed again
    on it. Nothing is downloaded.
    """
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    logged, scored_on = run.data.metrics, run.data.tags.get(TEST_DATA)
    wanted = str(Path(data_root).expanduser().resolve()) if data_root else None
    stored = {"test_top1": logged["test_top1"], "test_top5": logged["test_top5"]} \
        if "test_top1" in logged and "test_top5" in logged else None
    if stored and (wanted is None or wanted == scored_on):
        return stored, _elsewhere(run, scored_on)
    found, why = _compute(client, run_id, wanted, best_epoch_of(client, run))
    if stored and math.isnan(found["test_top1"]):  # the root asked for does not serve: the stored scores stand
        return stored, f"{why}; its stored test scores (computed on {scored_on or 'an unrecorded data root'}) stand"
    if wanted and not math.isnan(found["test_top1"]):  # said by the report that computes them, as by later ones
        why = "; ".join(filter(None, (why, _elsewhere(run, wanted)))) or None
    return found, why


def best_epoch_of(client: MlflowClient, run) -> int:
    """The epoch best.pt holds: the test scores are logged at that step, beside its validation scores in MLflow's
    charts (they were at step 0)."""
    from tune_jobs.tracking import run_summary

    best = run_summary(client, run).best
    return int(best["epoch"]) if best else 0


def _compute(client: MlflowClient, run_id: str, wanted: str | None, step: int = 0) -> tuple[dict, str | None]:
    """The run's best.pt scored on the test split at ``wanted`` (else the checkpoint's own root), and logged at
    ``step``."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with quiet_downloads():
                path = Path(client.download_artifacts(run_id, CHECKPOINT, tmp))
        except Exception as e:  # noqa: BLE001 - any store error means: no checkpoint to score
            return dict(UNKNOWN), f"run {run_id} has no {CHECKPOINT} artifact ({type(e).__name__})"
        import torch  # only now: a report with no checkpoint to score never loads it (650 MB)

        from attzoom.data import DataError, load
        from attzoom.train import best_test_metrics

        try:
            config = torch.load(path, map_location="cpu", weights_only=True)["config"]
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: this study unscored, not the report lost
            return dict(UNKNOWN), f"run {run_id}'s {CHECKPOINT} cannot be read ({type(e).__name__}: {e})"
        root = wanted or config["data_root"]
        try:
            data = load(config["dataset"], root, config["val_fraction"], download=False)
        except DataError as e:
            return dict(UNKNOWN), f"test split of {config['dataset']} not found ({e}); pass --data-root"
        scores = best_test_metrics(path.parent, data, "auto")
    found = {"test_top1": scores["top1"], "test_top5": scores["top5"]}
    try:
        with silenced("mlflow.store.db.utils"):  # it logs a refused SQL write with its traceback, then raises
            client.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), step) for k, v in found.items()],
                             tags=[RunTag(TEST_DATA, str(Path(root).expanduser().resolve()))])
    except Exception as e:  # noqa: BLE001 - a read-only store or user: the scores stand, only not kept for next time
        return found, (f"test scores of run {run_id} not logged, so the next report computes them again: the store "
                       f"refused the write ({type(e).__name__})")
    return found, None


def _elsewhere(run, scored_on: str | None) -> str | None:
    """A note when stored scores were computed on other data than the run trained beside (a report given another
    --data-root once): read on, they would pass for the run's own."""
    trained = run.data.params.get("data_root")
    if not scored_on or not trained or not Path(trained).is_absolute() or not Path(trained).is_dir():
        return None  # the advice below could not be followed here (a laptop without the cluster's data)
    if Path(trained).resolve() == Path(scored_on):
        return None
    return (f"the test scores of run {run.info.run_id} were computed on the data at {scored_on}, not where it trained "
            f"({trained}); `--data-root {trained}` scores it there")


@contextmanager
def silenced(logger: str):
    """A library logger quiet for a call whose failure is reported in our own words."""
    log = logging.getLogger(logger)
    saved, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = saved


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
