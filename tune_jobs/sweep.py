"""Run or resume a sweep: one Tune experiment, all studies, one global cap.

The spec is checked first, with no side effects (preflight). Then, at once: this driver
prepares the MLflow store and the studies' parent runs in a thread, while Ray starts; Tune
starts once the store has said the sweep's name is this storage's (check_owner; trials never
open the store). ``resume`` restores the same experiment, searcher state included, and runs
only what is missing (README: How resume works).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from . import layout
from .infra import BEFORE_START, raise_if_interrupted, raise_if_problem, report_problem, short_error, stops_on_problems
from .lease import sweep_lease
from .naming import counted
from .ray_session import apply_tune_settings, check_address, start_ray, stop_ray
from .storage import folder_names, is_remote, read_file, remove_folder, sweep_location, write_file
from .spec import (Spec, SpecError, check_cluster_cpus, check_cluster_gpus, check_data, check_storage_answers,
                   check_store_exists, check_tracking_store, check_writable, database_answers, database_backend,
                   has_password, hide_password, local_path, optuna_storage_url, spec_from_json, spec_json,
                   sqlite_file)

SPEC_FILE = "attzoom-spec.json"


def absolute(spec: Spec) -> Spec:
    """Trials run in other working directories: pin every local path to where the user meant."""
    def pin(location: str) -> str:
        if "://" in location:
            if location.startswith("sqlite:///") and not location.startswith("sqlite:////"):
                return "sqlite:///" + str(Path(location[len("sqlite:///"):]).expanduser().resolve())
            return location
        return str(Path(location).expanduser().resolve())

    optuna = pin(spec.optuna_storage) if spec.optuna_storage else None
    # a file:// storage is a local folder: the saved spec, the lease and the orphan clean-up work on its path
    storage = str(local_path(spec.storage)) if spec.storage.startswith("file://") else spec.storage
    return replace(spec, storage=pin(storage), tracking_uri=pin(spec.tracking_uri), optuna_storage=optuna,
                   data_root=str(Path(spec.data_root).expanduser().resolve()))


def preflight(spec: Spec, local: bool = False) -> Spec:
    """Every check that can run before Ray or MLflow is touched; returns the spec with absolute paths.

    ``local``: the sweep will start its own Ray instance, so the GPU request is checked here
    against this machine; a cluster's GPUs are checked once connected (start_ray).
    """
    spec = absolute(spec)
    check_writable("storage", spec.storage)
    check_no_password_in_cloud(spec)  # first: a key in the storage URI must not reach the probe or its message
    check_storage_answers(spec.storage)
    check_writable("tracking_uri", spec.tracking_uri)
    check_tracking_store(spec.tracking_uri)
    if optuna := optuna_storage_url(spec):  # the searcher cannot run without it, and nothing waits it out
        check_writable("optuna_storage", optuna)
        if database_backend(optuna) in ("postgresql", "mysql"):
            database_answers(optuna, "--optuna-storage")
    check_data(spec)
    if local:
        check_cluster_cpus(spec, os.cpu_count() or 1, "this machine")
    if local and spec.gpus > 0:
        import torch

        gpus = spec.local_gpus if spec.local_gpus is not None else torch.cuda.device_count()
        check_cluster_gpus(spec, gpus, "this machine")
    return spec


def started_in(storage: str, name: str) -> bool:
    """Whether Ray has started the sweep in ``storage``: its folder holds more than its saved spec (a folder holding
    only the spec is a sweep stopped before Ray started: its name is still free)."""
    return beyond_spec(folder_names(storage, name))


def beyond_spec(names: list[str]) -> bool:
    return any(name != SPEC_FILE for name in names)


def check_new_sweep(spec: Spec, spec_file: Path | None) -> None:
    """A new sweep's name must be free in its storage (started_in) and in its tracking store
    (check_name_in_store)."""
    if not started_in(spec.storage, spec.name):
        check_name_in_store(spec, spec_file)
        check_name_in_studies(spec, spec_file)
        return
    check_experiment_not_deleted(spec)  # else "continue it with resume", which then says just this
    where = sweep_location(spec.storage, spec.name)
    if changes := described_changes(saved_spec(spec.storage, spec.name), spec):  # an edited spec: resume ignores it
        raise SpecError(f"a sweep named {spec.name!r} already exists in {where}, started with another search "
                        f"({changes}); a resume continues it as it began, not with this spec: give this sweep "
                        f"another name in {spec_file}")
    raise SpecError(f"a sweep named {spec.name!r} already exists in {where}; {how_to_go_on(spec, continue_hint())} "
                    f"or change name in {spec_file}")


def check_experiment_not_deleted(spec: Spec):
    """The sweep's experiment (None: not made yet, or the store out of reach, which the sweep waits out). Deleted in
    the MLflow UI, it refuses every write: one line saying so."""
    from .tracking import check_not_deleted

    try:
        experiment = _sweep_experiment(spec)
    except Exception:  # noqa: BLE001 - a store out of reach: the resume waits it out as a sweep does
        return None
    check_not_deleted(experiment, spec.tracking_uri)
    return experiment


def finished_already(spec: Spec) -> dict | None:
    """The store's summary of this very sweep (this storage holds it, its search as this spec's) when every study
    has its N trials finished, none failed, and no driver runs it; else None. A script that runs its sweeps again
    is told they are done, where the name check refused them as bad input and advised a resume with nothing to
    resume."""
    from .lease import driver_gone
    from .summary import complete, summarize
    from .tracking import open_store, recorded_storage

    if not started_in(spec.storage, spec.name):
        return None
    try:
        experiment = _sweep_experiment(spec)
        if experiment is None or not _same_storage(recorded_storage(experiment) or "", spec.storage):
            return None
        started = started_spec(experiment.tags.get(layout.SPEC))
        if started is None or search_changes(started, json.loads(spec_json(spec)), strict=True):
            return None
        summary = summarize(open_store(spec.tracking_uri), experiment.experiment_id)
    except Exception:  # noqa: BLE001 - a store out of reach or a tag that is no JSON: the name check says what
        return None
    running = any(summary.get(study.name, {}).get("running") for study in spec.studies)
    # complete: every study's N trials closed, none failed (resume retries a failed one); a driver still at work
    # (a retry between two tries): refused as before
    done = complete(spec, summary) and not running and driver_gone(spec.storage, spec.name, spec.tracking_uri)
    return summary if done else None


def continue_hint() -> str:
    """`sweep --continue` as another way on, where the user typed the command (a submitted job's driver runs the
    command `attzoom submit` made)."""
    from .cli import in_ray_job

    return "" if in_ray_job() else " (or add --continue to this command)"


def how_to_go_on(spec: Spec, or_else: str = "") -> str:
    """For a sweep of this name that exists: it runs now (a live driver holds its lease, which says where), so a
    resume would be refused; else its resume command, with the --address its last driver recorded, and
    ``or_else``."""
    from .cli import attzoom_executable
    from .lease import describe, driver_gone, lease_for

    try:
        holder = None if driver_gone(spec.storage, spec.name, spec.tracking_uri) else \
            lease_for(spec.storage, spec.name, spec.tracking_uri).read()
    except Exception:  # noqa: BLE001 - a lease that cannot be read: as if none held it
        holder = None
    if not holder:
        return f"continue it with `{resume_command(spec, recorded_address(spec))}`{or_else}"
    status = f"{attzoom_executable()} status {spec.name} --tracking-uri {shlex.quote(hide_password(spec.tracking_uri))}"
    return f"it is running now ({describe(holder)}); follow it with `{status}`"


def check_name_in_store(spec: Spec, spec_file: Path | None) -> None:
    """A sweep with this name and runs in the tracking store (kept under another storage, or whose Tune folder is
    gone) would lose those runs to a new one: its orphan clean-up (drop_orphan_runs) deletes them, and its trials
    join the same Optuna studies. ``spec_file`` None: the demo's spec, which the user cannot rename."""
    from .tracking import earlier_sweep

    storage = earlier_sweep(spec.tracking_uri, spec.name)
    if storage is None:
        return
    store = f"a sweep named {spec.name!r} already has runs in the tracking store {hide_password(spec.tracking_uri)}"
    other = f"change name in {spec_file}" if spec_file else "pass another --tracking-uri"
    if storage and ("://" in storage or Path(storage, spec.name).is_dir()):
        raise SpecError(f"{store} (its results are in {storage}); {how_to_go_on(replace(spec, storage=storage))} "
                        f"or {other}")
    raise SpecError(f"{store}, but its Tune folder is gone, so it cannot be resumed; {other} (a new sweep under "
                    "that name would delete those runs)")


