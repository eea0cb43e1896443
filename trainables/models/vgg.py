"""VGG-16 with BatchNorm for 32x32 inputs, from torchvision's layer config ``cfgs["D"]``.

The 13 conv-BN-ReLU layers fall into 5 stages separated by max-pools. Group ``i`` is stage ``i``'s
convs, preceded by the previous stage's max-pool, so every tap is a full-resolution conv output
(64x32x32 ... 512x2x2) rather than a pooled map that ends at a useless 1x1 for the last group.
The last max-pool (2x2 -> 1x1) is ``final``, as in the standard CIFAR VGG; then ``fc`` 512->C
(the CIFAR variant's single linear layer, not ImageNet's 4096-wide classifier).
"""
from __future__ import annotations

from torch import nn
from torchvision.models import vgg as tv

from .base import TapModel


class VGG32x32(TapModel):
    def __init__(self, cfg: list, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]):
        layers = list(tv.make_layers(cfg, batch_norm=True))
        groups, current = [], []
        for layer in layers:
            if isinstance(layer, nn.MaxPool2d):
                groups.append(nn.Sequential(*current))
                current = [layer]  # this pool opens the next group
            else:
                current.append(layer)
        final = current[0]  # cfg ends with "M": the last pool is all that is left
        super().__init__(nn.Identity(), groups, final, nn.Linear(cfg[-2], num_classes), mean, std)
        # torchvision's VGG init (make_layers alone leaves PyTorch's defaults)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)


def vgg16_bn(num_classes, mean, std) -> TapModel:
    return VGG32x32(tv.cfgs["D"], num_classes, mean, std)
