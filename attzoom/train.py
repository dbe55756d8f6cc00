"""The training loop: the paper's protocol, resumable to the bit, reporting through a callback.

Short and flat in the airbench style: the data sit on the training device as uint8,
each batch is augmented there, and the loop knows nothing of Tune or MLflow. After
every epoch it writes ``last.pt`` (everything needed to continue exactly: model,
optimizer, scheduler, early-stopping state and RNG states) and, when validation
top-1 improved, ``best.pt``; then it calls ``callback(metrics, checkpoint_dir)``.
Both happen in the background (writer.py) while the next epoch trains.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from torch import nn

from .augment import PaperAugment, to_device
from .config import CheckpointError, CheckpointInUseError, ConfigError, TrainConfig
from .data import ImageSet, Splits, load
from .layer import AttZoom, GateStats
from .models import build_model
from .writer import EpochWriter
Callback = Callable[[dict, Path | None], None]


@dataclass
class FitResult:
    status: str  # "completed" | "early_stopped" | "diverged"
    best: dict  # metrics of the best epoch by validation top-1
    history: list[dict] = field(default_factory=list)
    checkpoint_dir: Path | None = None

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def diverged_in(self) -> int | None:
        """The epoch whose loss stopped being finite (it is not in the history), or None."""
        return self.epochs + 1 if self.status == "diverged" else None


@dataclass
class Runtime:
    """What the loop needs besides the config: device, precision and normalisation."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    mean: torch.Tensor
    std: torch.Tensor

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mul_(1 / (255 * self.std)).sub_(self.mean / self.std)  # in place: no extra copies
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def fit(config: TrainConfig | dict, data: Splits | None = None, *, callback: Callback | None = None,
        checkpoint_dir: str | Path | None = None, resume: bool = True,
        between_steps: Callable[[], None] | None = None) -> FitResult:
    """Train one model; with ``resume`` and a ``last.pt`` in ``checkpoint_dir``, continue it exactly.

    ``between_steps`` runs before every training step: what it raises stops training there, leaving the last
    finished epoch's checkpoint as it was (a sweep's trial stops so when its process exits). ``checkpoint_dir`` is
    locked while it trains: another training there raises CheckpointInUseError at once (checkpoint_lock)."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.validate()
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt_dir is not None:
        check_checkpoint_dir(ckpt_dir)
    with lock_if_there(ckpt_dir):
        data = data or load(cfg.dataset, cfg.data_root, cfg.val_fraction)
        with checkpoint_lock(ckpt_dir):
            return train_locked(cfg, data, callback, ckpt_dir, resume, between_steps)


def train_locked(cfg: TrainConfig, data: Splits, callback: Callback | None, ckpt_dir: Path | None, resume: bool,
                 between_steps: Callable[[], None] | None) -> FitResult:
    """fit's training, with the checkpoint folder locked (checkpoint_lock)."""
    rt = make_runtime(cfg, data)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, data.num_classes, rt)
    steps_per_epoch = max(1, len(data.train) // cfg.batch_size)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(enabled=rt.amp_dtype == torch.float16)
    generator = torch.Generator().manual_seed(cfg.seed)
    stop = EarlyStopping(cfg.patience)
    history: list[dict] = []
    last = ckpt_dir / "last.pt" if ckpt_dir else None
    if resume and last is not None and last.exists():
        history = resume_training_state(last, model, optimizer, scheduler, scaler, generator, stop, config=cfg)
    train_model = compile_model(model, cfg, rt) if cfg.compile else model
    train_set, val_set = data.train.to(rt.device), data.val.to(rt.device)
    augment = PaperAugment(data.image_size, autoaugment=True) if cfg.augment else None
    status = "early_stopped" if stop.should_stop else "completed"

    with EpochWriter() as writer:
        def checks() -> None:  # before every step: what the last epoch end raised, then the caller's own check
            writer.raise_if_failed()
            if between_steps:
                between_steps()

        for epoch in range(len(history) + 1, cfg.epochs + 1):
            if stop.should_stop:
                break
            started = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train_loss, seen = train_one_epoch(train_model, train_set, cfg, rt, optimizer, scheduler, scaler,
                                               augment, generator, checks)
            if not math.isfinite(train_loss):
                status = "diverged"
                break
            with watch_gates(model) as gates:
                val = evaluate(train_model, val_set, rt)
            if cfg.scheduler == "plateau":
                scheduler.step(val["loss"])
            elif cfg.scheduler != "onecycle":
                scheduler.step()
            elapsed = time.perf_counter() - started
            metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_top1": val["top1"],
                       "val_top5": val["top5"], "lr": lr, "epoch_time": elapsed, "images_per_s": seen / elapsed,
                       **gates.metrics()}
            history.append(metrics)
            improved = stop.update(epoch, metrics["val_top1"])
            status = "early_stopped" if stop.should_stop else "completed"
            state = training_state(cfg, data, model, optimizer, scheduler, scaler, generator, stop, history) \
                if ckpt_dir else None
            writer.submit(functools.partial(end_epoch, ckpt_dir, state, improved, callback, metrics))
    best = next((m for m in history if m["epoch"] == stop.best_epoch), {})
    return FitResult(status, best, history, ckpt_dir)


