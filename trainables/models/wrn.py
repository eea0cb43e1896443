"""WideResNet-depth-width (Zagoruyko & Komodakis 2016) in NAD's layout, the default victim.

conv3x3 3->16, then three groups of ``(depth-4)/6`` pre-activation basic blocks of widths
16k, 32k, 64k (strides 1, 2, 2), then BN-ReLU (``final``), global average pool, linear.
The group outputs are the raw block-group outputs, before the final BN-ReLU, exactly where NAD's
code reads ``activation1..3``. WRN-16-1 has about 0.175M parameters for 10 classes.
"""
from __future__ import annotations

from torch import nn

from .base import TapModel
from .preact import preact_stage


class WideResNet(TapModel):
    def __init__(self, depth: int, width: int, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...], drop_rate: float = 0.0):
        if depth < 10 or (depth - 4) % 6 != 0 or width < 1:
            raise ValueError(f"WideResNet needs depth = 6n+4 (n >= 1) and width >= 1, got {depth}-{width}")
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        groups, in_planes = [], 16
        for planes, stride in zip(widths, (1, 2, 2)):
            groups.append(preact_stage(in_planes, planes, n, stride, drop_rate))
            in_planes = planes
        final = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True))
        super().__init__(stem, groups, final, nn.Linear(in_planes, num_classes), mean, std)
        self.depth, self.width = depth, width
        # the WRN reference init: He-normal over fan_out, BN identity, zero linear bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
