"""A sweep's own files in its Tune storage, a local or shared folder or a cloud URI alike.

Tune opens a URI storage (s3://, gs://, ...) with pyarrow, so the saved spec goes there through
pyarrow too, next to the trial folders, and not into a local folder named after the URI. A URI's
query (``?endpoint_override=...``) is read by pyarrow, so paths are joined after it resolves.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .spec import local_path


def is_remote(storage: str) -> bool:
    return local_path(storage) is None


def sweep_location(storage: str, name: str) -> str:
    """The sweep's folder as Tune names it: a local path, or ``storage/name`` with the URI's query kept last."""
    if not is_remote(storage):
        return str(local_path(storage) / name)
    if not name:
        return storage
    base, _, query = storage.partition("?")
    return f"{base.rstrip('/')}/{name}" + (f"?{query}" if query else "")


def _remote(storage: str, *parts: str):
    from pyarrow.fs import FileSystem

    fs, base = FileSystem.from_uri(storage)
    return fs, "/".join([base.rstrip("/"), *filter(None, parts)])


def read_file(storage: str, *parts: str) -> str | None:
    """A file's text, or None when it is not there."""
    if not is_remote(storage):
        path = local_path(storage).joinpath(*parts)
        return path.read_text() if path.is_file() else None
    from pyarrow.fs import FileType

    fs, path = _remote(storage, *parts)
    if fs.get_file_info(path).type != FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_file(storage: str, *parts: str, text: str, private: bool = False) -> None:
    """Write a file, its folders made first; ``private``: readable by this user only (a local file; cloud storage
    has no file modes, so a caller must not put a secret there)."""
    if not is_remote(storage):
        _replace_file(local_path(storage).joinpath(*parts), text, 0o600 if private else 0o666)
        return
    fs, path = _remote(storage, *parts)  # an object is replaced whole or not at all
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def _replace_file(path: Path, text: str, mode: int) -> None:
    """The file replaced whole, or not at all: a kill or an error midway leaves the earlier one as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(draft, path)
    finally:
        draft.unlink(missing_ok=True)


def folder_names(storage: str, *parts: str, folders_only: bool = False) -> list[str]:
    """The names in a folder (``folders_only``: of its subfolders); none when it is not there."""
    if not is_remote(storage):
        folder = local_path(storage).joinpath(*parts)
        return [p.name for p in folder.iterdir() if p.is_dir() or not folders_only] if folder.is_dir() else []
    from pyarrow.fs import FileSelector, FileType

    fs, path = _remote(storage, *parts)
    return [Path(info.path).name for info in fs.get_file_info(FileSelector(path, allow_not_found=True))
            if info.type == FileType.Directory or not folders_only]


def remove_folder(storage: str, *parts: str) -> None:
    """Delete a folder and everything in it, as far as it can be deleted (a clean-up, which nothing waits on)."""
    if not is_remote(storage):
        shutil.rmtree(local_path(storage).joinpath(*parts), ignore_errors=True)
        return
    fs, path = _remote(storage, *parts)
    try:
        fs.delete_dir(path)
    except OSError:
        pass
