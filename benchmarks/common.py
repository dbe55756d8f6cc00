"""What the benchmark scripts share: progress lines on stderr (stdout holds the JSON) and a device sync."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def images_per_s_between(reports: list[float], train_images: int, batch: int) -> list[float]:
    """Training images per second from each epoch's report to the next (clock times of fit's callback): the
    epoch's whole cost, augmentation, validation, checkpoint write and report included. fit trains in full
    batches, so an epoch is ``train_images`` less its partial last batch."""
    used = train_images if train_images < batch else train_images - train_images % batch
    return [used / (later - earlier) for earlier, later in zip(reports, reports[1:])]


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a clock read after it measures it."""
    if device.type == "cuda":
        import torch  # here, not at the top: scripts that run no model import log() without torch

        torch.cuda.synchronize(device)
