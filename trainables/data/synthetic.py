"""A generated 32x32 RGB 10-class dataset with real, learnable structure (no download needed).

Each class is a shape family drawn with a random position, scale (radius 6-10 px) and rotation,
anti-aliased edges, on a coloured background with a brightness gradient and pixel noise; half of
the images also get a small blurred distractor blob. Each class has a colour tendency (its
foreground hue is near a class hue half of the time, uniform otherwise), so colour alone helps but
does not solve the task: shape must be learnt.

Classes: ``circle, square, triangle, cross, ring, frame, star, crescent, bar, dots``.

Built to stay clear of the triggers the attacks paste: every pixel is clipped to
``[8, 235]`` (no pure white, no pure black), shapes stay inside rows/cols 1-28 (the
bottom-right 3x3 corner is background: gradient plus noise), and there are no periodic
patterns (no stripes or checkers).

Generation is vectorised torch, deterministic for a given (seed, n_train, n_test): the train and
test splits come from separate generators, so the test set does not depend on ``n_train``. The
default 3,000 / 1,000 images take well under a second. Labels are balanced (``n // 10`` per
class, the remainder spread over the first classes) and shuffled.
"""
from __future__ import annotations

import math

import torch

from ._images import mean_std
from .base import DataError, Dataset, ImageSet

CLASSES = ("circle", "square", "triangle", "cross", "ring", "frame", "star", "crescent", "bar", "dots")
DEFAULT_TRAIN = 3000
DEFAULT_TEST = 1000
SIZE = 32
_CHUNK = 4096
_LOW, _HIGH = 8 / 255, 235 / 255


