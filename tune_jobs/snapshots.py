"""Tune's experiment snapshot in the storage: whole files only, and one snapshot's files together.

At every snapshot Tune copied the driver's snapshot (trial states, the searcher's and the callbacks'
state) into the sweep's folder, overwriting each file in place. A driver killed during that copy
left a file cut short, and the resume then failed to read it and started the search over beside
the trials it had. On a local or shared folder each file is now written beside its place and
renamed over it, so the folder holds the old file or the new one, whole. (Cloud storage writes an
object whole already.) A resume still checks the snapshot it restores and stops with one line if
it is damaged (a sweep of an older version).

The snapshot's own files are one state, read back as one: Tune copied them one by one while the
next snapshot was being written, and a stop between them left trial states and a searcher from
different moments (a trial Tune resumed that no study owned, so a study ran one trial too many).
Now a copy of them is taken while Tune cannot write them (one lock), and that copy is published
in an order whose every prefix a resume can use (publish_order); a driver ending itself waits for
a publish under way. A resume also makes the searcher agree with the trial states it restores
(searcher.MultiStudySearcher.agree_with), which covers a SIGKILL between two renames.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .space import STUDY_KEY
from .spec import SpecError

logger = logging.getLogger(__name__)
PART = ".attzoom-part"  # a file being written; never a name Tune looks for
QUIET_NS = 1_000_000_000
_copied: dict[str, tuple[int, int] | None] = {}  # a copy in the storage -> its source's (size, mtime) when quiet
_writing = threading.Lock()  # held while Tune writes the driver's snapshot, and while a copy of it is taken
_publishing = threading.Lock()  # held while a snapshot's files are renamed (or uploaded) into the storage
_freezes = itertools.count(1)  # the order in which copies of the snapshot were taken (the clock may step back)
_published: dict[str, int] = {}  # a storage folder -> the newest copy published into it
LAST = ("experiment_state-", "search_gen_state-")  # published last, in this order (publish_order)
MIN_PERIOD_S = 1.0  # between two snapshots: a driver killed between them forgets the trials started since
MAX_PERIOD_S = 10.0  # Tune's own floor: a slow storage's publish (wall time, mostly waiting) may not stretch it more
COST_SHARE = 19  # a snapshot period is this many times what the last snapshot cost (~5 % of the driver)
PERIOD_VARIABLE = "TUNE_GLOBAL_CHECKPOINT_S"


class Rewritten(Exception):
    """A file changed while it was copied: the storage keeps the one it has until the next snapshot."""


def whole_file_snapshots() -> None:
    """Make this driver's Tune publish its snapshot whole: on a local file system each file replaced, not
    overwritten; everywhere, the snapshot's own files from one moment, in publish_order."""
    from ray.train._internal.storage import _FilesystemSyncer
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    from ray.tune.execution.tune_controller import TuneController

    # Tune has no public hooks for how it uploads, writes and downloads its snapshot.
    _wrap_once(_FilesystemSyncer, "_sync_up_command", _upload_whole)
    _wrap_once(TuneController, "save_to_dir", _save_under_lock)
    _wrap_once(_ExperimentCheckpointManager, "sync_down_experiment_state", _restore_from_storage_only)
    _wrap_once(_ExperimentCheckpointManager, "sync_up_experiment_state", _period_from_cost)


def _wrap_once(owner, name: str, wrap) -> None:
    """owner.name replaced by wrap(owner.name), once per process however many drivers it starts."""
    original = getattr(owner, name)
    if getattr(original, "_attzoom_wrapped", False):
        return
    wrapper = wrap(original)
    wrapper._attzoom_wrapped = True
    setattr(owner, name, wrapper)


def _upload_whole(overwrite):
    """A local folder's files replaced, not overwritten; cloud objects uploaded in publish_order."""
    import pyarrow.fs

    def sync_up_command(self, local_path: str, uri: str, exclude: list | None = None):
        if exclude:
            return overwrite(self, local_path, uri, exclude)
        if isinstance(self.storage_filesystem, pyarrow.fs.LocalFileSystem):
            return _timed(self, replace_files), {"source": local_path, "target": uri}
        upload, kwargs = overwrite(self, local_path, uri, exclude)
        return _timed(self, upload_in_order), {"upload": upload, **kwargs}
    return sync_up_command


