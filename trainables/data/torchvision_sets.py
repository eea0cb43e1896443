"""CIFAR-10, CIFAR-100 and GTSRB through torchvision's dataset classes.

The data root is the ``root`` argument, else ``$SWEEP_DATA_ROOT``, else
``~/.cache/backdoor-sweep/data``; inside it the files sit where torchvision puts them
(``cifar-10-batches-py/``, ``cifar-100-python/``, ``gtsrb/``). A load first reads what is there
without downloading; if the dataset is missing and ``download`` is true it runs torchvision's own
download (under a per-dataset file lock, so that the workers of one node download once); if that
fails too, or ``download`` is false, it raises one :class:`DataError` that says which dataset is
missing, where it looked and how to provide it.

GTSRB images (15x15 to 250x250) are resized to 32x32 (bilinear, antialiased, aspect ratio not
kept) and the decoded tensors are cached like an image folder's (see ``imagefolder.py``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from . import _cache
from ._images import IMAGE_SIZE, decode_files
from .base import DataError, Dataset, ImageSet

log = logging.getLogger(__name__)

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": ((0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669)),
}

# What torchvision's files look like inside the root, for the error message.
_EXPECTED = {
    "cifar10": "cifar-10-batches-py/ (torchvision.datasets.CIFAR10)",
    "cifar100": "cifar-100-python/ (torchvision.datasets.CIFAR100)",
    "gtsrb": "gtsrb/GTSRB/Training and gtsrb/GTSRB/Final_Test with gtsrb/GT-final_test.csv (torchvision.datasets.GTSRB)",
}

GTSRB_CLASSES = (
    "speed_limit_20", "speed_limit_30", "speed_limit_50", "speed_limit_60", "speed_limit_70",
    "speed_limit_80", "end_of_speed_limit_80", "speed_limit_100", "speed_limit_120", "no_passing",
    "no_passing_over_3.5t", "right_of_way_at_intersection", "priority_road", "yield", "stop",
    "no_vehicles", "over_3.5t_prohibited", "no_entry", "general_caution", "dangerous_curve_left",
    "dangerous_curve_right", "double_curve", "bumpy_road", "slippery_road", "road_narrows_right",
    "road_work", "traffic_signals", "pedestrians", "children_crossing", "bicycles_crossing",
    "beware_ice_snow", "wild_animals_crossing", "end_of_all_limits", "turn_right_ahead",
    "turn_left_ahead", "ahead_only", "go_straight_or_right", "go_straight_or_left", "keep_right",
    "keep_left", "roundabout_mandatory", "end_of_no_passing", "end_of_no_passing_over_3.5t",
)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$SWEEP_DATA_ROOT``, else ``~/.cache/backdoor-sweep/data`` (absolute)."""
    if root is None or str(root) == "":
        root = os.environ.get("SWEEP_DATA_ROOT") or Path.home() / ".cache" / "backdoor-sweep" / "data"
    return Path(root).expanduser().absolute()


def _missing(name: str, root: Path, why: str) -> DataError:
    return DataError(
        f"dataset '{name}' not found: looked in {root} for {_EXPECTED[name]}; {why}. "
        f"Provide it with --data-root DIR or the SWEEP_DATA_ROOT environment variable (a folder "
        f"holding torchvision's files for it, or where it can be downloaded on a machine with a "
        f"network), or load your own copy as an image folder with 'imagefolder:<path>' "
        f"(<path>/train/<class>/*.jpg and <path>/test/<class>/*.jpg)."
    )


