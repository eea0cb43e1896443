"""Device-resident batching and augmentation: no DataLoader, no per-sample Python.

The whole uint8 split lives on the device; each batch is gathered by index, augmented there
(random crop with 4-pixel zero padding + horizontal flip, the standard CIFAR recipe) and only
then converted to float ``[0, 1]``.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-padded crop and horizontal flip of a whole batch (any dtype, NCHW)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    rows = oy[:, None] + torch.arange(h, device=dev)[None]                       # n×h
    cols = ox[:, None] + torch.arange(w, device=dev)[None]                       # n×w
    cols = torch.where(flip[:, None], cols.flip(1), cols)                        # flip = reversed columns
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def to_float(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in ``[0, 1]``."""
    return x_u8.float().div_(255.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float ``[0, 1]`` pixels -> uint8 (rounded, clipped): how poisoned images are stored."""
    return x.clamp(0, 1).mul(255.0).round_().to(torch.uint8)


def batches(x_u8: torch.Tensor, y: torch.Tensor, batch_size: int, *, generator: torch.Generator | None = None,
            shuffle: bool = False, augment: bool = False, drop_last: bool = False,
            order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(x_float, y, index)`` batches from device-resident uint8 images.

    ``shuffle`` and ``augment`` need a ``generator`` on the same device (reproducibility).
    ``order`` (without ``shuffle``): the row order to read, instead of the stored one.
    """
    n = x_u8.shape[0]
    if shuffle:
        order = torch.randperm(n, device=x_u8.device, generator=generator)
    elif order is None:
        order = torch.arange(n, device=x_u8.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        xb = x_u8[idx]
        if augment:
            xb = random_crop_flip(xb, generator)
        yield to_float(xb), y[idx], idx
