"""Early stopping with rungs per study (tune_jobs/scheduler.py), driven the way Tune drives it.

No Ray cluster: Tune's schedulers and callbacks are plain Python. Tune calls on_trial_add once per
trial, on_trial_result per report (the decision), then on_trial_complete; every callback gets the
same result, which becomes the trial's last result; callback state is pickled with each snapshot.
"""

import pickle
from dataclasses import dataclass, field, replace

import optuna
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from tune_jobs.layout import PRUNED_STATUS
from tune_jobs.scheduler import PrunedTrials, StudyASHA, early_stopping
from tune_jobs.searcher import StudySearch
from tune_jobs.space import STUDY_KEY, study_space
from tune_jobs.spec import EarlyStopping, SearchSpace, Spec, Study
from tune_jobs.trainable import RESTART_KEY, STATUS_KEY

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


@dataclass
class FakeTrial:
    """What a scheduler reads of Tune's Trial: its id and config."""

    trial_id: str
    config: dict = field(default_factory=dict)


def trial(trial_id: str, study: str = "a") -> FakeTrial:
    return FakeTrial(trial_id, {STUDY_KEY: study})


def asha(epochs: int = 8, grace: int = 1, factor: float = 2) -> StudyASHA:
    return StudyASHA("val_top1", "max", epochs, grace, factor)


def epoch(scheduler, t: FakeTrial, n: int, value: float) -> str:
    return scheduler.on_trial_result(None, t, {"epoch": n, "val_top1": value})


def add(scheduler, *trials: FakeTrial) -> None:
    for t in trials:
        scheduler.on_trial_add(None, t)


def test_a_trial_is_measured_against_its_own_study_only():
    scheduler, tune_asha = asha(), AsyncHyperBandScheduler(time_attr="epoch", metric="val_top1", mode="max", max_t=8,
                                                            grace_period=1, reduction_factor=2,
                                                            stop_last_trials=False)
    strong, weak = trial("s1", "resnet50.tinyimagenet"), trial("w1", "mobilenet.cifar100")
    for s in (scheduler, tune_asha):
        add(s, strong, weak)
        assert epoch(s, strong, 1, 60.0) == CONTINUE
    assert epoch(tune_asha, weak, 1, 20.0) == STOP  # one set of rungs for the whole sweep: the weak study loses
    assert epoch(scheduler, weak, 1, 20.0) == CONTINUE  # its own study's rung was empty
    assert scheduler.pruned == {}

    worse = trial("w2", "mobilenet.cifar100")
    add(scheduler, worse)
    assert epoch(scheduler, worse, 1, 10.0) == STOP  # below the best half of its own study at epoch 1
    assert scheduler.pruned == {"w2": 1}


def test_rungs_come_at_grace_period_times_the_factor():
    scheduler = asha(epochs=8, grace=2, factor=2)
    first, second = trial("t1"), trial("t2")
    add(scheduler, first, second)
    for n in range(1, 8):
        assert epoch(scheduler, first, n, 50.0 + n) == CONTINUE
    assert epoch(scheduler, second, 1, 1.0) == CONTINUE  # before the grace period
    assert epoch(scheduler, second, 2, 1.0) == STOP  # rung at epoch 2, below the first trial's 52
    assert scheduler.pruned == {"t2": 2}


def test_only_finished_epochs_count_and_a_trial_at_its_last_epoch_ends_by_itself():
    scheduler = asha(epochs=4)
    leader, other = trial("t1"), trial("t2")
    add(scheduler, leader, other)
    assert epoch(scheduler, leader, 1, 90.0) == CONTINUE
    ends = {"epoch": 1, "val_top1": 5.0, STATUS_KEY: "early_stopped"}  # how fit ended: it repeats the last epoch
    restart = {"epoch": 0, "val_top1": 0.0, RESTART_KEY: "damaged checkpoint"}
    for result in (ends, restart, {"val_top1": 5.0}, {"epoch": 4, "val_top1": 5.0}):
        assert scheduler.on_trial_result(None, other, result) == CONTINUE
    assert scheduler.pruned == {}


def test_the_state_survives_a_snapshot_and_a_restore_before_the_trials_are_added_again():
    scheduler = asha()
    first, second, third = trial("t1"), trial("t2"), trial("t3")
    add(scheduler, first, second)
    epoch(scheduler, first, 1, 70.0)
    epoch(scheduler, second, 1, 10.0)  # stopped
    scheduler.on_trial_complete(None, second, {"epoch": 1, "val_top1": 10.0})
    saved = pickle.dumps(PrunedTrials(scheduler).get_state())  # Tune pickles callback state with each snapshot

    restored = asha()
    marker = PrunedTrials(restored)
    marker.set_state(pickle.loads(saved))  # Tune restores callbacks first, then adds the trials again
    add(restored, first, second, third)
    assert restored.pruned == {"t2": 1}
    assert epoch(restored, third, 1, 30.0) == STOP  # measured against the rung the first driver filled
    fresh = asha()
    add(fresh, third)
    assert epoch(fresh, third, 1, 30.0) == CONTINUE  # what a resume without the state would have decided


