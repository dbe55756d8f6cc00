"""``attzoom train``: one training from the command line (the sweep service adds the other commands).

Errors a user can cause (a bad option value, missing data) end with one line naming the
problem and the fix, and exit code 2, before any training starts.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

from .config import OPTIMIZERS, SCHEDULERS, CheckpointError, ConfigError, DataError, TrainConfig
from .names import BACKBONES, DATASETS, POSITIONS, VARIANTS

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong and where to look) and exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def run(parser: Parser, argv, user_errors=(ConfigError, DataError), on_interrupt: str = "interrupted",
        stops: tuple[type[Exception], int] | None = None) -> int:
    """Parse, run the chosen command, and turn a user's error into one line and exit code 2.

    ``stops``: (exception type, exit code) of failures that are no user's error but stop the
    command cleanly (the sweep service's storage and tracking failures): one line, that code.
    A reader that stops reading (``attzoom status | head -1``) ends it quietly (reader_gone).
    """
    try:
        try:
            return run_command(parser, argv, user_errors, on_interrupt, stops)
        finally:  # buffered output fails here, not at exit: "Exception ignored ... BrokenPipeError", exit 120
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_closed():  # a pipe of Ray's, a server's or a child's: an error like any other
            raise
        return reader_gone()


EXIT_READER_GONE = 141  # 128 + SIGPIPE, what `seq 1 9999 | head -1` or `git log | head -1` report under pipefail


def reader_gone() -> int:
    """Output nobody reads is no error worth a traceback; the exit code still says it was cut, as other tools' do.
    stdout goes to /dev/null, so the interpreter's last flush of what is left has nothing to complain about."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_READER_GONE


def _stdout_closed() -> bool:
    """Whether nobody reads stdout any more: a pipe whose reader left polls as an error (Linux, macOS)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no stdout to ask: as before
        return True


def run_command(parser: Parser, argv, user_errors, on_interrupt: str, stops) -> int:
    args = parser.parse_args(argv)
    stop_error, stop_code = stops or (_NeverRaised, 1)
    try:
        return args.run(args)
    except user_errors as e:
        print(f"attzoom {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except stop_error as e:
        print(f"attzoom {args.command}: stopped: {e}", file=sys.stderr)
        return stop_code
    except KeyboardInterrupt as e:
        # an interrupt the command caught says how to go on; else the command's own advice (set_defaults), if any
        print(str(e) or getattr(args, "on_interrupt", on_interrupt), file=sys.stderr)
        return 130
    finally:
        gc.freeze()  # the interpreter's last collection would walk every object Tune and MLflow made: a second


class _NeverRaised(Exception):
    pass


def build_parser() -> Parser:
    parser = Parser(prog="attzoom", description="Train CNNs with and without AttZoom.")
    add_train_command(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    return parser


def add_train_command(sub) -> None:
    """``attzoom train``; the sweep service's CLI adds it to its own commands."""
    train = sub.add_parser("train", help="train one model and print its final metrics")
    add_train_options(train)
    train.add_argument("--checkpoint-dir", type=Path, default=None,
                       help="where last.pt / best.pt go (default: runs/<backbone>-<dataset>-<variant>)")
    train.add_argument("--restart", action="store_true", help="ignore an existing last.pt instead of resuming it")
    train.set_defaults(run=run_train, on_interrupt=RESUME_HINT)


RESUME_HINT = "interrupted; run the same command again to resume from its last.pt (--restart starts over)"


DEFAULT = " (default: %(default)s)"


def add_train_options(p: argparse.ArgumentParser) -> None:
    """The TrainConfig fields as options, each with a line of help and its default (the README points at --help)."""
    d = TrainConfig()
    p.add_argument("--backbone", choices=list(BACKBONES), default=d.backbone, help="network to train" + DEFAULT)
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="data set" + DEFAULT)
    p.add_argument("--variant", choices=VARIANTS, default=d.variant,
                   help="baseline, AttZoom or one of its controls" + DEFAULT)
    p.add_argument("--position", choices=POSITIONS, default=d.position,
                   help="where the AttZoom layer goes, unless baseline" + DEFAULT)
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem without pooling (small images)")
    p.add_argument("--kernel-size", type=int, default=d.kernel_size,
                   help="odd size k of the AttZoom layer's k x k attention and zoom convolutions" + DEFAULT)
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help="gate threshold in [0, 1]: where the attention reaches it, features pass whole" + DEFAULT)
    p.add_argument("--zoom", type=int, default=d.zoom, help="upsampling factor of the AttZoom layer" + DEFAULT)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training images per step" + DEFAULT)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate, the peak of onecycle" + DEFAULT)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay" + DEFAULT)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optimizer" + DEFAULT)
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD's momentum" + DEFAULT)
    p.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler, help="learning-rate schedule" + DEFAULT)
    p.add_argument("--step-size", type=int, default=d.step_size,
                   help="epochs between the step schedule's decays" + DEFAULT)
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="epochs to train at most; early stopping may end sooner" + DEFAULT)
    p.add_argument("--patience", type=int, default=d.patience,
                   help="epochs without a new best validation top-1 before stopping early" + DEFAULT)
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="train without random crop, flip and AutoAugment")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights, data order and augmentation" + DEFAULT)
    p.add_argument("--data-root", default=d.data_root,
                   help="folder holding the data sets; missing ones are downloaded or generated there" + DEFAULT)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the training set held out for validation" + DEFAULT)
    p.add_argument("--device", default=d.device, help="auto (CUDA when there is one), cpu, cuda or cuda:N" + DEFAULT)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (on CUDA: as CUDA graphs)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="with --compile on CUDA: compiled kernels without CUDA graphs")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    config.validate()
    return config


