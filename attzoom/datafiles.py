"""The published data sets' files as they lie on disk: read and checked without torch.

The loaders (attzoom.data) build tensors from these; a sweep's driver, which never imports torch,
checks the same files with the same rules before any trial starts (tune_jobs/spec.py: check_data),
so a copy that a trial would refuse is refused once, up front, not by every trial and its retries.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataError

CIFAR100_LAYOUT = "cifar-100-python/{train,test,meta} pickles as published by the CIFAR authors"
TINY_LAYOUT = ("tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG and "
               "val/images/*.JPEG with val/val_annotations.txt")
TINY_SIZE = 64
JPEG_END = b"\xff\xd9"


@dataclass(frozen=True)
class ClutterSpec:
    """How the cluttered-digits set is drawn; the cache key is derived from it."""

    canvas: int = 32
    digit_sizes: tuple[int, int] = (12, 18)
    fragments: tuple[int, int] = (3, 6)
    fragment_size: int = 6
    train_per_digit: int = 4
    test_per_digit: int = 2
    seed: int = 0


def digits_cache(root: Path, spec: ClutterSpec = ClutterSpec()) -> Path:
    """Where the cluttered digits drawn by ``spec`` are kept once built: a trial only reads it from then on, so a
    data root others share read-only serves it."""
    return root / "cluttered-digits" / f".attzoom-digits-{hashlib.sha1(repr(spec).encode()).hexdigest()[:12]}.npz"


def read_cifar_part(path: Path, note: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-100 pickle's images (N x 3072 uint8) and fine labels (N, in 0..99)."""
    if not path.is_file():
        raise DataError(f"CIFAR-100 not found: {path} is missing{note}; put {CIFAR100_LAYOUT} under "
                        f"{path.parent.parent}")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[b"fine_labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - damaged bytes can make pickle raise nearly anything
        # (OverflowError for a bogus FRAME length, ImportError, LookupError, MemoryError, ...)
        raise DataError(f"CIFAR-100 file {path} is truncated or malformed ({reason(e)}); "
                        f"expected a pickled dict with b'data' (N x 3072 uint8) and b'fine_labels'") from e
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),) or not len(data):
        raise DataError(f"CIFAR-100 file {path} is malformed: data shape {data.shape}, "
                        f"labels shape {labels.shape}; expected N x 3072 and N labels, N > 0")
    if labels.min() < 0 or labels.max() >= 100:
        raise DataError(f"CIFAR-100 file {path} is malformed: labels outside 0..99")
    return data, labels


def tiny_wnids(folder: Path, note: str = "") -> list[str]:
    """The class ids of wnids.txt, in order (a class's label is its line)."""
    wnids_file = folder / "wnids.txt"
    if not wnids_file.is_file():
        raise DataError(f"Tiny-ImageNet not found: {wnids_file} is missing{note}; put {TINY_LAYOUT} under "
                        f"{folder.parent}")
    wnids = [w.strip() for w in read_text(wnids_file, "one wnid such as 'n01443537' a line").splitlines()
             if w.strip()]
    bad = [w for w in wnids if not re.fullmatch(r"[A-Za-z0-9_-]+", w)]
    if bad or not wnids or len(set(wnids)) < len(wnids):
        what = f"lists {bad[0][:40]!r}" if bad else "repeats a wnid" if wnids else "lists no wnids"
        raise DataError(f"Tiny-ImageNet malformed: {wnids_file} {what}; expected one wnid such as 'n01443537' "
                        "a line, each with a folder train/<wnid>/images")
    return wnids


def class_names(dataset: str, root: Path) -> list[str] | None:
    """Each class's name by label, from the files that name them (CIFAR-100's meta, Tiny-ImageNet's words.txt); None
    for the digits, whose labels are their names, and where those files are missing or unreadable (an optional
    nicety: explain then labels classes by number)."""
    try:
        if dataset == "cifar100":
            with open(root / "cifar-100-python" / "meta", "rb") as f:
                return [name.decode() for name in pickle.load(f, encoding="bytes")[b"fine_label_names"]]
        if dataset == "tinyimagenet":
            folder = root / "tiny-imagenet-200"
            words = dict(line.split("\t", 1) for line in (folder / "words.txt").read_text().splitlines()
                         if "\t" in line)
            return [words.get(wnid, wnid).split(",")[0].strip() for wnid in tiny_wnids(folder)]
    except Exception:  # noqa: BLE001 - names are a nicety: numbers do where the files cannot be read
        return None
    return None