def test_a_trial_pruned_just_before_a_kill_stays_pruned_when_the_resume_runs_it_again():
    # the snapshot held the scheduler's decision but the trial still running: Tune restarts it from its checkpoint,
    # and ASHA, whose rung already holds it, let it train to the last epoch
    scheduler = asha()
    first, second = trial("t1"), trial("t2")
    add(scheduler, first, second)
    epoch(scheduler, first, 1, 70.0)
    assert epoch(scheduler, second, 1, 10.0) == STOP
    restored = asha()
    PrunedTrials(restored).set_state(pickle.loads(pickle.dumps(PrunedTrials(scheduler).get_state())))
    add(restored, first, second)  # t2 comes back PAUSED, not TERMINATED
    result = {"epoch": 2, "val_top1": 95.0}
    assert restored.on_trial_result(None, second, result) == STOP
    result["done"] = True
    PrunedTrials(restored).on_trial_result(0, [], second, result)
    assert result[STATUS_KEY] == PRUNED_STATUS and restored.pruned == {"t2": 1}
    assert epoch(restored, first, 2, 71.0) == CONTINUE


def test_the_marker_ends_only_the_trials_the_scheduler_stopped():
    scheduler = asha()
    marker = PrunedTrials(scheduler)
    leader, loser = trial("t1"), trial("t2")
    add(scheduler, leader, loser)
    epoch(scheduler, leader, 1, 80.0)
    result = {"epoch": 1, "val_top1": 10.0}
    assert scheduler.on_trial_result(None, loser, result) == STOP
    result["done"] = True  # Tune marks the result of a STOP decision done, then calls the callbacks
    marker.on_trial_result(0, [], loser, result)
    assert result[STATUS_KEY] == PRUNED_STATUS

    stopped_with_the_sweep = {"epoch": 2, "val_top1": 85.0, "done": True}  # not the scheduler's decision
    marker.on_trial_result(0, [], leader, stopped_with_the_sweep)
    assert STATUS_KEY not in stopped_with_the_sweep
    own_end = {"epoch": 3, "val_top1": 85.0, "done": True, STATUS_KEY: "completed"}
    marker.on_trial_result(0, [], leader, own_end)
    assert own_end[STATUS_KEY] == "completed"


def test_a_pruned_trial_is_pruned_in_optuna_with_its_last_epochs_value():
    study = Study("tiny_resnet", "cluttered-digits", "baseline")
    search = StudySearch(space=study_space(SearchSpace(), study), metric="val_top1", mode="max", seed=0)
    search.suggest("t1")
    search.on_trial_result("t1", {"epoch": 1, "val_top1": 30.0})
    # Tune gives the searcher no result of the epoch it stops the trial on; on_trial_complete gets the last result
    search.on_trial_complete("t1", {"epoch": 2, "val_top1": 20.0, STATUS_KEY: PRUNED_STATUS})
    [pruned] = search._ot_study.trials
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert pruned.intermediate_values == {1: 30.0, 2: 20.0} and pruned.value == 20.0


def test_the_papers_protocol_has_no_scheduler_and_asha_follows_the_spec():
    spec = Spec(name="s", backbones=("tiny_resnet",), datasets=("cluttered-digits",), variants=("baseline",),
                epochs=9)
    assert early_stopping(spec) == (None, [])
    scheduler, [marker] = early_stopping(replace(spec, scheduler=EarlyStopping("asha", 3, 3.0)))
    assert isinstance(marker, PrunedTrials) and marker.scheduler is scheduler
    leader, loser = trial("t1"), trial("t2")
    add(scheduler, leader, loser)
    assert [epoch(scheduler, leader, n, 50.0) for n in (1, 2, 3)] == [CONTINUE] * 3
    assert epoch(scheduler, loser, 2, 1.0) == CONTINUE and epoch(scheduler, loser, 3, 1.0) == STOP


def train(config):  # never run: the test only saves and restores the Tuner
    pass


def test_a_restored_tuners_callback_carries_the_restored_scheduler(tmp_path):
    # Tune saves the scheduler (in TuneConfig) and the callbacks (in RunConfig) in one tuner.pkl; the callback's
    # state, restored later, must land in the scheduler the restored run uses, not in a copy of it
    from ray import tune

    scheduler, marks = early_stopping(Spec(name="s", backbones=("tiny_resnet",), datasets=("cluttered-digits",),
                                           variants=("baseline",), scheduler=EarlyStopping("asha")))
    tune.Tuner(train, tune_config=tune.TuneConfig(scheduler=scheduler, metric="val_top1", mode="max"),
               run_config=tune.RunConfig(name="s", storage_path=str(tmp_path), callbacks=marks))
    restored = tune.Tuner.restore(str(tmp_path / "s"), trainable=train)._local_tuner  # noqa: SLF001
    [marker] = restored.get_run_config().callbacks
    assert isinstance(marker, PrunedTrials) and marker.scheduler is restored._tune_config.scheduler  # noqa: SLF001