def check_name_in_studies(spec: Spec, spec_file: Path | None) -> None:
    """An earlier sweep of this name whose runs are gone (its experiment deleted, its folder removed) may have left
    its Optuna studies: a new sweep added its trials to them, and TPE started from their results, so
    optuna-dashboard showed both sweeps' trials as one study while MLflow showed one sweep. A study with no trial
    (one stopped before its first) is taken over."""
    from .cli import executable
    from .studies import open_storage, optuna_study_name

    url = optuna_storage_url(spec)
    if url is None or ((database := sqlite_file(url)) is not None and not database.is_file()):
        return
    try:
        storage = open_storage(url)  # one engine for every study (the searcher then reuses it)
        kept = {study.study_name for study in storage.get_all_studies()}
        held = [(name, storage.get_n_trials(storage.get_study_id_from_name(name)))
                for name in (optuna_study_name(spec.name, study.name) for study in spec.studies) if name in kept]
    except Exception:  # noqa: BLE001 - a storage that does not answer: the searcher says so
        return
    if used := [(name, trials) for name, trials in held if trials]:
        name, trials = used[0]
        other = f"change name in {spec_file}" if spec_file else "pass another --tracking-uri"
        delete = f"{executable('optuna')} delete-study --storage {shlex.quote(hide_password(url))} --study-name"
        raise SpecError(f"the Optuna storage {hide_password(url)} holds {counted(len(used), 'study', 'studies')} of "
                        f"an earlier sweep named {spec.name!r} ({name!r}: {counted(trials, 'trial')}), whose runs are "
                        f"not in the tracking store; a new sweep would add its trials to them and start its search "
                        f"from theirs: {other}, or delete them (`{delete} {shlex.quote(name)}`, and so for each "
                        f"{spec.name}/... study)")


