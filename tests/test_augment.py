"""Batch augmentation: every image draws its own crop, flip and AutoAugment sub-policy."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2_contingency
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import AutoAugmentPolicy

from attzoom.augment import BatchAutoAugment, PaperAugment, random_crop, random_flip


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, size: int = 32, seed: int = 0, low: int = 1) -> torch.Tensor:
    """Random uint8 images with no zero pixel, so zero padding is recognisable."""
    return torch.randint(low, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen(seed))


def crop_offset(out: torch.Tensor, original: torch.Tensor, padding: int) -> tuple[int, int] | None:
    """The (dy, dx) at which ``out`` is a window of the zero-padded ``original``, if any."""
    padded = F.pad(original, (padding,) * 4)
    h, w = original.shape[-2:]
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            if torch.equal(padded[:, dy:dy + h, dx:dx + w], out):
                return dy, dx
    return None


def test_random_crop_is_a_window_of_the_padded_image():
    x = images(64)
    out = random_crop(x, 4, gen())
    assert out.shape == x.shape and out.dtype == torch.uint8
    offsets = [crop_offset(out[i], x[i], 4) for i in range(len(x))]
    assert None not in offsets
    dys, dxs = {o[0] for o in offsets}, {o[1] for o in offsets}
    assert len(dys) > 3 and len(dxs) > 3  # per-image offsets, over the whole range
    assert dys <= set(range(9)) and dxs <= set(range(9))


def test_random_crop_differs_per_image():
    x = images(1).expand(16, -1, -1, -1).contiguous()
    out = random_crop(x, 4, gen(1))
    distinct = {out[i].numpy().tobytes() for i in range(16)}
    assert len(distinct) > 8


def test_random_crop_is_seeded_and_handles_other_sizes():
    x = images(8, size=64)
    assert torch.equal(random_crop(x, 8, gen(3)), random_crop(x, 8, gen(3)))
    assert not torch.equal(random_crop(x, 8, gen(3)), random_crop(x, 8, gen(4)))
    rect = torch.randint(1, 256, (4, 3, 10, 14), dtype=torch.uint8, generator=gen())
    out = random_crop(rect, 2, gen())
    assert out.shape == rect.shape
    assert all(crop_offset(out[i], rect[i], 2) is not None for i in range(4))


def test_random_flip_mirrors_about_half():
    x = images(400)
    out = random_flip(x, gen())
    assert out.shape == x.shape and out.dtype == torch.uint8
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    assert (same ^ mirrored).all()  # exactly one of the two (random images are not symmetric)
    assert 150 < int(mirrored.sum()) < 250


def test_random_flip_is_seeded():
    x = images(32)
    assert torch.equal(random_flip(x, gen(5)), random_flip(x, gen(5)))
    assert not torch.equal(random_flip(x, gen(5)), random_flip(x, gen(6)))


def _natural(n: int, size: int = 32) -> torch.Tensor:
    """Smooth images with structure (gradients and a bright square), all identical."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.stack([xs * 255 // size, ys * 255 // size, (xs + ys) * 127 // size]).to(torch.uint8)
    img[:, 8:16, 10:20] = 240
    return img.expand(n, -1, -1, -1).contiguous()


def test_autoaugment_per_image_randomness():
    x = _natural(64)
    out = BatchAutoAugment()(x, gen())
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(x, _natural(64))  # the input is left alone
    distinct = {o.numpy().tobytes() for o in out}
    assert len(distinct) > 20
    changed = sum(not torch.equal(o, i) for o, i in zip(out, x))
    assert changed > 32


def test_autoaugment_is_deterministic_given_the_seed():
    x = _natural(48)
    aug = BatchAutoAugment()
    assert torch.equal(aug(x, gen(7)), aug(x, gen(7)))
    assert not torch.equal(aug(x, gen(7)), aug(x, gen(8)))


def test_autoaugment_large_batch():
    x = images(256, seed=2)
    out = BatchAutoAugment()(x, gen())
    assert out.shape == (256, 3, 32, 32) and out.dtype == torch.uint8
    # identical images: each draws its own sub-policy *and* its own coin flips and signs, so the
    # outputs are far more varied than one draw per sub-policy could make them (about 30 here)
    same = BatchAutoAugment()(_natural(256), gen())
    assert len({o.numpy().tobytes() for o in same}) > 45


