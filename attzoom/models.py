"""The paper's backbones (built with timm), with AttZoom or a control inserted at a named position.

Variants (DESIGN.md, "Placement"): inserting AttZoom doubles the spatial size seen by
the rest of the network, so the controls separate the gate from the zoom and from
plain upsampling:

- ``baseline``       the backbone unchanged
- ``attzoom``        the layer (gate + learned zoom)
- ``zoom-only``      zero insertion + conv, no gate
- ``attention-only`` the gate, no zoom (zoom = 1)
- ``resize2x``       bilinear upsampling by the zoom factor, nothing learned
"""

from __future__ import annotations

import numbers

import timm
import torch
from torch import nn

from .config import check_layer
from .layer import AttZoom
from .names import BACKBONES, POSITIONS, VARIANTS, Backbone  # noqa: F401 - re-exported


def build_model(backbone: str, num_classes: int, variant: str = "baseline", position: str = "stem",
                cifar_stem: bool = False, **attzoom_kwargs) -> nn.Module:
    """A timm backbone trained from scratch, with ``variant`` inserted at ``position``.

    ``cifar_stem`` swaps the stem for a 3x3 stride-1 conv without pooling: what
    practitioners use on 32 px images, and the strong baseline a careful reader asks for.
    ``attzoom_kwargs`` go to :class:`AttZoom` (kernel_size, threshold, zoom, fused).
    """
    spec = _lookup(backbone, BACKBONES, "backbone")
    _lookup(variant, VARIANTS, "variant")
    _lookup(position, POSITIONS, "position")
    _check_num_classes(num_classes)
    _check_layer_kwargs(**attzoom_kwargs)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, **dict(spec.kwargs))
    if cifar_stem:
        _use_cifar_stem(model, spec)
    if variant != "baseline":
        target, before = _insertion_point(spec, position)
        channels = 3 if position == "input" else _output_channels(model, target)
        _insert(model, target, make_variant(variant, channels, **attzoom_kwargs), before)
    return model


def make_variant(variant: str, channels: int, kernel_size: int = 3, threshold: float = 0.5,
                 zoom: int = 2, fused: bool = True) -> nn.Module:
    """The module a non-baseline variant inserts."""
    if variant == "attzoom":
        return AttZoom(channels, kernel_size, threshold, zoom, gate=True, fused=fused)
    if variant == "zoom-only":
        return AttZoom(channels, kernel_size, threshold, zoom, gate=False, fused=fused)
    if variant == "attention-only":
        return AttZoom(channels, kernel_size, threshold, zoom=1, gate=True, fused=fused)
    if variant == "resize2x":
        return nn.Upsample(scale_factor=zoom, mode="bilinear", align_corners=False)
    raise ValueError(f"variant {variant!r} inserts no module")


def find_attzoom(model: nn.Module) -> AttZoom | None:
    """The AttZoom layer of a model, if it has one (for attention maps and explanations)."""
    return next((m for m in model.modules() if isinstance(m, AttZoom)), None)


def _check_num_classes(num_classes) -> None:
    """0 or -1 built a model without a classifier head, "10" failed as a bare TypeError; True is an int to Python."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")


def _check_layer_kwargs(kernel_size: int = 3, threshold: float = 0.5, zoom: int = 2, fused: bool = True) -> None:
    """As fit checks them, whatever the variant: a sweep passes every key to every variant, and its values passed
    TrainConfig's same checks, so a baseline keeps taking a threshold it does not use, but not one fit refuses."""
    check_layer(kernel_size, threshold, zoom)


def _lookup(name: str, valid, what: str):
    if name not in valid:
        raise ValueError(f"unknown {what} {name!r}: choose one of {', '.join(valid)}")
    return valid[name] if isinstance(valid, dict) else name


def _insertion_point(spec: Backbone, position: str) -> tuple[str, bool]:
    """(module path, insert before it?) for a named position."""
    if position == "input":
        return spec.stem[0], True
    return (spec.stem[-1], False) if position == "stem" else (spec.stage1, False)


def _insert(model: nn.Module, path: str, layer: nn.Module, before: bool) -> None:
    parent, name = _parent(model, path)
    original = getattr(parent, name)
    setattr(parent, name, nn.Sequential(layer, original) if before else nn.Sequential(original, layer))


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, name = path.split(".")
    return model.get_submodule(".".join(parents)) if parents else model, name


def _output_channels(model: nn.Module, path: str) -> int:
    """Channels a module emits, found by a tiny forward pass rather than per-family rules."""
    seen = []
    hook = model.get_submodule(path).register_forward_hook(lambda m, i, out: seen.append(out.shape[1]))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 32, 32))
    finally:
        hook.remove()
        model.train(was_training)
    return seen[0]


def _use_cifar_stem(model: nn.Module, spec: Backbone) -> None:
    """3x3 stride-1 first conv and no stem pooling, keeping the stem's width."""
    parent, name = _parent(model, spec.stem[0])
    old = getattr(parent, name)
    setattr(parent, name, nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False))
    pool_parent, pool_name = _parent(model, spec.stem[-1])
    if isinstance(getattr(pool_parent, pool_name), (nn.MaxPool2d, nn.AvgPool2d)):
        setattr(pool_parent, pool_name, nn.Identity())
