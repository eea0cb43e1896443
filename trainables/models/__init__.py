"""The model zoo: every architecture is a ``TapModel`` (see ``base.py``) for 32x32 inputs.

``build_model(name, num_classes, mean, std)`` builds one by name; ``list_models()`` names them;
``model_summary(name)`` describes one in a line. Besides the registered names, any
``wrn-<depth>-<width>`` with ``(depth - 4) % 6 == 0`` is accepted.

Layer-group outputs (the taps ``features(x)`` returns) for a 32x32 input, C x H x W; the tests
check every model against this table:

=================  ==========================================================  ========================
name               taps (C x H x W)                                            params (10 classes)
=================  ==========================================================  ========================
wrn-16-1           16x32x32, 32x16x16, 64x8x8                                  0.175M (default victim)
wrn-16-2           32x32x32, 64x16x16, 128x8x8                                 0.69M
wrn-16-4           64x32x32, 128x16x16, 256x8x8                                2.75M
wrn-28-2           32x32x32, 64x16x16, 128x8x8                                 1.47M
wrn-28-4           64x32x32, 128x16x16, 256x8x8                                5.85M
wrn-40-2           32x32x32, 64x16x16, 128x8x8                                 2.24M
preact-resnet18    64x32x32, 128x16x16, 256x8x8, 512x4x4                       11.17M
resnet20           16x32x32, 32x16x16, 64x8x8                                  0.27M
resnet32           16x32x32, 32x16x16, 64x8x8                                  0.46M
resnet56           16x32x32, 32x16x16, 64x8x8                                  0.85M
resnet18           64x32x32, 128x16x16, 256x8x8, 512x4x4                       11.17M
resnet34           64x32x32, 128x16x16, 256x8x8, 512x4x4                       21.28M
resnet50           256x32x32, 512x16x16, 1024x8x8, 2048x4x4                    23.52M
vgg16-bn           64x32x32, 128x16x16, 256x8x8, 512x4x4, 512x2x2              14.73M
mobilenetv2        24x32x32, 32x16x16, 96x8x8, 320x4x4                         2.24M
densenet121        256x32x32, 512x16x16, 1024x8x8, 1024x4x4                    6.96M
=================  ==========================================================  ========================

``wrn-<d>-<k>`` in general: 16k x 32 x 32, 32k x 16 x 16, 64k x 8 x 8. What ``final`` is (the map
Fine-Pruning ranks): BN-ReLU for the pre-activation nets (WRN, PreAct-ResNet) and ``norm5``-ReLU
for DenseNet; the last max-pool for VGG; the 1x1 conv to 1280 channels for MobileNetV2; the
identity for the (post-activation) ResNets.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Callable

import torch

from .base import Normalize, TapModel
from .densenet import densenet121
from .mobilenet import mobilenetv2
from .preact import preact_resnet18
from .resnet import resnet18, resnet20, resnet32, resnet34, resnet50, resnet56
from .vgg import vgg16_bn
from .wrn import WideResNet

__all__ = ["MODELS", "DESCRIPTIONS", "DEFAULT_MODEL", "TapModel", "Normalize",
           "build_model", "list_models", "model_summary"]

Builder = Callable[[int, tuple, tuple], TapModel]


def _wrn(depth: int, width: int) -> Builder:
    return partial(WideResNet, depth, width)


DEFAULT_MODEL = "wrn-16-1"

# name -> builder(num_classes, mean, std)
MODELS: dict[str, Builder] = {
    "wrn-16-1": _wrn(16, 1),
    "wrn-16-2": _wrn(16, 2),
    "wrn-16-4": _wrn(16, 4),
    "wrn-28-2": _wrn(28, 2),
    "wrn-28-4": _wrn(28, 4),
    "wrn-40-2": _wrn(40, 2),
    "preact-resnet18": preact_resnet18,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg16-bn": vgg16_bn,
    "mobilenetv2": mobilenetv2,
    "densenet121": densenet121,
}

# name -> what it is, for ``model_summary`` (the CLI's ``list``)
DESCRIPTIONS: dict[str, str] = {
    "wrn-16-1": "WideResNet-16-1, NAD's layout (the default victim)",
    "wrn-16-2": "WideResNet-16-2",
    "wrn-16-4": "WideResNet-16-4",
    "wrn-28-2": "WideResNet-28-2",
    "wrn-28-4": "WideResNet-28-4",
    "wrn-40-2": "WideResNet-40-2",
    "preact-resnet18": "pre-activation ResNet-18",
    "resnet20": "CIFAR ResNet-20 (He et al. 2016, option-A shortcuts)",
    "resnet32": "CIFAR ResNet-32 (He et al. 2016, option-A shortcuts)",
    "resnet56": "CIFAR ResNet-56 (He et al. 2016, option-A shortcuts)",
    "resnet18": "ResNet-18, torchvision blocks, 3x3 stride-1 stem",
    "resnet34": "ResNet-34, torchvision blocks, 3x3 stride-1 stem",
    "resnet50": "ResNet-50, torchvision bottlenecks, 3x3 stride-1 stem",
    "vgg16-bn": "VGG-16 with BatchNorm, linear 512->C classifier",
    "mobilenetv2": "MobileNetV2, stem and second stage at stride 1",
    "densenet121": "DenseNet-121 (growth 32), 3x3 stride-1 stem, no pool",
}

_WRN_NAME = re.compile(r"wrn-(\d+)-(\d+)")


def list_models() -> list[str]:
    """The registered names (any valid ``wrn-<depth>-<width>`` is accepted as well)."""
    return list(MODELS)


def _lookup(name: str) -> tuple[Builder, str]:
    key = name.strip().lower()
    if key in MODELS:
        return MODELS[key], DESCRIPTIONS[key]
    match = _WRN_NAME.fullmatch(key)
    if match:
        depth, width = int(match.group(1)), int(match.group(2))
        if depth >= 10 and (depth - 4) % 6 == 0 and width >= 1:
            return _wrn(depth, width), f"WideResNet-{depth}-{width}"
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)} "
                     "(or any wrn-<depth>-<width> with (depth - 4) % 6 == 0)")


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` naming the known models if ``name`` is not one (nothing is built)."""
    _lookup(name)


def build_model(name: str, num_classes: int, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> TapModel:
    """A freshly initialised model; ``mean``/``std`` are the dataset's, applied as its first layer."""
    builder, _ = _lookup(name)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return builder(int(num_classes), tuple(mean), tuple(std))


def model_summary(name: str, num_classes: int = 10) -> str:
    """One line: name, description, parameter count and tap shapes for a 32x32 input."""
    builder, description = _lookup(name)
    with torch.device("meta"):  # shapes and sizes only: no memory, no compute
        model = builder(num_classes, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        taps, _ = model.features(torch.zeros(1, 3, 32, 32))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    shapes = ", ".join("x".join(str(s) for s in t.shape[1:]) for t in taps)
    return f"{name.strip().lower()}: {description}; {params:.2f}M params; taps {shapes}"
