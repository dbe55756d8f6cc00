"""Sweep specs: one TOML file describes a whole search, checked before anything starts.

A sweep is the matrix backbones x datasets x variants; each combination is one *study*,
an Optuna search of ``trials`` trials over the paper's space (tune_jobs/space.py). Every
problem is reported as a :class:`SpecError` whose one-line message names the key or path
and the fix, so the CLI can exit 2 before Ray, MLflow or any directory is touched.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from attzoom.config import OPTIMIZERS, SCHEDULERS, ConfigError, TrainConfig, expected_type
from attzoom.names import BACKBONES, DATASETS, POSITIONS, VARIANTS

from .layout import study_name

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The stores a sweep can track to: a SQLite file, an MLflow server, a database (MLflow's file store is frozen)
TRACKING_URI = re.compile(r"^(sqlite:///.|https?://.|(postgresql|mysql|mssql)(\+\w+)?://.)")
METRICS = ("val_top1",)
# TrainConfig keys a spec may fix in [train]; the searched and per-study ones are excluded.
SEARCHED = {"batch_size", "lr", "weight_decay", "optimizer", "momentum", "scheduler", "step_size"}
PER_STUDY = {"backbone", "dataset", "variant", "epochs", "patience", "seed", "data_root"}
TRAIN_KEYS = sorted({f.name for f in fields(TrainConfig)} - SEARCHED - PER_STUDY)


class SpecError(ValueError):
    """A spec problem a user can fix; str() is the one line to print."""


@dataclass(frozen=True)
class Study:
    backbone: str
    dataset: str
    variant: str

    @property
    def name(self) -> str:
        return study_name(self.backbone, self.dataset, self.variant)


@dataclass(frozen=True)
class SearchSpace:
    """The paper's search space (Sec. 5.3); a spec may narrow it or add AttZoom knobs."""

    batch_sizes: tuple[int, ...] = (32, 64, 128, 256)
    lr: tuple[float, float] = (1e-5, 1e-1)
    weight_decay: tuple[float, float] = (1e-6, 1e-2)
    optimizers: tuple[str, ...] = ("adam", "sgd")
    momentum: tuple[float, float] = (0.7, 1.0)
    schedulers: tuple[str, ...] = SCHEDULERS
    step_size: tuple[int, int] = (10, 30)
    threshold: tuple[float, float] | None = None  # tuned for gated variants when given
    positions: tuple[str, ...] | None = None  # tuned for non-baseline variants when given


SCHEDULER_KINDS = ("none", "asha")


@dataclass(frozen=True)
class EarlyStopping:
    """[scheduler]: stop hopeless trials early, with rungs kept per study (tune_jobs/scheduler.py).

    ``none`` is the paper's protocol: every trial trains until its epochs or its patience end.
    ``asha``: at epochs grace_period * reduction_factor**k a trial below the best 1/reduction_factor
    of its own study's trials at that epoch is stopped.
    """

    kind: str = "none"
    grace_period: int = 1
    reduction_factor: float = 4.0  # Ray Tune's and Optuna's default


@dataclass(frozen=True)
class Spec:
    name: str
    backbones: tuple[str, ...]
    datasets: tuple[str, ...]
    variants: tuple[str, ...]
    trials: int = 30
    epochs: int = 50
    patience: int = 5
    seed: int = 0
    data_root: str = "data"
    storage: str = "ray_results"
    tracking_uri: str = "sqlite:///mlflow.db"
    optuna_storage: str | None = None  # an SQLAlchemy URL for the Optuna studies (default: optuna_storage_url)
    metric: str = "val_top1"
    max_concurrent: int = 4
    max_retries: int = 2
    tracking_outage_minutes: float = 30.0  # how long the driver waits out a tracking server that does not answer
    cpus: float = 1.0
    gpus: float = 0.0
    local_gpus: int | None = None  # logical GPUs for a local Ray instance (default: those detected)
    train: dict = field(default_factory=dict)
    search: SearchSpace = SearchSpace()
    scheduler: EarlyStopping = EarlyStopping()

    @property
    def studies(self) -> list[Study]:
        return [Study(b, d, v) for b in self.backbones for d in self.datasets for v in self.variants]

    def train_config(self, study: Study, params: dict) -> TrainConfig:
        """The TrainConfig of one trial: fixed [train] settings, the study, the sampled params."""
        return TrainConfig(**{**self.train, **params}, backbone=study.backbone, dataset=study.dataset,
                           variant=study.variant, epochs=self.epochs, patience=self.patience,
                           seed=self.seed, data_root=self.data_root)


