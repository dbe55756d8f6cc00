"""MultiStudySearcher with real OptunaSearch (TPE) instances, driven the way Tune drives it.

No Ray cluster: a Searcher is plain Python. Tune calls suggest(trial_id) until it gets None
(wait) or FINISHED (stop asking), on_trial_result per epoch and on_trial_complete once, and
save/restore around every experiment snapshot; these tests make the same calls.
"""

import optuna
import pytest
from ray.tune.search import Searcher

from tune_jobs.searcher import STUDY_KEY, MultiStudySearcher
from tune_jobs.space import study_space
from tune_jobs.spec import SearchSpace, Spec, Study

STUDIES = [Study("tiny_resnet", "cluttered-digits", v) for v in ("baseline", "attzoom", "zoom-only")]
NAMES = [s.name for s in STUDIES]


def make_searcher(search: SearchSpace = SearchSpace(), trials: int = 3, cap: int = 2, seed: int = 0,
                  storage_url: str | None = None):
    return MultiStudySearcher({s.name: study_space(search, s) for s in STUDIES}, trials, cap, "val_top1", "max",
                              seed, storage_url=storage_url, sweep="sw")


def complete(searcher, trial_id: str, value: float = 50.0) -> None:
    searcher.on_trial_result(trial_id, {"val_top1": value, "epoch": 1, "training_iteration": 1})
    searcher.on_trial_complete(trial_id, {"val_top1": value, "training_iteration": 1})


def optuna_trials(searcher, name: str, state=optuna.trial.TrialState.COMPLETE):
    return [t for t in searcher.searches[name]._ot_study.trials if t.state == state]


def test_trials_go_to_the_study_with_fewest_within_the_global_cap():
    searcher = make_searcher()
    assert searcher.suggest("t0")[STUDY_KEY] == NAMES[0]
    assert searcher.suggest("t1")[STUDY_KEY] == NAMES[1]
    assert searcher.suggest("t2") is None  # 2 live = the cap, across studies
    complete(searcher, "t0")
    assert searcher.suggest("t2")[STUDY_KEY] == NAMES[2]  # the study with no trial yet, not t0's
    assert searcher.suggest("t3") is None

    live, n = ["t1", "t2"], 3
    while True:
        complete(searcher, live.pop(0))
        counts = searcher.trial_counts()
        config = searcher.suggest(f"t{n}")
        if config is Searcher.FINISHED:
            break
        assert counts[config[STUDY_KEY]] == min(c for c in counts.values() if c < 3)
        live.append(f"t{n}")
        n += 1
        assert len(searcher.live) <= 2
    assert n == 9 and searcher.trial_counts() == dict.fromkeys(NAMES, 3)
    assert searcher.live == set(live) == {"t8"}  # FINISHED comes while the last trial still runs
    for trial_id in live:
        complete(searcher, trial_id)
    assert searcher.suggest("t99") is Searcher.FINISHED
    assert all(len(optuna_trials(searcher, name)) == 3 for name in NAMES)


def test_results_go_to_the_owning_study_only():
    searcher = make_searcher(cap=3)
    for i in range(3):
        searcher.suggest(f"t{i}")
    owner = searcher.owner["t1"]
    searcher.on_trial_result("t1", {"training_iteration": 1, "val_loss": 2.0})  # no metric yet: ignored
    for epoch, top1 in ((1, 40.0), (2, 61.5), (3, 55.0)):  # each epoch's result; the last one got worse
        searcher.on_trial_result("t1", {"val_top1": top1, "epoch": epoch, "training_iteration": epoch})
    searcher.on_trial_complete("t1", {"val_top1": 55.0, "epoch": 3, "training_iteration": 4})  # its status report
    searcher.on_trial_complete("stranger", {"val_top1": 1.0})  # a trial this searcher never suggested
    [done] = optuna_trials(searcher, owner)
    # intermediate values by epoch; the trial's value is its best epoch's, the checkpoint it keeps
    assert done.value == 61.5 and done.intermediate_values == {1: 40.0, 2: 61.5, 3: 55.0}
    assert all(not optuna_trials(searcher, name) for name in NAMES if name != owner)
    assert searcher.live == {"t0", "t2"}

    searcher.on_trial_complete("t2", None, error=True)  # failed for good: recorded as failed, slot freed
    assert len(optuna_trials(searcher, searcher.owner["t2"], optuna.trial.TrialState.FAIL)) == 1
    assert searcher.live == {"t0"}
    assert searcher.trial_counts() == dict.fromkeys(NAMES, 1)  # a failed trial still counts for its study


