"""Run, resume and summarise a sweep: one Tune experiment, all studies, one global cap.

Order matters for "nothing lost, nothing repeated": the spec is validated first (no
side effects), then the MLflow store and the studies' parent runs are created by this
driver (trials racing on a fresh SQLite schema fail), then Ray starts, then Tune.
``resume`` restores the same experiment (searcher state included) and runs only what
is missing.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from .spec import SearchSpace, Spec, SpecError, check_cluster_gpus, check_data, check_writable, validate

SPEC_FILE = "attzoom-spec.json"
# Snapshot the experiment every second (not every 10 s): a driver killed between two
# snapshots forgets the trials started since, and each of those costs a repeated trial.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Tune's default TensorBoard logger costs a second of imports before the first trial and duplicates
# MLflow; run_sweep adds the CSV and JSON loggers back (confirm reads the trials' params.json).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def absolute(spec: Spec) -> Spec:
    """Trials run in other working directories: pin every local path to where the user meant."""
    def pin(location: str) -> str:
        if "://" in location:
            if location.startswith("sqlite:///") and not location.startswith("sqlite:////"):
                return "sqlite:///" + str(Path(location[len("sqlite:///"):]).expanduser().resolve())
            return location
        return str(Path(location).expanduser().resolve())

    return replace(spec, storage=pin(spec.storage), tracking_uri=pin(spec.tracking_uri),
                   data_root=str(Path(spec.data_root).expanduser().resolve()))


def preflight(spec: Spec, local: bool = False) -> Spec:
    """Every check that can run before Ray or MLflow is touched; returns the spec with absolute paths.

    ``local``: the sweep will start its own Ray instance, so the GPU request is checked here
    against this machine; a cluster's GPUs are checked once connected (start_ray).
    """
    spec = absolute(spec)
    check_writable("storage", spec.storage)
    check_writable("tracking_uri", spec.tracking_uri)
    check_data(spec)
    if local and spec.gpus > 0:
        import torch

        gpus = spec.local_gpus if spec.local_gpus is not None else torch.cuda.device_count()
        check_cluster_gpus(spec, gpus, "this machine")
    return spec


def experiment_dir(spec: Spec) -> Path:
    return Path(spec.storage) / spec.name


def save_spec(spec: Spec) -> None:
    folder = experiment_dir(spec)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))


def load_saved_spec(name_or_dir: str, storage: str = "ray_results") -> Spec:
    """The spec a sweep was started with, found by its folder or by its name under ``storage``."""
    candidates = [Path(name_or_dir), Path(storage) / name_or_dir]
    for folder in candidates:
        if (folder / SPEC_FILE).is_file():
            raw = json.loads((folder / SPEC_FILE).read_text())
            search = SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.pop("search").items()})
            spec = Spec(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}, search=search)
            validate(spec, source=str(folder / SPEC_FILE))
            return spec
    raise SpecError(f"no sweep found at {name_or_dir!r} (looked for {SPEC_FILE} in "
                    f"{' and '.join(str(c) for c in candidates)}); pass the sweep's folder or its name with --storage")


def start_ray(spec: Spec, address: str | None):
    """Connect to a cluster, or start a private local instance bound to 127.0.0.1."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=True)
        where = f"the cluster at {address}"
    else:
        with loopback_only(), lean_local_head():
            ray.init(address="local", num_gpus=spec.local_gpus, include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=False)
        where = "this machine"
    check_cluster_gpus(spec, ray.cluster_resources().get("GPU", 0.0), where)
    start_trials_in_prestarted_workers()


def start_trials_in_prestarted_workers() -> None:
    """Let trial actors take the workers Ray starts ahead, not new processes (half a second each).

    Tune gives every trainable actor a runtime env holding one variable, PL_DISABLE_FORK (a
    PyTorch Lightning workaround; no Lightning runs here). Ray reuses a worker only for the
    runtime env it was started with, so that variable made every trial actor wait for a fresh
    process. Variables Tune must carry (cloud credentials) still go, and still cost a process.
    """
    try:
        from ray.tune.execution.class_cache import DEFAULT_ENV_VARS
    except ImportError:  # a Ray without it starts trials in fresh processes, as before
        return
    DEFAULT_ENV_VARS.pop("PL_DISABLE_FORK", None)


@contextmanager
def loopback_only():
    """Keep every service of a private local Ray on 127.0.0.1.

    Ray swaps 127.0.0.1 for the machine's network address (so that other nodes could join)
    unless it believes the platform cannot cluster, its macOS/Windows default. Saying so
    while the instance starts binds the GCS, raylet, object manager and agents to loopback;
    the processes it starts inherit the setting, nothing after ray.init sees it.
    """
    from ray._private import ray_constants

    variable = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved, saved_flag = os.environ.get(variable), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[variable], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved


@contextmanager
def lean_local_head():
    """Start a private local Ray without the two head processes a sweep never uses.

    Even with ``include_dashboard=False`` Ray starts a dashboard API server (for job submission,
    the state API and usage stats, none of which a local sweep calls) and waits for it, and an
    autoscaler monitor, which has nothing to scale on one machine. Together that is about one
    CPU-second while both cores are busy starting Ray: the first epoch starts about 0.8 s sooner.
    Skipped only while this driver starts its own instance; ``ray start`` clusters keep both.
    """
    import ray._private.node
    import ray._private.services

    services, node = ray._private.services, ray._private.node.Node
    saved = services.start_api_server, node.start_monitor
    services.start_api_server = lambda *args, **kwargs: (None, None)  # (dashboard URL, process): none
    node.start_monitor = lambda self: None
    try:
        yield
    finally:
        services.start_api_server, node.start_monitor = saved