LIST_KEYS = ("batch_sizes", "optimizers", "schedulers", "positions")  # [search] keys that are lists of choices
TOP_KEYS = {"name", "trials", "epochs", "patience", "seed", "data_root", "storage", "tracking_uri", "optuna_storage",
            "metric",
            "max_concurrent", "matrix", "resources", "failure", "train", "search", "scheduler"}
SECTION_KEYS = {
    "matrix": {"backbones", "datasets", "variants"},
    "resources": {"cpus", "gpus", "local_gpus"},
    "failure": {"max_retries", "tracking_outage_minutes"},
    "search": {f.name for f in fields(SearchSpace)},
    "train": set(TRAIN_KEYS),
    "scheduler": {f.name for f in fields(EarlyStopping)},
}


def load_spec(path: str | Path, scheduler: str | None = None, **overrides) -> Spec:
    """Parse and validate a spec file; ``overrides`` (from the CLI) win over the file, ``scheduler`` over
    [scheduler] kind."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"spec file {path} not found; pass the path of a TOML sweep spec") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"spec file {path} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"spec file {path} is not valid TOML: {e}") from None
    spec = parse_spec(raw, source=str(path))
    given = {k: v for k, v in overrides.items() if v is not None}
    spec = replace(spec, **given)
    if scheduler is not None:
        spec = replace(spec, scheduler=replace(spec.scheduler, kind=scheduler))
        given["scheduler"] = scheduler
    # a bad value may be an option's, not the file's: the line names both
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())
    source = f"{path} with {hide_password(options)}" if given else str(path)
    validate(spec, source=source)
    for fixed, searched in (("threshold", "threshold"), ("position", "positions")):
        if fixed in spec.train and getattr(spec.search, searched) is not None:  # the search won, silently
            # a new sweep's only: an older one that started so resumes as it began
            raise SpecError(f"{source}: train.{fixed} fixes what search.{searched} searches; keep one of the two")
    cap = spec.train.get("gpu_memory_fraction")
    if cap is not None and 0 < spec.gpus < cap:  # the trial's share won, silently: trials sharing a GPU must
        raise SpecError(f"{source}: train.gpu_memory_fraction = {cap} is more than a trial's share of its GPU "
                        f"(resources.gpus = {spec.gpus}), which caps it; drop it or set it to {spec.gpus} or less")
    return spec


def parse_spec(raw: dict, source: str = "spec") -> Spec:
    _check_keys(raw, TOP_KEYS, source, "")
    for section, keys in SECTION_KEYS.items():
        if section in raw:
            if not isinstance(raw[section], dict):
                raise SpecError(f"{source}: [{section}] must be a table")
            _check_keys(raw[section], keys, source, f"{section}.")
    if "name" not in raw:
        raise SpecError(f"{source}: missing key 'name'; add name = \"my-sweep\"")
    matrix = raw.get("matrix", {})
    for key in ("backbones", "datasets", "variants"):
        if not matrix.get(key):
            raise SpecError(f"{source}: [matrix] {key} is missing or empty; list at least one")
        _check_list(matrix[key], f"matrix.{key}", source)
    for key in LIST_KEYS:
        if key in raw.get("search", {}):
            _check_list(raw["search"][key], f"search.{key}", source)
            # a choice listed twice is drawn twice as often, a silent bias; checked in a spec file only, so that a
            # sweep started before this check can still be resumed from its saved spec
            if len(set(map(repr, raw["search"][key]))) != len(raw["search"][key]):
                raise SpecError(f"{source}: search.{key} lists a choice twice: {raw['search'][key]}")
    resources, failure = raw.get("resources", {}), raw.get("failure", {})
    search = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.get("search", {}).items()}
    top = {k: v for k, v in raw.items() if k not in SECTION_KEYS and k != "name"}
    try:
        return Spec(name=raw["name"], **top,
                    backbones=tuple(matrix["backbones"]), datasets=tuple(matrix["datasets"]),
                    variants=tuple(matrix["variants"]), train=dict(raw.get("train", {})),
                    search=SearchSpace(**search), scheduler=EarlyStopping(**raw.get("scheduler", {})),
                    **resources, **failure)
    except TypeError as e:
        raise SpecError(f"{source}: {e}") from None


def spec_json(spec: Spec) -> str:
    """The spec as saved beside the sweep and in its MLflow experiment (so resume and confirm need no TOML)."""
    return json.dumps(asdict(spec), indent=2)


def shared_spec_json(spec: Spec) -> str:
    """spec_json for the sweep's MLflow experiment, which every user of the store reads: passwords hidden."""
    storage = spec.optuna_storage and hide_password(spec.optuna_storage)
    return spec_json(replace(spec, tracking_uri=hide_password(spec.tracking_uri), optuna_storage=storage))