def experiment_dir(spec: Spec) -> Path:
    return Path(spec.storage) / spec.name


def save_spec(spec: Spec) -> None:
    """Beside the trials, in the sweep's folder; resume reads a password here, so such a file is this user's only
    (and cloud storage, which has no file modes, never gets one: check_no_password_in_cloud)."""
    private = has_password(spec.tracking_uri) or has_password(spec.optuna_storage)
    write_file(spec.storage, spec.name, SPEC_FILE, text=spec_json(spec), private=private)


def saved_spec(storage: str, name: str) -> str | None:
    return read_file(storage, name, SPEC_FILE)


def check_no_password_in_cloud(spec: Spec) -> None:
    """Cloud storage has no private files: a password in a URL would be readable by whoever reads the bucket. Keys
    in the storage URI itself (s3://KEY:SECRET@bucket) would be saved, stored in MLflow and printed everywhere."""
    if has_password(spec.storage):
        raise SpecError(f"storage {hide_password(spec.storage)} holds a secret key, which would be saved with the "
                        "sweep and printed in its commands: leave it out and give the credentials as the cloud's "
                        "environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) or its profile")
    if is_remote(spec.storage):
        for key, url in (("tracking_uri", spec.tracking_uri), ("optuna_storage", spec.optuna_storage)):
            if has_password(url):
                raise SpecError(f"{key} {hide_password(url)} holds a password, which would be saved with the sweep "
                                f"in {spec.storage}: leave it out and give it as PGPASSWORD or in ~/.pgpass (a "
                                "tracking server's as MLFLOW_TRACKING_PASSWORD)")


def load_saved_spec(name_or_dir: str, storage: str = "ray_results", tracking_uri: str | None = None,
                    data_root: str | None = None) -> Spec:
    """The spec a sweep was started with: from its folder, found by path or by name under ``storage``, or,
    with ``tracking_uri``, from its MLflow experiment (where the Tune folder is gone or out of reach).
    ``data_root``: where the data sets are now (where things are may change between drivers; the search may not)."""
    spec = _saved_spec(name_or_dir, storage, tracking_uri)
    return replace(spec, data_root=data_root) if data_root else spec


