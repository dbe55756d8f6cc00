"""The paper's augmentation (random crop with padding, horizontal flip, AutoAugment), per image, on batches.

torchvision's v2 transforms draw one set of random parameters per call, so a batch
would share one crop and one AutoAugment sub-policy. Here every image draws its own,
and the work is grouped: one gather for all crops and flips,
and AutoAugment applied once per (sub-policy, operation, sign) group using torchvision's
own policy table and operations. The data stay uint8 on whatever device holds them.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import AutoAugmentPolicy


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut each image at its own random offset (RandomCrop(size, padding))."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=images.device)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chans = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """``random_flip(random_crop(...))`` as one gather: the same draws and output, about 8x cheaper on CPU."""
    n, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    width = padded.shape[-1]
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    across = torch.arange(w, device=dev)
    rows = dy[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = dx[:, None] + torch.where(flip[:, None], across.flip(0), across)  # (N, W), mirrored where flipped
    index = (rows[:, :, None] * width + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


class BatchAutoAugment:
    """AutoAugment (Cubuk et al., 2019) with an independent sub-policy, coin flips and signs per image."""

    def __init__(self, policy: AutoAugmentPolicy = AutoAugmentPolicy.CIFAR10):
        self._ops = v2.AutoAugment(policy)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        policies = self._ops._policies
        choice = torch.randint(len(policies), (len(images),), generator=generator)
        out = images.clone()
        for p in range(len(policies)):
            members = (choice == p).nonzero().squeeze(1)
            if len(members):
                for transform_id, probability, magnitude_idx in policies[p]:
                    self._apply(out, members, transform_id, probability, magnitude_idx, generator)
        return out

    def _apply(self, out, members, transform_id, probability, magnitude_idx, generator) -> None:
        h, w = out.shape[-2:]
        fires = torch.rand(len(members), generator=generator) <= probability
        negative = torch.rand(len(members), generator=generator) <= 0.5
        magnitudes_fn, signed = self._ops._AUGMENTATION_SPACE[transform_id]
        magnitudes = magnitudes_fn(10, h, w)
        magnitude = 0.0 if magnitudes is None else float(magnitudes[magnitude_idx])
        groups = [(fires & ~negative, magnitude), (fires & negative, -magnitude)] if signed else [(fires, magnitude)]
        for mask, value in groups:
            index = members[mask].to(out.device)
            if len(index):
                out[index] = self._ops._apply_image_or_video_transform(
                    out[index], transform_id, value, interpolation=self._ops.interpolation, fill=self._ops._fill
                )


class PaperAugment:
    """RandomCrop(padding) + RandomHorizontalFlip + AutoAugment, as the paper trains."""

    def __init__(self, image_size: int, autoaugment: bool = True):
        self.padding = max(1, image_size // 8)  # 4 px at 32 px, 8 px at 64 px
        self.autoaugment = BatchAutoAugment() if autoaugment else None

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = random_crop_flip(images, self.padding, generator)
        return self.autoaugment(images, generator) if self.autoaugment else images