@contextlib.contextmanager
def _download_lock(root: Path, name: str):
    """An exclusive lock on ``<root>/.<name>.download.lock`` (POSIX); no-op where unsupported."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / f".{name}.download.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open(name: str, factory, root: Path, download: bool):
    """``factory(download: bool)`` for every split: read first, then download, else one DataError."""
    try:
        return factory(False)
    except Exception as exc:  # torchvision raises RuntimeError("Dataset not found ..."), OSError, ...
        first = exc
    if not download:
        raise _missing(name, root, f"download=False ({_short(first)})") from None
    log.info("dataset %s not found in %s; trying torchvision's download", name, root)
    try:
        with _download_lock(root, name):
            return factory(True)
    except Exception as exc:  # no network, a checksum mismatch, a read-only root, ...
        raise _missing(name, root, f"the download failed ({_short(exc)})") from None


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _cifar_split(ds) -> ImageSet:
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) HWC -> NCHW
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    return ImageSet(x, y)


def _load_cifar(name: str, root: str | os.PathLike | None, download: bool) -> Dataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    path = data_root(root)

    def factory(dl: bool):
        return cls(str(path), train=True, download=dl), cls(str(path), train=False, download=dl)

    train, test = _open(name, factory, path, download)
    mean, std = MEAN_STD[name]
    return Dataset(name=name, train=_cifar_split(train), test=_cifar_split(test), classes=tuple(train.classes), mean=mean, std=std)


def load_cifar10(root: str | os.PathLike | None = None, *, download: bool = True) -> Dataset:
    """CIFAR-10: 50,000 train / 10,000 test 32x32 images, 10 classes."""
    return _load_cifar("cifar10", root, download)


def load_cifar100(root: str | os.PathLike | None = None, *, download: bool = True) -> Dataset:
    """CIFAR-100 (fine labels): 50,000 train / 10,000 test 32x32 images, 100 classes."""
    return _load_cifar("cifar100", root, download)


def load_gtsrb(
    root: str | os.PathLike | None = None, *, download: bool = True, cache_dir: str | os.PathLike | None = None
) -> Dataset:
    """GTSRB: 26,640 train / 12,630 test traffic-sign images resized to 32x32, 43 classes."""
    from torchvision import datasets

    path = data_root(root)

    def factory(dl: bool):
        return datasets.GTSRB(str(path), split="train", download=dl), datasets.GTSRB(str(path), split="test", download=dl)

    train_ds, test_ds = _open("gtsrb", factory, path, download)
    samples = {"train": list(train_ds._samples), "test": list(test_ds._samples)}
    base = path / "gtsrb"
    entries = []
    try:
        for split in ("train", "test"):
            for p, _ in samples[split]:
                st = os.stat(p)
                entries.append((os.path.relpath(p, base), st.st_size, st.st_mtime_ns))
    except OSError as exc:
        raise DataError(f"dataset 'gtsrb' in {base} is incomplete: {exc.filename}: {exc.strerror}") from None
    fp = _cache.fingerprint(entries, "gtsrb", IMAGE_SIZE)
    cfile = _cache.cache_file(cache_dir, "gtsrb", base)
    payload = _cache.load(cfile, base, fp)
    mean, std = MEAN_STD["gtsrb"]
    if payload is not None:
        try:
            return Dataset(
                name="gtsrb",
                train=ImageSet(payload["train_x"], payload["train_y"]),
                test=ImageSet(payload["test_x"], payload["test_y"]),
                classes=GTSRB_CLASSES,
                mean=mean,
                std=std,
            )
        except (KeyError, DataError) as exc:
            log.warning("ignoring malformed dataset cache %s (%s)", cfile, exc)
    splits = {}
    for split in ("train", "test"):
        x = decode_files([p for p, _ in samples[split]], IMAGE_SIZE)
        y = torch.tensor([int(t) for _, t in samples[split]], dtype=torch.int64)
        splits[split] = ImageSet(x, y)
    _cache.save(
        cfile, base, fp,
        {"train_x": splits["train"].x, "train_y": splits["train"].y, "test_x": splits["test"].x, "test_y": splits["test"].y},
    )
    return Dataset(name="gtsrb", train=splits["train"], test=splits["test"], classes=GTSRB_CLASSES, mean=mean, std=std)
