"""build_model: every backbone x variant x position, parameter counts, the CIFAR stem, errors."""

import math
import re

import pytest
import torch
from torch import nn

from attzoom.config import ConfigError, TrainConfig
from attzoom.layer import AttZoom
from attzoom.models import BACKBONES, POSITIONS, VARIANTS, build_model, find_attzoom

RESNETS = ("resnet50", "seresnet50", "cbam_resnet50", "resnext50", "resnet18", "tiny_resnet")

# (stem output channels, stage-1 output channels), from the architectures' definitions
CHANNELS = {
    "resnet50": (64, 256), "seresnet50": (64, 256), "cbam_resnet50": (64, 256), "resnext50": (64, 256),
    "resnet18": (64, 64), "densenet121": (64, 256), "mobilenetv1": (32, 64),
    "tiny_resnet": (64, 16),  # timm applies stem_width only to 'deep' stems; its plain stem is 64 wide
}

# the module that runs right after each insertion point ("input" inserts before the first conv)
AFTER = {
    **{b: {"input": "conv1", "stem": "layer1", "stage1": "layer2"} for b in RESNETS},
    "densenet121": {"input": "features.conv0", "stem": "features.denseblock1", "stage1": "features.transition1"},
    "mobilenetv1": {"input": "conv_stem", "stem": "blocks.0", "stage1": "blocks.1"},
}

# millions of parameters at 1000 classes, as published for each architecture
PUBLISHED = {"resnet50": 25.56, "densenet121": 7.98, "mobilenetv1": 4.23, "seresnet50": 28.09,
             "cbam_resnet50": 28.09, "resnext50": 25.03}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batch-2 convolutions gain nothing from threads, and oversubscribed cores lose a lot."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def input_size_at(model: nn.Module, path: str, size: int, inserted_before: bool = False) -> tuple[int, int]:
    """Spatial size of the input the module at ``path`` sees for a ``size`` px image."""
    module = model.get_submodule(path)
    if inserted_before:  # Sequential(inserted, original)
        module = module[1]
    seen = []
    hook = module.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_forward_backward_every_backbone_and_variant(backbone, variant):
    torch.manual_seed(0)
    model = build_model(backbone, 10, variant).train()
    for size in (32, 64):
        model.zero_grad()
        out = model(torch.randn(2, 3, size, size))
        assert out.shape == (2, 10)
        assert torch.isfinite(out).all()
        out.logsumexp(1).sum().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads)
        assert all(torch.isfinite(g).all() for g in grads)
    layer = find_attzoom(model)
    if variant == "baseline" or variant == "resize2x":
        assert layer is None
    else:
        assert layer.enhance.weight.grad.abs().sum() > 0
        if variant != "zoom-only":
            assert layer.attention.weight.grad is not None


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_position_gets_the_right_channels_and_doubles_the_size(backbone, position):
    torch.manual_seed(0)
    model = build_model(backbone, 10, "attzoom", position=position)
    layer = find_attzoom(model)
    expected = {"input": 3, "stem": CHANNELS[backbone][0], "stage1": CHANNELS[backbone][1]}[position]
    assert layer.enhance.in_channels == layer.enhance.out_channels == expected
    assert layer.attention.in_channels == expected

    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, out.shape)))
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 32, 32))
    hook.remove()
    assert out.shape == (1, 10)
    (n, c, h, w), out_shape = seen[0]
    assert c == expected
    assert tuple(out_shape) == (n, c, 2 * h, 2 * w)

    path, before = AFTER[backbone][position], position == "input"
    baseline = build_model(backbone, 10)
    base_h, base_w = input_size_at(baseline, path, 32)
    assert input_size_at(model, path, 32, inserted_before=before) == (2 * base_h, 2 * base_w)


@pytest.mark.parametrize("backbone", list(PUBLISHED))
def test_parameter_counts_match_published(backbone):
    count = n_params(build_model(backbone, 1000)) / 1e6
    assert count == pytest.approx(PUBLISHED[backbone], rel=0.01)


def _layer_params(c, k, gate=True):
    return (c * k * k + 1 if gate else 0) + c * c * k * k + c


@pytest.mark.parametrize("backbone, position, kernel_size", [
    ("resnet50", "stem", 3), ("densenet121", "stem", 3), ("mobilenetv1", "stem", 3),
    ("tiny_resnet", "stem", 3), ("tiny_resnet", "stage1", 5), ("tiny_resnet", "input", 5),
    ("mobilenetv1", "stage1", 5),
])
def test_variants_add_exactly_their_layer_parameters(backbone, position, kernel_size):
    c = {"input": 3, "stem": CHANNELS[backbone][0], "stage1": CHANNELS[backbone][1]}[position]
    base = n_params(build_model(backbone, 10))

    def extra(variant):
        return n_params(build_model(backbone, 10, variant, position, kernel_size=kernel_size)) - base

    assert extra("attzoom") == _layer_params(c, kernel_size)
    assert extra("attention-only") == _layer_params(c, kernel_size)
    assert extra("zoom-only") == _layer_params(c, kernel_size, gate=False)
    assert extra("resize2x") == 0


