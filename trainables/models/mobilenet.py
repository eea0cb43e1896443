"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs, from torchvision's ``MobileNetV2``.

The usual CIFAR tweak: the stem conv and the second stage (24 channels) use stride 1 instead of 2,
so the net downsamples 32 -> 16 -> 8 -> 4 (three times, like ResNet-18) instead of five times.
torchvision's ``features[1:18]`` are the 17 inverted-residual blocks; the groups split them at the
resolution changes, giving four taps like the 32x32 ResNets:

* group 1: stages t1-c16 and t6-c24 (``features[1:4]``)  -> 24x32x32
* group 2: stage c32 (``features[4:7]``)                 -> 32x16x16
* group 3: stages c64 and c96 (``features[7:14]``)       -> 96x8x8
* group 4: stages c160 and c320 (``features[14:18]``)    -> 320x4x4

``final`` is the 1x1 conv-BN-ReLU6 expansion to 1280 channels (the head, kept out of the taps so
Gram/FSP matrices stay 320-wide); ``fc`` is 1280->C. The 0.2 dropout before the classifier is
dropped, as in the common CIFAR versions, because ``fc`` must read ``penultimate`` directly.
"""
from __future__ import annotations

from torchvision.models import mobilenetv2 as tv

from .base import TapModel

# t (expansion), c (channels), n (blocks), s (stride of the first block): torchvision's table
# with the second stage's stride 2 -> 1 for 32x32 inputs
CIFAR_SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2],
                 [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


class MobileNetV2(TapModel):
    def __init__(self, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]):
        net = tv.MobileNetV2(num_classes=num_classes, inverted_residual_setting=CIFAR_SETTING)
        f = net.features
        f[0][0].stride = (1, 1)  # stem conv: stride 2 -> 1, weights and init unchanged
        groups = [f[1:4], f[4:7], f[7:14], f[14:18]]
        super().__init__(f[0], groups, f[18], net.classifier[1], mean, std)


def mobilenetv2(num_classes, mean, std) -> TapModel:
    return MobileNetV2(num_classes, mean, std)
