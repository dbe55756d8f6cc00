"""Data loaders on small fake copies in the real on-disk formats, and the cluttered-digits set."""

import collections
import pickle
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attzoom import data
from attzoom.config import TrainConfig
from attzoom.data import DATASETS, ClutterSpec, DataError, ImageSet, load, make_cluttered_digits

# --- CIFAR-100 -------------------------------------------------------------------------

def _cifar_with_ids(write_cifar100, root: Path, n_train: int = 50, n_test: int = 20) -> dict:
    """Fake CIFAR-100 whose image i carries i in its first two bytes and a marked pixel."""
    parts = write_cifar100(root, n_train, n_test)
    for part, entry in parts.items():
        d = entry[b"data"]
        d[:, 0] = np.arange(len(d)) % 256
        d[:, 1] = np.arange(len(d)) // 256
        with open(root / "cifar-100-python" / part, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return parts


def _ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def test_cifar100_layout_and_pixel_placement(tmp_path, write_cifar100):
    parts = write_cifar100(tmp_path, 50, 20)
    test = parts["test"]
    # a known pixel in each plane of test image 3: R at (y=5, x=7), G at (9, 2), B at (31, 30)
    test[b"data"][3] = 0
    test[b"data"][3, 0 * 1024 + 5 * 32 + 7] = 201
    test[b"data"][3, 1 * 1024 + 9 * 32 + 2] = 202
    test[b"data"][3, 2 * 1024 + 31 * 32 + 30] = 203
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump(test, f, protocol=2)

    splits = load("cifar100", tmp_path, download=False)
    assert splits.num_classes == 100
    assert splits.image_size == 32
    for part in (splits.train, splits.val, splits.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, 32, 32)
        assert part.labels.dtype == torch.int64
    img = splits.test.images[3]
    assert (img[0, 5, 7], img[1, 9, 2], img[2, 31, 30]) == (201, 202, 203)
    assert int((img != 0).sum()) == 3
    # the test split is kept whole and in order
    assert torch.equal(splits.test.images.reshape(20, -1), torch.from_numpy(test[b"data"]))
    assert splits.test.labels.tolist() == test[b"fine_labels"]
    assert len(splits.mean) == len(splits.std) == 3


def test_cifar100_validation_split(tmp_path, write_cifar100):
    parts = _cifar_with_ids(write_cifar100, tmp_path, 50, 20)
    labels = parts["train"][b"fine_labels"]
    splits = load("cifar100", tmp_path, val_fraction=0.1, seed=0, download=False)
    train_ids, val_ids = _ids(splits.train.images), _ids(splits.val.images)
    assert len(val_ids) == 5 and len(train_ids) == 45
    assert set(train_ids).isdisjoint(val_ids)
    assert sorted(train_ids + val_ids) == list(range(50))
    # labels travel with their images
    assert splits.train.labels.tolist() == [labels[i] for i in train_ids]
    assert splits.val.labels.tolist() == [labels[i] for i in val_ids]
    assert len(splits.test) == 20 and _ids(splits.test.images) == list(range(20))

    again = load("cifar100", tmp_path, val_fraction=0.1, seed=0, download=False)
    assert _ids(again.val.images) == val_ids and _ids(again.train.images) == train_ids
    other = load("cifar100", tmp_path, val_fraction=0.1, seed=1, download=False)
    assert sorted(_ids(other.val.images)) != sorted(val_ids)
    assert _ids(other.test.images) == list(range(20))

    bigger = load("cifar100", tmp_path, val_fraction=0.3, seed=0, download=False)
    assert len(bigger.val) == 15 and len(bigger.train) == 35


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_bad_val_fraction(fake_cifar100, fraction):
    with pytest.raises(DataError, match="val_fraction"):
        load("cifar100", fake_cifar100, val_fraction=fraction, download=False)


@pytest.mark.parametrize("name", DATASETS)
def test_a_data_root_that_is_a_file_is_named_as_such(tmp_path, name):
    # it said "downloading ... failed (FileExistsError)", or trained on digits it could never cache
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(DataError, match=f"data root {tmp_path / 'data'} is a file, not a folder"):
        load(name, tmp_path / "data", download=False)


def test_cifar100_missing_names_path_and_layout(tmp_path):
    with pytest.raises(DataError) as info:
        load("cifar100", tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in message
    assert "cifar-100-python/" in message and "train" in message and "test" in message


@pytest.mark.parametrize("name", ["cifar100", "tinyimagenet"])
def test_a_sweeps_trial_never_downloads_a_data_set_gone_since_the_check(tmp_path, name):
    # a data set removed after the sweep's check: each trial tried to download it, every trial at once into the
    # shared root, and its error said "downloading https://... failed (URLError)"
    from tune_jobs.trainable import cached_data

    config = TrainConfig(dataset=name, data_root=str(tmp_path))
    with pytest.raises(DataError) as info:
        cached_data(config)
    assert "download" not in str(info.value) and str(tmp_path) in str(info.value), info.value
    assert list(tmp_path.iterdir()) == []


def test_cifar100_missing_test_part(fake_cifar100):
    (fake_cifar100 / "cifar-100-python" / "test").unlink()
    with pytest.raises(DataError, match="test"):
        load("cifar100", fake_cifar100, download=False)


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.9, 0.999])
@pytest.mark.parametrize("part", ["train", "test"])
def test_cifar100_truncated_pickle(fake_cifar100, part, keep):
    path = fake_cifar100 / "cifar-100-python" / part
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(DataError) as info:
        load("cifar100", fake_cifar100, download=False)
    assert str(path) in str(info.value)
    assert "truncated or malformed" in str(info.value)


