"""Data sets as uint8 tensors: CIFAR-100, Tiny-ImageNet and the embedded cluttered digits.

Every loader returns a :class:`Splits`: a training set, a validation set held out of
the training set with a fixed seed (for search and early stopping), and the official
test split (kept for the final report; for Tiny-ImageNet that is its labelled ``val``
folder, as its own test labels were never published). Images are (N, 3, H, W) uint8 so
that CIFAR-sized sets live on the training device whole and are augmented there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataError  # noqa: F401 - re-exported
from .datafiles import (TINY_SIZE, ClutterSpec, digits_cache, files_key, read_cifar_part, tiny_files, tiny_wnids,
                        unreadable_image, wrong_size)
from .names import DATASETS


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


def load(name: str, root: str | Path = "data", val_fraction: float = 0.1, seed: int = 0,
         download: bool = True) -> Splits:
    """Load a data set by name and hold ``val_fraction`` of its training set out for validation."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():  # else "downloading ... failed (FileExistsError)", or no cache at all
        raise DataError(f"data root {root} is a file, not a folder; pass the folder that holds the data sets")
    if name == "cifar100":
        train, test, classes = load_cifar100(root, download)
    elif name == "tinyimagenet":
        train, test, classes = load_tinyimagenet(root, download)
    elif name == "cluttered-digits":
        train, test, classes = load_cluttered_digits(root)
    else:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    train, val = split_validation(train, val_fraction, seed)
    mean, std = channel_stats(train.images)
    return Splits(train, val, test, classes, mean, std)


