"""One training's knobs (the paper's protocol, Sec. 5.3), validated before any work starts,
and the errors a user can fix. No torch import: the CLI checks input before loading it."""

from __future__ import annotations

import math
import numbers
import re
import types
import typing
from dataclasses import asdict, dataclass, fields

from .names import BACKBONES, DATASETS, POSITIONS, VARIANTS

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("cosine", "step", "plateau", "onecycle")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # whether this machine has it is checked with torch (train.py)


class ConfigError(ValueError):
    """A config value a user can fix; the message names the key and the fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from (truncated, corrupt, another config's); the message names it."""


class CheckpointInUseError(ConfigError):
    """Another training writes the checkpoint folder now. No CheckpointError: nothing is wrong with its files, and a
    sweep's trial starts over on one of those."""


class DataError(Exception):
    """A data set is missing or malformed; the message says where and what is expected."""


@dataclass
class TrainConfig:
    backbone: str = "tiny_resnet"
    dataset: str = "cluttered-digits"
    variant: str = "baseline"
    position: str = "stem"
    cifar_stem: bool = False
    kernel_size: int = 3
    threshold: float = 0.5
    zoom: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9  # SGD only
    scheduler: str = "cosine"
    step_size: int = 30  # StepLR only
    epochs: int = 50
    patience: int = 5
    augment: bool = True
    seed: int = 0
    data_root: str = "data"
    val_fraction: float = 0.1
    device: str = "auto"
    amp: bool | None = None  # None: on when training on CUDA
    channels_last: bool | None = None  # None: on when training on CUDA
    compile: bool = False
    cuda_graphs: bool = True  # with compile on CUDA: steps replay as CUDA graphs (mode "reduce-overhead")
    gpu_memory_fraction: float | None = None  # cap this process's CUDA memory (shared GPUs)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a plain dict (a Tune config, a checkpoint), rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r}: valid keys are {', '.join(sorted(known))}")
        config = cls(**values)
        config.validate()
        return config

    def __post_init__(self) -> None:
        """numpy's values (a sweep's sampled ones, a table's cells) as Python's: torch refused a numpy batch size
        in training, and torch.load(weights_only=True) a checkpoint's numpy config, so its resume called it damaged."""
        for f in fields(self):
            if type(value := getattr(self, f.name)).__module__ == "numpy" and hasattr(value, "item"):
                setattr(self, f.name, value.item())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse_params(cls, values: dict[str, str]) -> dict:
        """Typed values from their ``str()`` (how MLflow stores a run's params), by each field's annotation."""
        kinds = {f.name: str(f.type).replace(" ", "").split("|") for f in fields(cls)}
        return {key: _parse(text, kinds[key]) for key, text in values.items()}

    def validate(self) -> None:
        check_types(self)
        _choice("backbone", self.backbone, BACKBONES)
        _choice("dataset", self.dataset, DATASETS)
        _choice("variant", self.variant, VARIANTS)
        _choice("position", self.position, POSITIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        if not DEVICE.fullmatch(str(self.device)):
            raise ConfigError(f"unknown device {self.device!r}: choose auto, cpu, cuda, cuda:N or mps")
        for key in ("batch_size", "epochs", "patience", "step_size"):
            _positive(key, getattr(self, key))
        check_layer(self.kernel_size, self.threshold, self.zoom)
        _in_range("lr", self.lr, 0, 10, low_open=True)
        _in_range("weight_decay", self.weight_decay, 0, 1)
        _in_range("momentum", self.momentum, 0, 1)
        _in_range("val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        if self.gpu_memory_fraction is not None:
            _in_range("gpu_memory_fraction", self.gpu_memory_fraction, 0, 1, low_open=True)


def check_types(config) -> None:
    """Each field against its annotation: a wrong type (epochs="2", batch_size=64.0) passed the range checks and
    failed as a bare TypeError deep in training, after the data had loaded."""
    for f in fields(config):
        check_type(f.name, getattr(config, f.name))


def check_type(name: str, value) -> None:
    """``value`` against TrainConfig's field ``name``: one line naming the type to pass instead."""
    expected = expected_type(name, value)
    if expected:
        default = TrainConfig.__dataclass_fields__[name].default
        raise ConfigError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}); pass {expected}"
                          f" such as {name}={default!r}")


def check_layer(kernel_size, threshold, zoom) -> None:
    """The AttZoom layer's arguments by TrainConfig's rules and words: from Python, build_model and AttZoom took a
    threshold of 2.0 that fit refuses (the gate then never opens)."""
    for key, value in (("kernel_size", kernel_size), ("threshold", threshold), ("zoom", zoom)):
        check_type(key, value)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"kernel_size must be odd and positive, got {kernel_size}")
    _positive("zoom", zoom)
    _in_range("threshold", threshold, 0, 1)


def expected_type(name: str, value) -> str | None:
    """What TrainConfig's field ``name`` takes, in words, where ``value`` is not of it (else None): one rule for
    a Python caller's TrainConfig and a sweep spec's [train] table."""
    kind = typing.get_type_hints(TrainConfig)[name]
    return None if _is_a(value, kind) else _describe(kind)


def _is_a(value, kind) -> bool:
    """Ints count as floats (lr=1); bools count as neither (True is an int to Python); NaN and inf are not numbers
    (NaN passes every range check). numpy's values are Python's by now (TrainConfig.__post_init__)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, arg) for arg in args)
    if origin in (tuple, list):
        return isinstance(value, origin) and _items_are(value, args)
    if kind is type(None):
        return value is None
    if kind in (int, float):
        number = numbers.Integral if kind is int else numbers.Real
        return isinstance(value, number) and not isinstance(value, bool) and \
            (isinstance(value, numbers.Integral) or math.isfinite(value))
    return isinstance(value, kind) if isinstance(kind, type) else True


def _items_are(items, args) -> bool:
    """tuple[int, ...], tuple[int, str] or list[int]: each item against its annotation."""
    if (len(args) == 2 and args[1] is Ellipsis) or len(args) == 1:
        return all(_is_a(item, args[0]) for item in items)
    return not args or len(items) == len(args) and all(_is_a(i, a) for i, a in zip(items, args))


TYPE_NAMES = {int: ["an integer"], float: ["a finite number"], bool: ["True", "False"], str: ["a string"],
              type(None): ["None"]}


def _describe(kind) -> str:
    """'an integer', 'True, False or None': the annotation in words."""
    words = _words(kind)
    return " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


def _words(kind) -> list[str]:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return [word for arg in args for word in _words(arg)]
    if origin in (tuple, list):
        return [f"a {origin.__name__}" + (f" (items: {_describe(args[0])})" if args else "")]
    return TYPE_NAMES.get(kind, [getattr(kind, "__name__", str(kind))])


def _parse(text: str, kinds: list[str]):
    if text == "None" and "None" in kinds:
        return None
    if "bool" in kinds:
        return text == "True"
    for kind, convert in (("int", int), ("float", float)):
        if kind in kinds:
            return convert(text)
    return text


def _positive(key: str, value) -> None:
    if int(value) < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value}")


def _choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {key} {value!r}: choose one of {', '.join(valid)}")


def _in_range(key, value, low, high, low_open=False, high_open=False) -> None:
    """NaN is checked on its own: every comparison with it is False, so it passed any bound (--lr nan trained)."""
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        finite = "" if math.isfinite(value) else "a finite number "
        raise ConfigError(f"{key} must be {finite}in {lo}{low}, {high}{hi}, got {value}")