def make_runtime(cfg: TrainConfig, data: Splits) -> Runtime:
    """CUDA gets mixed precision and channels_last unless the config says otherwise."""
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    if cuda and cfg.gpu_memory_fraction:
        # Ray's fractional GPUs are bookkeeping only: cap our share so a neighbour's OOM stays theirs.
        # it needs a device index: a bare "cuda" raises
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(cfg.gpu_memory_fraction, index)
    amp = cuda if cfg.amp is None else cfg.amp
    amp_dtype = (torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16) if amp else None
    channels_last = cuda if cfg.channels_last is None else cfg.channels_last
    return plain_runtime(device, data, amp_dtype, channels_last)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU; a device this machine lacks is a ConfigError, not a
    traceback from deep inside torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: choose auto, cpu, cuda, cuda:N or mps") from None
    missing = missing_device(device)
    if missing:
        raise ConfigError(f"device {name!r}: {missing}; pass --device auto or cpu")
    return device


def missing_device(device: torch.device) -> str | None:
    """Why this machine cannot train on ``device``, or None when it can."""
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "this machine has no usable MPS device"
    if device.type != "cuda":
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "this machine has no CUDA GPU that torch can use"
    if device.index is not None and device.index >= count:
        return f"this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
    return None


def check_checkpoint_dir(path: Path) -> None:
    """A file where the checkpoint folder (or a folder above it) should be fails now, not after the first epoch."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"checkpoint dir {path} cannot be made: {folder} is a file; pass another "
                                  "--checkpoint-dir (checkpoint_dir in fit) or move the file")
            return


LOCK_FILE = ".attzoom-train.lock"


@contextmanager
def checkpoint_lock(ckpt_dir: Path | None):
    """Held while a training writes ``ckpt_dir``: two at once both trained and both wrote last.pt and best.pt. Not
    waited for: a second training fails at once. The OS frees it when its process ends, so a killed training's lock
    stops nobody; one thread may take it again (the CLI holds it around fit, which takes it too)."""
    if ckpt_dir is None:
        yield
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(ckpt_dir / LOCK_FILE, timeout=0, is_singleton=True)
    try:
        lock.acquire()
    except Timeout:
        raise CheckpointInUseError(f"checkpoint dir {ckpt_dir} is in use: another training writes there now; wait "
                                   "for it to end, or pass another --checkpoint-dir (checkpoint_dir in fit)") from None
    try:
        yield
    finally:
        lock.release()


def lock_if_there(ckpt_dir: Path | None):
    """checkpoint_lock of a folder that is there, before the data load: one in use is refused before any download;
    a new one is made once the data loaded (a DataError leaves no folder behind)."""
    return checkpoint_lock(ckpt_dir) if ckpt_dir is not None and ckpt_dir.is_dir() else nullcontext()


def plain_runtime(device: torch.device, data: Splits, amp_dtype=None, channels_last: bool = False) -> Runtime:
    """A Runtime normalising with the data set's channel statistics."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (data.mean, data.std))
    return Runtime(device, amp_dtype, channels_last, mean, std)


