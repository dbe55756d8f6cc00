"""What the benchmark scripts share: progress lines on stderr (stdout holds the JSON) and a device sync."""

from __future__ import annotations

import sys

import torch


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a clock read after it measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