def test_autoaugment_draws_like_torchvision_per_image():
    """Per image, the same outputs as torchvision's own AutoAugment, at the same rates.

    BatchAutoAugment rebuilds AutoAugment from torchvision's private policy table and operations
    and regroups the draws, so a change there or a slip in the grouping (sub-policy, coin flip,
    sign, order of the two operations) alters which images come out or how often. One image,
    augmented 4000 times each way; a chi-square test on how often each distinct output occurs.
    """
    n = 4000
    x = _natural(n)
    ours = Counter(o.numpy().tobytes() for o in BatchAutoAugment()(x, gen()))
    reference = v2.AutoAugment(AutoAugmentPolicy.CIFAR10)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = Counter(reference(x[0]).numpy().tobytes() for _ in range(n))
    common = [k for k in sorted(ours.keys() | theirs.keys()) if ours[k] + theirs[k] >= 10]
    assert len(common) > 50  # enough distinct outputs for the test to see a difference
    # one column per output seen 10+ times in all, and one for the rare rest
    table = [[c[k] for k in common] + [n - sum(c[k] for k in common)] for c in (ours, theirs)]
    assert chi2_contingency(table).pvalue > 1e-3


@pytest.mark.parametrize("size, padding", [(32, 4), (64, 8)])
def test_paper_augment_end_to_end(size, padding):
    x = images(64, size=size)
    aug = PaperAugment(size)
    assert aug.padding == padding and aug.autoaugment is not None
    out = aug(x, gen())
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, aug(x, gen()))
    assert not torch.equal(out, x)


def test_paper_augment_without_autoaugment_is_crop_and_flip():
    x = images(32)
    aug = PaperAugment(32, autoaugment=False)
    out = aug(x, gen(9))
    flips = 0
    for o, i in zip(out, x):
        straight, mirrored = crop_offset(o, i, 4), crop_offset(o.flip(-1), i, 4)
        assert straight is not None or mirrored is not None
        flips += straight is None
    assert 0 < flips < 32


def test_fused_crop_flip_equals_crop_then_flip():
    from attzoom.augment import random_crop, random_crop_flip, random_flip

    images = torch.randint(0, 256, (64, 3, 16, 12), dtype=torch.uint8)
    fused = random_crop_flip(images, 3, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(fused, random_flip(random_crop(images, 3, gen), gen))


@pytest.mark.parametrize("size", [32, 64])
def test_each_operation_gives_torchvisions_pixels_with_a_magnitude_per_image(size):
    """Every AutoAugment operation, batched with its own magnitude per image (every bin, both signs),
    equals torchvision's operation on that image alone, to the pixel."""
    from attzoom.augment import GEOMETRIC, PIXEL_OPERATIONS, affine, affine_matrix

    reference = v2.AutoAugment(AutoAugmentPolicy.CIFAR10)
    for name, (magnitudes_fn, signed) in reference._AUGMENTATION_SPACE.items():
        magnitudes = magnitudes_fn(10, size, size)
        values = [0.0] if magnitudes is None else [float(m) for m in magnitudes]
        values += [-v for v in values] if signed else []
        x = images(len(values), size=size, seed=len(name), low=0)
        theirs = torch.stack([reference._apply_image_or_video_transform(
            image, name, value, interpolation=reference.interpolation, fill=reference._fill)
            for image, value in zip(x, values)])
        if name in GEOMETRIC:
            ours = affine(x, torch.tensor([affine_matrix(name, v, size, size) for v in values]).view(-1, 2, 3))
        else:
            ours = PIXEL_OPERATIONS[name](x, torch.tensor(values, dtype=torch.float64))
        assert torch.equal(ours, theirs), name


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_autoaugment_is_a_few_batched_calls_whatever_the_batch():
    """One call per kind of operation and step (all geometric ones in one grid sample), not one per
    (sub-policy, operation, sign) group: on a GPU each op is a kernel launch."""
    counts = []
    for n in (64, 512):
        with _CountOps() as ops:
            BatchAutoAugment()(images(n), gen())
        counts.append(ops.count)
    assert max(counts) < 800  # about 580; one call per group made 1,500-1,800
    assert counts[1] < 1.2 * counts[0]