def test_conditional_parameters_follow_the_paper_space():
    search = SearchSpace(threshold=(0.3, 0.7), positions=("stem", "stage1"))
    searcher = make_searcher(search, trials=20, cap=1)
    spec = Spec(name="t", backbones=("tiny_resnet",), datasets=("cluttered-digits",),
                variants=tuple(s.variant for s in STUDIES), search=search)
    seen = set()
    for i in range(60):
        config = searcher.suggest(f"t{i}")
        name = config.pop(STUDY_KEY)
        study = next(s for s in STUDIES if s.name == name)
        assert ("momentum" in config) == (config["optimizer"] == "sgd")
        assert ("step_size" in config) == (config["scheduler"] == "step")
        assert ("threshold" in config) == (study.variant == "attzoom")  # gated variants only
        assert ("position" in config) == (study.variant != "baseline")
        assert config["batch_size"] in search.batch_sizes and 1e-5 <= config["lr"] <= 1e-1
        spec.train_config(study, config).validate()  # every sample is a trainable config
        seen |= {config["optimizer"], config["scheduler"]}
        complete(searcher, f"t{i}", value=float(i))
    assert seen >= {"adam", "sgd", "step", "cosine"}  # both sides of each condition were drawn
    assert searcher.suggest("t60") is Searcher.FINISHED


def test_no_attzoom_knobs_unless_the_spec_asks():
    searcher = make_searcher(cap=3)
    for i in range(3):
        config = searcher.suggest(f"t{i}")
        assert not {"threshold", "position"} & set(config)


def test_restore_continues_with_the_same_owners_live_trials_and_counts(tmp_path):
    searcher = make_searcher()
    for i in range(2):
        searcher.suggest(f"t{i}")
    complete(searcher, "t0", 10.0)
    complete(searcher, "t1", 20.0)
    for i in range(2, 4):
        searcher.suggest(f"t{i}")
    searcher.save(str(tmp_path / "searcher.pkl"))  # the driver is killed here: 4 suggested, 2 live
    owner, live = dict(searcher.owner), set(searcher.live)

    restored = make_searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.owner == owner and restored.live == live == {"t2", "t3"}
    assert restored.suggest("t4") is None  # the resumed trials still hold the cap
    complete(restored, "t2", 30.0)  # Tune resumes the two running trials; they report to their studies
    complete(restored, "t3", 40.0)
    n = 4
    while restored.suggest(f"t{n}") is not Searcher.FINISHED:
        complete(restored, f"t{n}", float(n))
        n += 1
    assert n == 9 and restored.trial_counts() == dict.fromkeys(NAMES, 3)
    values = {name: sorted(t.value for t in optuna_trials(restored, name)) for name in NAMES}
    assert all(len(v) == 3 for v in values.values())
    assert sorted(v for vs in values.values() for v in vs) == [4, 5, 6, 7, 8, 10, 20, 30, 40]  # each trial once
    assert 10.0 in values[owner["t0"]] and 30.0 in values[owner["t2"]] and 40.0 in values[owner["t3"]]


