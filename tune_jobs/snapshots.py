"""Tune's experiment snapshot in the storage: whole files only.

Every second Tune copies the driver's snapshot (trial states, the searcher's and the callbacks'
state) into the sweep's folder, overwriting each file in place. A driver killed during that copy
left a file cut short, and the resume then failed to read it and started the search over beside
the trials it had. On a local or shared folder each file is now written beside its place and
renamed over it, so the folder holds the old file or the new one, whole. (Cloud storage writes an
object whole already.) A resume still checks the snapshot it restores and stops with one line if
it is damaged (a sweep of an older version).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from .spec import SpecError

PART = ".attzoom-part"  # a file being written; never a name Tune looks for
QUIET_NS = 1_000_000_000
_copied: dict[str, tuple[int, int] | None] = {}  # a copy in the storage -> its source's (size, mtime) when quiet


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


def replace_files(source: str, target: str) -> None:
    """Copy the folder ``source`` into ``target``, each file written beside its place and renamed over it.

    A file this driver copied before, quiet then and unchanged since, is skipped: at paper scale the trial folders
    hold thousands of the loggers' files, and between two snapshots only the running trials' change (Tune copied
    them all). A file written within the last second is copied again next time: a write in the same clock tick as
    the copy leaves its time stamp as it was."""
    for folder, _, files in os.walk(source):
        into = Path(target, os.path.relpath(folder, source))
        into.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.startswith("."):  # Tune's own temporary files, there for a moment
                continue
            try:
                _replace(Path(folder, name), into / name, durable=folder == source)
            except FileNotFoundError:  # gone since the listing: the next snapshot has what replaced it
                continue


def _replace(path: Path, copy: Path, durable: bool) -> None:
    """One file; ``durable``: on disk before the rename (the snapshot's own files: a host crash after the rename
    must not leave an empty one). A file Tune rewrote during the copy is left for the next snapshot."""
    stat = path.stat()
    version = (stat.st_size, stat.st_mtime_ns)
    if _copied.get(str(copy)) == version and copy.exists():
        return
    part = copy.with_name(f".{copy.name}.{os.getpid()}-{threading.get_ident()}{PART}")  # one per copying thread
    try:
        shutil.copyfile(path, part)
        if durable:
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != version or not _parses(part):
            return  # rewritten while copied: the storage keeps the whole file it has
        os.replace(part, copy)
    finally:
        part.unlink(missing_ok=True)
    _copied[str(copy)] = version if time.time_ns() - stat.st_mtime_ns > QUIET_NS else None


def _parses(part: Path) -> bool:
    """An experiment state is whole JSON (a rewrite within the copy's clock tick leaves the time stamp alone)."""
    if not part.name.startswith(".experiment_state-"):
        return True
    try:
        json.loads(part.read_bytes())
        return True
    except ValueError:
        return False


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
