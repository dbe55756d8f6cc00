"""Tune's experiment snapshot in the storage (tune_jobs/snapshots.py): a killed copy leaves whole files only."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tune_jobs.spec import Spec, SpecError

COPY = """
import sys
import pyarrow.fs
from ray.train._internal.storage import _FilesystemSyncer
if sys.argv[3] == "whole":
    from tune_jobs.snapshots import whole_file_snapshots
    whole_file_snapshots()
syncer = _FilesystemSyncer(storage_filesystem=pyarrow.fs.LocalFileSystem(), sync_period=0, sync_timeout=600)
fn, kwargs = syncer._sync_up_command(local_path=sys.argv[1], uri=sys.argv[2])
print("copying", flush=True)
fn(**kwargs)
"""
SIZE = 200 * 2 ** 20
NAME = "experiment_state-2026-12-01_00-00-00.json"


def killed_mid_copy(tmp_path, how: str) -> bytes:
    """Copy a snapshot file over an older one as the driver's Tune syncer does; SIGKILL it mid-copy."""
    staging, storage = tmp_path / "staging", tmp_path / "storage"
    staging.mkdir()
    storage.mkdir()
    with open(staging / NAME, "wb") as f:
        f.truncate(SIZE)  # sparse: read at once, written at the disk's pace
    (storage / NAME).write_bytes(b'{"old": true}')
    scratch = tmp_path / "tmp"  # the copy's /tmp
    scratch.mkdir()
    copy = subprocess.Popen([sys.executable, "-c", COPY, str(staging), str(storage), how], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "TMPDIR": str(scratch)})
    assert copy.stdout.readline() == "copying\n"
    while copy.poll() is None and sum(p.stat().st_size for p in storage.iterdir()) <= len(b'{"old": true}'):
        pass  # until the copy has written its first bytes
    copy.send_signal(signal.SIGKILL)
    copy.wait(timeout=60)
    if copy.returncode == 0:
        pytest.skip("the copy ended before the kill landed")
    left = (storage / NAME).read_bytes()
    assert not any(scratch.iterdir())  # a killed driver left its frozen copy in /tmp: 200 MB here, each kill
    for folder in [staging, storage, *tmp_path.glob(".attzoom-snapshot-*")]:
        shutil.rmtree(folder)  # pytest keeps the last runs' folders: not 200 MB each
    return left


def test_a_driver_killed_while_tune_copies_its_snapshot_leaves_the_old_file_whole(tmp_path):
    # Tune overwrote each file in place: the kill left a JSON cut short, and the resume started the search over
    left = killed_mid_copy(tmp_path, "whole")
    assert left == b'{"old": true}'


def test_the_copy_replaces_every_file_of_the_folder(tmp_path):
    from tune_jobs.snapshots import PART, replace_files

    staging, storage = tmp_path / "staging", tmp_path / "storage"
    (staging / "trial-1").mkdir(parents=True)
    (staging / NAME).write_text('"new state"')
    (staging / "trial-1" / "result.json").write_text("{}\n{}\n")
    (storage / "trial-1").mkdir(parents=True)
    (storage / NAME).write_text('"old state, longer than the new one"')
    (storage / "kept.txt").write_text("not Tune's")
    replace_files(str(staging), str(storage))
    files = {str(p.relative_to(storage)): p.read_text() for p in storage.rglob("*") if p.is_file()}
    assert files == {NAME: '"new state"', "trial-1/result.json": "{}\n{}\n", "kept.txt": "not Tune's"}
    assert not [p for p in storage.rglob(f"*{PART}")]
    # the next copies: a file written since is copied, one just written is copied again (a write in the same clock
    # tick as the copy would not move its time stamp), a file quiet since its copy is left alone
    (staging / NAME).write_text('"newer state"')
    os.utime(staging / "trial-1" / "result.json", ns=(0, 0))  # quiet for decades
    replace_files(str(staging), str(storage))
    (storage / "trial-1" / "result.json").write_text("marker")
    os.utime(staging / NAME, ns=(0, 0))  # the snapshot's content changes, its time stamp does not
    (staging / NAME).write_text('"newest"')
    os.utime(staging / NAME, ns=(0, 0))
    replace_files(str(staging), str(storage))
    assert (storage / NAME).read_text() == '"newest"'  # copied the time before: it was written within the second
    replace_files(str(staging), str(storage))
    assert (storage / "trial-1" / "result.json").read_text() == "marker"  # quiet, unchanged: not copied again
    (storage / "trial-1" / "result.json").unlink()
    (staging / ".c4f1-tmp-searcher-state").write_text("Tune's, for a moment")
    replace_files(str(staging), str(storage))
    assert (storage / "trial-1" / "result.json").read_text() == "{}\n{}\n"  # its copy is gone: copied again
    assert not (storage / ".c4f1-tmp-searcher-state").exists()