def _saved_spec(name_or_dir: str, storage: str, tracking_uri: str | None) -> Spec:
    candidates = [(name_or_dir, ""), (storage, name_or_dir)]
    for folder, name in candidates:
        if is_remote(folder):
            check_storage_answers(folder)  # else a cloud client's minutes of retries, then a traceback
        if (text := saved_spec(folder, name)) is not None:
            return spec_from_json(text, source=f"{sweep_location(folder, name)}/{SPEC_FILE}")
    where = " or ".join(sweep_location(folder, name) for folder, name in candidates)
    if tracking_uri:
        from .tracking import stored_spec

        if (text := stored_spec(tracking_uri, name_or_dir)) is not None:  # its URIs' passwords hidden: the one given
            source = f"the spec stored with sweep {name_or_dir!r} in {hide_password(tracking_uri)}"
            spec = replace(spec_from_json(text, source=source), tracking_uri=tracking_uri)
            print(f"no {SPEC_FILE} in {where}: using {source} (its results folder: "
                  f"{spec.storage})", file=sys.stderr, flush=True)  # a mistyped --storage must not pass unseen
            return spec
    where += f" or in {hide_password(tracking_uri)}" if tracking_uri else ""
    raise SpecError(f"no sweep found at {name_or_dir!r} (looked for {SPEC_FILE} in {where}); pass the sweep's "
                    "folder, or its name with --storage")


# What a resume continues as the sweep began: Tune and Optuna saved the search (its studies, N, space, seed) and
# the trials their configs; the rest (where things are, resources, retries) may change between drivers.
FIXED_ON_RESUME = ("backbones", "datasets", "variants", "trials", "epochs", "patience", "seed", "metric", "search",
                   "scheduler", "train")


def search_changes(started: dict, now: dict, strict: bool = False) -> list[str]:
    """The keys of FIXED_ON_RESUME whose values differ between two specs' JSON. A key the started spec lacks (one
    stored by an older version) differs only when ``strict``: a resume may go on, a finished sweep is not this one."""
    return [key for key in FIXED_ON_RESUME if (strict or key in started) and started.get(key) != now[key]]


def check_unchanged_since_start(spec: Spec, changed_is: str | None = None) -> None:
    """A saved spec edited since the sweep started would be half applied (the restored searcher keeps its N, the
    summary and the store take the new one): compared with the spec the sweep stored in its experiment.
    ``changed_is``: what the refusal calls the change (default: the saved spec changed since the start)."""
    experiment = check_experiment_not_deleted(spec)
    if experiment is not None:  # a resume in another storage of another sweep's name: before a local Ray starts
        from .tracking import recorded_storage

        check_owner(spec, recorded_storage(experiment))
    text = experiment.tags.get(layout.SPEC) if experiment else None
    refuse_changes(text, spec, changed_is or f"the saved spec of sweep {spec.name} changed since it started")


def check_continues_search(spec: Spec, spec_file: Path) -> None:
    """`sweep --continue` of a started sweep: this spec (with its command-line options) must not change the search,
    compared with the spec saved in the sweep's folder (there once Ray started it, whatever the tracking store
    answers) and with the one stored in its experiment."""
    changed_is = f"{spec_file}, with the options given, is not the spec sweep {spec.name} started with"
    refuse_changes(saved_spec(spec.storage, spec.name), spec, changed_is)
    check_unchanged_since_start(spec, changed_is)


def check_continuable(spec: Spec) -> None:
    """What `sweep --continue --check` can tell of a resume before its work: the stores it began in are there, and
    no driver runs it now (the resume's lease would refuse it)."""
    from .lease import driver_alive

    check_stores_kept(spec)
    if driver_alive(spec.storage, spec.name, spec.tracking_uri):
        raise SpecError(f"sweep {spec.name!r} cannot be continued: {how_to_go_on(spec)}")