def test_cifar100_empty_file(fake_cifar100):
    path = fake_cifar100 / "cifar-100-python" / "train"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=str(path)):
        load("cifar100", fake_cifar100, download=False)


def test_cifar100_pickle_starting_with_0x95(fake_cifar100):
    """0x95 is pickle's FRAME opcode: the next 8 bytes read as an absurd frame length (was an OverflowError)."""
    path = fake_cifar100 / "cifar-100-python" / "train"
    path.write_bytes(b"\x95" + path.read_bytes()[1:])
    with pytest.raises(DataError, match="truncated or malformed") as info:
        load("cifar100", fake_cifar100, download=False)
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1


def _rewrite(root: Path, part: str, **changes) -> Path:
    path = root / "cifar-100-python" / part
    with open(path, "rb") as f:
        entry = pickle.load(f)
    entry.update({k.encode(): v for k, v in changes.items()})
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    return path


@pytest.mark.parametrize("changes", [
    {"data": np.zeros((50, 3000), np.uint8)},        # wrong row length
    {"data": np.zeros((50, 3, 32, 32), np.uint8)},   # wrong rank
    {"data": np.zeros(3072 * 50, np.uint8)},         # flat
    {"fine_labels": list(range(49))},                # label count != image count
    {"fine_labels": [100] * 50},                     # label out of range
    {"fine_labels": [-1] * 50},
], ids=["row-length", "rank", "flat", "label-count", "label-100", "label-negative"])
def test_cifar100_wrong_shapes(fake_cifar100, changes):
    path = _rewrite(fake_cifar100, "train", **changes)
    with pytest.raises(DataError, match="malformed") as info:
        load("cifar100", fake_cifar100, download=False)
    assert str(path) in str(info.value)


def test_cifar100_missing_key_and_not_a_dict(fake_cifar100):
    path = fake_cifar100 / "cifar-100-python" / "train"
    with open(path, "rb") as f:
        entry = pickle.load(f)
    del entry[b"fine_labels"]
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with pytest.raises(DataError, match=str(path)):
        load("cifar100", fake_cifar100, download=False)
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f, protocol=2)
    with pytest.raises(DataError, match=str(path)):
        load("cifar100", fake_cifar100, download=False)


