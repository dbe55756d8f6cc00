"""The AttZoom layer (paper, Sec. 3 and Algorithm 1).

A spatial gate ``f(A)`` keeps important positions at full strength and scales
the rest by their attention, then a *zoom* (zero insertion followed by a
``k x k`` convolution) doubles the resolution, spreading the kept features over
a larger area. The zoom is computed as one transposed convolution by default;
the literal zero-insert-then-convolve form is kept as the reference it is
tested against. Both read the same ``enhance`` weights (Conv2d layout), so a
checkpoint loads in either mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def zero_insert(x: torch.Tensor, zoom: int) -> torch.Tensor:
    """Place ``x[..., h, w]`` at ``(zoom*h, zoom*w)`` of a zero map ``zoom`` times larger."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, zoom * h, zoom * w)
    out[:, :, ::zoom, ::zoom] = x
    return out


class AttZoom(nn.Module):
    """Attention gate plus learned zoom: (N, C, H, W) -> (N, C, zoom*H, zoom*W).

    ``gate=False`` drops the attention (f = 1): the zoom-only control.
    ``zoom=1`` keeps the gate but not the upsampling: the attention-only control.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        threshold: float = 0.5,
        zoom: int = 2,
        gate: bool = True,
        fused: bool = True,
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if zoom < 1:
            raise ValueError(f"zoom must be >= 1, got {zoom}")
        self.kernel_size, self.threshold, self.zoom = kernel_size, threshold, zoom
        self.fused = fused
        pad = kernel_size // 2
        self.attention = nn.Conv2d(channels, 1, kernel_size, padding=pad) if gate else None
        self.enhance = nn.Conv2d(channels, channels, kernel_size, padding=pad)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """f(A): 1 where sigmoid(conv_A(x)) >= threshold, else the attention itself; (N, 1, H, W)."""
        if self.attention is None:
            return x.new_ones(x.shape[0], 1, x.shape[2], x.shape[3])
        a = torch.sigmoid(self.attention(x))
        return torch.where(a >= self.threshold, torch.ones_like(a), a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.device.type == "cpu":
            # oneDNN's transposed conv is about twice as fast in channels_last on CPU; converting once
            # here keeps the gate in that format too, and the layers after simply continue in it.
            x = x.contiguous(memory_format=torch.channels_last)
        weighted = x if self.attention is None else x * self.attention_map(x)
        return self._zoom_fused(weighted) if self.fused else self._zoom_literal(weighted)

    def _zoom_literal(self, x: torch.Tensor) -> torch.Tensor:
        return self.enhance(zero_insert(x, self.zoom))

    def _zoom_fused(self, x: torch.Tensor) -> torch.Tensor:
        # conv(zero_insert(x)) == conv_transpose(x) with the kernel flipped and in/out swapped;
        # skips the multiply-adds on inserted zeros and never builds the large map.
        k, s = self.kernel_size, self.zoom
        weight = self.enhance.weight.flip(-1, -2).transpose(0, 1)
        return F.conv_transpose2d(
            x, weight, self.enhance.bias, stride=s, padding=k - 1 - k // 2, output_padding=s - 1
        )

    def extra_repr(self) -> str:
        gate = "off" if self.attention is None else f"threshold={self.threshold}"
        return f"kernel_size={self.kernel_size}, zoom={self.zoom}, gate {gate}, fused={self.fused}"