def split_validation(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Fixed-seed random split of a training set into (train, validation)."""
    if not 0 < fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {fraction}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(fraction * len(data)))
    return data.subset(order[n_val:]), data.subset(order[:n_val])


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, for normalisation."""
    x = images[:4096].float().div_(255)
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return tuple(mean), tuple(std)


# --- CIFAR-100 (python pickle layout) -------------------------------------------------

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"


def load_cifar100(root: Path, download: bool = True) -> tuple[ImageSet, ImageSet, int]:
    folder = root / "cifar-100-python"
    note = ""
    if not (folder / "train").exists() and download:
        note = _try_download(CIFAR100_URL, root, CIFAR100_MD5)
    return _cifar_part(folder, "train", note), _cifar_part(folder, "test", note), 100


def _cifar_part(folder: Path, part: str, note: str = "") -> ImageSet:
    data, labels = read_cifar_part(folder / part, note)
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageSet(images, torch.from_numpy(labels))


# --- Tiny-ImageNet (folder layout) ----------------------------------------------------

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def load_tinyimagenet(root: Path, download: bool = True) -> tuple[ImageSet, ImageSet, int]:
    folder = root / "tiny-imagenet-200"
    note = ""
    if not (folder / "wnids.txt").exists() and download:
        note = _try_download(TINY_URL, root, None)
    wnids = tiny_wnids(folder, note)
    train_files, test_files = tiny_files(folder, wnids)
    caches, key = _tiny_caches(folder), files_key(folder, train_files + test_files)
    for cache in caches:
        if cached := _read_cache(cache, TINY_SIZE, len(wnids), key):
            return *cached, len(wnids)
    train, test = _read_images(train_files), _read_images(test_files)
    _save_cache(caches[-1], train_x=train.images.numpy(), train_y=train.labels.numpy(),
                test_x=test.images.numpy(), test_y=test.labels.numpy(), key=np.array(key))
    return train, test, len(wnids)


def _read_images(files: list[tuple[Path, int]]) -> ImageSet:
    from PIL import Image

    images = np.empty((len(files), TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as im:
                size = im.size  # checked before decoding, so a damaged header cannot ask for a huge image
                if size == (TINY_SIZE, TINY_SIZE):
                    images[i] = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise unreadable_image(path, e) from e
        if size != (TINY_SIZE, TINY_SIZE):
            raise wrong_size(path, size)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels)


# --- Cluttered digits (embedded, generated) -------------------------------------------

def load_cluttered_digits(root: Path, spec: ClutterSpec = ClutterSpec()) -> tuple[ImageSet, ImageSet, int]:
    """Cluttered digits: scikit-learn's 8x8 digits scaled onto a larger canvas with clutter.

    The cluttered-MNIST idea from the attention literature, built from a data set that
    ships inside scikit-learn, so the demo needs no download. Deterministic in ``spec``
    and cached under ``root`` after the first build.
    """
    cache = digits_cache(root, spec)
    if cached := _read_cache(cache, spec.canvas, 10):
        return *cached, 10
    train, test = make_cluttered_digits(spec)
    _save_cache(cache, train_x=train.images.numpy(), train_y=train.labels.numpy(),
                test_x=test.images.numpy(), test_y=test.labels.numpy())
    return train, test, 10


def make_cluttered_digits(spec: ClutterSpec = ClutterSpec()) -> tuple[ImageSet, ImageSet]:
    """Generate (train, test); the source digits of the two splits are disjoint."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs = torch.from_numpy(digits.images / 16.0).float()  # (1797, 8, 8) in [0, 1]
    labels = torch.from_numpy(digits.target).long()
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(labels), generator=gen)
    n_test = len(labels) // 4
    test_src, train_src = order[:n_test], order[n_test:]
    train = _render(glyphs, labels, train_src, spec.train_per_digit, spec, gen)
    test = _render(glyphs, labels, test_src, spec.test_per_digit, spec, gen)
    return train, test


def _render(glyphs, labels, source, copies, spec: ClutterSpec, gen) -> ImageSet:
    import torch.nn.functional as F

    c = spec.canvas
    src = source.repeat(copies)
    canvas = torch.zeros(len(src), c, c)
    for i, k in enumerate(src.tolist()):
        for _ in range(int(torch.randint(spec.fragments[0], spec.fragments[1] + 1, (1,), generator=gen))):
            other = glyphs[int(torch.randint(len(glyphs), (1,), generator=gen))]
            big = F.interpolate(other[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
            fy, fx = torch.randint(0, 16 - spec.fragment_size + 1, (2,), generator=gen).tolist()
            frag = big[fy:fy + spec.fragment_size, fx:fx + spec.fragment_size]
            y, x = torch.randint(0, c - spec.fragment_size + 1, (2,), generator=gen).tolist()
            _paste_max(canvas[i], frag, y, x)
        size = int(torch.randint(spec.digit_sizes[0], spec.digit_sizes[1] + 1, (1,), generator=gen))
        digit = F.interpolate(glyphs[k][None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        y, x = torch.randint(0, c - size + 1, (2,), generator=gen).tolist()
        _paste_max(canvas[i], digit, y, x)
    images = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()
    return ImageSet(images, labels[src].clone())


def _paste_max(canvas: torch.Tensor, patch: torch.Tensor, y: int, x: int) -> None:
    h, w = patch.shape
    canvas[y:y + h, x:x + w] = torch.maximum(canvas[y:y + h, x:x + w], patch)


# --- caching and download -------------------------------------------------------------

def _tiny_caches(folder: Path) -> list[Path]:
    """Where the decoded set may be, the one to write last: beside the data set, and where that folder is read-only
    (a shared volume mounted so) in the user's cache folder too; else every new trial process decoded the 110,000
    images again."""
    own = _cache_file(folder, "tiny")
    if _writable(folder):
        return [own]
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [own, home / "attzoom" / f"tiny-{hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]}.npz"]


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def _cache_file(folder: Path, key: str) -> Path:
    return folder / f".attzoom-{key}.npz"


def _read_cache(path: Path, size: int, classes: int, key: str | None = None) -> tuple[ImageSet, ImageSet] | None:
    """The cached (train, test), or None when there is none, it is damaged or does not fit, or (``key``) it was
    built from other files.

    A cache is this program's own derived file, not the user's data: when it is damaged (a full
    disk, a copy cut short) a user expects it rebuilt from the data set, not an error telling them
    to delete it, so a damaged cache counts as absent and the rebuild overwrites it.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if key is not None and ("key" not in z.files or str(z["key"]) != key):
                return None
            parts = tuple(ImageSet(torch.from_numpy(z[f"{s}_x"]), torch.from_numpy(z[f"{s}_y"]))
                          for s in ("train", "test"))
    except Exception:  # noqa: BLE001 - zip, npy and torch errors of every kind all mean: rebuild it
        return None
    for p in parts:
        if not (p.images.dtype == torch.uint8 and p.images.shape[1:] == (3, size, size)
                and p.labels.dtype == torch.int64 and p.labels.shape == (len(p.images),) and len(p.labels)
                and 0 <= int(p.labels.min()) and int(p.labels.max()) < classes):
            return None
    return parts


def _save_cache(path: Path, **arrays) -> None:
    """Write atomically, so a killed build never leaves a truncated cache behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    except OSError:
        pass  # a read-only data root only costs a rebuild next time


def _try_download(url: str, root: Path, md5: str | None) -> str:
    """Fetch and unpack an archive when the network allows; on failure return a note for the error
    message and leave no folder behind that was not there before."""
    from torchvision.datasets.utils import download_and_extract_archive

    created = [p for p in (root, *root.parents) if not p.exists()]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        download_and_extract_archive(url, str(root), md5=md5, remove_finished=True)
        return ""
    except Exception as e:  # noqa: BLE001 - any failure is reported by the layout check that follows
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        return f" and downloading {url} failed ({type(e).__name__})"
    finally:
        socket.setdefaulttimeout(previous)