def run_train(args: argparse.Namespace) -> int:
    """train, with a library error's Python-API hint ("(resume=False in fit)") cut: here only the option applies."""
    try:
        return train_and_report(args)
    except ConfigError as e:
        raise type(e)(re.sub(r" \([^()]* in fit\)", "", str(e))) from e


def train_and_report(args: argparse.Namespace) -> int:
    from .train import check_checkpoint_dir, lock_if_there, resolve_device

    config = config_from_args(args)
    resolve_device(config.device)
    ckpt = args.checkpoint_dir or Path("runs") / f"{config.backbone}-{config.dataset}-{config.variant}"
    check_checkpoint_dir(ckpt)
    with lock_if_there(ckpt):  # a folder another training writes now: refused before its last.pt is read
        return train_into(ckpt, config, args)


def train_into(ckpt: Path, config: TrainConfig, args: argparse.Namespace) -> int:
    """The resume check, the data, fit and the final report, for the checkpoint folder ``ckpt``."""
    from .data import load
    from .train import best_test_metrics, fit

    last, before = ckpt / "last.pt", file_stamp(ckpt / "last.pt")
    try:
        if not args.restart and before:
            check_resumable(last, config)
        data = load(config.dataset, config.data_root, config.val_fraction)
        with EpochBar(config.epochs, config.variant) as bar:
            result = fit(config, data, callback=bar, checkpoint_dir=ckpt, resume=not args.restart)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_message(last, before, args.restart)) from None
    if result.best:  # none when epoch 1 diverged: a best.pt there is another run's, or missing
        test = best_test_metrics(ckpt, data, config.device)
        epochs = f"{result.epochs} epoch{'' if result.epochs == 1 else 's'}"
        if not bar.trained:  # the same command again: its last.pt had ended, so this only tested best.pt
            epochs += f" (its last.pt in {ckpt} had ended: nothing trained now; --restart trains it again)"
        print(f"{result.status} after {epochs}; best epoch {result.best['epoch']}: "
              f"val top-1 {result.best['val_top1']:.2f} %, top-5 {result.best['val_top5']:.2f} %; "
              f"test top-1 {test['top1']:.2f} %, top-5 {test['top5']:.2f} %")
        print(f"checkpoints: {ckpt}/best.pt (best weights), {ckpt}/last.pt (resume state)")
    if result.status == "diverged":
        print(diverged_message(result, config), file=sys.stderr)
        return 1
    return 0


def check_resumable(last: Path, config: TrainConfig) -> None:
    """train.check_resumable, but a file that is no zip archive at all (garbage, empty, cut at its start) is told
    as such: torch's words for it ("mmap can only be used with files saved with ...") are its internals."""
    from .train import check_resumable as check

    try:
        check(last, config)
    except CheckpointError as e:
        if "mmap can only be used" not in str(e.__cause__):
            raise
        raise CheckpointError(f"cannot resume from {last}: it is not a checkpoint torch can read (truncated or not "
                              "a checkpoint); start over with --restart or pass another --checkpoint-dir") from e


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a file, None when there is none: each checkpoint save replaces last.pt, so the stamp
    changes when an epoch finished."""
    try:
        stat = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return stat.st_ino, stat.st_mtime_ns


def interrupted_message(last: Path, before: tuple[int, int] | None, restart: bool) -> str:
    """How to go on after Ctrl-C: a resume needs a last.pt this command can continue; before any epoch finished
    there is none (or, with --restart, only the old one it ignores)."""
    now = file_stamp(last)
    if now is None or (restart and now == before):
        return ("interrupted before any epoch finished, so nothing was saved: the same command starts again from "
                "the beginning")
    if restart:  # the same command would start over again
        return "interrupted; run the same command without --restart to resume from its last.pt"
    return RESUME_HINT


def diverged_message(result, config: TrainConfig) -> str:
    """One line for a run whose training loss became NaN or inf: which epoch, what is left of it, what to change."""
    if result.best:
        kept = (f"best.pt holds epoch {result.best['epoch']} (reported above); last.pt holds epoch {result.epochs}, "
                "so run with --restart")
    else:
        kept = "no epoch finished, so there is no best checkpoint to test; run"
    decay = f" or --weight-decay (now {config.weight_decay:g})" if config.weight_decay else ""
    return (f"attzoom train: diverged in epoch {result.diverged_in}: the training loss became NaN or infinite; {kept} "
            f"again with a lower --lr (now {config.lr:g}){decay}")


class EpochBar:
    """A tqdm bar over epochs showing the latest validation metrics; a fit() callback."""

    def __init__(self, epochs: int, label: str):
        from tqdm import tqdm

        self.bar = tqdm(total=epochs, desc=label, unit="epoch", file=sys.stderr)
        self.trained = 0  # epochs this command trained (a finished last.pt: none)

    def __call__(self, metrics: dict, _checkpoint_dir) -> None:
        self.trained += 1
        self.bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", top1=f"{metrics['val_top1']:.1f}",
                             img_s=f"{metrics['images_per_s']:.0f}", refresh=False)
        self.bar.update(metrics["epoch"] - self.bar.n)

    def __enter__(self) -> "EpochBar":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