def stop_ray() -> None:
    """Shut Ray down. A private local instance has no autoscaler monitor (lean_local_head), which on
    SIGTERM would report its own death to the already-stopped GCS and hang for Ray's one-second grace."""
    import ray

    ray.shutdown()


def run_sweep(spec: Spec, address: str | None = None, resume: bool = False) -> dict:
    """Run (or resume) a validated sweep to the end; returns the per-study summary."""
    spec = preflight(spec, local=not address)  # a local run starts its own Ray (address="local")
    # The store's migration overlaps Ray's start and the first trial's start; only the driver's MLflow logger
    # waits for it, when the first trial has started.
    pool = ThreadPoolExecutor(max_workers=1)
    tracking = pool.submit(_prepare_tracking, spec)
    pool.shutdown(wait=False)
    start_ray(spec, address)
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from .progress import StudyProgress
    from .runlog import TrialLogger
    from .searcher import MultiStudySearcher
    from .space import study_space
    from .trainable import SweepContext, run_trial

    save_spec(spec)
    # Tune lets a custom searcher keep only one trial pending; let it fill every slot of the cap at once.
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(spec.max_concurrent))
    try:
        context = SweepContext(spec)
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=context),
                                        {"cpu": spec.cpus, "gpu": spec.gpus})
        path = str(experiment_dir(spec))
        if resume and tune.Tuner.can_restore(path):
            # Tune restores the callbacks pickled with the run config; that logger finds the store's ids itself,
            # so the preparation finishes first and the two never race.
            tracking.result()
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            callbacks = [TrialLogger(context, tracking.result), StudyProgress(spec), CSVLoggerCallback(),
                         JsonLoggerCallback()]
            searcher = MultiStudySearcher({s.name: study_space(spec.search, s) for s in spec.studies},
                                          spec.trials, spec.max_concurrent, spec.metric, "max", spec.seed)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, metric=spec.metric, mode="max",
                                            reuse_actors=True, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=spec.name, storage_path=spec.storage, verbose=0,
                    callbacks=callbacks,
                    failure_config=tune.FailureConfig(max_failures=spec.max_retries),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
            )
        results = tuner.fit()
    finally:
        stop_ray()
    experiment_id, parents = tracking.result()
    drop_orphan_runs(spec, experiment_id, {trial_id_of(r.path) for r in results})
    return finish_studies(spec, experiment_id, parents)


def _prepare_tracking(spec: Spec) -> tuple[str, dict[str, str]]:
    """The modules run_sweep needs next (Tune, Optuna, MLflow), imported while ray.init waits; then the store."""
    from . import progress, runlog, searcher, space, trainable  # noqa: F401
    from .tracking import prepare_tracking

    return prepare_tracking(spec)


def trial_dirname(trial) -> str:
    return f"{trial.config.get('study', 'trial')}-{trial.trial_id}"


def trial_id_of(trial_path: str) -> str:
    return Path(trial_path).name.rsplit("-", 1)[-1]


def drop_orphan_runs(spec: Spec, experiment_id: str, trial_ids: set[str]) -> None:
    """Delete the runs of trials the experiment does not know.

    A driver killed between starting a trial and its next experiment snapshot restores
    without that trial (Tune and the searcher forget it together, and it is suggested
    afresh), but the trial may already have opened an MLflow run: that run belongs to no
    trial, so it goes, keeping one run per trial.
    """
    from mlflow.tracking import MlflowClient

    from .tracking import ROLE, TRIAL

    client = MlflowClient(spec.tracking_uri)
    for run in client.search_runs([experiment_id], f"tags.`{ROLE}` = 'trial'", max_results=50_000):
        if run.data.tags.get(TRIAL) not in trial_ids:
            client.delete_run(run.info.run_id)


def finish_studies(spec: Spec, experiment_id: str, parents: dict) -> dict:
    """Close each study's parent run with its counts and best trial; return the summary."""
    from mlflow.tracking import MlflowClient


    client = MlflowClient(spec.tracking_uri)
    summary = summarize(client, experiment_id)
    for name, run_id in parents.items():
        row = summary.get(name, {})
        metrics = {"trials_finished": row.get("finished", 0), "trials_failed": row.get("failed", 0)}
        if row.get("best_top1") is not None:
            metrics["best_val_top1"] = row["best_top1"]
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        done = row.get("finished", 0) + row.get("failed", 0) >= spec.trials
        client.set_terminated(run_id, "FINISHED" if done else "KILLED")
    return summary


def summarize(client, experiment_id: str) -> dict:
    """Per study: finished / running / failed child runs and the best validation top-1 so far."""
    from .tracking import ROLE, STUDY, best_score

    rows = defaultdict(lambda: {"finished": 0, "running": 0, "failed": 0, "best_top1": None})
    for run in client.search_runs([experiment_id], f"tags.`{ROLE}` = 'trial'", max_results=50_000):
        row = rows[run.data.tags[STUDY]]
        row[{"FINISHED": "finished", "FAILED": "failed"}.get(run.info.status, "running")] += 1
        score = best_score(client, run.info.run_id) if "val_top1" in run.data.metrics else None
        if score is not None and (row["best_top1"] is None or score[0] > row["best_top1"]):
            row["best_top1"] = score[0]
    return dict(rows)


def print_summary(spec: Spec, summary: dict, out=sys.stdout) -> None:
    lines = ["| study | finished | failed | running | best val top-1 |", "|---|---:|---:|---:|---:|"]
    for study in spec.studies:
        row = summary.get(study.name, {})
        best = row.get("best_top1")
        lines.append(f"| {study.name} | {row.get('finished', 0)} | {row.get('failed', 0)} | {row.get('running', 0)} "
                     f"| {'-' if best is None else f'{best:.2f}'} |")
    print("\n".join(lines), file=out)