def _timed(syncer, publish):
    """``publish``, its duration kept on the syncer that runs it, for the next snapshot's period."""
    def timed(**kwargs):
        started = time.monotonic()
        try:
            publish(**kwargs)
        finally:
            syncer.attzoom_publish_s = time.monotonic() - started
    return timed


def _save_under_lock(save):
    """Tune writes the snapshot's files one after another: no copy of them is taken while it does."""
    def save_to_dir(self):
        with _writing:
            save(self)
    return save_to_dir


def _restore_from_storage_only(download):
    """A resume reads the trial states from the storage but the searcher's state from the driver's staging folder,
    which a cluster's Ray session keeps across drivers: a killed driver's unpublished snapshot there was newer than
    the storage's, and the two disagreed. The staging folder's snapshot files go before Tune copies the storage's."""
    def sync_down_experiment_state(self):
        staging = Path(self._storage.experiment_driver_staging_path)
        for stale in [*staging.glob("*.json"), *staging.glob("*.pkl")]:
            stale.unlink(missing_ok=True)
        download(self)
    return sync_down_experiment_state


def _period_from_cost(sync_up):
    """A snapshot every second while it is cheap, every 19 of its costs (Tune's writing and the publish) once it
    is not, up to 10 s: at the paper's 720 trials the experiment state is ~15 MB, and a fixed second had the driver
    writing it, twice, a fifth of the time. A user's TUNE_GLOBAL_CHECKPOINT_S fixes the period, on a resume too (Tune
    restores the period it saved)."""
    def sync_up_experiment_state(self, *args, force: bool = False, wait: bool = False, **kwargs):
        saved_before, started = self._last_save_time, time.monotonic()  # noqa: SLF001 - (all four)
        waited = force or wait or self._should_force_sync_up  # noqa: SLF001 - the call waits for the publish
        publish = 0.0 if waited else getattr(self._storage.syncer, "attzoom_publish_s", 0.0)  # noqa: SLF001
        sync_up(self, *args, force=force, wait=wait, **kwargs)
        if self._last_save_time == saved_before:  # noqa: SLF001 - within the period: no snapshot was taken
            return
        if (own := os.environ.get(PERIOD_VARIABLE, "auto")) != "auto":
            self._checkpoint_period = float(own)  # noqa: SLF001
        elif PERIOD_VARIABLE not in os.environ:
            cost = time.monotonic() - started + publish
            self._checkpoint_period = min(max(MIN_PERIOD_S, COST_SHARE * cost), MAX_PERIOD_S)  # noqa: SLF001
    return sync_up_experiment_state


def snapshot_held(timeout: float = 10.0) -> bool:
    """Wait until no snapshot is half published, and let none start: for a driver about to end itself
    (infra._end_if_ray_ends), so the storage keeps a snapshot whose files agree. False: it waited in vain."""
    return _publishing.acquire(timeout=timeout)


def publish_order(names) -> list[str]:
    """The trial states after the searcher's and the callbacks' state: a stop between them leaves the trial states
    older, which a restore reconciles (searcher.agree_with); the search generator's last, so that its "finished"
    is never newer than the trials (a forgotten trial's slot would never be asked again). The callbacks' state is
    not reconciled: a forgotten trial's epochs stay in ASHA's rungs (results it did report) and in the MLflow
    journal (its run is dropped as an orphan at the sweep's end)."""
    def rank(name: str) -> tuple[int, str]:
        return next((i + 1 for i, prefix in enumerate(LAST) if name.startswith(prefix)), 0), name
    return sorted(names, key=rank)