def refuse_changes(started_text: str | None, spec: Spec, changed_is: str) -> None:
    """SpecError when ``spec`` changes the search of the started spec (its JSON); nothing to compare with: no word."""
    if what := described_changes(started_text, spec):
        raise SpecError(f"{changed_is} ({what}); a resume continues the search as it began: undo the change, or "
                        "start a new sweep (another name, or another --storage and --tracking-uri)")


def described_changes(started_text: str | None, spec: Spec) -> str:
    """How ``spec`` changes the search of the started spec (its JSON), as "key: old then, new now"; "" when it does
    not, or there is nothing to compare with (no spec, a tag that is no JSON)."""
    if (started := started_spec(started_text)) is None:
        return ""
    now = json.loads(spec_json(spec))
    return "; ".join(f"{key}: {started[key]} then, {now[key]} now" for key in search_changes(started, now))


def started_spec(text: str | None) -> dict | None:
    """A stored spec's JSON as a dict; None when there is none, or it is no JSON object."""
    try:
        started = json.loads(text or "null")
    except ValueError:
        return None
    return started if isinstance(started, dict) else None


def check_stores_kept(spec: Spec, searcher: bool = True) -> None:
    """A resume goes on in the stores the sweep began in. One that is gone (a moved or deleted mlflow.db or
    optuna.db, another server) would be made afresh and empty: the MLflow runs of resumed trials would then hold only
    the epochs still to come and the sweep would say done with wrong bests; Tune's restore of the searcher failed
    and the driver hung. ``searcher`` False: the Optuna storage is not needed (confirm)."""
    if not any(name.startswith("experiment_state-") for name in folder_names(spec.storage, spec.name)):
        return  # nothing to restore: the sweep starts (a first demo) and makes its stores
    # Tune restores the callbacks and the searcher with the stores they began with: the store must come back there
    results = (f"whose results are in {sweep_location(spec.storage, spec.name)}: it was moved, deleted or replaced; "
               "put it back where it was (a resume goes on in the stores the sweep began in)")
    if not _kept_in_tracking_store(spec):
        raise SpecError(f"the tracking store {hide_password(spec.tracking_uri)} holds no experiment of sweep "
                        f"{spec.name!r}, {results}")
    if searcher and (missing := _missing_studies(spec)):
        raise SpecError(f"the Optuna storage {hide_password(optuna_storage_url(spec))} holds no study {missing[0]!r} "
                        f"of sweep {spec.name!r}, {results}")


def _kept_in_tracking_store(spec: Spec) -> bool:
    """False only when a trial has started (its folder is there), no MLflow write waits in the journal, and the store
    answers without the sweep's experiment: that trial's run was made in it, so it is another store now. A sweep
    stopped before its first trial, or during an outage, may not have made its experiment yet."""
    from .mlflow_callback import journal_path

    if is_remote(spec.storage):  # its unmade writes travel in the snapshot, not in a journal here (mlflow_callback)
        return True
    if not trial_folders(spec):
        return True
    journal = journal_path(spec)
    if journal.is_file() and journal.stat().st_size:
        return True
    try:
        return _sweep_experiment(spec) is not None
    except Exception:  # noqa: BLE001 - a store out of reach: the resume waits it out as a sweep does
        return True


def _sweep_experiment(spec: Spec):
    """The sweep's MLflow experiment, or None when the store answers without one; raises when it does not answer
    (an HTTP server is asked for its health first: MLflow's own client retries for minutes)."""
    from .tracking import sweep_experiment

    if spec.tracking_uri.startswith(("http://", "https://")):
        check_store_exists(spec.tracking_uri)
    return sweep_experiment(spec.tracking_uri, spec.name)


def _missing_studies(spec: Spec) -> list[str]:
    """The sweep's studies its Optuna storage lacks (all of them when its SQLite file is gone); none when the
    studies live in memory only or the storage does not answer (the searcher then says so)."""
    from .studies import optuna_study_name

    url = optuna_storage_url(spec)
    names = [optuna_study_name(spec.name, study.name) for study in spec.studies]
    if url is None:
        return []
    if (database := sqlite_file(url)) is not None and not database.is_file():
        return names
    import optuna

    try:
        kept = set(optuna.get_all_study_names(storage=url))
    except Exception:  # noqa: BLE001
        return []
    return [name for name in names if name not in kept]


