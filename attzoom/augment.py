"""The paper's augmentation (random crop with padding, horizontal flip, AutoAugment), per image, on batches.

torchvision's v2 transforms draw one set of random parameters per call, so a batch
would share one crop and one AutoAugment sub-policy. Here every image draws its own,
and the work is batched: one gather for all crops and flips, and AutoAugment as one call
per kind of operation with a magnitude per image, giving torchvision's own pixels.
The data stay uint8 on whatever device holds them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import AutoAugmentPolicy
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional._color import _rgb_to_grayscale_image
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (random draws, indices) to the images' device without waiting for it: a blocking
    copy would drain the GPU's queue every time, leaving it idle while the host launches what follows."""
    return values.to(device, non_blocking=True)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut each image at its own random offset (RandomCrop(size, padding))."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy, dx = to_device(torch.randint(0, 2 * padding + 1, (2, n), generator=generator), images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=images.device)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chans = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = to_device(torch.rand(len(images), generator=generator) < 0.5, images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """``random_flip(random_crop(...))`` as one gather: the same draws and output, about 8x cheaper on CPU."""
    n, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    width = padded.shape[-1]
    dy, dx = to_device(torch.randint(0, 2 * padding + 1, (2, n), generator=generator), dev)
    flip = to_device(torch.rand(n, generator=generator) < 0.5, dev)
    across = torch.arange(w, device=dev)
    rows = dy[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = dx[:, None] + torch.where(flip[:, None], across.flip(0), across)  # (N, W), mirrored where flipped
    index = (rows[:, :, None] * width + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


class BatchAutoAugment:
    """AutoAugment (Cubuk et al., 2019) with an independent sub-policy, coin flips and signs per image.

    All draws for a batch come at once (``plan``); then each of the two steps of a sub-policy runs
    as one call per kind of operation, every image with its own magnitude: one grid sample for all
    shears, translations and rotations, one blend each for brightness, colour, contrast and
    sharpness. That is about 20 batched calls per batch instead of one per (sub-policy, operation,
    sign) group, so on a GPU the augmentation is a few large kernels rather than a hundred small ones.
    Magnitudes, matrices and rounding follow torchvision's own operations.
    """

    def __init__(self, policy: AutoAugmentPolicy = AutoAugmentPolicy.CIFAR10):
        self._ops = v2.AutoAugment(policy)
        policies = self._ops._policies
        self.kinds = sorted({name for sub_policy in policies for name, _, _ in sub_policy})
        self._kind = torch.tensor([[self.kinds.index(name) for name, _, _ in p] for p in policies])
        self._probability = torch.tensor([[probability for _, probability, _ in p] for p in policies])
        self._geometric = torch.tensor([name in GEOMETRIC for name in self.kinds])  # by kind
        self._tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # by image size

    def plan(self, n: int, generator: torch.Generator, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and step (n, 2): the operation (an index into ``kinds``, -1 when its coin said no) and
        its signed magnitude (float64, as torchvision passes it)."""
        choice = torch.randint(len(self._kind), (n,), generator=generator)
        fires = torch.rand(n, 2, generator=generator) <= self._probability[choice]
        negative = torch.rand(n, 2, generator=generator) <= 0.5
        magnitude, signed = self._magnitudes(height, width)
        value = torch.where(negative & signed[choice], -magnitude[choice], magnitude[choice])
        return torch.where(fires, self._kind[choice], -1), value

    def _magnitudes(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(magnitude, signed) per sub-policy and step, for images of this size."""
        if (height, width) not in self._tables:
            self._tables[height, width] = self._magnitude_table(height, width)
        return self._tables[height, width]

    def _magnitude_table(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[self._magnitude(name, index, height, width) for name, _, index in p] for p in self._ops._policies]
        magnitude = torch.tensor([[m for m, _ in row] for row in rows], dtype=torch.float64)
        return magnitude, torch.tensor([[signed for _, signed in row] for row in rows])

    def _magnitude(self, name: str, index, height: int, width: int) -> tuple[float, bool]:
        magnitudes_fn, signed = self._ops._AUGMENTATION_SPACE[name]
        magnitudes = magnitudes_fn(10, height, width)
        return (0.0 if magnitudes is None else float(magnitudes[index])), signed

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        kind, value = self.plan(len(images), generator, *images.shape[-2:])
        out = images.clone()
        for k, v in zip(kind.T, value.T):  # the sub-policies' first operations, then their second ones
            moved = self._geometric[k.clamp(min=0)] & (k >= 0)
            if moved.any():
                members = moved.nonzero().squeeze(1)
                matrices = [affine_matrix(self.kinds[i], m, *images.shape[-2:])
                            for i, m in zip(k[members].tolist(), v[members].tolist())]
                index = to_device(members, out.device)
                out[index] = affine(out[index], to_device(torch.tensor(matrices).view(-1, 2, 3), out.device))
            for i in k[~moved & (k >= 0)].unique().tolist():
                members = (k == i).nonzero().squeeze(1)
                index = to_device(members, out.device)
                out[index] = PIXEL_OPERATIONS[self.kinds[i]](out[index], to_device(v[members], out.device))
        return out


# --- torchvision's AutoAugment operations, each image of a batch with its own magnitude -------------------
# Same arithmetic in the same order as torchvision.transforms.v2.functional (tests/test_augment.py compares).

GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def affine_matrix(name: str, magnitude: float, height: int, width: int) -> list[float]:
    """The inverse affine matrix torchvision's AutoAugment samples with for one geometric operation."""
    if name == "Rotate":
        return _get_inverse_affine_matrix([0.0, 0.0], -(magnitude % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return _get_inverse_affine_matrix([-width * 0.5, -height * 0.5], 0.0, [0.0, 0.0], 1.0,
                                          [shear, 0.0] if name == "ShearX" else [0.0, shear])
    shift = float(int(magnitude))
    return _get_inverse_affine_matrix([0.0, 0.0], 0.0, [shift, 0.0] if name == "TranslateX" else [0.0, shift],
                                      1.0, [0.0, 0.0])


def affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour resampling of image i by inverse matrix ``theta[i]`` (2 x 3), zeros outside."""
    n, _, h, w = images.shape
    base = torch.empty(1, h, w, 3, device=images.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=images.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=images.device)[:, None])
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2) / to_device(torch.tensor([0.5 * w, 0.5 * h]), images.device)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(scaled).view(n, h, w, 2)
    out = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(images.dtype)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """One float32 value per image, shaped to broadcast over (N, C, H, W)."""
    return values.float()[:, None, None, None]


def _fused_add(out: torch.Tensor, other: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``out + alpha * other`` rounded once, as torch's ``add(other, alpha=...)`` computes it (a fused
    multiply-add): exact in float64 for these 8-bit images, then rounded to float32."""
    return out.double().add_(other.double() * _per_image(alpha).double()).float()


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with one ratio per image: images * r + other * (1 - r), clamped, truncated."""
    out = images.float().mul_(_per_image(ratio))
    return _fused_add(out, other, 1.0 - ratio).clamp_(0, 255).to(images.dtype)


def _gray(images: torch.Tensor) -> torch.Tensor:
    return _rgb_to_grayscale_image(images, num_output_channels=1, preserve_dtype=False).floor_()


def _sharpness(images: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = to_device(torch.tensor([[a, a, a], [a, b, a], [a, a, a]]), images.device).expand(3, 1, 3, 3)
    out = images.float()
    blurred = F.conv2d(out, kernel, groups=3).round_()
    inner = out[..., 1:-1, 1:-1]
    # alpha = 1 - factor with factor = 1 + magnitude, in float64 as torchvision computes it (not -magnitude)
    inner.copy_(_fused_add(inner, blurred.sub_(inner), 1.0 - (1.0 + values)))
    return out.clamp_(0, 255).to(images.dtype)


def _posterize(images: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    bits = values.to(torch.int64)
    mask = (((1 << bits) - 1) << (8 - bits)).where(bits < 8, 255).to(images.dtype)
    return images & mask[:, None, None, None]


def _solarize(images: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    threshold = _per_image(255.0 * values)
    return torch.where(images >= threshold, 255 - images, images)


PIXEL_OPERATIONS = {
    "Brightness": lambda x, v: x.float().mul_(_per_image(1.0 + v)).clamp_(0, 255).to(x.dtype),
    "Color": lambda x, v: _blend(x, _gray(x), 1.0 + v),
    "Contrast": lambda x, v: _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), 1.0 + v),
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": lambda x, v: TF.autocontrast(x),
    "Equalize": lambda x, v: TF.equalize(x),
    "Invert": lambda x, v: TF.invert(x),
}


class PaperAugment:
    """RandomCrop(padding) + RandomHorizontalFlip + AutoAugment, as the paper trains."""

    def __init__(self, image_size: int, autoaugment: bool = True):
        self.padding = max(1, image_size // 8)  # 4 px at 32 px, 8 px at 64 px
        self.autoaugment = BatchAutoAugment() if autoaugment else None

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = random_crop_flip(images, self.padding, generator)
        return self.autoaugment(images, generator) if self.autoaugment else images
