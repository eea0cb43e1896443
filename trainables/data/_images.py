"""Image helpers shared by the loaders: fast decoding of many small files, resizing, statistics."""
from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from .base import DataError

IMAGE_SIZE = 32
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_JPEG = (".jpg", ".jpeg")
_TORCHVISION_FORMATS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
_CHUNK = 1024


def resize_uint8(img: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Resize a uint8 (3, H, W) or (N, 3, H, W) tensor to ``size`` x ``size`` (bilinear, antialiased)."""
    if img.shape[-2:] == (size, size):
        return img
    from torchvision.transforms.v2 import functional as F

    return F.resize(img, [size, size], antialias=True)


def _torchvision_io():
    """(ImageReadMode, decode_image, decode_jpeg) from torchvision.io, or None where it is gone
    (deprecated since torchvision 0.29): everything then decodes with PIL."""
    try:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    except Exception:  # pragma: no cover - future torchvision
        return None
    return ImageReadMode, decode_image, decode_jpeg


def _decode_with_pil(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
        w, h = im.size
    return arr.view(h, w, 3).permute(2, 0, 1).contiguous()


def _reason(exc: Exception) -> str:
    """A one-line reason without torchvision's C++ source location prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\w+, \S+:\d+, ", "", text)


def decode_file(path: str, data: torch.Tensor | None = None) -> torch.Tensor:
    """One image file as uint8 (3, H, W) RGB; a file that cannot be decoded is a DataError naming it."""
    first: Exception | None = None
    tv = _torchvision_io()
    if tv is not None and path.lower().endswith(_TORCHVISION_FORMATS):
        mode, decode_image, _ = tv
        try:
            return decode_image(_read(path) if data is None else data, mode=mode.RGB)
        except DataError:
            raise
        except Exception as exc:  # try PIL before giving up (e.g. a PNG named .jpg still decodes)
            first = exc
    try:  # PPM, BMP, TIFF, ... and the fallback
        return _decode_with_pil(path)
    except Exception as exc:
        raise DataError(f"corrupt or undecodable image file: {path} ({_reason(first or exc)})") from None


def _read(path: str) -> torch.Tensor:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read image file {path}: {exc.strerror or exc}") from None
    if not raw:
        raise DataError(f"corrupt or undecodable image file: {path} (empty file)")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _decode_chunk(paths: Sequence[str], size: int) -> torch.Tensor:
    datas = [_read(p) for p in paths]
    images = None
    tv = _torchvision_io()
    if tv is not None and all(p.lower().endswith(_JPEG) for p in paths):
        mode, _, decode_jpeg = tv
        try:  # batched libjpeg decode: the fast path for the usual all-JPEG folder
            images = decode_jpeg(datas, mode=mode.RGB)
        except Exception:
            images = None  # fall back to one file at a time, which names the bad file
    if images is None:
        images = [decode_file(p, d) for p, d in zip(paths, datas)]
    if all(img.shape == (3, size, size) for img in images):
        return torch.stack(images)
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != 3:
            raise DataError(f"corrupt or undecodable image file: {paths[i]} (decoded shape {tuple(img.shape)})")
        out[i] = resize_uint8(img, size)
    return out


def decode_files(paths: Sequence[str], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Decode image files into one uint8 (N, 3, size, size) tensor, in chunks on a thread pool."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    starts = range(0, len(paths), _CHUNK)

    def work(start: int) -> None:
        out[start : start + _CHUNK] = _decode_chunk(paths[start : start + _CHUNK], size)

    workers = min(8, 2 * (os.cpu_count() or 1), len(starts))
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates torchvision.io decoding (one warning per call); PIL is the
        # fallback the day it is removed, see _torchvision_io.
        warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision are deprecated")
        if workers <= 1:
            for start in starts:
                work(start)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(work, starts):  # re-raises the first DataError
                    pass
    return out


def mean_std(x: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of uint8 NCHW images in ``[0, 1]`` units (exact, from value histograms)."""
    if x.shape[0] == 0:
        raise DataError("cannot compute mean/std of an empty image set")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = hist.sum()
        m = (hist * values).sum() / n
        var = ((hist * values.square()).sum() / n - m.square()).clamp_min(0)
        means.append(round(float(m), 4))
        stds.append(round(max(float(var.sqrt()), 1e-3), 4))
    return tuple(means), tuple(stds)
