"""The in-memory form of every dataset: uint8 NCHW tensors plus labels.

Everything downstream (attacks, the engine, defenses) works on this one container. Images stay
uint8 until the engine moves a batch to the device and scales it to ``[0, 1]``, so a 50,000-image
training set costs 150 MB, fits on any device, and poisoned copies are cheap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class DataError(RuntimeError):
    """A dataset is missing, corrupt or malformed; the message says what and where."""


@dataclass(frozen=True)
class ImageSet:
    """One split: ``x`` uint8 (N, 3, H, W), ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise DataError(f"images must be uint8 NCHW, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise DataError(f"labels must be int64 of shape ({self.x.shape[0]},), got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.x[index], self.y[index])


@dataclass(frozen=True)
class Dataset:
    """A named dataset: train and test splits, class names, normalisation statistics."""

    name: str
    train: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])