def make_model(cfg: TrainConfig, num_classes: int, rt: Runtime) -> nn.Module:
    model = build_model(cfg.backbone, num_classes, cfg.variant, cfg.position, cfg.cifar_stem,
                        kernel_size=cfg.kernel_size, threshold=cfg.threshold, zoom=cfg.zoom)
    model = model.to(rt.device)
    return model.to(memory_format=torch.channels_last) if rt.channels_last else model


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """On CUDA the fused kernels: one launch for all parameters instead of several per tensor."""
    fused = True if next(model.parameters()).is_cuda else None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fused)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """The paper's four schedulers; OneCycleLR steps per batch, the others per epoch."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "step":
        return sched.StepLR(optimizer, step_size=cfg.step_size)
    if cfg.scheduler == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="min", patience=2)
    if cfg.scheduler == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    return sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs)


def compile_model(model: nn.Module, cfg: TrainConfig, rt: Runtime) -> nn.Module:
    """torch.compile with static shapes; on CUDA as CUDA graphs (mode "reduce-overhead") unless
    ``cuda_graphs`` is off: a small-image step is bound by kernel launches, which a replayed graph
    does away with. Training drops its last partial batch; validation's is one more graph."""
    graphs = rt.device.type == "cuda" and cfg.cuda_graphs
    return torch.compile(model, mode="reduce-overhead" if graphs else None, dynamic=False)


def train_one_epoch(model, data: ImageSet, cfg: TrainConfig, rt: Runtime, optimizer, scheduler, scaler,
                    augment, generator, between_steps: Callable[[], None] = lambda: None) -> tuple[float, int]:
    """One pass in shuffled full batches; returns (mean loss, images seen), NaN as soon as the loss is.

    ``between_steps`` runs before each step (fit: raise what the last epoch's background write raised)."""
    model.train()
    n = len(data)
    usable = n if n < cfg.batch_size else n - n % cfg.batch_size
    order = to_device(torch.randperm(n, generator=generator)[:usable], rt.device)
    total = torch.zeros((), device=rt.device)
    finite = FiniteCheck(rt.device)
    batches = order.split(cfg.batch_size)
    for step, index in enumerate(batches, 1):
        between_steps()
        images = data.images[index]
        if augment:
            images = augment(images, generator)
        mark_step(model)
        with rt.autocast():
            loss = F.cross_entropy(model(rt.prepare(images)), data.labels[index])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if cfg.scheduler == "onecycle":
            scheduler.step()
        total += loss.detach() * len(index)
        if step % 25 == 0 and not finite(total):
            return math.nan, step * cfg.batch_size
    return total.item() / usable, usable


class FiniteCheck:
    """Whether a running loss sum is still finite, for stopping a diverged epoch early.

    On CUDA the answer is one check late: the flag goes to pinned host memory without a sync and is
    read at the next check, long after the copy landed, so the GPU's queue never drains mid-epoch
    (a launch-bound step would idle while the host refills it). The epoch's closing ``.item()``
    still sees a NaN from the last steps. On the CPU there is nothing to overlap: it reads at once."""

    def __init__(self, device: torch.device):
        self.lagged = device.type == "cuda"
        self.flag = torch.ones((), dtype=torch.bool, pin_memory=self.lagged)
        self.copied = None  # the CUDA event after the last flag copy

    def __call__(self, total: torch.Tensor) -> bool:
        if not self.lagged:
            return bool(torch.isfinite(total))
        if self.copied is not None:
            self.copied.synchronize()  # recorded a check (25 steps) ago: done already
        seen = bool(self.flag)
        self.flag.copy_(torch.isfinite(total), non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return seen


def mark_step(model: nn.Module) -> None:
    """Tell CUDA graphs (compiled models) that a new step begins: the last step's outputs are used up."""
    if hasattr(model, "_orig_mod"):  # what torch.compile returns
        torch.compiler.cudagraph_mark_step_begin()


@contextmanager
def watch_gates(model: nn.Module):
    """Count what every gate of ``model`` does inside the block (one GateStats for all of them)."""
    gates = [m for m in model.modules() if isinstance(m, AttZoom) and m.attention is not None]
    stats = GateStats()
    for gate in gates:
        gate.stats = stats
    try:
        yield stats
    finally:
        for gate in gates:
            gate.stats = None


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, rt: Runtime, batch_size: int = 500) -> dict:
    """Loss, top-1 and top-5 accuracy (in %) on a data set, no augmentation; one device sync at the end."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss, top-1 hits, top-5 hits
    for start in range(0, len(data), batch_size):
        images = data.images[start:start + batch_size].to(rt.device)
        labels = data.labels[start:start + batch_size].to(rt.device)
        mark_step(model)
        with rt.autocast():
            logits = model(rt.prepare(images)).float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(),
                             hits.any(dim=1).sum()]).double()
    (loss, top1, top5), n = sums.tolist(), len(data)
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


class EarlyStopping:
    """Stop after ``patience`` epochs without a new best validation top-1."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.bad_epochs = patience, -math.inf, 0, 0

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def update(self, epoch: int, value: float) -> bool:
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