def spec_from_json(text: str, source: str) -> Spec:
    """A spec saved by spec_json, validated again (it may have been edited or come from an older version)."""
    def fail(message: str):
        raise SpecError(f"{source}: {message}; fix the file, or restore it from the spec the sweep was started with")

    try:
        raw = json.loads(text)
    except ValueError as e:
        fail(f"not valid JSON ({e})")
    if not isinstance(raw, dict) or not isinstance(raw.get("search"), dict):
        fail("it holds no spec (no 'search' table)")
    tables = {"": (raw, {f.name for f in fields(Spec)}), "search.": (raw["search"], SECTION_KEYS["search"]),
              "scheduler.": (raw.get("scheduler") or {}, SECTION_KEYS["scheduler"]),
              "train.": (raw.get("train") or {}, SECTION_KEYS["train"])}
    for prefix, (table, valid) in tables.items():
        if not isinstance(table, dict):
            fail(f"'{prefix[:-1]}' must be a table")
        if unknown := sorted(set(table) - valid):
            fail(f"unknown key '{prefix}{unknown[0]}'")
    if missing := sorted({"name", "backbones", "datasets", "variants"} - set(raw)):
        fail(f"key '{missing[0]}' is missing")
    search = SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.pop("search").items()})
    scheduler = EarlyStopping(**(raw.pop("scheduler", None) or {}))  # absent from a spec saved before it existed
    spec = Spec(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}, search=search,
                scheduler=scheduler)
    validate(spec, source=source)
    return spec


def validate(spec: Spec, source: str = "spec") -> None:
    """Every check that needs no cluster and writes nothing."""
    def fail(message: str):
        raise SpecError(f"{source}: {message}")

    if not isinstance(spec.name, str) or not NAME.fullmatch(spec.name):
        fail(f"name {spec.name!r} must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit "
             "(it names folders, so no '/' or '..')")
    for key, values, valid in (("matrix.backbones", spec.backbones, BACKBONES), ("matrix.datasets", spec.datasets,
                               DATASETS), ("matrix.variants", spec.variants, VARIANTS)):
        for value in values:
            if value not in valid:
                fail(f"{key}: unknown name {value!r}; choose from {', '.join(valid)}")
        if not values:
            fail(f"{key} is empty; list at least one")
        if len(set(values)) != len(values):
            fail(f"{key} lists a name twice")
    for key in ("trials", "epochs", "patience", "max_concurrent"):
        _positive_int(spec, key, fail)
    if not isinstance(spec.seed, int) or isinstance(spec.seed, bool) or not 0 <= spec.seed < 2**32:
        fail(f"seed must be an integer from 0 to 2**32 - 1 (Optuna's and NumPy's range), got {spec.seed!r}")
    for key in ("data_root", "storage", "tracking_uri"):
        if not isinstance(getattr(spec, key), str) or not getattr(spec, key):
            fail(f"{key} must be a non-empty string (a path or URI), got {getattr(spec, key)!r}")
    if spec.optuna_storage is not None and not re.match(r"^[a-z][a-z0-9+]*://", str(spec.optuna_storage)):
        fail(f"optuna_storage must be an SQLAlchemy URL such as sqlite:///optuna.db or postgresql://host/db, got "
             f"{spec.optuna_storage!r}")
    if not TRACKING_URI.match(spec.tracking_uri):
        fail(f"tracking_uri {hide_password(spec.tracking_uri)!r} is not a tracking store this tool can use; pass "
             "sqlite:///PATH/mlflow.db, the http(s):// address of an MLflow server, or a database URL such as "
             "postgresql://HOST/DB")
    if not isinstance(spec.max_retries, int) or isinstance(spec.max_retries, bool) or spec.max_retries < 0:
        fail(f"failure.max_retries must be an integer >= 0, got {spec.max_retries!r}")
    if not _number(spec.tracking_outage_minutes) or spec.tracking_outage_minutes <= 0:
        fail("failure.tracking_outage_minutes must be a number of minutes > 0 (how long an unreachable tracking "
             f"server is waited out), got {spec.tracking_outage_minutes!r}")
    if spec.metric not in METRICS:
        fail(f"metric {spec.metric!r} is not supported; use one of {', '.join(METRICS)} (maximised)")
    if not _number(spec.cpus) or spec.cpus <= 0:
        fail(f"resources.cpus must be a number > 0, got {spec.cpus!r}")
    if not _number(spec.gpus) or spec.gpus < 0:
        fail(f"resources.gpus must be a number >= 0 (a fraction such as 0.25 shares a GPU), got {spec.gpus!r}")
    if spec.gpus > 1 and spec.gpus != int(spec.gpus):
        fail(f"resources.gpus {spec.gpus} above 1 must be a whole number of GPUs")
    if spec.local_gpus is not None and (not isinstance(spec.local_gpus, int) or isinstance(spec.local_gpus, bool)
                                        or spec.local_gpus < 0):
        fail(f"resources.local_gpus must be an integer >= 0, got {spec.local_gpus!r}")
    _validate_search(spec.search, fail)
    _validate_train(spec, fail)
    _validate_scheduler(spec, fail)