def test_a_snapshot_rewritten_while_it_is_copied_is_not_published(tmp_path, monkeypatch):
    # Tune writes the next snapshot in place while the last one's copy may still run: the half-written file
    # passed the rename whole
    from tune_jobs import snapshots

    staging, storage = tmp_path / "staging", tmp_path / "storage"
    staging.mkdir()
    storage.mkdir()
    (staging / NAME).write_text('{"trial_data": [1, 2, 3]}')
    (storage / NAME).write_text('{"trial_data": [1, 2]}')
    copy = shutil.copyfile

    def copy_while_tune_writes(source, target, **kwargs):
        copy(source, target, **kwargs)
        if Path(target).parent == storage:  # the copy into the storage, taken mid-write
            Path(target).write_text('{"trial_da')
            (staging / NAME).write_text('{"trial_data": [1, 2, 3, 4]}')

    monkeypatch.setattr(snapshots.shutil, "copyfile", copy_while_tune_writes)
    snapshots.replace_files(str(staging), str(storage))
    assert (storage / NAME).read_text() == '{"trial_data": [1, 2]}' and sorted(os.listdir(storage)) == [NAME]
    monkeypatch.setattr(snapshots.shutil, "copyfile", copy)
    snapshots.replace_files(str(staging), str(storage))  # the next snapshot's copy
    assert (storage / NAME).read_text() == '{"trial_data": [1, 2, 3, 4]}'


def test_an_older_copy_of_the_snapshot_is_never_published_over_a_newer_one(tmp_path):
    # Ray starts the next publish when one runs past its sync timeout (30 min): the two raced for the renames, and
    # the older copy could land last, so a resume restored the trials as they were before it
    from tune_jobs import snapshots

    storage, older, newer = tmp_path / "storage", tmp_path / "older", tmp_path / "newer"
    for folder, trials in ((storage, "[]"), (older, "[1]"), (newer, "[1, 2]")):
        folder.mkdir()
        (folder / NAME).write_text(f'{{"trial_data": {trials}}}')
    now = time.time_ns()
    snapshots._publish_together(newer, now, 8, storage)  # noqa: SLF001 - the copies' renames, in the order they raced
    snapshots._publish_together(older, now, 7, storage)  # noqa: SLF001 - copied before, renamed after
    assert (storage / NAME).read_text() == '{"trial_data": [1, 2]}'
    assert sorted(os.listdir(storage)) == [NAME]  # the older copy's staged file is gone too


def test_on_cloud_storage_an_older_copy_of_the_snapshot_is_never_uploaded_over_a_newer_one(tmp_path):
    import pyarrow.fs
    from ray.train._internal.storage import _upload_to_fs_path  # what Tune's syncer uploads with

    from tune_jobs import snapshots

    staging, bucket = tmp_path / "staging", tmp_path / "bucket"
    (staging / "trial").mkdir(parents=True)
    bucket.mkdir()
    (staging / NAME).write_text('{"trial_data": [1]}')
    raced = []

    def upload(local_path, fs, fs_path, exclude=None):
        _upload_to_fs_path(local_path=local_path, fs=fs, fs_path=fs_path, exclude=exclude)
        if not raced:  # while the first copy's trial folders upload, the next snapshot is taken and uploaded whole
            raced.append(fs_path)
            (staging / NAME).write_text('{"trial_data": [1, 2]}')
            snapshots.upload_in_order(upload, str(staging), fs, str(bucket))

    snapshots.upload_in_order(upload, str(staging), pyarrow.fs.LocalFileSystem(), str(bucket))
    assert raced and (bucket / NAME).read_text() == '{"trial_data": [1, 2]}'


