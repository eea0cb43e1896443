"""ResNets for 32x32 inputs, built from torchvision's ``BasicBlock``/``Bottleneck``.

* CIFAR ResNet-20/32/56 (He et al. 2016, Sec. 4.2): 3x3 conv 3->16 + BN-ReLU, three groups of
  ``(depth-2)/6`` basic blocks of 16/32/64 channels (strides 1, 2, 2). Shortcuts are the paper's
  option A (parameter-free: subsample and zero-pad channels), so ResNet-20 has the paper's 0.27M.
* ResNet-18/34/50: torchvision's ImageNet ResNet with the 7x7 stride-2 stem and max-pool replaced
  by one 3x3 stride-1 conv (the usual CIFAR adaptation); four groups = ``layer1..4``.

Post-activation nets: each group already ends in ReLU, so ``final`` is the identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv

from .base import TapModel


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling plus zero channels, no parameters."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class CifarResNet(TapModel):
    def __init__(self, depth: int, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]):
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet needs depth = 6n+2 (n >= 1), got {depth}")
        n = (depth - 2) // 6
        stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        groups, in_planes = [], 16
        for planes, stride in zip((16, 32, 64), (1, 2, 2)):
            down = PadShortcut(planes - in_planes) if stride != 1 else None
            blocks = [tv.BasicBlock(in_planes, planes, stride, down)]
            blocks += [tv.BasicBlock(planes, planes) for _ in range(n - 1)]
            groups.append(nn.Sequential(*blocks))
            in_planes = planes
        super().__init__(stem, groups, nn.Identity(), nn.Linear(64, num_classes), mean, std)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class ResNet32x32(TapModel):
    """torchvision's ResNet (its blocks, widths and init) with a 32x32 stem."""

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        net = tv.ResNet(block, layers, num_classes=num_classes)
        conv = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # replaces 7x7/2 conv + max-pool: keep 32x32
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        stem = nn.Sequential(conv, net.bn1, net.relu)
        groups = [net.layer1, net.layer2, net.layer3, net.layer4]
        super().__init__(stem, groups, nn.Identity(), net.fc, mean, std)


def resnet20(num_classes, mean, std) -> TapModel:
    return CifarResNet(20, num_classes, mean, std)


def resnet32(num_classes, mean, std) -> TapModel:
    return CifarResNet(32, num_classes, mean, std)


def resnet56(num_classes, mean, std) -> TapModel:
    return CifarResNet(56, num_classes, mean, std)


def resnet18(num_classes, mean, std) -> TapModel:
    return ResNet32x32(tv.BasicBlock, [2, 2, 2, 2], num_classes, mean, std)


def resnet34(num_classes, mean, std) -> TapModel:
    return ResNet32x32(tv.BasicBlock, [3, 4, 6, 3], num_classes, mean, std)


def resnet50(num_classes, mean, std) -> TapModel:
    return ResNet32x32(tv.Bottleneck, [3, 4, 6, 3], num_classes, mean, std)