def _validate_scheduler(spec: Spec, fail) -> None:
    early = spec.scheduler
    if early.kind not in SCHEDULER_KINDS:
        fail(f"scheduler.kind {early.kind!r} is not supported; use one of {', '.join(SCHEDULER_KINDS)} "
             "(none: every trial trains to its end, the paper's protocol)")
    if not isinstance(early.grace_period, int) or isinstance(early.grace_period, bool) or \
            not 1 <= early.grace_period <= spec.epochs:
        fail(f"scheduler.grace_period must be a whole number of epochs from 1 to epochs ({spec.epochs}), got "
             f"{early.grace_period!r}")
    if not _number(early.reduction_factor) or early.reduction_factor <= 1:
        fail(f"scheduler.reduction_factor must be a number > 1 (4 keeps the best quarter at each rung), got "
             f"{early.reduction_factor!r}")


def check_cluster_gpus(spec: Spec, available: float, where: str, ceiling: float | None = None) -> str | None:
    """A trial asking for more GPU than the cluster has, and can get, would wait forever: refuse it up front.
    ``ceiling``: the most GPUs the cluster's autoscaler may bring up (inf where it does not say), None without
    one. Returns what to tell the user when the trials must wait for the autoscaler."""
    if spec.gpus <= available:
        return None
    if ceiling is None:
        raise SpecError(f"resources.gpus = {spec.gpus} but {where} has {available:g} GPU(s); lower resources.gpus "
                        "or run on a cluster with GPUs (for a local run without one, set resources.gpus = 0)")
    if spec.gpus > ceiling:
        raise SpecError(f"resources.gpus = {spec.gpus} but {where} has {available:g} GPU(s) and its autoscaler adds "
                        f"at most {ceiling:g}; lower resources.gpus or let the autoscaler start GPU nodes")
    return (f"{where} has {available:g} GPU(s) now; the trials (resources.gpus = {spec.gpus}) wait for its "
            "autoscaler to start GPU nodes")


def check_cluster_cpus(spec: Spec, available: float, where: str) -> None:
    """A trial asking for more CPUs than any node has would wait forever (Ray's autoscaler only warns)."""
    if spec.cpus > available:
        raise SpecError(f"resources.cpus = {spec.cpus:g} but {where} has {available:g} CPU(s); lower resources.cpus")


def check_data(spec: Spec) -> None:
    """The data root must hold each data set the matrix names, whole enough to train on (cluttered digits are
    generated): else every trial fails the same way, each retried, in pages of tracebacks."""
    root = Path(spec.data_root).expanduser()
    for dataset in spec.datasets:
        if dataset == "cifar100":
            _check_cifar100(root)
        elif dataset == "tinyimagenet":
            _check_tinyimagenet(root)
        elif dataset == "cluttered-digits" and not _writable(root) and not _digits_built(root):
            raise SpecError(f"data_root: {root} is not writable, and cluttered digits are generated there; "
                            "set data_root to a writable folder")


def _digits_built(root: Path) -> bool:
    """Built once by whoever could write there, the digits are only read from then on (a team's shared data root,
    read-only to the others, was refused though every trial would have trained from it)."""
    from attzoom.datafiles import digits_cache

    return os.access(digits_cache(root), os.R_OK)


def _missing(root: Path, dataset: str, path: Path, layout: str) -> SpecError:
    return SpecError(f"data_root: {root} does not hold {dataset} ({path} is missing); put {layout} there, or point "
                     "data_root (--data-root) to where it is")


