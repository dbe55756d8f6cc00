"""Tune's experiment snapshot in the storage: whole files only, and one snapshot's files together.

Every second Tune copies the driver's snapshot (trial states, the searcher's and the callbacks'
state) into the sweep's folder, overwriting each file in place. A driver killed during that copy
left a file cut short, and the resume then failed to read it and started the search over beside
the trials it had. On a local or shared folder each file is now written beside its place and
renamed over it, so the folder holds the old file or the new one, whole. (Cloud storage writes an
object whole already.) A resume still checks the snapshot it restores and stops with one line if
it is damaged (a sweep of an older version).

The snapshot's own files are one state, read back as one: Tune copied them one by one while the
next snapshot was being written, and a stop between them left trial states and a searcher from
different moments (a trial Tune resumed that no study owned, so a study ran one trial too many).
They are now written and copied under one lock, and the trial states are renamed into place last.
A resume also makes the searcher agree with the trial states it restores (tune_jobs/searcher.py),
which covers a SIGKILL between two renames and cloud storage.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .space import STUDY_KEY
from .spec import SpecError

PART = ".attzoom-part"  # a file being written; never a name Tune looks for
QUIET_NS = 1_000_000_000
_copied: dict[str, tuple[int, int] | None] = {}  # a copy in the storage -> its source's (size, mtime) when quiet
_writing = threading.Lock()  # held while Tune writes the driver's snapshot and while it is published
TRIAL_STATES = "experiment_state-"  # the file Tune restores the trials from, published after the searcher's


class Rewritten(Exception):
    """A file changed while it was copied: the storage keeps the one it has until the next snapshot."""


def whole_file_snapshots() -> None:
    """Make this driver's Tune syncer replace files on a local file system instead of overwriting them."""
    import pyarrow.fs
    from ray.train._internal.storage import _FilesystemSyncer

    if getattr(_FilesystemSyncer, "_attzoom_whole_files", False):
        return
    overwrite = _FilesystemSyncer._sync_up_command  # noqa: SLF001 - Tune has no public hook for how it uploads

    def sync_up_command(self, local_path: str, uri: str, exclude: list | None = None):
        if isinstance(self.storage_filesystem, pyarrow.fs.LocalFileSystem) and not exclude:
            return replace_files, {"source": local_path, "target": uri}
        return overwrite(self, local_path, uri, exclude)

    _FilesystemSyncer._sync_up_command = sync_up_command  # noqa: SLF001
    _FilesystemSyncer._attzoom_whole_files = True  # noqa: SLF001
    _save_under_lock()


def _save_under_lock() -> None:
    """Tune writes the snapshot's files one after another: none of them is published while it does."""
    from ray.tune.execution.tune_controller import TuneController

    save = TuneController.save_to_dir

    def save_to_dir(self):
        with _writing:
            save(self)

    TuneController.save_to_dir = save_to_dir


def snapshot_held(timeout: float = 10.0) -> bool:
    """Wait until no snapshot is half written or half published, and let none start: for a driver about to end
    itself (infra._end_if_ray_ends), so the storage keeps a snapshot whose files agree. False: it waited in vain."""
    return _writing.acquire(timeout=timeout)


def replace_files(source: str, target: str) -> None:
    """Copy the folder ``source`` into ``target``, each file written beside its place and renamed over it.

    A file this driver copied before, quiet then and unchanged since, is skipped: at paper scale the trial folders
    hold thousands of the loggers' files, and between two snapshots only the running trials' change (Tune copied
    them all). A file written within the last second is copied again next time: a write in the same clock tick as
    the copy leaves its time stamp as it was."""
    for folder, _, files in os.walk(source):
        into = Path(target, os.path.relpath(folder, source))
        into.mkdir(parents=True, exist_ok=True)
        names = [name for name in files if not name.startswith(".")]  # Tune's own temporary files, there a moment
        if folder == source:
            _publish_together(Path(folder), into, names)
            continue
        for name in names:
            try:
                _commit([_staged(Path(folder, name), into / name, durable=False)])
            except (FileNotFoundError, Rewritten):  # gone or rewritten: the next snapshot has what replaced it
                continue


def _publish_together(folder: Path, into: Path, names: list[str]) -> None:
    """The snapshot's own files, copied while Tune cannot write them and each durable before its rename (a host
    crash after it must not leave an empty one); the trial states go last, so a stop between two renames leaves
    them older than the searcher's, never newer. One file rewritten while copied: none is published."""
    with _writing:
        staged = []
        try:
            for name in sorted(names, key=lambda n: (n.startswith(TRIAL_STATES), n)):
                staged.append(_staged(folder / name, into / name, durable=True))
            _commit(staged)
        except (FileNotFoundError, Rewritten):
            for copy in staged:
                if copy is not None:
                    copy.part.unlink(missing_ok=True)


@dataclass
class _Copy:
    part: Path  # beside its place, under a name Tune never looks for
    copy: Path
    version: tuple[int, int]  # the source's (size, mtime) when copied
    quiet: bool  # the source was last written over a second before: its mtime will move if it is written again


def _staged(path: Path, copy: Path, durable: bool) -> _Copy | None:
    """``path`` copied beside ``copy``; None: unchanged since this driver last copied it."""
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
    return _Copy(part, copy, version, time.time_ns() - stat.st_mtime_ns > QUIET_NS)


def _commit(staged: list[_Copy | None]) -> None:
    for item in staged:
        if item is not None:
            os.replace(item.part, item.copy)
            _copied[str(item.copy)] = item.version if item.quiet else None


def _parses(part: Path) -> bool:
    """An experiment state is whole JSON (a rewrite within the copy's clock tick leaves the time stamp alone)."""
    if not part.name.startswith(".experiment_state-"):
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
                                                  metadata.get("last_result") or {})
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