# --- checkpoints ----------------------------------------------------------------------

def training_state(cfg, data: Splits, model, optimizer, scheduler, scaler, generator, stop, history) -> dict:
    """Everything ``last.pt`` holds, copied to the CPU now: the next epoch trains while it is written.
    The copies from the GPU go without waiting, one each (~900 for ResNet-50 + Adam), then one sync."""
    state = _copy_to_cpu({
        "config": cfg.to_dict(), "model": model.state_dict(), "num_classes": data.num_classes,
        "mean": list(data.mean), "std": list(data.std),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "early_stopping": stop.state_dict(),
        "history": list(history),
        "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    })
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()  # the writer thread reads the copies next
    return state


def end_epoch(ckpt_dir: Path | None, state: dict | None, improved: bool, callback: Callback | None,
              metrics: dict) -> None:
    """In the EpochWriter's thread: the checkpoints first, then the report that may point at them."""
    if ckpt_dir is not None:
        save_checkpoints(ckpt_dir, state, improved)
    if callback:
        callback(metrics, ckpt_dir)


def save_checkpoints(ckpt_dir: Path, state: dict, improved: bool) -> None:
    """``last.pt`` to continue exactly; ``best.pt`` (weights + config + metrics) when top-1 improved."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if improved:
        model_info = {key: state[key] for key in ("config", "model", "num_classes", "mean", "std")}
        _atomic_save({**model_info, "metrics": state["history"][-1]}, ckpt_dir / "best.pt")
    _atomic_save(state, ckpt_dir / "last.pt")


def _copy_to_cpu(value):
    """A copy of nested dicts, lists and tuples whose tensors are new CPU tensors (the live ones change)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True, non_blocking=True)  # into pinned memory from a GPU
    if isinstance(value, dict):
        return {key: _copy_to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to_cpu(item) for item in value)
    return value


def resume_training_state(path: Path, *state, config: TrainConfig | None = None) -> list[dict]:
    """load_training_state; a damaged file told as one CheckpointError line (checkpoint_error), an I/O error or lack
    of memory raised as it is (unreadable_now)."""
    try:
        return load_training_state(path, *state, config=config)
    except CheckpointError:
        raise  # another config's: already one line
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises, the user's choice is the same
        if unreadable_now(e):
            raise  # the file may be intact: a retry resumes from it, where starting over would lose the trial
        raise checkpoint_error(path, e) from e


def check_resumable(path: Path, config: TrainConfig | None = None) -> None:
    """Fail now, not mid-progress-bar, on a last.pt that cannot be read (mmap: the tensors are not loaded) or that
    ``config`` cannot continue exactly."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - as in resume_training_state
        if unreadable_now(e):
            raise ConfigError(f"cannot read {path} now ({type(e).__name__}: {first_line(e)}); the file itself may be "
                              "intact: check its disk or mount and run again") from e
        raise checkpoint_error(path, e) from e
    if config is not None:
        check_same_config(path, state, config)


# errors of the device or the mount, not of the file's bytes (a file cut short can raise EINVAL: not here)
PASSING_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.ENOTCONN, errno.EAGAIN, errno.ENOMEM,
                  errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH}


def unreadable_now(error: Exception) -> bool:
    """An I/O error (a network mount's EIO) or no memory while loading: it says nothing about the file."""
    out_of_memory = isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)
    return out_of_memory or (isinstance(error, OSError) and error.errno in PASSING_ERRNOS)


def first_line(error: Exception, limit: int = 160) -> str:
    """The error's first sentence, cut at a word if still long: torch follows it with sentences of advice, and a cut
    at a fixed length ended the one line mid-sentence ("...there is a high)")."""
    line = (str(error).strip().splitlines() or [""])[0]
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z])", line, maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " ..."


