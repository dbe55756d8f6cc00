"""An ended trial's last.pt is removed once the published experiment snapshot records its end (tune_jobs/reclaim.py):
real Tune trials, the snapshot in Tune's own format, a checkpoint folder per trial."""

import json
import pickle

from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Trial

from tune_jobs import reclaim
from tune_jobs.layout import PRUNED_STATUS
from tune_jobs.reclaim import EndedTrialsLastPt, remove_ended_last_pts
from tune_jobs.sweep import trial_dirname, trial_id_of
from tune_jobs.trainable import STATUS_KEY

SNAPSHOT = "experiment_state-2026-12-02_00-00-00.json"  # the name Tune gives it (TuneController.CKPT_FILE_TMPL)


def trial(storage, trial_id: str, status: str, last_result: dict) -> Trial:
    """A trial of sweep ``t`` in ``storage``, its checkpoint folder holding last.pt and best.pt."""
    made = Trial("run_trial", stub=True, trial_id=trial_id, config={"study": "s"},
                 storage=StorageContext(storage_path=str(storage), experiment_dir_name="t"))
    made.relative_logdir = made.storage.trial_dir_name = trial_dirname(made)  # as Tune's init_local_path names it
    ended(made, status, last_result)
    checkpoint = storage / "t" / made.relative_logdir / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "last.pt").write_bytes(b"resume state")
    (checkpoint / "best.pt").write_bytes(b"best weights")
    return made


def ended(made: Trial, status: str, last_result: dict) -> None:
    made.run_metadata.last_result = last_result
    made.set_status(status)


def publish(storage, trials: list[Trial]) -> None:
    """The experiment snapshot a resume restores: each trial's JSON state and run metadata, as Tune writes them."""
    (storage / "t" / SNAPSHOT).write_text(json.dumps({"trial_data": [t.get_json_state() for t in trials]}))


def last_pts(storage) -> list[str]:
    return sorted(trial_id_of(p.parent.parent) for p in (storage / "t").glob("*/checkpoint_*/last.pt"))


def test_only_trials_whose_end_the_snapshot_records_lose_last_pt_and_best_pt_stays(tmp_path):
    publish(tmp_path, [trial(tmp_path, "done", Trial.TERMINATED, {"epoch": 3, STATUS_KEY: "completed"}),
                       trial(tmp_path, "pruned", Trial.TERMINATED, {"epoch": 1, STATUS_KEY: PRUNED_STATUS}),
                       trial(tmp_path, "stopped", Trial.TERMINATED, {"epoch": 2}),  # with the sweep: resumed later
                       trial(tmp_path, "failed", Trial.ERROR, {"epoch": 1}),  # a resume runs it again from last.pt
                       trial(tmp_path, "running", Trial.RUNNING, {"epoch": 2})])
    assert remove_ended_last_pts(tmp_path / "t", set()) == {"done", "pruned"}
    assert last_pts(tmp_path) == ["failed", "running", "stopped"]
    assert len(list(tmp_path.glob("t/*/checkpoint_*/best.pt"))) == 5
    assert remove_ended_last_pts(tmp_path / "t", {"done", "pruned"}) == set()  # those done are not looked at again
    assert remove_ended_last_pts(tmp_path / "nothing-here", set()) == set()  # no snapshot (yet): nothing to do


def test_a_trial_that_ends_loses_last_pt_once_a_published_snapshot_says_so_not_before(tmp_path, monkeypatch):
    monkeypatch.setattr(reclaim, "CHECK_EVERY_S", 0.0)
    earlier = trial(tmp_path, "earlier", Trial.TERMINATED, {"epoch": 2, STATUS_KEY: "completed"})  # a killed driver's
    now = trial(tmp_path, "now", Trial.RUNNING, {"epoch": 1})
    trials = [earlier, now]
    publish(tmp_path, trials)
    callback = pickle.loads(pickle.dumps(EndedTrialsLastPt()))  # as Tune keeps it with the run, for a resume
    callback.on_step_end(iteration=0, trials=trials)  # a driver that starts or resumes looks once
    assert last_pts(tmp_path) == ["now"]

    ended(now, Trial.TERMINATED, {"epoch": 2, STATUS_KEY: "early_stopped"})
    callback.on_trial_complete(iteration=1, trials=trials, trial=now)
    callback.on_step_end(iteration=1, trials=trials)
    assert last_pts(tmp_path) == ["now"]  # the published snapshot has it running: a resume would continue it
    publish(tmp_path, trials)
    callback.on_step_end(iteration=2, trials=trials)
    assert last_pts(tmp_path) == []