def test_a_resume_from_a_damaged_snapshot_is_one_line(tmp_path):
    from tune_jobs.snapshots import check_snapshot_readable

    (tmp_path / NAME).write_text('{"trial_data": [["{\\"trial_id\\": \\"ab')  # cut short
    with pytest.raises(SpecError, match=f"Tune snapshot {tmp_path / NAME} cannot be read .*new name"):
        check_snapshot_readable(str(tmp_path))
    (tmp_path / NAME).write_text('{"trial_data": []}')
    (tmp_path / f".{NAME}.attzoom-part").write_text('{"trial_da')  # the copy a kill cut short
    check_snapshot_readable(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]
    os.remove(tmp_path / NAME)
    check_snapshot_readable(str(tmp_path))  # a sweep Tune never snapshotted: nothing to check


SNAPSHOT = {NAME: '{"trial_data": [1, 2]}', "searcher-state-2026-12-01_00-00-00.pkl": "searcher, 2 trials",
            "search_gen_state-2026-12-01_00-00-00.json": '{"counter": 2}', "callback-states-2026-12-01.pkl": "2"}


def snapshot_folders(tmp_path):
    staging, storage = tmp_path / "staging", tmp_path / "storage"
    for folder, version in ((staging, "3"), (storage, "2")):
        folder.mkdir()
        for name, text in SNAPSHOT.items():
            (folder / name).write_text(text.replace("2", version))
    return staging, storage


def test_the_snapshots_files_are_published_in_an_order_a_resume_can_use_at_every_step(tmp_path, monkeypatch):
    # Tune's files went one by one in the folder's listing order: a stop between them left trial states newer than
    # the searcher's, and the resume ran a trial no study owned
    from tune_jobs import snapshots

    staging, storage = snapshot_folders(tmp_path)
    (staging / "trial-1").mkdir()
    (staging / "trial-1" / "result.json").write_text("{}\n{}\n")  # a trial's rows, its last one new
    listing = os.walk
    monkeypatch.setattr(snapshots.os, "walk", lambda top: ((f, d, sorted(n)) for f, d, n in listing(top)))
    renamed, rename = [], os.replace
    monkeypatch.setattr(snapshots.os, "replace", lambda a, b: (renamed.append(Path(b).name), rename(a, b)))
    snapshots.replace_files(str(staging), str(storage))
    # a stop between two renames leaves trial states older than the searcher's, and the generator's "finished" never
    # newer than the trials; the trial folders go first (a trial TERMINATED in them had lost its last row)
    assert renamed[0] == "result.json" and sorted(renamed[1:]) == sorted(SNAPSHOT)
    assert renamed[-2:] == [NAME, "search_gen_state-2026-12-01_00-00-00.json"]
    assert {p.name: p.read_text() for p in storage.iterdir() if p.is_file()} == {
        n: t.replace("2", "3") for n, t in SNAPSHOT.items()}


def test_tune_writing_its_next_snapshot_during_the_copy_leaves_the_published_one_from_one_moment(tmp_path,
                                                                                                monkeypatch):
    # each file was copied from the staging folder as it was at its turn: the next snapshot, written meanwhile, gave
    # a mix of the two (or, a file rewritten mid-copy being skipped, new trial states beside the old searcher's)
    from tune_jobs import snapshots

    staging, storage = snapshot_folders(tmp_path)
    copy, written = shutil.copyfile, []

    def copy_while_tune_writes(source, target, **kwargs):
        copy(source, target, **kwargs)
        if Path(target).parent == storage and not written:  # the slow copy into the storage: Tune goes on
            with snapshots._writing:  # as Tune's save_to_dir takes it
                for name, text in SNAPSHOT.items():
                    (staging / name).write_text(text.replace("2", "4"))
            written.append(True)
    monkeypatch.setattr(snapshots.shutil, "copyfile", copy_while_tune_writes)
    snapshots.replace_files(str(staging), str(storage))
    assert written and {p.name: p.read_text() for p in storage.iterdir()} == {
        n: t.replace("2", "3") for n, t in SNAPSHOT.items()}
    monkeypatch.setattr(snapshots.shutil, "copyfile", copy)
    snapshots.replace_files(str(staging), str(storage))  # the next snapshot's copy
    assert {p.name: p.read_text() for p in storage.iterdir()} == {n: t.replace("2", "4") for n, t in SNAPSHOT.items()}


