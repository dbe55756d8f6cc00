"""Metric histories of many runs in a few queries: what makes the report linear in the store.

MlflowClient has only a per-run history call, and a SQL store answers each by scanning that
metric's rows across the whole store, so a report reading every run's history one by one
grows with the square of the store. The SQL store has a bulk query (one scan per metric and
chunk of runs); a tracking server exposes it as the UI's get-history-bulk endpoint. Any other
store is read run by run.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from mlflow.tracking import MlflowClient

SQL_CHUNK = 500  # runs per query: far below SQLite's limit on bound variables
HTTP_CHUNK = 20  # runs per request: the server allows 100 runs and 25,000 points per answer
HTTP_MAX_POINTS = 25_000
BULK_ENDPOINT = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"

History = dict[int, float]  # epoch (step) -> value


def histories(client: MlflowClient, run_ids: Iterable[str], key: str) -> dict[str, History]:
    """{run id: {step: value}} of one metric for every run given (runs without it map to {})."""
    run_ids = list(dict.fromkeys(run_ids))
    found: dict[str, History] = defaultdict(dict)
    store = client._tracking_client.store  # noqa: SLF001 - the client has no bulk call of its own
    if hasattr(store, "get_metric_history_bulk"):
        for chunk in _chunks(run_ids, SQL_CHUNK):
            for metric in store.get_metric_history_bulk(chunk, key, max_results=None):
                found[metric.run_id][metric.step] = metric.value
    elif hasattr(store, "get_host_creds"):
        for chunk in _chunks(run_ids, HTTP_CHUNK):
            for metric in _http_bulk(store, chunk, key):
                found[metric["run_id"]][int(metric.get("step", 0))] = float(metric["value"])
    else:
        for run_id in run_ids:
            found[run_id] = {m.step: m.value for m in client.get_metric_history(run_id, key)}
    return {run_id: found.get(run_id, {}) for run_id in run_ids}


def _http_bulk(store, run_ids: list[str], key: str) -> list[dict]:
    """One get-history-bulk request; a chunk whose answer may have been cut is split and asked again."""
    from mlflow.utils.rest_utils import http_request_safe

    params = [("run_id", r) for r in run_ids] + [("metric_key", key), ("max_results", HTTP_MAX_POINTS)]
    response = http_request_safe(store.get_host_creds(), BULK_ENDPOINT, "GET", params=params)
    metrics = response.json().get("metrics", [])
    if len(metrics) >= HTTP_MAX_POINTS and len(run_ids) > 1:
        half = len(run_ids) // 2
        return _http_bulk(store, run_ids[:half], key) + _http_bulk(store, run_ids[half:], key)
    return metrics


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]
