"""The one model contract every architecture in the zoo follows.

A ``TapModel`` is ``normalize -> stem -> groups[0..G-1] -> final -> pool -> fc``:

* input is ``[0, 1]`` pixels, NCHW; normalisation is the first layer, so triggers and
  adversarial perturbations always live in pixel space;
* ``features(x)`` returns ``(group_outputs, logits)``: one tensor per layer group (the maps that
  NAD, ARGD, NBA and CheatKD read), and the logits;
* ``final`` is what sits between the last group and pooling (BN-ReLU for pre-activation nets,
  identity elsewhere); its output is the "last convolutional feature map" that Fine-Pruning
  ranks, reachable with a forward hook on ``model.final``;
* ``fc`` is the linear classifier and ``penultimate(x)`` its input (TrojanNN's units).

Callers never branch on the architecture: they use these names only.
"""
from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the model's first layer."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TapModel(nn.Module):
    """Base class: subclasses build ``stem``, ``groups``, ``final``, ``fc`` and call ``super``."""

    def __init__(self, stem: nn.Module, groups: list[nn.Module], final: nn.Module, fc: nn.Linear,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.stem = stem
        self.groups = nn.ModuleList(groups)
        self.final = final
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(outputs of every layer group, logits)`` for pixel input ``x`` in ``[0, 1]``."""
        out = self.stem(self.normalize(x))
        taps = []
        for group in self.groups:
            out = group(out)
            taps.append(out)
        logits = self.fc(torch.flatten(self.pool(self.final(out)), 1))
        return taps, logits

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector that ``fc`` reads."""
        out = self.stem(self.normalize(x))
        for group in self.groups:
            out = group(out)
        return torch.flatten(self.pool(self.final(out)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.penultimate(x))