@contextmanager
def _frozen(folder: Path):
    """A copy of the snapshot's own files (the folder's, not its trial folders') as of one moment: taken on local
    disk while Tune cannot write them, so the slow copy to the storage runs while Tune goes on. It lies beside the
    folder, in the Ray session's folder: a driver killed mid-publish leaves it there, with Ray's own leftovers of
    the session, not loose in /tmp."""
    with tempfile.TemporaryDirectory(prefix=".attzoom-snapshot-", dir=folder.parent) as frozen:
        with _writing:
            for path in folder.iterdir():
                if path.is_file() and not path.name.startswith("."):  # Tune's own temporary files, there a moment
                    with suppress(FileNotFoundError):
                        shutil.copy2(path, Path(frozen, path.name))  # its time stamp too: _staged compares it
            frozen_at, order = time.time_ns(), next(_freezes)
        yield Path(frozen), frozen_at, order


def replace_files(source: str, target: str) -> None:
    """Copy the folder ``source`` into ``target``, each file written beside its place and renamed over it; the
    snapshot's own files (the folder's) last, as of a moment before the trial folders' copy: a stop midway leaves
    trial folders at least as new as the trial states that name them (a trial TERMINATED there had lost its
    result.json's last row when the stop came between the two).

    A file this driver copied before, quiet then and unchanged since, is skipped: at paper scale the trial folders
    hold thousands of the loggers' files, and between two snapshots only the running trials' change (Tune copied
    them all). A file written within the last second is copied again next time: a write in the same clock tick as
    the copy leaves its time stamp as it was."""
    with _frozen(Path(source)) as (frozen, frozen_at, order):
        for folder, _, files in os.walk(source):
            into = Path(target, os.path.relpath(folder, source))
            into.mkdir(parents=True, exist_ok=True)
            if folder != source:
                for name in files:
                    if not name.startswith("."):
                        _replace(Path(folder, name), into / name)
        _publish_together(frozen, frozen_at, order, Path(target))


def _replace(path: Path, copy: Path, tries: int = 3) -> None:
    """One trial folder's file; one that a logger appended to while it was copied is copied again."""
    for _ in range(tries):
        try:
            _commit([_staged(path, copy, durable=False)])
            return
        except Rewritten:
            continue
        except FileNotFoundError:  # gone since the listing: the next snapshot has what replaced it
            return


def _publish_together(frozen: Path, frozen_at: int, order: int, into: Path) -> None:
    """The snapshot's own files from one moment, each durable before its rename (a host crash after it must not
    leave an empty one), renamed in publish_order; never over those of a later copy. Ray starts the next publish
    when one runs past its sync timeout (30 min), and the two raced for the renames: the older could land last,
    and a resume then restored trials as they were before, one that had ended among them (its last.pt gone)."""
    staged = []
    try:
        for name in publish_order(os.listdir(frozen)):
            staged.append(_staged(frozen / name, into / name, durable=True, now=frozen_at))
        with _publishing:
            if not _newest(order, str(into)):
                return  # a later copy is in place; this one's staged files go (finally)
            _commit(staged)
        staged = []
    except Rewritten as e:  # a copy into the storage that does not read back whole: the storage keeps its last
        logger.warning("the sweep's snapshot was not published this time: its copy of %s was not whole", e)
    finally:
        for item in staged:
            if item is not None:
                item.part.unlink(missing_ok=True)


def upload_in_order(upload, local_path: str, fs, fs_path: str, exclude=None) -> None:
    """Cloud storage: the trial folders as Tune uploads them, then the snapshot's own files from a moment before,
    one object each (an object is written whole), in publish_order."""
    root = Path(local_path)
    with _frozen(root) as (frozen, _, order):
        for folder in [path for path in root.iterdir() if path.is_dir()]:
            upload(local_path=str(folder), fs=fs, fs_path=f"{fs_path.rstrip('/')}/{folder.name}", exclude=exclude)
        with _publishing:
            if not _newest(order, fs_path):
                return
            for name in publish_order(os.listdir(frozen)):
                upload(local_path=str(frozen / name), fs=fs, fs_path=f"{fs_path.rstrip('/')}/{name}",
                       exclude=exclude)


def _newest(order: int, into: str) -> bool:
    """Whether the copy taken ``order``-th is newer than any published into ``into`` (then it is the newest);
    under _publishing."""
    if order <= _published.get(into, 0):
        return False
    _published[into] = order
    return True