def run_sweep(spec: Spec, address: str | None = None, resume: bool = False) -> dict:
    """Run (or resume) a validated sweep to the end, as its one driver; returns the per-study summary."""
    check_address(address)
    spec = preflight(spec, local=not address)  # a local run starts its own Ray (address="local")
    if resume:  # resume, or a demo run again: on the search as it began, in the stores it began in
        check_unchanged_since_start(spec)
        check_stores_kept(spec)
    with stops_on_problems(resume_command(spec, driver_address(address)), spec.tracking_uri), \
            cluster_joined(spec, address), \
            sweep_lease(spec.storage, spec.name, on_error=report_problem, tracking_uri=spec.tracking_uri):
        return _run_sweep(spec, address, resume)


@contextmanager
def cluster_joined(spec: Spec, address: str | None):
    """Join the cluster first: one that refuses this driver (not Ray, no token, too few GPUs) leaves nothing behind,
    not even the lease's folder; left when the body ends. A local Ray starts later, in _run_sweep."""
    if not address:
        yield
        return
    joined = False
    try:
        start_ray(spec, address)
        joined = True
        yield
    except KeyboardInterrupt:
        if joined:
            raise
        raise KeyboardInterrupt(BEFORE_START) from None
    finally:
        stop_ray()


JOBS_API = "http://127.0.0.1:8265"  # the Jobs API on the head, and through the README's port-forward or tunnel


def resume_command(spec: Spec, address: str | None = None) -> str:
    """As the user can type it: this environment's attzoom (the venv is seldom activated), a URI's '&' quoted, and
    the cluster's --address (without it the resume would move a cluster's sweep onto a private local Ray). A
    driver that found its cluster with `auto` (a submitted job's, on the head) is resumed as a job: the hint is
    read through `attzoom logs` or `status` elsewhere, where `auto` finds no cluster."""
    from .cli import attzoom_executable

    storage = shlex.quote(spec.storage)
    if address == "auto":
        return f"{attzoom_executable()} submit --resume {spec.name} --storage {storage} --address {JOBS_API}"
    command = f"{attzoom_executable()} resume {spec.name} --storage {storage}"
    return f"{command} --address {shlex.quote(address)}" if address else command


def driver_address(address: str | None) -> str:
    """The --address a hint names for a driver that joined ``address`` ("" for a local Ray): as given, but `auto`
    inside a Ray job (`attzoom submit`), whose driver runs on the head, where `auto` finds the cluster."""
    from .cli import in_ray_job

    if not address or address == "local":
        return ""
    return "auto" if in_ray_job() else address


def recorded_address(spec: Spec) -> str | None:
    """The --address the sweep's last driver recorded in its experiment (prepare_tracking); None when unknown."""
    try:
        experiment = _sweep_experiment(spec)
    except Exception:  # noqa: BLE001 - a store out of reach: the hint goes without it
        return None
    return experiment.tags.get(layout.ADDRESS) if experiment else None