def test_studies_live_in_the_optuna_storage_and_a_restore_fails_what_the_killed_driver_asked(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(storage_url=url)
    for i in range(2):
        searcher.suggest(f"t{i}")
    complete(searcher, "t0", 10.0)
    searcher.save(str(tmp_path / "searcher.pkl"))  # the last snapshot: t1 live
    searcher.suggest("t2")  # asked after it, then the driver is killed: Tune and the searcher forget t2
    restored = make_searcher(storage_url=url)
    restored.restore(str(tmp_path / "searcher.pkl"))
    loaded = {n: optuna.load_study(study_name=f"sw/{n}", storage=url) for n in NAMES}
    states = {t.user_attrs["tune_trial_id"]: t.state.name for study in loaded.values() for t in study.trials}
    assert states == {"t0": "COMPLETE", "t1": "RUNNING", "t2": "FAIL"}  # t1 resumes; t2 is asked afresh
    # optuna-dashboard shows why a trial that never failed is FAIL (it showed no reason)
    reasons = {t.user_attrs["tune_trial_id"]: t.user_attrs.get("dropped") for s in loaded.values() for t in s.trials}
    assert reasons["t2"].startswith("asked by a driver stopped before its next snapshot") and reasons["t1"] is None
    complete(restored, "t1", 20.0)
    n = 2
    while restored.suggest(f"n{n}") is not Searcher.FINISHED:
        complete(restored, f"n{n}", float(n))
        n += 1
    for name in NAMES:
        trials = optuna.load_study(study_name=f"sw/{name}", storage=url).trials
        assert sum(t.state.name == "COMPLETE" for t in trials) == 3
        assert all(t.state.is_finished() and t.intermediate_values == {1: t.value} for t in trials
                   if t.state.name == "COMPLETE")


def test_a_trial_told_by_a_killed_driver_after_its_last_snapshot_is_not_told_again(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(storage_url=url)
    searcher.suggest("t0")
    searcher.save(str(tmp_path / "searcher.pkl"))  # the last snapshot: t0 running
    complete(searcher, "t0", 10.0)  # t0 ends and is told, then the driver is killed
    restored = make_searcher(storage_url=url)
    restored.restore(str(tmp_path / "searcher.pkl"))
    complete(restored, "t0", 10.0)  # Tune runs t0 on from its checkpoint; it ends again
    assert "Cannot tell" not in caplog.text  # Optuna refuses to tell a finished trial twice (a warning line)
    [trial] = optuna.load_study(study_name=f"sw/{NAMES[0]}", storage=url).trials
    assert trial.state.name == "COMPLETE" and trial.value == 10.0
    assert restored.suggest("t1")[STUDY_KEY] == NAMES[1]  # and it counts once


def test_the_same_seed_gives_the_same_suggestions():
    def first(seed):
        searcher = make_searcher(cap=3, seed=seed)
        return [searcher.suggest(f"t{i}") for i in range(3)]

    assert first(7) == first(7)
    assert first(7) != first(8)
    assert len({c["lr"] for c in first(7)}) == 3  # each study has its own sampler seed


def test_set_max_concurrency_changes_the_cap():
    searcher = make_searcher(cap=1)
    assert searcher.suggest("t0") is not None and searcher.suggest("t1") is None
    assert searcher.set_max_concurrency(2)
    assert searcher.suggest("t1") is not None and searcher.suggest("t2") is None


@pytest.mark.parametrize("trials", [1, 2])
def test_finished_once_every_study_has_its_trials(trials):
    searcher = make_searcher(trials=trials, cap=10)
    ids = []
    while (config := searcher.suggest(f"t{len(ids)}")) is not Searcher.FINISHED:
        assert config is not None
        ids.append(f"t{len(ids)}")
    assert len(ids) == 3 * trials and searcher.trial_counts() == dict.fromkeys(NAMES, trials)


def test_a_study_write_the_optuna_storage_refuses_stops_the_sweep_instead_of_being_dropped(tmp_path):
    # OptunaSearch logged a failed tell as a warning and went on: the trial stayed RUNNING in its study, TPE never
    # learnt its value, and the next resume marked it FAIL while MLflow showed it finished
    import sqlite3

    from tune_jobs import infra

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(storage_url=url)
    searcher.suggest("t0")
    searcher.on_trial_result("t0", {"val_top1": 10.0, "epoch": 1, "training_iteration": 1})
    with sqlite3.connect(tmp_path / "optuna.db") as db:  # the storage now refuses every value written
        db.execute("DROP TABLE trial_values")
        db.execute("DROP TABLE trial_intermediate_values")
    infra.clear()
    try:
        searcher.on_trial_result("t0", {"val_top1": 20.0, "epoch": 2, "training_iteration": 2})
        assert f"Optuna storage {url} failed to record its epoch of trial t0" in (infra.problem() or "")
        infra.clear()
        searcher.on_trial_complete("t0", {"val_top1": 20.0, "training_iteration": 2})
        assert f"Optuna storage {url} failed to record its end of trial t0" in (infra.problem() or "")
        assert "t0" not in searcher.searches[NAMES[0]]._completed_trials
        searcher.save(str(tmp_path / "searcher.pkl"))  # a snapshot may come before the sweep stops: Tune has t0 ended
    finally:
        infra.clear()
    optuna.storages.RDBStorage(url)  # the storage is fixed (its missing tables made again)
    restored = make_searcher(storage_url=url)
    restored.restore(str(tmp_path / "searcher.pkl"))  # the resume tells it, as Tune will not run t0 again
    [trial] = optuna.load_study(study_name=f"sw/{NAMES[0]}", storage=url).trials
    assert trial.state.name == "COMPLETE" and trial.value == 20.0 and infra.problem() is None


def test_a_failed_trial_that_a_resume_runs_again_reaches_its_study_and_counts_against_the_cap(tmp_path):
    # Tune runs failed trials again on resume (resume_errored): their results were dropped, so the study kept FAIL for
    # a trial MLflow showed finished, and they ran beside max_concurrent new ones
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(storage_url=url, trials=2, cap=2)
    params = searcher.suggest("t0")
    searcher.on_trial_result("t0", {"val_top1": 60.0, "epoch": 1, "training_iteration": 1})
    searcher.on_trial_complete("t0", None, error=True)
    searcher.suggest("t1")
    complete(searcher, "t1", 10.0)
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = make_searcher(storage_url=url, trials=2, cap=2)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.live == {"t0"}
    assert restored.suggest("t2") is not None and restored.suggest("t3") is None  # t0 and t2 fill the cap of 2
    # that resume is stopped too while t0 runs on from its checkpoint: the next one must still take its results
    restored.on_trial_result("t0", {"val_top1": 50.0, "epoch": 2, "training_iteration": 2})
    restored.save(str(tmp_path / "searcher.pkl"))
    again = make_searcher(storage_url=url, trials=2, cap=2)
    again.restore(str(tmp_path / "searcher.pkl"))
    again.on_trial_result("t0", {"val_top1": 45.0, "epoch": 3, "training_iteration": 3})
    again.on_trial_complete("t0", {"val_top1": 45.0, "training_iteration": 3})
    trials = optuna.load_study(study_name=f"sw/{params[STUDY_KEY]}", storage=url).trials
    mine = [t for t in trials if t.user_attrs["tune_trial_id"] == "t0"]
    assert [t.state.name for t in mine] == ["FAIL", "COMPLETE"] and mine[0].params == mine[1].params
    assert mine[1].value == 60.0 and mine[1].intermediate_values == {1: 60.0, 2: 50.0, 3: 45.0}  # its best epoch's


def test_a_searcher_saved_before_failed_trials_were_kept_finds_them_in_its_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(storage_url=url)
    params = searcher.suggest("t0")
    searcher.on_trial_complete("t0", None, error=True)
    for search in searcher.searches.values():
        del search.__dict__["failed"]  # as an older version pickled it
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = make_searcher(storage_url=url)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.live == {"t0"} and restored.searches[params[STUDY_KEY]].failed == set()


@pytest.mark.parametrize("pragma, cause", [
    ("max_page_count = 1", "the disk is full (OperationalError: database or disk is full)"),  # no page beyond its own
    ("query_only = 1", "the database is read-only (OperationalError: attempt to write a readonly database)"),
])
def test_a_storage_whose_disk_is_full_or_read_only_stops_the_sweep_with_a_line_that_says_so(tmp_path, pragma, cause):
    # it said "StorageInternalError: An exception is raised during the commit. This typically happens due to invalid
    # data in the commit, e.g. exceeding max length.. No trial was charged": no word of the full disk, and two stops
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    from tune_jobs import infra
    from tune_jobs.infra import InfrastructureError, stops_on_problems

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(storage_url=url)
    searcher.suggest("t0")

    def refuse_writes(dbapi_connection, record, proxy):  # SQLite's own error, on every connection Optuna takes
        dbapi_connection.execute(f"PRAGMA {pragma}")

    event.listen(Pool, "checkout", refuse_writes)
    try:
        with pytest.raises(InfrastructureError) as stopped, stops_on_problems("attzoom resume sw", url):
            for epoch in range(1, 2000):  # until a value needs a page the file cannot have
                searcher.on_trial_result("t0", {"val_top1": 1.0, "epoch": epoch, "training_iteration": epoch})
                if infra.problem():
                    break
    finally:
        event.remove(Pool, "checkout", refuse_writes)
        infra.clear()
    line = str(stopped.value)
    assert f"Optuna storage {url} failed to record its epoch of trial t0: {cause}. No trial was charged" in line, line
    assert ".." not in line and "invalid data" not in line


def tune_snapshot(folder, trials: dict, ended: dict | None = None, errored=()) -> None:
    """The experiment state Tune writes beside the searcher's state: ``trials`` maps trial id -> its config (from
    suggest); ``ended`` trial id -> its last result, for trials Tune had ended (TERMINATED); ``errored``: trials
    that failed for good (ERROR), which a resume runs again."""
    import json

    from ray.tune.experiment import Trial

    states = []
    for trial_id, config in trials.items():
        trial = Trial("run_trial", config=config, trial_id=trial_id, stub=True)
        trial.set_status(Trial.TERMINATED if trial_id in (ended or {}) else
                         Trial.ERROR if trial_id in errored else Trial.RUNNING)
        trial.run_metadata.last_result = (ended or {}).get(trial_id, {})
        states.append(list(trial.get_json_state()))
    (folder / "experiment_state-2026-12-01_00-00-00.json").write_text(json.dumps({"trial_data": states}))


def run_to_the_end(searcher, first: int = 0) -> int:
    n = first
    while searcher.suggest(f"n{n}") is not Searcher.FINISHED:
        complete(searcher, f"n{n}", float(n))
        n += 1
    return n - first


@pytest.mark.parametrize("storage", [True, False], ids=["optuna-storage", "in-memory"])
def test_a_trial_tune_restores_that_the_searchers_older_state_never_asked_is_owned_by_its_study(tmp_path, storage):
    # a stop between Tune's two snapshot files restored trial states newer than the searcher's: Tune resumed a trial no
    # study owned, and its study asked one more (4 trials of 3, "done 4/3")
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if storage else None
    searcher = make_searcher(storage_url=url)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(2)}
    searcher.save(str(tmp_path / "searcher.pkl"))  # the searcher's file of the last snapshot
    complete(searcher, "t0", 10.0)
    configs["t2"] = searcher.suggest("t2")  # after it, in the trial states only
    tune_snapshot(tmp_path, configs, ended={"t0": {"val_top1": 10.0, "epoch": 1}})
    restored = make_searcher(storage_url=url)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.owner == {t: c[STUDY_KEY] for t, c in configs.items()} and restored.live == {"t1", "t2"}
    complete(restored, "t1", 20.0)  # Tune runs both on; each reports to its own study
    complete(restored, "t2", 30.0)
    assert run_to_the_end(restored) == 9 - 3 and restored.trial_counts() == dict.fromkeys(NAMES, 3)
    values = sorted(t.value for name in NAMES for t in optuna_trials(restored, name))
    assert len(values) == 9 and {10.0, 20.0, 30.0} <= set(values)  # t0 told once (Optuna refuses twice)
    assert configs["t2"] == {k: restored.searches[configs["t2"][STUDY_KEY]]._ot_trials["t2"].params.get(k, v)
                             for k, v in configs["t2"].items()}


def test_a_trial_the_searcher_asked_that_tunes_older_trial_states_lack_is_asked_afresh(tmp_path):
    # the other way round: the searcher counted a trial Tune never ran, and its study ended one short ("interrupted:
    # 5 of 6 trials ended" with nothing stopping it)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(storage_url=url)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(2)}
    tune_snapshot(tmp_path, configs)  # the trial states of the last snapshot
    complete(searcher, "t0", 10.0)
    searcher.suggest("t2")
    searcher.save(str(tmp_path / "searcher.pkl"))  # the searcher's, newer
    restored = make_searcher(storage_url=url)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert set(restored.owner) == {"t0", "t1"} and restored.live == {"t0", "t1"}  # t0 runs on from its checkpoint
    complete(restored, "t0", 10.0)
    complete(restored, "t1", 20.0)
    assert run_to_the_end(restored) == 9 - 2 and restored.trial_counts() == dict.fromkeys(NAMES, 3)
    for name in NAMES:
        trials = optuna.load_study(study_name=f"sw/{name}", storage=url).trials
        assert sum(t.state.name == "COMPLETE" for t in trials) == 3
    states = {t.user_attrs["tune_trial_id"]: t.state.name for name in NAMES
              for t in optuna.load_study(study_name=f"sw/{name}", storage=url).trials}
    assert states["t2"] == "FAIL" and states["t0"] == "COMPLETE"


def test_a_trial_tune_had_ended_but_the_searcher_was_not_told_is_told_at_its_best_epoch(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(storage_url=url)
    config = searcher.suggest("t0")
    searcher.save(str(tmp_path / "searcher.pkl"))  # t0 running
    for epoch, value in ((1, 30.0), (2, 40.0), (3, 35.0)):
        searcher.on_trial_result("t0", {"val_top1": value, "epoch": epoch, "training_iteration": epoch})
    tune_snapshot(tmp_path, {"t0": config}, ended={"t0": {"val_top1": 35.0, "epoch": 3}})  # the tell is lost
    restored = make_searcher(storage_url=url)
    restored.restore(str(tmp_path / "searcher.pkl"))
    [trial] = optuna.load_study(study_name=f"sw/{config[STUDY_KEY]}", storage=url).trials
    assert trial.state.name == "COMPLETE" and trial.value == 40.0 and restored.live == set()
    assert restored.suggest("t1")[STUDY_KEY] == NAMES[1]  # t0 counts once


def test_a_failed_trial_run_again_on_a_resume_that_agrees_with_tune_reaches_its_new_optuna_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(storage_url=url, trials=2, cap=2)
    configs = {"t0": searcher.suggest("t0")}
    searcher.on_trial_result("t0", {"val_top1": 60.0, "epoch": 1, "training_iteration": 1})
    searcher.on_trial_complete("t0", None, error=True)
    configs["t1"] = searcher.suggest("t1")
    searcher.save(str(tmp_path / "searcher.pkl"))
    tune_snapshot(tmp_path, configs, errored={"t0"})  # the same moment: t0 ERROR, t1 running
    restored = make_searcher(storage_url=url, trials=2, cap=2)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.live == {"t0", "t1"}
    restored.on_trial_result("t0", {"val_top1": 70.0, "epoch": 2, "training_iteration": 2})
    restored.on_trial_complete("t0", {"val_top1": 70.0, "training_iteration": 2})
    mine = [t for t in optuna.load_study(study_name=f"sw/{configs['t0'][STUDY_KEY]}", storage=url).trials
            if t.user_attrs["tune_trial_id"] == "t0"]
    assert [(t.state.name, t.value) for t in mine] == [("FAIL", None), ("COMPLETE", 70.0)]  # it stayed RUNNING


def test_a_failed_trial_tune_ran_again_to_its_end_after_the_searchers_snapshot_is_not_run_a_third_time(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(storage_url=url, trials=2, cap=1)
    config = searcher.suggest("t0")
    searcher.on_trial_complete("t0", None, error=True)
    searcher.save(str(tmp_path / "searcher.pkl"))  # the searcher's file: t0 failed
    rerun = make_searcher(storage_url=url, trials=2, cap=1)
    rerun.restore(str(tmp_path / "searcher.pkl"))  # a resume ran it again to its end; its searcher's file was lost
    complete(rerun, "t0", 55.0)
    tune_snapshot(tmp_path, {"t0": config}, ended={"t0": {"val_top1": 55.0, "epoch": 1}})
    restored = make_searcher(storage_url=url, trials=2, cap=1)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.live == set() and restored.suggest("t1") is not None  # the cap of 1 was held for ever
    states = [t.state.name for t in optuna.load_study(study_name=f"sw/{config[STUDY_KEY]}", storage=url).trials]
    assert states == ["FAIL", "COMPLETE"]


def test_a_searcher_pickled_by_an_older_version_agrees_with_tune_too(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(storage_url=url)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(2)}
    for search in searcher.searches.values():
        del search.__dict__["failed"], search.__dict__["untold"]  # as a version before them pickled it
    searcher.save(str(tmp_path / "searcher.pkl"))
    tune_snapshot(tmp_path, {"t0": configs["t0"]})  # t1 asked after Tune's trial states
    restored = make_searcher(storage_url=url)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert set(restored.owner) == {"t0"} and restored.live == {"t0"}