@dataclass
class _Copy:
    part: Path  # beside its place, under a name Tune never looks for
    copy: Path
    version: tuple[int, int]  # the source's (size, mtime) when copied
    quiet: bool  # the source was last written over a second before: its mtime will move if it is written again


def _staged(path: Path, copy: Path, durable: bool, now: int | None = None) -> _Copy | None:
    """``path`` copied beside ``copy``; None: unchanged since this driver last copied it. ``now``: when the file was
    read (a frozen copy's time), for whether it was quiet then."""
    stat = path.stat()
    version = (stat.st_size, stat.st_mtime_ns)
    if _copied.get(str(copy)) == version and copy.exists():
        return None
    part = copy.with_name(f".{copy.name}.{os.getpid()}-{threading.get_ident()}{PART}")  # one per copying thread
    try:
        shutil.copyfile(path, part)
        if durable:
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != version or not _parses(part):
            raise Rewritten(str(path))
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return _Copy(part, copy, version, (now or time.time_ns()) - stat.st_mtime_ns > QUIET_NS)


def _commit(staged: list[_Copy | None]) -> None:
    for item in staged:
        if item is not None:
            os.replace(item.part, item.copy)
            _copied[str(item.copy)] = item.version if item.quiet else None


def _parses(part: Path) -> bool:
    """An experiment state is whole JSON (a rewrite within the copy's clock tick leaves the time stamp alone)."""
    if not part.name.startswith(f".{LAST[0]}"):
        return True
    try:
        json.loads(part.read_bytes())
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class SnapshotTrial:
    """A trial as the experiment state Tune restores holds it."""

    study: str | None
    status: str  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    config: dict
    last_result: dict
    metric_analysis: dict  # metric -> {"max": ..., "min": ..., "last": ...} over the results Tune had
    folder: str = ""  # the trial's folder, relative to the sweep's

    def best(self, metric: str) -> float | None:
        """The highest value of ``metric`` Tune had from the trial (its best epoch, where the study lacks it)."""
        return (self.metric_analysis.get(metric) or {}).get("max")


def snapshot_trials(folder: str) -> dict[str, SnapshotTrial] | None:
    """Trial id -> its state in the newest experiment state in ``folder``, the one Tune restores; None: none there."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint

    newest = _find_newest_experiment_checkpoint(folder)
    if newest is None:
        return None
    trials = {}
    for state, metadata in json.loads(Path(newest).read_bytes())["trial_data"]:
        state, metadata = json.loads(state), json.loads(metadata)
        config = state.get("config") if isinstance(state.get("config"), dict) else {}
        trials[state["trial_id"]] = SnapshotTrial(config.get(STUDY_KEY), state["status"], config,
                                                  metadata.get("last_result") or {},
                                                  metadata.get("metric_analysis") or {},
                                                  state.get("relative_logdir") or "")
    return trials


def check_snapshot_readable(folder: str) -> None:
    """The newest experiment state Tune would restore parses; a damaged one is one line, not a restart."""
    from pyarrow.fs import LocalFileSystem
    from ray.train._internal.storage import get_fs_and_path
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint

    fs, path = get_fs_and_path(folder)
    if isinstance(fs, LocalFileSystem):
        for pattern in (f".*{PART}", f"*/.*{PART}"):  # a copy the last driver was killed in: its file stands
            for part in Path(path).glob(pattern):
                part.unlink(missing_ok=True)
    newest = _find_newest_experiment_checkpoint(path, fs=fs)
    if newest is None:
        return
    try:
        with fs.open_input_stream(newest) as f:
            json.loads(f.readall())
    except (ValueError, OSError) as e:
        raise SpecError(f"the sweep's Tune snapshot {newest} cannot be read ({type(e).__name__}: {e}); it was cut "
                        "short (a driver of an older version killed while writing it, or a full disk), and Tune would "
                        "start the search over beside its trials. Its finished trials stay in the tracking store; "
                        "run the sweep again under a new name") from None
