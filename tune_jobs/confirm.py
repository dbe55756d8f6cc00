"""``attzoom confirm SWEEP``: re-train each study's best config with new seeds, as Tune trials.

A single best-of-30 trial mixes the config's merit with its lucky seed. Each study's best
trial (layout.best_of: the rule the report uses) is trained again with seeds 1..K (K+1 where the
sweep itself trained with one of them: its seed is skipped, it picked the best trial), every
other setting unchanged (same epochs, data split and resources as the sweep's saved spec).
The best configs are read from the trials' MLflow runs, so confirm needs no Tune trial folder.
Each re-run is a Tune trial logged by the same driver-side callback (tune_jobs/mlflow_callback.py)
as a child run of the study's parent run, with the confirm role and its seed as tags;
``attzoom report`` then adds the seeds' mean and standard deviation of test top-1. Pairs
(study, seed) that already have a finished confirm run of the study's best config are skipped, so
running confirm again only fills in what is missing, and after a resume found a better config it
trains that one's seeds. A confirm stopped midway is restored by the next one (confirm_experiment), so a stopped
seed goes on from its checkpoint in its own run.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from dataclasses import replace

from . import layout
from .layout import SEED, STUDY
from .infra import RUN_AGAIN, raise_if_interrupted, raise_if_problem, report_problem, stops_on_problems
from .lease import sweep_lease
from .naming import counted
from .space import STUDY_KEY, same_config, searched_values
from .spec import Spec, SpecError, hide_password
from .storage import folder_names, read_file, sweep_location, write_file


def add_confirm_command(sub) -> None:
    confirm = sub.add_parser("confirm", help="re-train each study's best config with K new seeds (seed noise)")
    confirm.add_argument("sweep", help="the sweep's name (under --storage) or its folder")
    confirm.add_argument("--seeds", type=int, default=3,
                         help="seeds per study: 1..K, skipping the sweep's own seed (default 3)")
    confirm.add_argument("--storage", default="ray_results")
    confirm.add_argument("--tracking-uri", default=None,
                         help="the sweep's MLflow store as this machine reaches it (default: the one its spec names; "
                              "its spec is read there when its folder is gone, else from sqlite:///mlflow.db)")
    confirm.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    confirm.add_argument("--data-root", default=None, help="where the data sets are now, if they moved")
    confirm.set_defaults(run=run_confirm_command, on_interrupt=RUN_AGAIN)  # before its own stop says more


def run_confirm_command(args) -> int:
    from .ray_session import check_address
    from .sweep import check_stores_kept, check_unchanged_since_start, preflight

    if args.seeds < 1:
        raise SpecError(f"--seeds must be at least 1, got {args.seeds}")
    check_address(args.address)
    spec = preflight(confirmed_spec(args), local=not args.address)
    check_unchanged_since_start(spec)  # confirm stores the spec it runs: an edited one would pass the next resume
    check_stores_kept(spec, searcher=False)  # confirm reads the sweep's runs, never its Optuna studies
    line, code = confirm_closing(spec, args.seeds, *confirm_sweep(spec, args.seeds, args.address),
                                 address=args.address)
    print(line)
    return code


def confirmed_spec(args) -> Spec:
    """The sweep's saved spec, with its store as --tracking-uri names it (a port-forward's address of the same server):
    given, it was read only where the sweep's folder was gone, and the runs went to the spec's store unsaid. A store
    that is not there is one line, never made afresh."""
    from .spec import check_store_exists
    from .sweep import load_saved_spec

    if args.tracking_uri is None:
        return load_saved_spec(args.sweep, args.storage, DEFAULT_TRACKING_URI, args.data_root)
    check_store_exists(args.tracking_uri)
    spec = load_saved_spec(args.sweep, args.storage, args.tracking_uri, args.data_root)
    return replace(spec, tracking_uri=args.tracking_uri)


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_after_kept_writes(spec: Spec) -> tuple[str, dict[str, str]]:
    """The store's ids once the writes a stopped sweep kept in its journal are made (they come before any read).
    Those may reopen the runs of trials a killed driver was training, which nothing trains now: stopped after."""
    from mlflow.tracking import MlflowClient

    from .mlflow_callback import make_kept_writes
    from .tracking import prepare_tracking, stop_leftover_runs
    from .trainable import SweepContext

    experiment_id, parents = prepare_tracking(spec)
    make_kept_writes(SweepContext(spec), lambda: (experiment_id, parents))
    raise_if_problem()
    stop_leftover_runs(MlflowClient(spec.tracking_uri), experiment_id)
    return experiment_id, parents


def confirm_closing(spec: Spec, seeds: int, failed: list[tuple[str, int]],
                    unfinished: list[str] = (), address: str | None = None) -> tuple[str, int]:
    """Confirm's last line and exit code: "complete" only when every study had a best trial to confirm and every
    seed run finished. ``address``: the driver's --address, which its hints name."""
    from .cli import attzoom_executable
    from .sweep import driver_address, resume_command

    if failed:
        runs = ", ".join(f"{study} seed {seed}" for study, seed in failed)
        return (f"confirm runs of {spec.name} are incomplete: {len(failed)} failed ({runs}); each one's error is in "
                f"its MLflow run (tag {layout.ERROR}); retry them with `{confirm_command(spec, seeds, address)}`"), 1
    if unfinished:
        return (f"confirm runs of {spec.name} are incomplete: {', '.join(unfinished)} has no finished trial to "
                f"confirm yet; finish the sweep (`{resume_command(spec, driver_address(address))}`), then "
                f"confirm again"), 1
    verdict = "the verdict" if has_pairs(spec) else "each study's mean and spread over the seeds"
    wanted = ", ".join(map(str, confirm_seeds(spec.seed, seeds)))
    # not "K seeds per study": an earlier confirm may have trained more, and the report averages every one
    return (f"confirm runs of {spec.name} are complete (seed{'s' if seeds > 1 else ''} {wanted} of each study "
            f"finished); see {verdict}, over every finished seed, in "
            f"`{attzoom_executable()} report {spec.name} --tracking-uri {hide_password(spec.tracking_uri)}`"), 0