def _run_sweep(spec: Spec, address: str | None, resume: bool) -> dict:
    try:  # a cluster is joined by now (cluster_joined)
        save_spec(spec)  # then: a sweep stopped while a local Ray starts can be resumed as its Ctrl-C line says
        apply_tune_settings(spec)
        if resume:  # before a local Ray starts: a damaged snapshot is one line
            from .snapshots import check_snapshot_readable

            check_snapshot_readable(sweep_location(spec.storage, spec.name))
        # The store's migration overlaps the imports and a local Ray's start; Tune waits for it (and for the name
        # to be this sweep's) before it writes anything.
        pool = ThreadPoolExecutor(max_workers=1)
        tracking = pool.submit(_prepare_tracking, spec, driver_address(address))
        pool.shutdown(wait=False)
        from ray import tune
        from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

        from .guard import SweepGuard
        from .mlflow_callback import MlflowCallback, adopt
        from .progress import StudyProgress
        from .reclaim import EndedTrialsLastPt, after_fit
        from .scheduler import early_stopping
        from .searcher import MultiStudySearcher
        from .space import study_space
        from .summary import finish_studies
        from .trainable import SweepContext, ended, run_trial, trial_trainable

        if not address:
            start_ray(spec, address)  # inside the try: a local Ray with too few CPUs or GPUs is stopped too
        context = SweepContext(spec)
        trainable = trial_trainable(run_trial, context)
        _wait_for_owner_check(tracking)  # before Tune writes anything into this storage
        path = sweep_location(spec.storage, spec.name)  # not a Path: that makes s3://b/x s3:/b/x
        restoring = resume and tune.Tuner.can_restore(path)  # a first demo is no resume
        announce(spec, address, restoring)
        if restoring:
            # Tune restores the callbacks pickled with the run config; that logger finds the store's ids itself,
            # so the preparation finishes first and the two never race.
            tracking.result()
            adopt(context)  # the restored logger goes on with this driver's spec (a moved data root, say)
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            scheduler, marks = early_stopping(spec)  # marks pruned trials after the logger saw their last epoch
            callbacks = [SweepGuard(), MlflowCallback(context, tracking.result), StudyProgress(spec), *marks,
                         EndedTrialsLastPt(), CSVLoggerCallback(), JsonLoggerCallback()]
            searcher = MultiStudySearcher({s.name: study_space(spec.search, s) for s in spec.studies},
                                          spec.trials, spec.max_concurrent, spec.metric, "max", spec.seed,
                                          storage_url=optuna_storage_url(spec), sweep=spec.name)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=-1,
                                            metric=spec.metric, mode="max", reuse_actors=True,
                                            trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=spec.name, storage_path=spec.storage, verbose=0,
                    callbacks=callbacks,
                    failure_config=tune.FailureConfig(max_failures=spec.max_retries),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
            )
        results = tuner.fit()
    finally:
        stop_ray()
    raise_if_problem()  # the MLflow writes could not all be made: no summary, no "done"
    after_fit(spec.storage, spec.name)
    experiment_id, parents = _tracking_ids(tracking, spec, driver_address(address))
    drop_orphan_runs(spec, experiment_id, {trial_id_of(r.path) for r in results})
    drop_orphan_folders(spec, {Path(r.path).name for r in results})
    summary = finish_studies(spec, experiment_id, parents)  # an interrupted sweep's unfinished studies: KILLED
    raise_if_interrupted(ended(results), spec.trials * len(spec.studies),
                         resume_command(spec, driver_address(address)))
    return summary


def announce(spec: Spec, address: str | None, resume: bool) -> None:
    """The sweep's first line: what runs, where it goes, and how to continue it, for a driver that ends without a
    word (SIGKILL, an out-of-memory kill, a lost head node, a closed terminal) and for the logs of a script."""
    print(f"{'resuming sweep' if resume else 'sweep'} {spec.name}: {counted(len(spec.studies), 'study', 'studies')} x "
          f"{counted(spec.trials, 'trial')} of up to {counted(spec.epochs, 'epoch')}; results in "
          f"{sweep_location(spec.storage, spec.name)}, runs in {hide_password(spec.tracking_uri)}; if it stops, "
          "continue with: "
          f"{resume_command(spec, driver_address(address))}", flush=True)


def _prepare_tracking(spec: Spec, address: str) -> tuple[str, dict[str, str]]:
    """The modules run_sweep needs next (Tune, Optuna, MLflow), imported while ray.init waits; then the store."""
    from . import mlflow_callback, progress, searcher, space, trainable  # noqa: F401
    from .tracking import prepare_tracking

    return prepare_tracking(spec, address, check_owner=lambda recorded: check_owner(spec, recorded), reopen=True)