def _check_cifar100(root: Path) -> None:
    """Both pickles a trial reads are there and hold CIFAR-100 (the loader's own checks, without torch)."""
    for part in ("train", "test"):
        path = root / "cifar-100-python" / part
        if not path.is_file():
            raise _missing(root, "cifar100", path, "cifar-100-python/{train,test,meta}")
        info = path.stat()
        if why := _cifar_problem(str(path), info.st_size, info.st_mtime_ns):
            raise SpecError(f"data_root: {why}; copy cifar-100-python/ again from the published archive")


@functools.lru_cache(maxsize=8)
def _cifar_problem(path: str, size: int, mtime_ns: int) -> str | None:
    """What a trial would refuse in the pickle, or None; once per file version (preflight runs twice)."""
    from attzoom.config import DataError
    from attzoom.datafiles import read_cifar_part

    try:
        read_cifar_part(Path(path))
    except DataError as e:
        return str(e)
    return None


def _check_tinyimagenet(root: Path) -> None:
    """The lists, every file they name and every image's header and end: what the first trial would refuse in
    decoding them (a cut-short or garbage JPEG, a wrong size, an annotation naming no file or no class)."""
    from attzoom.config import DataError
    from attzoom.datafiles import check_images, files_key, tiny_files, tiny_wnids

    folder = root / "tiny-imagenet-200"
    layout = "tiny-imagenet-200/ (wnids.txt, train/, val/)"
    for path in (folder / "wnids.txt", folder / "val" / "val_annotations.txt"):
        if not path.is_file():
            raise _missing(root, "tinyimagenet", path, layout)
    try:
        train, test = tiny_files(folder, tiny_wnids(folder))
        marker = _checked_marker(files_key(folder, train + test))
        if not marker.exists():
            check_images(train + test)
            _leave(marker)
    except DataError as e:
        raise SpecError(f"data_root: {e}; copy tiny-imagenet-200/ again") from None
    except OSError as e:  # a folder that cannot be listed, a link to nothing: the loader's stat would fail as well
        raise SpecError(f"data_root: {e.filename or folder} cannot be read ({type(e).__name__}: {e.strerror}); "
                        "copy tiny-imagenet-200/ again") from None


def _checked_marker(key: str) -> Path:
    """Where it is noted that this version of the files (``files_key``) was found whole: each sweep's driver read
    all 110,000 images again, twice (seconds on a local disk, minutes on a cold network volume)."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home / "attzoom" / "checked" / f"tinyimagenet-{key}"


def _leave(marker: Path) -> None:
    """Best effort: where the cache folder cannot be written, the next check reads the images again."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass


MIN_FREE_BYTES = 16 * 2**20  # a full disk: the sweep stopped at its lease's first write, leaving empty stores behind


def check_writable(key: str, location: str) -> None:
    """A local storage or tracking location must be creatable; remote URIs are left to their clients."""
    path = local_path(location)
    if path is not None and not _writable(path):
        existing = _nearest_existing(path)
        why = f"{existing} is a file" if not existing.is_dir() else "its nearest existing folder is not writable"
        raise SpecError(f"{key}: cannot write to {path} ({why}); choose a writable location with "
                        f"--{key.replace('_', '-')}")
    usage = shutil.disk_usage(_nearest_existing(path)) if path is not None else None
    if usage and usage.total and (free := usage.free) < MIN_FREE_BYTES:  # a FUSE mount without statfs says 0 of 0
        raise SpecError(f"{key}: the disk holding {path} is full ({free / 2**20:.1f} MiB free); free space there or "
                        f"choose another location with --{key.replace('_', '-')}")


STORAGE_CHECK = """
import sys
import pyarrow.fs
try:
    fs, path = pyarrow.fs.FileSystem.from_uri(sys.argv[1])
    fs.get_file_info(path)
    bucket = path.split("/")[0]
    try:  # credentials for a prefix may not be allowed to look at the bucket itself: then Tune's writes will tell
        missing = fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound
    except OSError:
        missing = False
    if sys.argv[1].startswith(("s3:", "gs:", "gcs:")) and missing:
        sys.exit(f"there is no bucket {bucket}")
except Exception as e:
    sys.exit(" ".join(str(e).split())[:300])
"""