def test_tune_writes_its_snapshot_under_the_lock_and_a_driver_ending_itself_waits_for_a_publish(tmp_path,
                                                                                                 monkeypatch):
    import threading

    from ray.tune.execution.tune_controller import TuneController

    from tune_jobs import snapshots

    held = []
    monkeypatch.setattr(TuneController, "save_to_dir", lambda self: held.append(snapshots._writing.locked()))
    for _ in range(2):  # as whole_file_snapshots does, once per driver
        snapshots._wrap_once(TuneController, "save_to_dir", snapshots._save_under_lock)
    TuneController.save_to_dir(None)
    assert held == [True] and not snapshots._writing.locked()
    staging, storage = snapshot_folders(tmp_path)
    assert snapshots.snapshot_held(timeout=1)  # what the watch of a driver about to end itself takes
    try:
        copy = threading.Thread(target=snapshots.replace_files, args=(str(staging), str(storage)))
        copy.start()
        copy.join(0.5)
        assert copy.is_alive() and (storage / NAME).read_text() == SNAPSHOT[NAME]
    finally:
        snapshots._publishing.release()
    copy.join(30)
    assert (storage / NAME).read_text() == SNAPSHOT[NAME].replace("2", "3")


def test_a_resume_reads_the_searchers_state_from_the_storage_not_from_a_killed_drivers_staging_folder(tmp_path,
                                                                                                       monkeypatch):
    # a cluster's Ray session keeps the staging folder across drivers: Tune restored the trials from the storage's
    # newest snapshot and the searcher from a newer one a killed driver never published there
    from types import SimpleNamespace

    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from tune_jobs import snapshots

    staging, storage = tmp_path / "staging", tmp_path / "storage"
    for folder in (staging, storage):
        folder.mkdir()
        (folder / "searcher-state-2026-12-01_00-00-00.pkl").write_text(f"{folder.name}'s")
    (staging / "searcher-state-2026-12-02_00-00-00.pkl").write_text("never published")
    (staging / "trial-1").mkdir()
    (staging / "trial-1" / "params.pkl").write_text("a trial's")

    def download(manager):  # Tune's: every .json and .pkl of the storage's folder into the staging folder
        for path in storage.iterdir():
            shutil.copyfile(path, staging / path.name)
    monkeypatch.setattr(_ExperimentCheckpointManager, "sync_down_experiment_state", download)
    snapshots._wrap_once(_ExperimentCheckpointManager, "sync_down_experiment_state",
                         snapshots._restore_from_storage_only)
    manager = SimpleNamespace(_storage=SimpleNamespace(experiment_driver_staging_path=str(staging)))
    _ExperimentCheckpointManager.sync_down_experiment_state(manager)
    assert sorted(p.name for p in staging.iterdir()) == ["searcher-state-2026-12-01_00-00-00.pkl", "trial-1"]
    assert (staging / "searcher-state-2026-12-01_00-00-00.pkl").read_text() == "storage's"
    assert (staging / "trial-1" / "params.pkl").exists()


def test_a_snapshot_file_is_quiet_by_when_it_was_frozen_not_by_when_it_was_published(tmp_path, monkeypatch):
    # a long trial-folder copy made a file written just before the freeze count as quiet: rewritten later with the
    # same size in the same clock tick, it would never be copied again
    import time

    from tune_jobs import snapshots

    staging, storage = snapshot_folders(tmp_path)
    (staging / "trial-1").mkdir()
    (staging / "trial-1" / "result.json").write_text("{}\n")
    written = time.time_ns() - snapshots.QUIET_NS // 2  # half a second before the freeze
    os.utime(staging / NAME, ns=(written, written))
    copy = shutil.copyfile

    def slow_trial_copy(source, target, **kwargs):
        copy(source, target, **kwargs)
        if Path(source).parent.name == "trial-1":
            time.sleep(snapshots.QUIET_NS / 1e9)  # thousands of loggers' files at paper scale
    monkeypatch.setattr(snapshots.shutil, "copyfile", slow_trial_copy)
    snapshots.replace_files(str(staging), str(storage))
    assert (storage / NAME).read_text() == SNAPSHOT[NAME].replace("2", "3")
    assert snapshots._copied[str(storage / NAME)] is None  # not quiet when read: copied again next time


