"""Shared fixtures: small fake copies of the real data sets in their exact on-disk formats; real servers on loopback."""

import os
import pickle
import urllib.request
from pathlib import Path

# One compute thread per process, as Ray gives a one-CPU trial: the suite's processes (its test workers, the sweeps
# and `attzoom train` they start) outnumber the cores, and torch's OpenMP threads wait for each other by spinning. A
# test_train fit of 2.4 s alone took 11-14 s beside two busy processes with torch's two threads, 3-4 s with one
# (21 s in a whole suite). Set before torch or NumPy loads; the subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest

MAX_WORKERS = 4  # each holds torch, and its sweeps a Ray instance: ~1.5 GiB apiece


@pytest.hookimpl(optionalhook=True)  # known only where pytest-xdist is installed (the GPU session may lack it)
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): one test process per CPU this process may use, at most MAX_WORKERS; most
    tests wait on servers and sweeps, so two processes on two cores finish the suite in about 70 % of the time."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(items) -> None:
    """Files with the most end-to-end (``slow``) tests first, each file's tests in their own order: the test
    processes take whole files in this order (pyproject's ``--no-loadscope-reorder``), so the long files start at
    once instead of last, where one of them alone kept a process busy minutes after the others had finished."""
    slow_in_file: dict[str, int] = {}
    for item in items:
        slow_in_file.setdefault(item.path, 0)
        slow_in_file[item.path] += item.get_closest_marker("slow") is not None
    first_seen = {path: n for n, path in enumerate(slow_in_file)}
    items.sort(key=lambda item: (-slow_in_file[item.path], first_seen[item.path]))


def _write_cifar100(root: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict:
    """``root/cifar-100-python/{train,test,meta}`` laid out like the published pickles.

    Returns the written dicts by part name, so tests can compare against them.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    for part, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        entry = {
            b"filenames": [f"fake_{part}_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{part}ing batch 1 of 1".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        with open(folder / part, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        parts[part] = entry
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return parts


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """A data root holding the cluttered-digits cache, built once for the whole run (it takes seconds)."""
    from attzoom.data import load

    root = tmp_path_factory.mktemp("digits")
    load("cluttered-digits", root)
    return root


@pytest.fixture(scope="session")
def few_digits_root(digits_root, tmp_path_factory) -> Path:
    """A data root holding a quarter of the cluttered digits (every 4th image of each split, all ten classes), in the
    cache file the embedded data set is read from: sweeps that test what happens around training, not how well it
    learns, train 4x faster on it."""
    from attzoom import data

    spec, root = data.ClutterSpec(), tmp_path_factory.mktemp("few-digits")
    train, test, _ = data.load_cluttered_digits(digits_root, spec)
    cache = data.digits_cache(root, spec)
    data._save_cache(cache, train_x=train.images[::4].numpy(), train_y=train.labels[::4].numpy(),  # noqa: SLF001
                     test_x=test.images[::4].numpy(), test_y=test.labels[::4].numpy())
    assert cache.is_file()  # else each test would build and train on the whole set, unseen
    return root


@pytest.fixture
def fake_cifar100(tmp_path) -> Path:
    """A data root holding a 50-train / 20-test fake CIFAR-100."""
    _write_cifar100(tmp_path)
    return tmp_path


@pytest.fixture
def write_cifar100():
    """The fake CIFAR-100 writer: ``write_cifar100(root, n_train, n_test)`` -> written dicts."""
    return _write_cifar100


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL server on 127.0.0.1 for the session, installed with apt-get when missing
    (tests/postgres.py); ``postgres_server.database()`` makes a fresh database and returns its SQLAlchemy URL.
    Tests that use it skip only where PostgreSQL cannot be installed or started."""
    from postgres import running_server

    with running_server() as server:
        yield server


@pytest.fixture
def s3(monkeypatch):
    """A real S3 server on loopback (moto's) with one empty bucket: (boto3 client, bucket). The AWS_* variables
    point this process and the ones it starts (a sweep, its Ray workers) at it, as they would at AWS."""
    import boto3
    from moto.server import ThreadedMotoServer
    from test_sweep_e2e import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto keeps its buckets in this process, not in the server: an earlier test's objects would still be there
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST")).close()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="sweeps")
    yield client, "sweeps"
    server.stop()