def _sdf(c: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of shape ``c`` in units of the shape's scale."""
    r = torch.sqrt(u * u + v * v)
    if c == 0:  # circle
        return r - 1.0
    if c == 1:  # square
        return torch.maximum(u.abs(), v.abs()) - 0.85
    if c == 2:  # equilateral triangle, circumradius 1
        d = None
        for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):
            h = u * math.cos(a) + v * math.sin(a) - 0.5
            d = h if d is None else torch.maximum(d, h)
        return d
    if c == 3:  # cross
        arm1 = torch.maximum(u.abs() - 1.0, v.abs() - 0.3)
        arm2 = torch.maximum(u.abs() - 0.3, v.abs() - 1.0)
        return torch.minimum(arm1, arm2)
    if c == 4:  # ring
        return (r - 0.75).abs() - 0.22
    if c == 5:  # square frame
        return (torch.maximum(u.abs(), v.abs()) - 0.72).abs() - 0.18
    if c == 6:  # five-pointed star
        return r - (0.68 + 0.32 * torch.cos(5 * torch.atan2(v, u)))
    if c == 7:  # crescent
        return torch.maximum(r - 1.0, 0.8 - torch.sqrt((u - 0.5) ** 2 + v * v))
    if c == 8:  # bar
        return torch.maximum(u.abs() - 1.05, v.abs() - 0.28)
    if c == 9:  # three dots
        d = None
        for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            h = torch.sqrt((u - 0.62 * math.cos(a)) ** 2 + (v - 0.62 * math.sin(a)) ** 2) - 0.36
            d = h if d is None else torch.minimum(d, h)
        return d
    raise ValueError(c)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N,) hue/saturation/value in [0, 1] -> (N, 3) RGB."""
    h = (h % 1.0) * 6.0
    k = torch.tensor([5.0, 3.0, 1.0]).view(1, 3)
    t = (k + h.view(-1, 1)) % 6.0
    return v.view(-1, 1) - v.view(-1, 1) * s.view(-1, 1) * torch.clamp(torch.minimum(t, 4.0 - t), 0.0, 1.0)


def _balanced_labels(n: int, g: torch.Generator) -> torch.Tensor:
    y = torch.arange(n, dtype=torch.int64) % len(CLASSES)
    return y[torch.randperm(n, generator=g)]


def _generate(n: int, g: torch.Generator) -> ImageSet:
    k = len(CLASSES)
    y = _balanced_labels(n, g)

    def U(lo: float, hi: float, size=(n,)) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(size, generator=g)

    # Geometry: the shape (extent <= 1.1 scale) stays inside [1, 28] in both axes.
    scale = U(7.0, 10.5)
    lo, hi = 1.1 * scale + 1.0, 28.0 - 1.1 * scale
    cx = lo + (hi - lo) * torch.rand(n, generator=g)
    cy = lo + (hi - lo) * torch.rand(n, generator=g)
    angle = U(0.0, 2 * math.pi)

    # Colours: foreground hue near the class hue 70% of the time; background contrasting in value.
    class_hue = (y.float() + 0.5) / k
    hue = torch.where(torch.rand(n, generator=g) < 0.6, class_hue + 0.06 * torch.randn(n, generator=g), torch.rand(n, generator=g))
    fg_v = U(0.45, 0.9)
    fg = _hsv_to_rgb(hue, U(0.45, 1.0), fg_v)
    bg_v = U(0.1, 0.85)
    close = (bg_v - fg_v).abs() < 0.3
    bg_v = torch.where(close, torch.where(fg_v > 0.55, fg_v - 0.35, fg_v + 0.3), bg_v).clamp(0.08, 0.88)
    bg = _hsv_to_rgb(torch.rand(n, generator=g), U(0.0, 0.7), bg_v)
    grad_amp, grad_dir = U(0.0, 0.15), U(0.0, 2 * math.pi)
    bg_noise, fg_noise = U(0.01, 0.04), U(0.0, 0.05)

    # Distractor: a small blurred blob of a random colour in half of the images.
    has_blob = (torch.rand(n, generator=g) < 0.5).float()
    blob_x, blob_y, blob_r = U(3.0, 26.0), U(3.0, 26.0), U(1.2, 2.5)
    blob_rgb = _hsv_to_rgb(torch.rand(n, generator=g), U(0.3, 1.0), U(0.2, 0.85))

    coords = torch.arange(SIZE, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (32, 32)
    x = torch.empty((n, 3, SIZE, SIZE), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        m = sl.stop - sl.start
        col = lambda t: t[sl].view(m, 1, 1)  # noqa: E731
        dx, dy = xx - col(cx), yy - col(cy)
        cos, sin = torch.cos(col(angle)), torch.sin(col(angle))
        u = (dx * cos + dy * sin) / col(scale)
        v = (-dx * sin + dy * cos) / col(scale)
        d = torch.empty_like(u)
        yc = y[sl]
        for c in range(k):
            idx = (yc == c).nonzero(as_tuple=True)[0]
            if len(idx):
                d[idx] = _sdf(c, u[idx], v[idx])
        alpha = torch.sigmoid(-d * col(scale) / 0.5).unsqueeze(1)  # anti-aliased edge, ~1 px wide

        ramp = ((xx - 16) * torch.cos(col(grad_dir)) + (yy - 16) * torch.sin(col(grad_dir))) / 16 * col(grad_amp)
        back = bg[sl].view(m, 3, 1, 1) + ramp.unsqueeze(1)
        back = back + bg_noise[sl].view(m, 1, 1, 1) * torch.randn((m, 3, SIZE, SIZE), generator=g)
        front = fg[sl].view(m, 3, 1, 1) * (1 + fg_noise[sl].view(m, 1, 1, 1) * torch.randn((m, 1, SIZE, SIZE), generator=g))
        img = back * (1 - alpha) + front * alpha

        blob = torch.exp(-((xx - col(blob_x)) ** 2 + (yy - col(blob_y)) ** 2) / (2 * col(blob_r) ** 2))
        blob = (0.7 * blob * col(has_blob)).unsqueeze(1)
        img = img * (1 - blob) + blob_rgb[sl].view(m, 3, 1, 1) * blob

        x[sl] = (img.clamp(_LOW, _HIGH) * 255).round().to(torch.uint8)
    return ImageSet(x, y)


def load_synthetic(n_train: int = DEFAULT_TRAIN, n_test: int = DEFAULT_TEST, *, seed: int = 0) -> Dataset:
    """The generated shapes dataset; the same (n_train, n_test, seed) always gives the same tensors."""
    for what, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < len(CLASSES):
            raise DataError(f"synthetic dataset: {what} must be an integer >= {len(CLASSES)}, got {n!r}")
    seed = int(seed)
    train = _generate(n_train, torch.Generator().manual_seed(seed * 2 + 0x5EED0))
    test = _generate(n_test, torch.Generator().manual_seed(seed * 2 + 0x5EED1))
    mean, std = mean_std(train.x)
    name = "synthetic" if (n_train, n_test) == (DEFAULT_TRAIN, DEFAULT_TEST) else f"synthetic:{n_train}:{n_test}"
    return Dataset(name=name, train=train, test=test, classes=CLASSES, mean=mean, std=std)