@functools.lru_cache(maxsize=8)
def check_storage_answers(storage: str, timeout_s: float = 30.0) -> None:
    """Remote storage (s3://, gs://, ...) must be reachable before any work: Ray opens it as pyarrow does here, and
    else ends in a traceback. A separate process, since a cloud client retries for minutes and cannot be stopped.
    An answer is kept for the command (a failure raises, so it is not): resume reads the saved spec there, then
    preflight checks the storage, once per driver step, and each probe costs a second."""
    import subprocess
    import sys

    if local_path(storage) is not None:
        return
    fix = "check the bucket name, the credentials and the network, or pass a local or shared folder with --storage"
    try:
        done = subprocess.run([sys.executable, "-c", STORAGE_CHECK, storage], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SpecError(f"storage {storage} did not answer within {timeout_s:.0f} s; {fix}") from None
    if done.returncode:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise SpecError(f"storage {storage} cannot be reached ({reason}); {fix}")


def check_store_exists(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """What readers (status, report, explain, ui) check first: they never create a store, and never hang on one.

    A missing SQLite file is a typo or the wrong folder, and MLflow would silently create an empty one
    (and its folders) there. A tracking server that does not answer would make MLflow retry for minutes
    and end in a long traceback; another HTTP server (optuna-dashboard's port, next to MLflow's in `attzoom
    ui`) in a traceback with its HTML page.
    """
    database = sqlite_file(tracking_uri)
    if database is not None and not database.is_file():
        raise SpecError(f"no tracking store at {database}; pass --tracking-uri sqlite:///PATH/mlflow.db (or the "
                        "http:// address of an MLflow server)")
    if not TRACKING_URI.match(tracking_uri):
        raise SpecError(f"--tracking-uri {hide_password(tracking_uri)!r} is not a tracking store; pass "
                        "sqlite:///PATH/mlflow.db or the http:// address of an MLflow server")
    if database is not None:
        _check_sqlite_store(database)
    if tracking_uri.startswith(("http://", "https://")):
        _check_tracking_server(tracking_uri, timeout_s)
        _check_login(tracking_uri)
    if database_backend(tracking_uri) in ("postgresql", "mysql"):
        _check_database(tracking_uri, timeout_s)


MLFLOW_LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # where MLflow's client takes a login from


def _check_tracking_server(tracking_uri: str, timeout_s: float) -> None:
    """The server answers, as MLflow: MLflow's own client would retry one that does not for minutes."""
    import http.client
    import urllib.error
    import urllib.request

    address, login = split_login(tracking_uri)
    request = urllib.request.Request(f"{address.rstrip('/')}/health", headers=login)
    try:  # MLflow's /health answers "OK" without a login, also on a basic-auth server
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            healthy = answer.read(16).strip() == b"OK"
    except urllib.error.HTTPError as e:
        healthy = e.code in (401, 403)  # a login in front of the whole server: it answered, as MLflow may
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise SpecError(f"the tracking server {hide_password(tracking_uri)} does not answer ({reason}); start it, "
                        "or fix --tracking-uri") from None
    if not healthy:
        raise SpecError(f"{hide_password(tracking_uri)} answers, but not as an MLflow tracking server (its /health "
                        "is not MLflow's); fix --tracking-uri (optuna-dashboard's address is not the store)")


def split_login(url: str) -> tuple[str, dict[str, str]]:
    """An http(s) URL without its user:password@ (urllib would take them for part of the host name), and the
    basic-auth header that carries them, as MLflow's client (requests) sends a URL's login."""
    import base64
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    login, host = parts.netloc.rsplit("@", 1)
    user, _, password = login.partition(":")
    token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), {"Authorization": f"Basic {token}"}


def _check_login(tracking_uri: str) -> None:
    """One read with the login the readers use: a basic-auth server answers /health to anyone, then refuses their
    first request with a 40-line traceback (explain: with "no run"), when the login is missing or wrong."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except MlflowException as e:
        if e.get_http_status_code() in (401, 403):
            raise SpecError(login_refused(tracking_uri, e.get_http_status_code())) from None
        read_failed(tracking_uri, e)
    except Exception as e:  # noqa: BLE001 - requests' errors after MLflow's retries: a server that fails mid-way
        read_failed(tracking_uri, e)


def read_failed(tracking_uri: str, error: BaseException) -> None:
    """A server that answers /health but fails a read (a 404 under a proxy's path, a 5xx): one line, not a
    traceback."""
    from .infra import short_error  # infra imports this module

    raise SpecError(f"the tracking server {hide_password(tracking_uri)} answers /health but failed a read "
                    f"({short_error(error)}); check the URI's path and the server's log") from None


def login_refused(tracking_uri: str, code: int) -> str:
    """What is wrong with the login, in one line, without the password."""
    if code == 403:
        why = "the user may not read it"
    elif split_login(tracking_uri)[1] or any(os.environ.get(name) for name in MLFLOW_LOGIN):
        why = "wrong user name or password"
    else:
        why = "no login given"
    return (f"the tracking server {hide_password(tracking_uri)} refused the login (HTTP {code}, {why}); set "
            f"{' and '.join(MLFLOW_LOGIN)} to the name and password of an MLflow user who may read the sweep")


def _check_sqlite_store(database: Path) -> None:
    tables = sqlite_tables(database)
    if not tables:
        raise SpecError(f"{database} holds no MLflow tables yet (a sweep starting now creates them: try again in a "
                        "few seconds); else pass the --tracking-uri of the sweep's store")
    if "experiments" not in tables:
        raise SpecError(f"{database} is not an MLflow tracking store (it holds other tables); pass the "
                        "--tracking-uri of the sweep's store (mlflow.db, not optuna.db)")


def database_backend(url: str) -> str:
    """The database an SQLAlchemy URL names, without its driver: postgresql+psycopg://... -> postgresql."""
    return url.split("://", 1)[0].split("+", 1)[0]


# user:password@ after a scheme, the password read as SQLAlchemy reads it (anything up to the @, "/" and "#"
# included), or a password=... query parameter; in a URL or in any text that quotes one (an error message)
_PASSWORD = re.compile(r"(?P<user>[\w+.-]+://[^:/@\s]*:)[^@\s]*@|(?P<key>[?&]password=)[^&\s]*", re.IGNORECASE)


def hide_password(text: str | None) -> str | None:
    """A URL (or a message quoting one) as it may be printed or stored where others read it: passwords become ***."""
    if not text:
        return text
    return _PASSWORD.sub(lambda m: f"{m['user']}***@" if m["user"] else f"{m['key']}***", text)


def has_password(url: str | None) -> bool:
    return bool(url) and hide_password(url) != url


def _check_database(tracking_uri: str, timeout_s: float) -> None:
    """A database store must answer and hold MLflow's tables: MLflow retries a database that does not answer
    (or does not exist) for minutes, and makes its tables in an empty one."""
    if not database_answers(tracking_uri, "--tracking-uri", timeout_s):
        raise SpecError(f"no tracking store in {hide_password(tracking_uri)} (the database holds no MLflow tables); "
                        "pass the --tracking-uri of the sweep's store")


def database_answers(url: str, option: str, timeout_s: float = 5.0) -> bool:
    """Whether the database answers (SpecError, one line, when it does not) and holds MLflow's tables."""
    import sqlalchemy

    shown = hide_password(url)
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": max(1, round(timeout_s))})
        try:
            with engine.connect() as connection:
                return sqlalchemy.inspect(connection).has_table("experiments")
        finally:
            engine.dispose()
    except ImportError as e:
        raise SpecError(f"no database driver for {option} {shown} ({e})") from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise SpecError(f"the database of {option} {shown} does not answer ({reason}); start it, or fix "
                        f"{option}") from None


def optuna_storage_url(spec: Spec) -> str | None:
    """Where the sweep's Optuna studies live: the spec's URL, else optuna.db beside a SQLite MLflow store, else
    in the local storage folder; None (in memory only) when both stores are remote and none is given."""
    if spec.optuna_storage:
        return spec.optuna_storage
    if database := sqlite_file(spec.tracking_uri):
        return f"sqlite:///{database.expanduser().resolve().parent / 'optuna.db'}"
    if "://" not in spec.storage:
        return f"sqlite:///{Path(spec.storage).expanduser().resolve() / 'optuna.db'}"
    return None


def sqlite_tables(database: Path) -> set[str]:
    """The tables of an existing SQLite file, read without changing it; SpecError when it is no SQLite database.

    A writer killed mid-transaction (a driver's SIGKILL) leaves a hot journal, which only a read-write connection
    may roll back: read-only, the store was refused as "attempt to write a readonly database" until something
    opened it to write. It is read again as MLflow would open it (the file is never created)."""
    import sqlite3

    path = database.resolve()
    try:
        try:
            return _tables(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5))
        except sqlite3.OperationalError as e:
            if "readonly" not in str(e) or not Path(f"{path}-journal").exists():
                raise
            return _tables(sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=5))
    except sqlite3.Error as e:
        raise SpecError(f"{database} cannot be read as a tracking store ({e}); pass the --tracking-uri of the "
                        "sweep's store, sqlite:///PATH/mlflow.db") from None


