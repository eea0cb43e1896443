"""Any image folder in the ImageFolder layout, decoded once and cached as tensors.

Layout::

    <path>/train/<class>/<any name>.jpg|png|...   (subfolders of a class folder are read too)
    <path>/test/<class>/...

Classes are the sorted names of the class folders (label = position in that order); train and
test must have the same class folders. Images are converted to RGB and resized to 32x32
(bilinear, antialiased, aspect ratio not kept) when they are not 32x32 already. ``mean``/``std``
are computed from the train split.

The decoded tensors are cached in ``cache_dir`` (else ``$SWEEP_CACHE_DIR``, else
``~/.cache/backdoor-sweep/imagefolder``) under a name derived from the folder's absolute path.
The cache stores a fingerprint of the tree (relative path, size and mtime of every image file),
recomputed on every load with a cheap ``os.scandir`` walk: a changed, added or removed file makes
the next load re-read the folder. Hidden files and folders (``.name``) are ignored.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from . import _cache
from ._images import IMAGE_SIZE, IMG_EXTENSIONS, decode_files, mean_std
from .base import DataError, Dataset, ImageSet

log = logging.getLogger(__name__)

SPLITS = ("train", "test")

# What the last call of load_imagefolder did: {"path", "cache_file", "cache_hit", "seconds"}.
# Tests and benchmarks read it; nothing depends on it.
last_load_info: dict = {}


def _scan_class(class_dir: str, rel_prefix: str, out: list[tuple[str, str, int, int]]) -> None:
    """Append (absolute path, relative path, size, mtime_ns) of every image file under class_dir."""
    try:
        it = os.scandir(class_dir)
    except OSError as exc:
        raise DataError(f"cannot list image folder {class_dir}: {exc.strerror or exc}") from None
    with it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith("."):
            continue
        rel = f"{rel_prefix}/{e.name}"
        if e.is_dir():
            _scan_class(e.path, rel, out)
        elif e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file():
            st = e.stat()
            out.append((e.path, rel, st.st_size, st.st_mtime_ns))


def _class_dirs(split_dir: Path) -> list[str]:
    try:
        with os.scandir(split_dir) as it:
            return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"cannot list image folder {split_dir}: {exc.strerror or exc}") from None


def check_folder(path: str | os.PathLike) -> Path:
    """The folder exists with train/ and test/ subfolders (no file is read); its absolute path."""
    root = Path(path).expanduser().absolute()
    layout = f"expected {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg"
    if not root.exists():
        raise DataError(f"image folder not found: {root} does not exist ({layout})")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a directory ({layout})")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"image folder {root} has no {split}/ subfolder ({layout})")
    return root


def scan(path: str | os.PathLike) -> tuple[Path, tuple[str, ...], dict[str, list[tuple[str, str, int, int, int]]]]:
    """Validate the tree and list its files: (root, classes, {split: [(abs, rel, size, mtime, label)]})."""
    root = check_folder(path)
    layout = f"expected {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg"
    classes = _class_dirs(root / "train")
    if not classes:
        raise DataError(f"image folder {root}/train has no class folders ({layout})")
    test_classes = _class_dirs(root / "test")
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(
            f"image folder {root}: train/ and test/ have different class folders "
            f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'})"
        )
    files: dict[str, list[tuple[str, str, int, int, int]]] = {}
    for split in SPLITS:
        rows: list[tuple[str, str, int, int, int]] = []
        for label, cls in enumerate(classes):
            found: list[tuple[str, str, int, int]] = []
            _scan_class(str(root / split / cls), f"{split}/{cls}", found)
            if not found and split == "train":
                raise DataError(f"image folder {root}: class folder train/{cls} has no image files ({', '.join(IMG_EXTENSIONS)})")
            rows.extend(r + (label,) for r in found)
        if not rows:
            raise DataError(f"image folder {root}: {split}/ has no image files ({', '.join(IMG_EXTENSIONS)})")
        files[split] = rows
    return root, tuple(classes), files


def _decode_split(rows: list[tuple[str, str, int, int, int]]) -> ImageSet:
    x = decode_files([r[0] for r in rows], IMAGE_SIZE)
    y = torch.tensor([r[4] for r in rows], dtype=torch.int64)
    return ImageSet(x, y)


def load_imagefolder(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> Dataset:
    """Load ``<path>/{train,test}/<class>/*`` as a :class:`Dataset`, through the tensor cache."""
    start = time.perf_counter()
    root, classes, files = scan(path)
    entries = [(r[1], r[2], r[3]) for split in SPLITS for r in files[split]]
    fp = _cache.fingerprint(entries, "imagefolder", IMAGE_SIZE, classes)
    cfile = _cache.cache_file(cache_dir, "imagefolder", root)
    name = f"imagefolder:{root}"

    payload = _cache.load(cfile, root, fp) if use_cache else None
    if payload is not None:
        try:
            ds = Dataset(
                name=name,
                train=ImageSet(payload["train_x"], payload["train_y"]),
                test=ImageSet(payload["test_x"], payload["test_y"]),
                classes=tuple(payload["classes"]),
                mean=tuple(payload["mean"]),
                std=tuple(payload["std"]),
            )
        except (KeyError, TypeError, DataError) as exc:
            log.warning("ignoring malformed dataset cache %s (%s); rebuilding it", cfile, exc)
        else:
            last_load_info.clear()
            last_load_info.update(path=str(root), cache_file=str(cfile), cache_hit=True, seconds=time.perf_counter() - start)
            log.info("loaded %s from cache %s", root, cfile)
            return ds

    train = _decode_split(files["train"])
    test = _decode_split(files["test"])
    mean, std = mean_std(train.x)
    ds = Dataset(name=name, train=train, test=test, classes=classes, mean=mean, std=std)
    if use_cache:
        _cache.save(
            cfile,
            root,
            fp,
            {
                "train_x": train.x,
                "train_y": train.y,
                "test_x": test.x,
                "test_y": test.y,
                "classes": list(classes),
                "mean": list(mean),
                "std": list(std),
            },
        )
    last_load_info.clear()
    last_load_info.update(path=str(root), cache_file=str(cfile), cache_hit=False, seconds=time.perf_counter() - start)
    log.info("decoded %d+%d images from %s in %.1fs", len(train), len(test), root, last_load_info["seconds"])
    return ds
