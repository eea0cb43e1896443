"""Pre-activation ResNet-18 (He et al. 2016, "Identity mappings") for 32x32 inputs.

``PreActBlock`` is also WideResNet's block (``wrn.py``): BN-ReLU-conv3x3-BN-ReLU-conv3x3, with a
1x1 conv shortcut on ``relu(bn1(x))`` when the shape changes and the raw ``x`` otherwise.
Group outputs are the raw stage outputs; the network's last BN-ReLU is ``final``.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import TapModel


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)  # in place on fresh BN outputs only, never on x
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        # the projection reads the pre-activated input; the identity path reads raw x
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + shortcut


def preact_stage(in_planes: int, planes: int, blocks: int, stride: int,
                 drop_rate: float = 0.0) -> nn.Sequential:
    """``blocks`` pre-activation blocks; only the first one changes width/resolution."""
    layers = [PreActBlock(in_planes, planes, stride, drop_rate)]
    layers += [PreActBlock(planes, planes, 1, drop_rate) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class PreActResNet(TapModel):
    """3x3 stem (no BN: the first block pre-activates), 4 stages of 64/128/256/512."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        stem = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
        groups, in_planes = [], 64
        for planes, n, stride in zip(widths, blocks, strides):
            groups.append(preact_stage(in_planes, planes, n, stride))
            in_planes = planes
        final = nn.Sequential(nn.BatchNorm2d(512), nn.ReLU(inplace=True))
        super().__init__(stem, groups, final, nn.Linear(512, num_classes), mean, std)


def preact_resnet18(num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]) -> TapModel:
    return PreActResNet((2, 2, 2, 2), num_classes, mean, std)