@pytest.mark.parametrize("backbone", ["tiny_resnet", "mobilenetv1", "densenet121"])
def test_spatial_size_after_insertion_per_variant(backbone):
    path = AFTER[backbone]["stem"]
    base = input_size_at(build_model(backbone, 10), path, 32)
    doubled = (2 * base[0], 2 * base[1])
    for variant, expected in [("attzoom", doubled), ("zoom-only", doubled), ("resize2x", doubled),
                              ("attention-only", base)]:
        assert input_size_at(build_model(backbone, 10, variant), path, 32) == expected, variant
    layer = find_attzoom(build_model(backbone, 10, "attention-only"))
    assert layer.zoom == 1 and layer.attention is not None
    assert find_attzoom(build_model(backbone, 10, "zoom-only")).attention is None
    resize = build_model(backbone, 10, "resize2x")
    assert any(isinstance(m, nn.Upsample) and m.scale_factor == 2 for m in resize.modules())


def test_zoom_kwarg_sets_the_scale():
    model = build_model("tiny_resnet", 10, "attzoom", zoom=3)
    base = input_size_at(build_model("tiny_resnet", 10), "layer1", 32)
    assert input_size_at(model, "layer1", 32) == (3 * base[0], 3 * base[1])


FIRST_CONV = {**{b: "conv1" for b in RESNETS}, "densenet121": "features.conv0", "mobilenetv1": "conv_stem"}
POOL = {**{b: "maxpool" for b in RESNETS}, "densenet121": "features.pool0"}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_cifar_stem(backbone):
    torch.manual_seed(0)
    imagenet = build_model(backbone, 10)
    cifar = build_model(backbone, 10, cifar_stem=True)
    old, conv = imagenet.get_submodule(FIRST_CONV[backbone]), cifar.get_submodule(FIRST_CONV[backbone])
    assert isinstance(conv, nn.Conv2d)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert (conv.in_channels, conv.out_channels) == (3, old.out_channels)
    if backbone in POOL:
        assert isinstance(imagenet.get_submodule(POOL[backbone]), nn.MaxPool2d)
        assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        small = imagenet.eval().forward_features(x).shape[-2:]
        large = cifar.eval().forward_features(x).shape[-2:]
        assert cifar(x).shape == (1, 10)
    assert large[0] > small[0] and large[1] > small[1]


@pytest.mark.parametrize("position", POSITIONS)
def test_cifar_stem_with_attzoom(position):
    model = build_model("tiny_resnet", 10, "attzoom", position, cifar_stem=True)
    layer = find_attzoom(model)
    assert layer.enhance.in_channels == {"input": 3, "stem": 64, "stage1": 16}[position]
    first = model.conv1[1] if position == "input" else model.conv1
    assert first.stride == (1, 1) and first.kernel_size == (3, 3)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("kwargs, what, valid", [
    ({"backbone": "resnet51"}, "backbone", list(BACKBONES)),
    ({"variant": "attzoom2"}, "variant", list(VARIANTS)),
    ({"position": "stage9"}, "position", list(POSITIONS)),
])
def test_unknown_names_raise_listing_valid_ones(kwargs, what, valid):
    args = {"backbone": "tiny_resnet", "num_classes": 10, "variant": "attzoom", "position": "stem", **kwargs}
    with pytest.raises(ValueError) as info:
        build_model(**args)
    message = str(info.value)
    assert what in message and repr(next(iter(kwargs.values()))) in message
    for name in valid:
        assert name in message


@pytest.mark.parametrize("variant", ["attzoom", "attention-only", "baseline"])
@pytest.mark.parametrize("kwargs", [{"threshold": 2.0}, {"threshold": -0.1}, {"threshold": math.nan},
                                    {"threshold": "0.5"}, {"kernel_size": 4}, {"kernel_size": 3.0}, {"zoom": 0}])
def test_layer_arguments_are_refused_as_fit_refuses_them_whatever_the_variant(variant, kwargs):
    """build_model took threshold=2.0 that fit refuses; a sweep passes every key to every variant, but each value
    already passed TrainConfig's checks there, so only values fit refuses are refused here."""
    with pytest.raises(ConfigError) as from_fit:
        TrainConfig(variant=variant, **kwargs).validate()
    with pytest.raises(ConfigError) as from_python:
        build_model("tiny_resnet", 10, variant=variant, **kwargs)
    assert str(from_python.value) == str(from_fit.value)


def test_a_baseline_takes_the_layer_arguments_it_does_not_use():
    """A sweep's configs pass every key to every variant."""
    assert find_attzoom(build_model("tiny_resnet", 10, variant="baseline", threshold=0.3, zoom=3)) is None


@pytest.mark.parametrize("num_classes", [0, -1, "10", 10.0, True, None])
def test_num_classes_must_be_a_positive_integer(num_classes):
    # 0 and -1 built a model without a classifier head (output [1, 128]); "10" failed as a bare TypeError
    with pytest.raises(ValueError, match=re.escape(f"num_classes must be an integer >= 1, got {num_classes!r}")):
        build_model("tiny_resnet", num_classes)


def test_find_attzoom_and_kwargs_pass_through():
    model = build_model("tiny_resnet", 10, "attzoom", "stage1", kernel_size=5, threshold=0.3, zoom=3, fused=False)
    layer = find_attzoom(model)
    assert isinstance(layer, AttZoom)
    assert any(m is layer for m in model.modules())
    assert (layer.kernel_size, layer.threshold, layer.zoom, layer.fused) == (5, 0.3, 3, False)
    assert layer is model.layer1[1]  # inserted after stage 1, inside the model
    assert find_attzoom(build_model("tiny_resnet", 10)) is None
    assert find_attzoom(build_model("tiny_resnet", 10, "resize2x")) is None


def test_tiny_resnet_is_small_enough_for_cpu_work():
    model = build_model("tiny_resnet", 10)
    assert [len(model.get_submodule(f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert model.layer4[0].conv2.out_channels == 128
    assert sum(p.numel() for p in model.parameters()) < 500_000