def _tables(connection) -> set[str]:
    try:
        return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        connection.close()


def check_tracking_store(tracking_uri: str) -> None:
    """A sweep's tracking store: a SQLite file that exists must be MLflow's, not another database MLflow would
    add its tables to (the Optuna studies' optuna.db is an easy mix-up)."""
    database = sqlite_file(tracking_uri)
    if database is None or not database.is_file():
        return
    tables = sqlite_tables(database)
    if tables and "experiments" not in tables:
        raise SpecError(f"tracking_uri: {database} is not an MLflow tracking store (it holds other tables: "
                        f"{', '.join(sorted(tables)[:4])}...); point tracking_uri at mlflow.db or a new file")


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (``~`` expanded), or None for another store."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix):]).expanduser() if tracking_uri.startswith(prefix) else None


def local_path(location: str) -> Path | None:
    """The local file system path behind a storage path or tracking URI, or None when remote."""
    if database := sqlite_file(location):
        return database.resolve().parent
    if location.startswith("file://"):
        return Path(location[len("file://"):]).expanduser()
    if "://" in location:
        return None
    return Path(location).expanduser()


def _nearest_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _writable(path: Path) -> bool:
    """Whether ``path`` can be created: its nearest existing folder takes a file (an unnamed
    temporary one, so nothing is left; os.access alone says yes to root even on /proc)."""
    path = _nearest_existing(path)
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _validate_search(search: SearchSpace, fail) -> None:
    if not search.batch_sizes or any(not isinstance(b, int) or b < 1 for b in search.batch_sizes):
        fail(f"search.batch_sizes must be positive integers, got {list(search.batch_sizes)}")
    _range("search.lr", search.lr, fail, low=0, high=10, log=True)
    _range("search.weight_decay", search.weight_decay, fail, low=0, high=1, log=True)
    _range("search.momentum", search.momentum, fail, low=0, high=1)
    _range("search.step_size", search.step_size, fail, low=1, high=10_000)
    if not all(isinstance(v, int) for v in search.step_size):
        fail(f"search.step_size must be two integers [low, high], got {list(search.step_size)}")
    if search.threshold is not None:
        _range("search.threshold", search.threshold, fail, low=0, high=1)
    for key, values, valid in (("search.optimizers", search.optimizers, OPTIMIZERS),
                               ("search.schedulers", search.schedulers, SCHEDULERS),
                               ("search.positions", search.positions or (), POSITIONS)):
        if key != "search.positions" and not values:
            fail(f"{key} is empty; list at least one of {', '.join(valid)}")
        for value in values:
            if value not in valid:
                fail(f"{key}: unknown name {value!r}; choose from {', '.join(valid)}")