def checkpoint_error(path: Path, error: Exception) -> CheckpointError:
    """One line naming the file and the way out, for a truncated file, another config's weights, or a file
    carrying pickled code (which weights_only refuses without running it)."""
    return CheckpointError(f"cannot resume from {path} ({type(error).__name__}: {first_line(error)}); it is truncated, "
                           "corrupt or from another config: start over with --restart (resume=False in fit)")


# Fields that do not change what any epoch computes: where and how fast it runs, where the data lie, when to stop.
# A resume may change them: a sweep's trial continues on another node, GPU or mount (tune_jobs/trainable.py).
RUNTIME_KEYS = {"device", "amp", "channels_last", "compile", "cuda_graphs", "gpu_memory_fraction", "data_root",
                "patience"}
# Fields a config does not read, given its other fields (which must match): a resume may change them too.
UNUSED_WHEN = {
    "momentum": lambda c: c.optimizer != "sgd",
    "step_size": lambda c: c.scheduler != "step",
    "epochs": lambda c: c.scheduler not in ("cosine", "onecycle"),  # only these schedules are shaped by it
    "position": lambda c: c.variant == "baseline",
    "kernel_size": lambda c: c.variant in ("baseline", "resize2x"),
    "threshold": lambda c: c.variant not in ("attzoom", "attention-only"),
    "zoom": lambda c: c.variant in ("baseline", "attention-only"),
}


def config_differences(saved: dict, config: TrainConfig) -> list[str]:
    """'key: saved in it, now' for each field of a last.pt's config (``saved``) that ``config`` trains differently."""
    now = config.to_dict()
    used = [k for k in now if k not in RUNTIME_KEYS and not (k in UNUSED_WHEN and UNUSED_WHEN[k](config))]
    return [f"{k}: {saved[k]!r} in it, {now[k]!r} now" for k in used if k in saved and saved[k] != now[k]]


def check_same_config(path: Path, state: dict, config: TrainConfig) -> None:
    """Resuming another config's last.pt would go on with its weights and schedule under the new name: refuse."""
    differences = config_differences(state.get("config") or {}, config)
    if differences:
        raise CheckpointError(f"{path} is another config's last.pt ({', '.join(differences)}); resume it with its own "
                              "options, or start over with --restart (resume=False in fit) or another --checkpoint-dir")


def load_training_state(path: Path, model, optimizer, scheduler, scaler, generator, stop,
                        config: TrainConfig | None = None) -> list[dict]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if config is not None:
        check_same_config(path, state, config)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    stop.load_state_dict(state["early_stopping"])
    generator.set_state(state["rng"]["generator"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["history"]


def load_checkpoint_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, TrainConfig, dict]:
    """Rebuild a trained model from ``best.pt`` or ``last.pt``: (model in eval mode, config, metrics)."""
    state = torch.load(path, map_location=device, weights_only=True)
    cfg = TrainConfig.from_dict(state["config"])
    model = build_model(cfg.backbone, state["num_classes"], cfg.variant, cfg.position, cfg.cifar_stem,
                        kernel_size=cfg.kernel_size, threshold=cfg.threshold, zoom=cfg.zoom)
    model.load_state_dict(state["model"])
    metrics = state.get("metrics") or (state["history"][-1] if state.get("history") else {})
    return model.to(device).eval(), cfg, metrics


def best_test_metrics(checkpoint_dir: str | Path, data: Splits, device: str = "auto") -> dict:
    """The best checkpoint's loss, top-1 and top-5 on the official test split (for the final report)."""
    device = resolve_device(device)
    model, _, _ = load_checkpoint_model(Path(checkpoint_dir) / "best.pt", str(device))
    return evaluate(model, data.test, plain_runtime(device, data))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
