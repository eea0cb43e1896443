"""DenseNet-121 (Huang et al. 2017) for 32x32 inputs, from torchvision's ``DenseNet``.

Growth 32, blocks (6, 12, 24, 16), bottleneck 4, compression 0.5, as torchvision builds it.
32x32 adaptation: the 7x7 stride-2 conv0 becomes a 3x3 stride-1 conv and pool0 is dropped.
Group ``i`` is ``transition{i-1}`` (none for the first) followed by ``denseblock{i}``, so every
tap is a dense block's raw concatenated output at its full resolution: 256x32x32, 512x16x16,
1024x8x8, 1024x4x4. ``final`` is ``norm5`` + ReLU, as in torchvision's forward.
"""
from __future__ import annotations

from torch import nn
from torchvision.models import densenet as tv

from .base import TapModel


class DenseNet32x32(TapModel):
    def __init__(self, block_config: tuple[int, ...], num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...], growth_rate: int = 32):
        net = tv.DenseNet(growth_rate=growth_rate, block_config=block_config,
                          num_init_features=2 * growth_rate, num_classes=num_classes)
        f = net.features
        conv0 = nn.Conv2d(3, 2 * growth_rate, 3, 1, 1, bias=False)  # 32x32: no 7x7/2, no pool0
        nn.init.kaiming_normal_(conv0.weight)  # torchvision's init for its convs
        stem = nn.Sequential(conv0, f.norm0, f.relu0)
        groups = [f.denseblock1]
        for i in range(2, len(block_config) + 1):
            groups.append(nn.Sequential(getattr(f, f"transition{i - 1}"), getattr(f, f"denseblock{i}")))
        final = nn.Sequential(f.norm5, nn.ReLU(inplace=True))
        super().__init__(stem, groups, final, net.classifier, mean, std)


def densenet121(num_classes, mean, std) -> TapModel:
    return DenseNet32x32((6, 12, 24, 16), num_classes, mean, std)