# --- Tiny-ImageNet ---------------------------------------------------------------------

WNIDS = ["n03000001", "n01000002", "n02000003"]  # deliberately not sorted: labels follow wnids.txt
COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]  # one solid colour per class
VAL = [(0, 2), (1, 0), (2, 1), (3, 2), (4, 0), (5, 1)]  # (val image index, label)


def _jpeg(path: Path, colour, size=64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, "JPEG", quality=95)


def write_tinyimagenet(root: Path, per_class: int = 4) -> Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in WNIDS))
    (folder / "words.txt").write_text("".join(f"{w}\tthing {i}, object {i}\n" for i, w in enumerate(WNIDS)))
    for label, wnid in enumerate(WNIDS):
        boxes = []
        for i in range(per_class):
            _jpeg(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", COLOURS[label])
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    lines = []
    for i, label in VAL:
        _jpeg(folder / "val" / "images" / f"val_{i}.JPEG", COLOURS[label])
        lines.append(f"val_{i}.JPEG\t{WNIDS[label]}\t1\t2\t40\t50\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return folder


def _colour_labels(images: torch.Tensor) -> list[int]:
    """Which class colour each image is (its dominant channel)."""
    return images.float().mean(dim=(2, 3)).argmax(dim=1).tolist()


def test_class_names_come_from_the_data_sets_own_files(tmp_path, write_cifar100):
    # explain labelled CIFAR-100 and Tiny-ImageNet rows "true 42 / predicted 17": the names are in the copies' files
    from attzoom.datafiles import class_names

    write_cifar100(tmp_path)
    assert class_names("cifar100", tmp_path) == [f"fine{i}" for i in range(100)]
    folder = write_tinyimagenet(tmp_path)
    assert class_names("tinyimagenet", tmp_path) == ["thing 0", "thing 1", "thing 2"]  # by wnids.txt's order
    (folder / "words.txt").write_text(f"{WNIDS[1]}\tgoldfish, Carassius auratus\n")  # a wnid it lacks: the wnid
    assert class_names("tinyimagenet", tmp_path) == [WNIDS[0], "goldfish", WNIDS[2]]
    (folder / "words.txt").unlink()
    (tmp_path / "cifar-100-python" / "meta").write_bytes(b"junk")
    assert class_names("tinyimagenet", tmp_path) is None and class_names("cifar100", tmp_path) is None
    assert class_names("cluttered-digits", tmp_path) is None  # a digit's label is its name


def test_tinyimagenet_loads_folder_layout(tmp_path):
    folder = write_tinyimagenet(tmp_path)
    train, test, classes = data.load_tinyimagenet(tmp_path, download=False)
    assert classes == 3
    assert train.images.shape == (12, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert _colour_labels(train.images) == train.labels.tolist()
    # JPEG of a solid colour decodes to (almost) that colour
    assert (train.images[0].float() - torch.tensor(COLOURS[0]).float()[:, None, None]).abs().max() <= 3
    assert test.images.shape == (6, 3, 64, 64)
    assert test.labels.tolist() == [label for _, label in VAL]
    assert _colour_labels(test.images) == test.labels.tolist()

    splits = load("tinyimagenet", tmp_path, val_fraction=0.25, download=False)
    assert splits.num_classes == 3 and splits.image_size == 64
    assert len(splits.train) == 9 and len(splits.val) == 3
    assert torch.equal(splits.test.labels, test.labels)
    assert (folder / ".attzoom-tiny.npz").is_file()


def test_a_tinyimagenet_copy_completed_later_is_decoded_again(tmp_path):
    # the cache kept serving the first, partial copy's images, without a word
    folder = write_tinyimagenet(tmp_path, per_class=2)
    assert len(data.load_tinyimagenet(tmp_path, download=False)[0].labels) == 6
    for label, wnid in enumerate(WNIDS):
        for i in range(2, 4):
            _jpeg(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", COLOURS[label])
    train, _, _ = data.load_tinyimagenet(tmp_path, download=False)
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(list(folder.glob(".attzoom-*"))) == 1  # rebuilt in place, not beside the old one


def test_tinyimagenet_cache_is_used_and_identical(tmp_path, monkeypatch):
    folder = write_tinyimagenet(tmp_path)
    first = data.load_tinyimagenet(tmp_path, download=False)
    cache = folder / ".attzoom-tiny.npz"
    assert cache.is_file()

    def decode(files):
        raise AssertionError("decoded the images again")

    monkeypatch.setattr(data, "_read_images", decode)  # a second load reads the cache only
    second = data.load_tinyimagenet(tmp_path, download=False)
    assert second[2] == first[2]
    for a, b in zip(first[:2], second[:2]):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert b.images.dtype == torch.uint8 and b.labels.dtype == torch.int64


def test_tinyimagenet_on_a_read_only_folder_is_cached_in_the_users_cache_folder(tmp_path, monkeypatch):
    # the KubeRay manifests mount the data read-only: the cache was never written, and every new trial process
    # decoded the 110,000 images again
    folder = write_tinyimagenet(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_writable", lambda path: path != folder)  # as a read-only mount (root writes anyway)
    first = data.load_tinyimagenet(tmp_path / "data", download=False)
    assert not (folder / ".attzoom-tiny.npz").exists() and len(list((tmp_path / "cache" / "attzoom").glob("*"))) == 1

    def decode(files):
        raise AssertionError("decoded the images again")

    monkeypatch.setattr(data, "_read_images", decode)
    second = data.load_tinyimagenet(tmp_path / "data", download=False)
    assert all(torch.equal(a.images, b.images) for a, b in zip(first[:2], second[:2]))


def test_tinyimagenet_missing_names_path_and_layout(tmp_path):
    with pytest.raises(DataError) as info:
        load("tinyimagenet", tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "tiny-imagenet-200" / "wnids.txt") in message
    assert "val_annotations.txt" in message and "train/<wnid>/images" in message


@pytest.mark.parametrize("bad_line", [
    "val_9.JPEG n09999999\t1\t2\t3\t4",     # unknown wnid
    "val_9.JPEG n01000002 1 2 3 4",        # spaces, not tabs
    "val_9.JPEG",                          # one field
], ids=["unknown-wnid", "spaces", "one-field"])
def test_tinyimagenet_malformed_annotation(tmp_path, bad_line):
    folder = write_tinyimagenet(tmp_path)
    annotations = folder / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    lines.insert(2, bad_line)
    annotations.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load("tinyimagenet", tmp_path, download=False)
    message = str(info.value)
    assert str(annotations) in message and "line 3" in message
    assert not (folder / ".attzoom-tiny.npz").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_tinyimagenet_corrupt_jpeg(tmp_path, damage):
    folder = write_tinyimagenet(tmp_path)
    image = folder / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_2.JPEG"
    raw = image.read_bytes()
    image.write_bytes({"garbage": b"not a jpeg at all" * 20, "truncated": raw[: len(raw) // 2],
                       "empty": b""}[damage])
    with pytest.raises(DataError) as info:
        load("tinyimagenet", tmp_path, download=False)
    assert str(image) in str(info.value)
    assert not (folder / ".attzoom-tiny.npz").exists()


def test_tinyimagenet_missing_val_image_and_wrong_size(tmp_path):
    folder = write_tinyimagenet(tmp_path)
    missing = folder / "val" / "images" / "val_4.JPEG"
    missing.unlink()
    with pytest.raises(DataError, match=str(missing)):
        load("tinyimagenet", tmp_path, download=False)
    _jpeg(missing, COLOURS[0], size=32)
    with pytest.raises(DataError, match="32x32"):
        load("tinyimagenet", tmp_path, download=False)


def test_tinyimagenet_class_without_images(tmp_path):
    folder = write_tinyimagenet(tmp_path)
    for jpeg in (folder / "train" / WNIDS[2] / "images").glob("*.JPEG"):
        jpeg.unlink()
    with pytest.raises(DataError, match=str(folder / "train" / WNIDS[2] / "images")):
        load("tinyimagenet", tmp_path, download=False)


# --- cluttered digits ------------------------------------------------------------------

def _cache_files(root: Path) -> list[Path]:
    return sorted((root / "cluttered-digits").glob(".attzoom-digits-*.npz"))


def test_cluttered_digits_shapes_and_classes(digits_root):
    splits = load("cluttered-digits", digits_root)
    assert splits.num_classes == 10 and splits.image_size == 32
    for part in (splits.train, splits.val, splits.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, 32, 32)
        assert part.labels.dtype == torch.int64
        assert set(part.labels.tolist()) == set(range(10))
        lit = (part.images[:, 0] > 0).flatten(1).sum(1)
        assert (lit > 0).all()  # no blank image
        # grey images: the three channels are equal
        assert torch.equal(part.images[:, 0], part.images[:, 1]) and torch.equal(part.images[:, 0], part.images[:, 2])
    spec = ClutterSpec()
    n_source = 1797
    assert len(splits.test) == spec.test_per_digit * (n_source // 4)
    assert len(splits.train) + len(splits.val) == spec.train_per_digit * (n_source - n_source // 4)


def test_cluttered_digits_cache_and_determinism(digits_root, tmp_path):
    files = _cache_files(digits_root)
    assert len(files) == 1
    cached = load("cluttered-digits", digits_root)
    fresh = load("cluttered-digits", tmp_path)  # a second build, in another root
    assert len(_cache_files(tmp_path)) == 1 and _cache_files(tmp_path)[0].name == files[0].name
    for a, b in [(cached.train, fresh.train), (cached.val, fresh.val), (cached.test, fresh.test)]:
        assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
        assert torch.equal(a.labels, b.labels)

    # the second call reads the cache file: replace its contents and the loader returns them
    train_x = np.full((20, 3, 32, 32), 7, np.uint8)
    labels = np.arange(20) % 10
    with open(_cache_files(tmp_path)[0], "wb") as f:
        np.savez(f, train_x=train_x, train_y=labels, test_x=train_x[:10], test_y=labels[:10])
    planted = load("cluttered-digits", tmp_path)
    assert len(planted.test) == 10 and len(planted.train) + len(planted.val) == 20
    assert (planted.train.images == 7).all()


def test_cluttered_digits_have_clutter():
    clean_train, _ = make_cluttered_digits(ClutterSpec(fragments=(0, 0), train_per_digit=1, test_per_digit=1))
    busy_train, _ = make_cluttered_digits(ClutterSpec(train_per_digit=1, test_per_digit=1))

    def lit(images):
        return (images[:, 0] > 0).flatten(1).sum(1).float()

    def extent(images):  # the larger side of the bounding box of lit pixels
        mask = images[:, 0] > 0
        rows, cols = mask.any(2), mask.any(1)
        span = lambda m: m.shape[1] - m.long().argmax(1) - m.flip(1).long().argmax(1)  # noqa: E731
        return torch.maximum(span(rows), span(cols))

    assert lit(busy_train.images).mean() > 1.3 * lit(clean_train.images).mean()
    max_digit = ClutterSpec().digit_sizes[1]
    assert (extent(clean_train.images) <= max_digit).all()  # a lone digit fits its own box
    assert (extent(busy_train.images) > max_digit).float().mean() > 0.5  # clutter spreads beyond it


def test_cluttered_digits_spec_changes_data():
    a, _ = make_cluttered_digits(ClutterSpec(seed=1, train_per_digit=1, test_per_digit=1))
    b, _ = make_cluttered_digits(ClutterSpec(seed=1, train_per_digit=1, test_per_digit=1))
    c, _ = make_cluttered_digits(ClutterSpec(seed=2, train_per_digit=1, test_per_digit=1))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_cluttered_digits_test_images_not_in_train(digits_root):
    splits = load("cluttered-digits", digits_root)
    train = {bytes(img.numpy().tobytes()) for img in torch.cat([splits.train.images, splits.val.images])}
    assert not any(img.numpy().tobytes() in train for img in splits.test.images)


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(DataError) as info:
        load("imagenet", tmp_path)
    assert "imagenet" in str(info.value)
    for name in DATASETS:
        assert name in str(info.value)


# --- fuzzing: every damaged data file ends in the one-line DataError, never a traceback ----

FUZZ_SEED = 13


@pytest.fixture
def one_torch_thread():
    """Hundreds of tiny loads: torch's thread pool only adds contention (4x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _corruptions(raw: bytes, n: int, seed: int, quiet: tuple[bytes, ...] = ()) -> list[tuple[str, bytes]]:
    """``n`` labelled damaged copies of ``raw``, in turn: random bytes of random length, ``raw`` cut
    at a random point, ``raw`` with 1-8 bytes overwritten (half of them outside the ``quiet`` blobs,
    bulk pixel data where a flip may only change a pixel) and ``raw`` with another first byte (0x95,
    the pickle FRAME opcode, among others). Random files also start with 0x95 every other time."""
    rng = np.random.default_rng(seed)
    loud = np.ones(len(raw), bool)
    for blob in quiet:
        if (at := raw.find(blob)) >= 0:
            loud[at:at + len(blob)] = False
    loud = np.flatnonzero(loud)
    out = []
    for i in range(n):
        kind = ("random", "truncated", "flipped", "first-byte")[i % 4]
        if kind == "random":
            blob = rng.bytes(int(rng.integers(0, min(2 * len(raw), 1 << 16) + 1)))
            if i % 8 == 0 and blob:
                blob = b"\x95" + blob[1:]
        elif kind == "truncated":
            blob = raw[: int(rng.integers(0, len(raw)))]
        else:
            b = bytearray(raw)
            if kind == "first-byte":
                b[0] = int(rng.choice([0x95, 0x95, 0x80, 0x00, 0xFF, int(rng.integers(256))]))
            else:
                for _ in range(int(rng.integers(1, 9))):
                    at = int(rng.choice(loud)) if rng.random() < 0.5 and len(loud) else int(rng.integers(len(b)))
                    b[at] ^= int(rng.integers(1, 256))
            blob = bytes(b)
        out.append((f"seed={seed} {kind} #{i} ({len(blob)} bytes)", blob))
    return out


def _fuzz(path: Path, variants, reload, must_load: bool = False, check=None) -> collections.Counter:
    """Write each variant over ``path`` and call ``reload()``; it must return (then ``check`` its result)
    or, unless ``must_load``, raise a one-line DataError naming ``path``. Anything else fails the test."""
    outcomes, failures = collections.Counter(), []
    for label, blob in variants:
        path.write_bytes(blob)
        try:
            result = reload()
        except DataError as e:
            outcomes["DataError"] += 1
            message = str(e)
            if must_load or len(message.splitlines()) != 1 or str(path) not in message:
                why = "instead of a rebuild" if must_load else "not one line naming the file"
                failures.append(f"{label}: DataError {why}: {message!r}")
        except Exception as e:  # noqa: BLE001 - a traceback for the user: exactly what this test hunts
            outcomes[type(e).__name__] += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            failures.append(f"{label}: {type(e).__name__}: {str(e)[:150]!r} "
                            f"at {Path(where.filename).name}:{where.lineno}")
        else:
            outcomes["loaded"] += 1
            if check is not None and (problem := check(result)):
                failures.append(f"{label}: loaded but {problem}")
    assert not failures, (f"{len(failures)} of {len(variants)} damaged versions of {path} failed "
                          f"(outcomes {dict(outcomes)}):\n" + "\n".join(failures[:20]))
    return outcomes


@pytest.mark.parametrize("part", ["train", "test"])
@pytest.mark.usefixtures("one_torch_thread")
def test_fuzz_cifar100_pickles(tmp_path, write_cifar100, part):
    entry = write_cifar100(tmp_path, 4, 2)[part]
    path = tmp_path / "cifar-100-python" / part
    pixels = entry[b"data"].tobytes()  # protocol 2 stores them as a latin-1 text, UTF-8 encoded
    variants = _corruptions(path.read_bytes(), 250, FUZZ_SEED + (part == "test"),
                            quiet=(pixels, pixels.decode("latin-1").encode("utf-8")))
    outcomes = _fuzz(path, variants, lambda: load("cifar100", tmp_path, download=False))
    assert outcomes["DataError"] > len(variants) // 2  # the damage was mostly real, not pixel noise


TINY_TARGETS = ["wnids.txt", "val/val_annotations.txt", f"train/{WNIDS[1]}/images/{WNIDS[1]}_0.JPEG",
                "val/images/val_3.JPEG"]


@pytest.mark.parametrize("target", TINY_TARGETS, ids=["wnids", "annotations", "train-jpeg", "val-jpeg"])
@pytest.mark.usefixtures("one_torch_thread")
def test_fuzz_tinyimagenet_files(tmp_path, target):
    folder = write_tinyimagenet(tmp_path, per_class=1)
    path, cache = folder / target, folder / ".attzoom-tiny.npz"

    def reload():
        cache.unlink(missing_ok=True)  # decode the files every time, not the cache of a lucky variant
        return load("tinyimagenet", tmp_path, download=False)

    outcomes = _fuzz(path, _corruptions(path.read_bytes(), 120, FUZZ_SEED), reload)
    assert outcomes["DataError"] > 30


def _fuzz_cache(cache: Path, reference, reload, n: int = 200) -> None:
    """A damaged cache is rebuilt from the data set, so every variant loads, and loads the right data."""
    with np.load(cache) as z:
        quiet = tuple(z[k].tobytes() for k in z.files if z[k].nbytes > 256)

    def check(splits):
        if not (torch.equal(splits.test.images, reference.test.images)
                and torch.equal(splits.test.labels, reference.test.labels)
                and len(splits.train) + len(splits.val) == len(reference.train) + len(reference.val)):
            return "with data other than the data set's"

    _fuzz(cache, _corruptions(cache.read_bytes(), n, FUZZ_SEED, quiet), reload, must_load=True, check=check)


@pytest.mark.usefixtures("one_torch_thread")
def test_fuzz_tinyimagenet_cache(tmp_path, monkeypatch):
    folder = write_tinyimagenet(tmp_path, per_class=1)
    reload = lambda: load("tinyimagenet", tmp_path, download=False)  # noqa: E731
    reference = reload()
    _fuzz_cache(folder / ".attzoom-tiny.npz", reference, reload)

    def decode(files):
        raise AssertionError("decoded the images again")

    monkeypatch.setattr(data, "_read_images", decode)  # the last damaged cache was replaced by a good one
    assert torch.equal(reload().test.images, reference.test.images)


@pytest.mark.usefixtures("one_torch_thread")
def test_fuzz_cluttered_digits_cache(tmp_path, monkeypatch):
    small = ImageSet(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8), torch.arange(20) % 10)
    monkeypatch.setattr(data, "make_cluttered_digits", lambda spec: (small, small.subset(torch.arange(10))))
    reload = lambda: load("cluttered-digits", tmp_path)  # noqa: E731 - rebuilding takes milliseconds now
    reference = reload()
    _fuzz_cache(_cache_files(tmp_path)[0], reference, reload)