def test_cloud_storage_gets_the_trial_folders_then_the_snapshots_own_files_in_publish_order(tmp_path):
    # an object store writes each object whole, but Tune uploaded the folder as it was at each file's turn
    import pyarrow.fs
    from ray.train._internal.storage import _upload_to_fs_path

    from tune_jobs.snapshots import upload_in_order

    staging, bucket = snapshot_folders(tmp_path)
    (staging / "trial-1").mkdir()
    (staging / "trial-1" / "result.json").write_text("{}\n")
    uploaded = []

    def upload(local_path, fs, fs_path, exclude=None):
        uploaded.append(Path(fs_path).name)
        _upload_to_fs_path(local_path=local_path, fs=fs, fs_path=fs_path, exclude=exclude)
    upload_in_order(upload, str(staging), pyarrow.fs.LocalFileSystem(), str(bucket))
    assert uploaded[0] == "trial-1" and sorted(uploaded[1:]) == sorted(SNAPSHOT)
    assert uploaded[-2:] == [NAME, "search_gen_state-2026-12-01_00-00-00.json"]
    assert (bucket / "trial-1" / "result.json").read_text() == "{}\n"
    assert {p.name: p.read_text() for p in bucket.iterdir() if p.is_file()} == {
        n: t.replace("2", "3") for n, t in SNAPSHOT.items()}


def test_the_snapshot_period_grows_with_what_a_snapshot_costs_and_a_users_own_period_stays(tmp_path, monkeypatch):
    # at the paper's 720 trials the experiment state is ~15 MB: written and published every second (a fixed
    # TUNE_GLOBAL_CHECKPOINT_S of 1), the driver's CPU rose from 24 % to 73 % of a core over the sweep
    import time

    from ray.train._internal.storage import StorageContext
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from tune_jobs import snapshots
    from tune_jobs.ray_session import tune_settings

    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    spec = Spec(name="t", backbones=("tiny_resnet",), datasets=("cluttered-digits",), variants=("baseline",))
    for key, value in tune_settings(spec).items():
        monkeypatch.setenv(key, value)  # as apply_tune_settings does for a sweep
    snapshots.whole_file_snapshots()
    # the driver's staging folder under a folder of its own, not a Ray session's (no Ray runs here)
    monkeypatch.setattr("ray.train._internal.storage._get_ray_train_session_dir", lambda: str(tmp_path / "session"))
    storage = StorageContext(storage_path=str(tmp_path / "storage"), experiment_dir_name="t")
    staging = Path(storage.experiment_driver_staging_path)
    staging.mkdir(parents=True, exist_ok=True)

    def manager():  # as TuneController makes it
        return _ExperimentCheckpointManager(storage=storage, checkpoint_period=os.getenv("TUNE_GLOBAL_CHECKPOINT_S",
                                                                                        "auto"))

    def save(seconds: float):
        def save_to_dir():
            time.sleep(seconds)  # a large experiment state being written
            (staging / NAME).write_text('{"trial_data": []}')
        return save_to_dir

    manager().sync_up_experiment_state(save_fn=save(0.0), wait=True)  # a first snapshot imports what Tune needs
    cheap, costly = manager(), manager()
    cheap.sync_up_experiment_state(save_fn=save(0.0))  # the publish goes on in Tune's sync thread
    assert 1.0 <= cheap._checkpoint_period < 19 * 0.2  # a small sweep's: about a second (a kill forgets little)
    costly.sync_up_experiment_state(save_fn=save(0.2), wait=True)
    assert 19 * 0.2 <= costly._checkpoint_period < 10
    costly.sync_up_experiment_state(save_fn=save(0.0))  # within the period: no snapshot, the period stays
    assert 19 * 0.2 <= costly._checkpoint_period
    assert (tmp_path / "storage" / "t" / NAME).exists()  # published as before
    storage.syncer.wait()
    assert storage.syncer.attzoom_publish_s > 0  # what the publish in Tune's sync thread took ...
    storage.syncer.attzoom_publish_s = 0.3  # ... counts too (a large state, a slow shared folder)
    cheap._last_save_time = float("-inf")
    cheap.sync_up_experiment_state(save_fn=save(0.0))
    assert 19 * 0.3 <= cheap._checkpoint_period
    storage.syncer.attzoom_publish_s = 60  # an object store's publish of a minute: a kill forgets at most 10 s
    cheap._last_save_time = float("-inf")
    cheap.sync_up_experiment_state(save_fn=save(0.0))
    assert cheap._checkpoint_period == 10.0
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "7")  # the README: a user's own value of these wins
    own = manager()
    own.sync_up_experiment_state(save_fn=save(0.2), wait=True)
    assert own._checkpoint_period == 7.0
    restored = _ExperimentCheckpointManager(storage=storage, checkpoint_period="auto")  # a resume: Tune restores
    restored.sync_up_experiment_state(save_fn=save(0.0), wait=True)  # the period it saved, not the user's
    assert restored._checkpoint_period == 7.0
