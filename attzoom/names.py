"""What a user can name: backbones, data sets, variants, positions.

Plain data with no torch import, so the command line and spec validation answer a typo
in a fraction of a second, before the heavy stack loads.
"""

from __future__ import annotations

from dataclasses import dataclass

DATASETS = ("cifar100", "tinyimagenet", "cluttered-digits")
VARIANTS = ("baseline", "attzoom", "zoom-only", "attention-only", "resize2x")
POSITIONS = ("input", "stem", "stage1")
# What fit reports for every epoch (besides "epoch"); the sweep's driver logs these to MLflow. The gate's two, on
# the validation set, only for variants with a gate: the share of positions (in %) where the gate is fully open
# (f(A) = 1, which passes no gradient to the attention conv) and the mean of sigmoid(A).
GATE_METRICS = ("gate_open", "gate_sigma")
METRICS = ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "epoch_time", "images_per_s", *GATE_METRICS)


@dataclass(frozen=True)
class Backbone:
    """How to build a backbone and where its stem ends and its first stage is."""

    timm_name: str
    stem: tuple[str, ...]  # stem modules in order: first is the input conv, last ends the stem
    stage1: str
    kwargs: tuple = ()


_RESNET_STEM = ("conv1", "maxpool")
BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone("resnet50", _RESNET_STEM, "layer1"),
    "densenet121": Backbone("densenet121", ("features.conv0", "features.pool0"), "features.denseblock1"),
    "mobilenetv1": Backbone("mobilenetv1_100", ("conv_stem", "bn1"), "blocks.0"),
    "seresnet50": Backbone("seresnet50", _RESNET_STEM, "layer1"),
    "cbam_resnet50": Backbone("resnet50", _RESNET_STEM, "layer1", (("block_args", {"attn_layer": "cbam"}),)),
    "resnext50": Backbone("resnext50_32x4d", _RESNET_STEM, "layer1"),
    # small ones for CPU work and the embedded demo
    "resnet18": Backbone("resnet18", _RESNET_STEM, "layer1"),
    # one BasicBlock per stage, narrow stages; timm's plain 7x7 stem stays 64 wide
    "tiny_resnet": Backbone("resnet18", _RESNET_STEM, "layer1", (
        ("layers", (1, 1, 1, 1)), ("channels", (16, 32, 64, 128)))),
}
