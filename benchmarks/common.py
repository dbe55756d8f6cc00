"""What the benchmark scripts share: progress lines on stderr (stdout holds the JSON) and a device sync."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a clock read after it measures it."""
    if device.type == "cuda":
        import torch  # here, not at the top: scripts that run no model import log() without torch

        torch.cuda.synchronize(device)