def has_pairs(spec: Spec) -> bool:
    """Whether the report has a verdict to give: an AttZoom study and one it is compared with (layout.COMPARED_WITH)
    of the same backbone and data set; the spec's matrix crosses them all, so both variants are enough."""
    return "attzoom" in spec.variants and any(v in layout.COMPARED_WITH for v in spec.variants)


def confirm_command(spec: Spec, seeds: int, address: str | None = None) -> str:
    """The command that runs the seed re-runs still missing (after a stop or an interrupt), on the cluster the
    driver joined (``address``), if any."""
    from .cli import attzoom_executable
    from .sweep import driver_address

    command = (f"{attzoom_executable()} confirm {spec.name} --storage {shlex.quote(spec.storage)} --tracking-uri "
               f"{shlex.quote(hide_password(spec.tracking_uri))} --seeds {seeds}")
    where = driver_address(address)
    return f"{command} --address {shlex.quote(where)}" if where else command


def confirm_sweep(spec: Spec, seeds: int, address: str | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``run_confirm`` as the sweep's one driver (its lease), stopping cleanly on infrastructure failures; returns
    the (study, seed) runs that failed and the studies with no finished trial to confirm."""
    with stops_on_problems(confirm_command(spec, seeds, address), spec.tracking_uri), \
            sweep_lease(spec.storage, spec.name, on_error=report_problem, tracking_uri=spec.tracking_uri):
        trained, failed, unfinished = run_confirm(spec, seeds, address)
    for study, done in trained.items():
        print(f"{study}: trained seeds {', '.join(map(str, done))}")
    return failed, unfinished


def best_params(tracking_uri: str, experiment_id: str) -> dict[str, dict]:
    """{study: the searched params of its best finished trial}, typed back from its MLflow run's params.

    The run holds the trial's whole TrainConfig; its search-space keys, over the saved spec's
    [train], give that TrainConfig again (a key that was not searched holds the value it had anyway).
    """
    from mlflow.tracking import MlflowClient

    from .tracking import run_summary

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([experiment_id], layout.runs_filter(layout.TRIAL_ROLE, finished=True),
                              max_results=layout.MAX_RUNS, order_by=["attributes.start_time ASC"])
    by_study: dict[str, list] = {}
    for run in runs:
        by_study.setdefault(run.data.tags[STUDY], []).append((run, run_summary(client, run).best))
    found = {}
    for study, candidates in by_study.items():
        best = layout.best_of(candidates)
        if best is not None:
            found[study] = searched_values(best.data.params)
    return found


def done_pairs(tracking_uri: str, experiment_id: str, params: dict[str, dict]) -> set[tuple[str, int]]:
    """(study, seed) with a finished confirm run of the study's best config now (``params``)."""
    return confirm_pairs(tracking_uri, experiment_id, params)[0]


def confirm_pairs(tracking_uri: str, experiment_id: str, params: dict[str, dict]) -> tuple[set, set]:
    """(study, seed) with a finished confirm run of the study's best config now, and of an earlier best config (a
    resume has found a better one since: those do not count)."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(tracking_uri).search_runs(
        [experiment_id], layout.runs_filter(layout.CONFIRM_ROLE, finished=True), max_results=layout.MAX_RUNS)
    current, earlier = set(), set()
    for run in runs:
        study = run.data.tags[STUDY]
        if study in params:
            pairs = current if same_config(run.data.params, params[study]) else earlier
            pairs.add((study, int(run.data.tags[SEED])))
    return current, earlier


def confirm_study(config: dict) -> str:
    """The study a confirm trial re-trains (for the progress display)."""
    return config["pair"][STUDY_KEY]


def confirm_trial(config: dict, sweep, params: dict):
    """(sweep trial config, context) of one seed of one study: the best params, the seed swapped in."""
    study, seed = config["pair"][STUDY_KEY], int(config["pair"]["seed"])
    confirm = replace(sweep, spec=replace(sweep.spec, seed=seed), role=layout.CONFIRM_ROLE)
    return {STUDY_KEY: study, **params[study]}, confirm


def run_confirm_trial(config: dict, sweep, params: dict) -> None:
    """One seed of one study: the sweep's own trainable."""
    from .trainable import run_trial

    run_trial(*confirm_trial(config, sweep, params))


def confirm_seeds(sweep_seed: int, count: int) -> list[int]:
    """The first ``count`` seeds from 1, skipping the sweep's own: the selected trial trained with that one, so
    re-training it would put its best-of-N luck back among the seeds the verdict averages."""
    return [seed for seed in range(1, count + 2) if seed != sweep_seed][:count]


def run_confirm(spec: Spec, seeds: int, address: str | None = None) -> tuple[dict[str, list[int]], list, list]:
    """Re-train every study's best config with ``seeds`` seeds (confirm_seeds); returns ({study: seeds trained now}, the
    (study, seed) runs that failed, the studies with no finished trial to confirm)."""
    from collections import Counter

    from ray import tune

    from .mlflow_callback import adopt
    from .ray_session import apply_tune_settings, start_ray, stop_ray
    from .reclaim import after_fit
    from .trainable import SweepContext, ended, trial_trainable

    apply_tune_settings(spec)
    experiment_id, parents = tracking_after_kept_writes(spec)
    params = best_params(spec.tracking_uri, experiment_id)
    if not params:
        raise SpecError(f"sweep {spec.name!r} has no finished trial yet; run or resume it before confirming")
    unfinished = [study.name for study in spec.studies if study.name not in params]
    done, earlier = confirm_pairs(spec.tracking_uri, experiment_id, params)
    wanted = confirm_seeds(spec.seed, seeds)
    todo = [(study, seed) for study in params for seed in wanted if (study, seed) not in done]
    for study in sorted({s for s, _ in earlier} & {s for s, _ in todo}):
        print(f"{study}: its best config changed since its last confirm runs (a resume found a better one); "
              "re-training the new one", file=sys.stderr, flush=True)
    if not todo:
        return {}, [], unfinished
    experiment, restored = confirm_experiment(spec, todo, done, params, experiment_id)
    # with how to go on, as a sweep's first line: a confirm killed without a word (SIGKILL, OOM) said nothing of it
    print(f"re-training each study's best config with seeds {', '.join(map(str, wanted))} "
          f"({counted(len(todo), 'run')} to train), for a verdict beyond one lucky trial; if it stops, continue with: "
          f"{confirm_command(spec, seeds, address)}", file=sys.stderr, flush=True)
    if restored:
        print(f"continuing {experiment}, the confirm that was stopped: its stopped trials go on from their "
              "checkpoints, in their own MLflow runs", file=sys.stderr, flush=True)
    try:
        start_ray(spec, address)
        context = SweepContext(spec)
        trainable = trial_trainable(run_confirm_trial, context, params=params)
        path = sweep_location(spec.storage, experiment)
        if restored:
            adopt(context)  # the restored logger goes on with this driver's spec (a moved data root, say)
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            write_file(spec.storage, experiment, CONFIRM_FILE, text=json.dumps({"pairs": todo, "params": params}))
            tuner = new_confirm_tuner(spec, seeds, experiment, trainable, context, todo, params, experiment_id,
                                      parents, done_before=Counter(study for study, seed in done if seed in wanted))
        results = tuner.fit()
    finally:
        stop_ray()
    raise_if_problem()
    after_fit(spec.storage, experiment)
    raise_if_interrupted(ended(results), len(restored or todo), confirm_command(spec, seeds, address))
    trained: dict[str, list[int]] = {}
    now = done_pairs(spec.tracking_uri, experiment_id, params)
    for study, seed in sorted(now - done):
        trained.setdefault(study, []).append(seed)
    return trained, [pair for pair in todo if pair not in now], unfinished


def new_confirm_tuner(spec: Spec, seeds: int, experiment: str, trainable, context, todo: list, params: dict,
                      experiment_id: str, parents: dict, done_before):
    """A Tune experiment with one trial per (study, seed) in ``todo``, logged by the sweep's MLflow callback."""
    from functools import partial

    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from .guard import SweepGuard
    from .mlflow_callback import MlflowCallback
    from .progress import StudyProgress
    from .reclaim import EndedTrialsLastPt

    logger = MlflowCallback(context, lambda: (experiment_id, parents), partial(confirm_trial, params=params))
    progress = StudyProgress(spec, seeds, confirm_study, [s for s in spec.studies if s.name in params],
                             done_before=done_before, continued_by="confirm")
    callbacks = [SweepGuard(), logger, progress, EndedTrialsLastPt(), CSVLoggerCallback(), JsonLoggerCallback()]
    return tune.Tuner(
        trainable,
        param_space={"pair": tune.grid_search([{STUDY_KEY: s, "seed": k} for s, k in todo])},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, reuse_actors=True,
                                    trial_dirname_creator=lambda t: f"confirm-{t.trial_id}"),
        run_config=tune.RunConfig(name=experiment, storage_path=spec.storage, verbose=0, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_retries),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


CONFIRM_FILE = "attzoom-confirm.json"  # in a confirm's Tune folder: the (study, seed) pairs and best configs it trains


def confirm_experiment(spec: Spec, todo: list[tuple[str, int]], done: set, params: dict[str, dict],
                       experiment_id: str) -> tuple[str, set]:
    """(the Tune experiment's name, the pairs it trains when it is restored, else none): the latest confirm of this
    sweep when it stopped with just ``todo`` left (its other pairs ``done``) on the same best configs. Restored,
    its stopped trials go on from their checkpoints in their own MLflow runs; run afresh, they trained again in new
    runs, and MLflow showed two runs of one seed (the killed one counted in the report's compute)."""
    from ray import tune

    pattern = re.compile(rf"{re.escape(spec.name)}-confirm-(\d+)")
    stamps = [int(m.group(1)) for name in folder_names(spec.storage) if (m := pattern.fullmatch(name))]
    if stamps:
        latest = f"{spec.name}-confirm-{max(stamps)}"
        pairs = saved_pairs(spec, latest, params)
        if set(todo) <= pairs and pairs - set(todo) <= done and not set(todo) & deleted_pairs(spec, experiment_id) and \
                tune.Tuner.can_restore(sweep_location(spec.storage, latest)):
            return latest, pairs
    return f"{spec.name}-confirm-{int(time.time())}", set()


def deleted_pairs(spec: Spec, experiment_id: str) -> set[tuple[str, int]]:
    """(study, seed) of confirm runs deleted in the MLflow UI: their Tune trials ended, and a restored experiment
    never runs an ended trial again, so such a pair is trained in a new experiment."""
    from mlflow.tracking import MlflowClient

    from .summary import deleted_runs

    runs = deleted_runs(MlflowClient(spec.tracking_uri), experiment_id, layout.CONFIRM_ROLE)
    return {(run.data.tags[STUDY], int(run.data.tags[SEED])) for run in runs}


def saved_pairs(spec: Spec, experiment: str, params: dict[str, dict]) -> set[tuple[str, int]]:
    """The (study, seed) pairs a confirm's Tune experiment trains, when it trains them on ``params``; else none
    (an older confirm's folder has no CONFIRM_FILE)."""
    try:
        saved = json.loads(read_file(spec.storage, experiment, CONFIRM_FILE) or "null")
        pairs = {(study, int(seed)) for study, seed in saved["pairs"]}
        if all(saved["params"].get(study) == json.loads(json.dumps(params.get(study))) for study, _ in pairs):
            return pairs
    except (TypeError, KeyError, ValueError, AttributeError):
        pass
    return set()
