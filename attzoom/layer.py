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

from .config import check_layer


def zero_insert(x: torch.Tensor, zoom: int) -> torch.Tensor:
    """Place ``x[..., h, w]`` at ``(zoom*h, zoom*w)`` of a zero map ``zoom`` times larger."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, zoom * h, zoom * w)
    out[:, :, ::zoom, ::zoom] = x
    return out


class GateStats:
    """Running counts of what the gates of a model did: how often f(A) = 1, and the mean of sigmoid(A).

    A fully open gate is constant, so no gradient reaches the attention conv there: a gate open
    everywhere stays open, and AttZoom then trains as the zoom-only control. Counts stay on the
    device (no sync per batch) until ``metrics`` reads them.
    """

    def __init__(self):
        self.open = self.sigma = self.count = 0

    @torch.compiler.disable  # a compiled model breaks its graph here: counts stay out of CUDA graphs' memory
    def add(self, a: torch.Tensor, threshold: float) -> None:
        a = a.detach().float()
        self.open = self.open + (a >= threshold).sum()
        self.sigma = self.sigma + a.sum()
        self.count += a.numel()

    def metrics(self) -> dict:
        """{"gate_open": % of positions with f(A) = 1, "gate_sigma": mean sigmoid(A)}; {} when nothing was seen."""
        if not self.count:
            return {}
        return {"gate_open": 100.0 * float(self.open) / self.count, "gate_sigma": float(self.sigma) / self.count}


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
        check_layer(kernel_size, threshold, zoom)  # a ConfigError (a ValueError) worded as fit's
        self.channels, self.kernel_size, self.threshold, self.zoom = channels, kernel_size, threshold, zoom
        self.fused = fused
        pad = kernel_size // 2
        self.attention = nn.Conv2d(channels, 1, kernel_size, padding=pad) if gate else None
        self.enhance = nn.Conv2d(channels, channels, kernel_size, padding=pad)
        self.stats: GateStats | None = None  # set while the gate is watched (train.watch_gates)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """f(A): 1 where sigmoid(conv_A(x)) >= threshold, else the attention itself; (N, 1, H, W)."""
        if self.attention is None:
            return x.new_ones(x.shape[0], 1, x.shape[2], x.shape[3])
        a = torch.sigmoid(self.attention(x))
        if self.stats is not None:
            self.stats.add(a, self.threshold)
        return torch.where(a >= self.threshold, torch.ones_like(a), a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.fused and x.device.type == "cpu":
            # oneDNN's transposed conv is about twice as fast in channels_last on CPU; converting once
            # here keeps the gate in that format too, and the layers after simply continue in it.
            x = x.contiguous(memory_format=torch.channels_last)
        weighted = x if self.attention is None else x * self.attention_map(x)
        return self._zoom_fused(weighted) if self.fused else self._zoom_literal(weighted)

    def _check_input(self, x: torch.Tensor) -> None:
        """A shape check only (static under torch.compile, no sync): an unbatched (C, H, W) input failed deep inside,
        in torch's words ("required rank 4 tensor to use channels_last format")."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"AttZoom built for {self.channels} channels takes (N, {self.channels}, H, W), got "
                             f"{tuple(x.shape)}")

    def _zoom_literal(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added on its own so that its gradient is a plain sum: oneDNN's conv backward folds it into
        # the weight pass and drifts up to ~1e-4 from the float64 sum at these sizes, which no reference should.
        conv = F.conv2d(zero_insert(x, self.zoom), self.enhance.weight, padding=self.kernel_size // 2)
        return conv + self.enhance.bias[:, None, None]

    def _zoom_fused(self, x: torch.Tensor) -> torch.Tensor:
        # conv(zero_insert(x)) == conv_transpose(x) with the kernel flipped and in/out swapped;
        # skips the multiply-adds on inserted zeros and never builds the large map.
        weight = self.enhance.weight.flip(-1, -2).transpose(0, 1)
        padding = self.kernel_size - 1 - self.kernel_size // 2
        if x.device.type == "cpu":  # on CUDA, cuDNN's own backward measured faster (1.2 vs 1.5 ms on an H200)
            return _TransposedZoom.apply(x, weight, self.enhance.bias, self.zoom, padding)
        return F.conv_transpose2d(x, weight, self.enhance.bias, stride=self.zoom, padding=padding,
                                  output_padding=self.zoom - 1)

    def extra_repr(self) -> str:
        gate = "off" if self.attention is None else f"threshold={self.threshold}"
        return f"kernel_size={self.kernel_size}, zoom={self.zoom}, gate {gate}, fused={self.fused}"


class _TransposedZoom(torch.autograd.Function):
    """``conv_transpose2d(x, w, b, stride=s, padding=p, output_padding=s-1)`` with a faster backward.

    Both gradients are computed with the kernels of the adjoint *strided* convolution
    (``conv2d(grad, w, stride=s)``): on CPU they take about half as long as the transposed
    convolution's own backward and give the same values. The bias gradient is a plain sum.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride: int, padding: int):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv_transpose2d(x, weight, bias, stride=stride, padding=padding, output_padding=stride - 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        s, p = [ctx.stride] * 2, [ctx.padding] * 2
        # under autocast the forward ran in grad's dtype; redo that cast for the adjoint kernels
        x_, weight_ = x.to(grad.dtype), weight.to(grad.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight_, stride=s, padding=p).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                x_, grad, weight_, None, s, p, [1, 1], False, [0, 0], 1, [False, True, False])[1].to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3)).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None