def tiny_files(folder: Path, wnids: list[str]) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(training images, test images), each a list of (path, label)."""
    index = {w: i for i, w in enumerate(wnids)}
    return _tiny_train_files(folder, wnids, index), _tiny_val_files(folder, index)


def files_key(folder: Path, files: list[tuple[Path, int]]) -> str:
    """What the decoded set was built from: each image's path, label, size and time of change. A copy completed
    or fixed later is decoded again (the cache kept serving the old images)."""
    digest = hashlib.sha1()
    for path, label in files:
        info = path.stat()
        digest.update(f"{path.relative_to(folder)}\t{label}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def check_images(files: list[tuple[Path, int]]) -> None:
    """Each image opens as a 64x64 picture and ends where a JPEG ends, without decoding it (a tenth of the cost):
    a garbage, empty or cut-short file is found. One whose end is not a JPEG's is decoded to be sure."""
    from PIL import Image

    for path, _ in files:
        try:
            with open(path, "rb") as f, Image.open(f) as im:
                size = im.size
                f.seek(-len(JPEG_END), 2)
                if size == (TINY_SIZE, TINY_SIZE) and f.read() != JPEG_END:
                    im.load()  # raises for a cut-short file; another format or trailing bytes pass
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise unreadable_image(path, e) from e
        if size != (TINY_SIZE, TINY_SIZE):
            raise wrong_size(path, size)


def unreadable_image(path: Path, error: BaseException) -> DataError:
    return DataError(f"Tiny-ImageNet image {path} is missing or unreadable ({reason(error)}); expected a 64x64 JPEG")


def wrong_size(path: Path, size: tuple[int, int]) -> DataError:
    return DataError(f"Tiny-ImageNet image {path} is {size[0]}x{size[1]}, expected 64x64")


def _tiny_train_files(folder: Path, wnids: list[str], index: dict[str, int]) -> list[tuple[Path, int]]:
    files = []
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        found = sorted(images.glob("*.JPEG"))
        if not found:
            raise DataError(f"Tiny-ImageNet malformed: no images in {images} for wnid {wnid} of "
                            f"{folder / 'wnids.txt'}; expected {TINY_LAYOUT}")
        files += [(p, index[wnid]) for p in found]
    return files


def _tiny_val_files(folder: Path, index: dict[str, int]) -> list[tuple[Path, int]]:
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"Tiny-ImageNet malformed: {annotations} is missing; expected {TINY_LAYOUT}")
    expected = "'<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>' lines"
    images = folder / "val" / "images"
    present = {p.name for p in images.iterdir()} if images.is_dir() else set()
    files = []
    for n, line in enumerate(read_text(annotations, expected).splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"Tiny-ImageNet malformed: {annotations} line {n} is {line[:100]!r}; "
                            f"expected {expected} with a wnid from {folder / 'wnids.txt'}")
        if fields[0] not in present:  # also keeps names such as '../x' or '/x' out of the path
            raise DataError(f"Tiny-ImageNet malformed: {annotations} line {n} names "
                            f"{str(images / fields[0][:100])!r}, which is missing")
        files.append((images / fields[0], index[fields[1]]))
    if not files:
        raise DataError(f"Tiny-ImageNet malformed: {annotations} lists no images; expected {expected}")
    return files


def read_text(path: Path, expected: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except Exception as e:  # noqa: BLE001 - UnicodeDecodeError for binary junk, OSError for an unreadable file
        raise DataError(f"Tiny-ImageNet file {path} is unreadable ({reason(e)}); expected {expected}") from e


def reason(e: BaseException) -> str:
    """A decoder's complaint on one short line, to quote in a DataError."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__
