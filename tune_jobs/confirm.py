"""``attzoom confirm SWEEP``: re-train each study's best config with new seeds, as Tune trials.

A single best-of-30 trial mixes the config's merit with its lucky seed. Each study's best
trial (highest validation top-1 over its epochs, ties by top-5: the rule dashboards' report
uses) is trained again with seeds 1..K, every other setting unchanged (same epochs, data
split and resources as the sweep's saved spec). Each re-run is a Tune trial logged by the
same driver-side logger (tune_jobs/runlog.py) as a child run of the study's parent run, tagged
``attzoom.role = confirm`` and ``attzoom.seed``; ``attzoom report`` then adds the seeds' mean
and standard deviation of test top-1. Pairs (study, seed) that already have a finished
confirm run are skipped, so running confirm again only fills in what is missing.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from .spec import Spec, SpecError

# Tag and config keys of tracking.py and searcher.py, repeated so that building the CLI parser
# (which imports this module for add_confirm_command) loads neither MLflow nor Ray.
ROLE, STUDY, TRIAL, SEED = "attzoom.role", "attzoom.study", "attzoom.trial_id", "attzoom.seed"
STUDY_KEY = "study"


def add_confirm_command(sub) -> None:
    confirm = sub.add_parser("confirm", help="re-train each study's best config with seeds 1..K (seed noise)")
    confirm.add_argument("sweep", help="the sweep's name (under --storage) or its folder")
    confirm.add_argument("--seeds", type=int, default=3, help="seeds 1..K per study (default 3)")
    confirm.add_argument("--storage", default="ray_results")
    confirm.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    confirm.set_defaults(run=run_confirm_command)


def run_confirm_command(args) -> int:
    from .sweep import load_saved_spec, preflight

    if args.seeds < 1:
        raise SpecError(f"--seeds must be at least 1, got {args.seeds}")
    spec = preflight(load_saved_spec(args.sweep, args.storage), local=not args.address)
    trained = run_confirm(spec, args.seeds, args.address)
    for study, seeds in trained.items():
        print(f"{study}: trained seeds {', '.join(map(str, seeds))}")
    print(f"confirm runs of {spec.name} are complete ({args.seeds} seeds per study); see mean +- std in "
          f"`attzoom report {spec.name} --tracking-uri {spec.tracking_uri}`")
    return 0


def best_trial_ids(tracking_uri: str, experiment_id: str) -> dict[str, str]:
    """{study: Tune trial id of its best finished trial}: max validation top-1 over epochs, ties by top-5."""
    from mlflow.tracking import MlflowClient

    from .tracking import best_score

    client = MlflowClient(tracking_uri)
    best: dict[str, tuple[tuple[float, float], str]] = {}
    for run in client.search_runs([experiment_id], f"tags.`{ROLE}` = 'trial' and attributes.status = 'FINISHED'",
                                  max_results=50_000):
        score = best_score(client, run.info.run_id)
        if score is None:
            continue
        study = run.data.tags[STUDY]
        if study not in best or score > best[study][0]:
            best[study] = (score, run.data.tags[TRIAL])
    return {study: trial_id for study, (_, trial_id) in best.items()}


def best_params(spec: Spec, trial_ids: dict[str, str]) -> dict[str, dict]:
    """{study: the sampled params of its best trial}, exactly as Tune gave them (the trial's params.json)."""
    from .sweep import experiment_dir

    found = {}
    for study, trial_id in trial_ids.items():
        path = Path(experiment_dir(spec)) / f"{study}-{trial_id}" / "params.json"
        if not path.is_file():
            raise SpecError(f"the best trial of {study} has no {path}; run confirm with the sweep's own --storage")
        found[study] = {k: v for k, v in json.loads(path.read_text()).items() if k != STUDY_KEY}
    return found


def done_pairs(tracking_uri: str, experiment_id: str) -> set[tuple[str, int]]:
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(tracking_uri).search_runs(
        [experiment_id], f"tags.`{ROLE}` = 'confirm' and attributes.status = 'FINISHED'", max_results=50_000)
    return {(r.data.tags[STUDY], int(r.data.tags[SEED])) for r in runs}


def confirm_trial(config: dict, sweep, params: dict):
    """(sweep trial config, context) of one seed of one study: the best params, the seed swapped in."""
    study, seed = config["pair"][STUDY_KEY], int(config["pair"]["seed"])
    return {STUDY_KEY: study, **params[study]}, replace(sweep, spec=replace(sweep.spec, seed=seed), role="confirm")


def run_confirm_trial(config: dict, sweep, params: dict) -> None:
    """One seed of one study: the sweep's own trainable."""
    from .trainable import run_trial

    run_trial(*confirm_trial(config, sweep, params))


def run_confirm(spec: Spec, seeds: int, address: str | None = None) -> dict[str, list[int]]:
    """Re-train every study's best config with seeds 1..``seeds``; returns {study: seeds trained now}."""
    from functools import partial

    from ray import tune

    from .runlog import TrialLogger
    from .sweep import start_ray, stop_ray
    from .tracking import prepare_tracking
    from .trainable import SweepContext

    experiment_id, parents = prepare_tracking(spec)
    params = best_params(spec, best_trial_ids(spec.tracking_uri, experiment_id))
    if not params:
        raise SpecError(f"sweep {spec.name!r} has no finished trial yet; run or resume it before confirming")
    done = done_pairs(spec.tracking_uri, experiment_id)
    todo = [(study, seed) for study in params for seed in range(1, seeds + 1) if (study, seed) not in done]
    if not todo:
        return {}
    start_ray(spec, address)
    try:
        context = SweepContext(spec)
        trainable = tune.with_resources(tune.with_parameters(run_confirm_trial, sweep=context, params=params),
                                        {"cpu": spec.cpus, "gpu": spec.gpus})
        logger = TrialLogger(context, lambda: (experiment_id, parents), partial(confirm_trial, sweep=context,
                                                                                params=params))
        tuner = tune.Tuner(
            trainable,
            param_space={"pair": tune.grid_search([{STUDY_KEY: s, "seed": k} for s, k in todo])},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, reuse_actors=True,
                                        trial_dirname_creator=lambda t: f"confirm-{t.trial_id}"),
            run_config=tune.RunConfig(name=f"{spec.name}-confirm-{int(time.time())}", storage_path=spec.storage,
                                      verbose=0, callbacks=[logger],
                                      failure_config=tune.FailureConfig(max_failures=spec.max_retries),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        tuner.fit()
    finally:
        stop_ray()
    trained: dict[str, list[int]] = {}
    for study, seed in sorted(done_pairs(spec.tracking_uri, experiment_id) - done):
        trained.setdefault(study, []).append(seed)
    return trained