def _validate_train(spec: Spec, fail) -> None:
    for key, value in spec.train.items():
        expected = expected_type(key, value)
        if expected:
            fail(f"train.{key} must be {expected}, got {value!r}")
    study = spec.studies[0]
    try:
        spec.train_config(study, {}).validate()
    except ConfigError as e:
        fail(f"[train] {e}")
    except TypeError as e:
        fail(f"[train] {e}")
    device = str(spec.train.get("device", "auto"))
    if device.startswith("cuda") and spec.gpus == 0:  # Ray hides every GPU from such a trial
        fail(f"train.device = {device!r} but resources.gpus = 0, so Ray gives each trial no GPU and every trial "
             "fails; set resources.gpus (e.g. 1, or 0.25 to share one) or device = \"auto\"")


def _range(key, value, fail, low, high, log=False) -> None:
    ok = isinstance(value, tuple) and len(value) == 2 and all(_number(v) for v in value)
    if not ok or not (low <= value[0] <= value[1] <= high) or (log and value[0] <= 0):
        bound = "> 0" if log else f">= {low}"
        shown = list(value) if isinstance(value, tuple) else value  # as the TOML array it came from
        fail(f"{key} must be [low, high], two numbers with {bound}, low <= high <= {high}; got {shown!r}")


def _positive_int(spec: Spec, key: str, fail) -> None:
    value = getattr(spec, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        fail(f"{key} must be a positive integer, got {value!r}")


def _number(value) -> bool:
    """A finite int or float: NaN passes every comparison a range check makes, and inf passes most."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_list(value, key: str, source: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        example = "[32, 64] (whole numbers)" if key.endswith("batch_sizes") else '["a", "b"] (names)'
        raise SpecError(f"{source}: {key} must be a list such as {example}, got {value!r}")


def _check_keys(table: dict, valid: set, source: str, prefix: str) -> None:
    for key in table:
        if key not in valid:
            raise SpecError(f"{source}: unknown key '{prefix}{key}'; valid keys here: {', '.join(sorted(valid))}")