def check_owner(spec: Spec, recorded: str) -> None:
    """The experiment of this name names another storage (``recorded``) that holds a sweep, or whose driver runs:
    two sweeps of one name would share the experiment and the Optuna studies, and each delete the other's runs as
    orphans (two people who picked one name, started within seconds: the name check before the start saw no runs
    yet). A storage that holds no such sweep any more was moved, or never got past its spec: this one goes on."""
    if not recorded or _same_storage(recorded, spec.storage):
        return
    try:
        held = _holds_sweep(recorded, spec)
    except OSError as e:  # a folder this user may not search, a bucket out of reach: no traceback, and no guess
        raise SpecError(f"the tracking store {hide_password(spec.tracking_uri)} names {recorded} as where sweep "
                        f"{spec.name!r} keeps its results, which cannot be read here ({short_error(e)}); give this "
                        "sweep another name, or run it where that storage can be read") from None
    if held:
        raise SpecError(f"a sweep named {spec.name!r} with its results in {recorded} is in the tracking store "
                        f"{hide_password(spec.tracking_uri)} too; {how_to_go_on(replace(spec, storage=recorded))} "
                        "or give this sweep another name")


def _holds_sweep(storage: str, spec: Spec) -> bool:
    """``storage`` holds the sweep (more than its spec), or the spec of a driver that runs now. Between two cloud
    storages the lease is one, kept in the tracking store by name: this driver holds it, and it already keeps the
    other out."""
    from .lease import driver_gone

    names = folder_names(storage, spec.name)
    if beyond_spec(names):
        return True
    if not names or (is_remote(storage) and is_remote(spec.storage)):
        return False
    return not driver_gone(storage, spec.name, spec.tracking_uri)


def _same_storage(a: str, b: str) -> bool:
    """One folder however spelled (a link, a trailing slash); cloud URIs as written."""
    if is_remote(a) or is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return local_path(a).resolve() == local_path(b).resolve()


def _wait_for_owner_check(tracking) -> None:
    """No trial (and so no Optuna trial) starts before the store said the name is this sweep's; a store out of reach
    is waited out later, as a sweep does (MlflowCallback)."""
    try:
        tracking.result()
    except SpecError:
        raise
    except Exception:  # noqa: BLE001 - the outage path: prepared again at the end (_tracking_ids)
        pass


def _tracking_ids(tracking, spec: Spec, address: str) -> tuple[str, dict[str, str]]:
    """The store's ids; prepared again if the first preparation failed (the tracking server was down then)."""
    try:
        return tracking.result()
    except Exception:  # noqa: BLE001 - the outbox has since made every write, so the store answers again
        return _prepare_tracking(spec, address)


def trial_dirname(trial) -> str:
    return f"{trial.config.get('study', 'trial')}-{trial.trial_id}"


def trial_id_of(trial_path: str | Path) -> str:
    return Path(trial_path).name.rsplit("-", 1)[-1]


def drop_orphan_folders(spec: Spec, known: set[str]) -> None:
    """Delete the trial folders of trials the experiment does not know (drop_orphan_runs says which).

    Such a trial began training, in ``work/`` inside its folder, before the driver died; its
    epochs are run again by the trial suggested in its place.
    """
    for trial in trial_folders(spec):
        if trial not in known:
            remove_folder(spec.storage, spec.name, trial)


def trial_folders(spec: Spec) -> list[str]:
    """The names of the sweep's trial folders in its storage (trial_dirname: ``<study>-<trial id>``)."""
    prefixes = tuple(f"{study.name}-" for study in spec.studies)
    return [name for name in folder_names(spec.storage, spec.name, folders_only=True) if name.startswith(prefixes)]


def drop_orphan_runs(spec: Spec, experiment_id: str, trial_ids: set[str]) -> None:
    """Delete the runs of trials the experiment does not know.

    A driver killed between starting a trial and its next experiment snapshot restores
    without that trial (Tune and the searcher forget it together, and it is suggested
    afresh), but the trial may already have opened an MLflow run: that run belongs to no
    trial, so it goes, keeping one run per trial.
    """
    from mlflow.tracking import MlflowClient

    from .tracking import drop_run

    client = MlflowClient(spec.tracking_uri)
    for run in client.search_runs([experiment_id], layout.runs_filter(layout.TRIAL_ROLE), max_results=layout.MAX_RUNS):
        if run.data.tags.get(layout.TRIAL) not in trial_ids:
            if run.info.status == "RUNNING":  # nothing trains it: deleted, it would still read as running
                client.set_terminated(run.info.run_id, "KILLED")
            drop_run(client, run.info.run_id, "orphan")
