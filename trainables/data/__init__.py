"""Datasets as in-memory uint8 tensors (see ``base.py``), loaded by name.

Names understood by :func:`load_dataset`:

* ``cifar10``, ``cifar100``, ``gtsrb`` - torchvision's datasets, read from the data root
  (``root`` argument, else ``$SWEEP_DATA_ROOT``, else ``~/.cache/backdoor-sweep/data``) and
  downloaded there by torchvision when missing and ``download`` is true;
* ``imagefolder:<path>`` - any ``<path>/train/<class>/*`` + ``<path>/test/<class>/*`` tree
  (``imagefolder`` alone reads the folder given as ``root``); decoded once, then cached;
* ``synthetic`` - a generated 10-class shapes dataset, 3,000 train / 1,000 test images;
  ``synthetic:<n_train>`` (1,000 test images) and ``synthetic:<n_train>:<n_test>`` choose the
  sizes, and ``seed`` picks the draw.
"""
from __future__ import annotations

import os

from .base import DataError, Dataset, ImageSet
from .splits import clean_subset

__all__ = [
    "DataError", "Dataset", "ImageSet", "clean_subset", "load_dataset", "list_datasets",
    "describe_datasets", "check_dataset_name", "check_dataset_folder", "absolute_dataset_name", "absolute_path",
]

_DESCRIPTIONS = {
    "cifar10": "CIFAR-10 (torchvision): 50,000/10,000 32x32 images, 10 classes",
    "cifar100": "CIFAR-100 (torchvision, fine labels): 50,000/10,000 32x32 images, 100 classes",
    "gtsrb": "GTSRB traffic signs (torchvision): 26,640/12,630 images resized to 32x32, 43 classes",
    "imagefolder:<path>": "any <path>/train/<class>/* and <path>/test/<class>/* image tree, resized to 32x32, cached",
    "synthetic[:<n_train>[:<n_test>]]": "generated 10-class shapes, no download; default 3,000/1,000 images",
}


def list_datasets() -> list[str]:
    """The dataset names (``imagefolder`` and ``synthetic`` in their argument forms)."""
    return list(_DESCRIPTIONS)


def describe_datasets() -> dict[str, str]:
    """``{name form: one-line description}``, for a CLI ``list``."""
    return dict(_DESCRIPTIONS)


def _valid_names() -> str:
    return ", ".join(_DESCRIPTIONS)


def _parse(name: str) -> tuple[str, str | None]:
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"dataset name must be a non-empty string, got {name!r}; valid names: {_valid_names()}")
    name = name.strip()
    kind, sep, arg = name.partition(":")
    kind = kind.lower()
    if kind not in ("cifar10", "cifar100", "gtsrb", "imagefolder", "synthetic"):
        raise DataError(f"unknown dataset {name!r}; valid names: {_valid_names()}")
    if kind in ("cifar10", "cifar100", "gtsrb") and sep:
        raise DataError(f"dataset {kind!r} takes no ':' argument (got {name!r}); use --data-root DIR or SWEEP_DATA_ROOT for its location")
    return kind, (arg if sep else None)


def _synthetic_sizes(name: str, arg: str | None) -> tuple[int, int]:
    from .synthetic import DEFAULT_TEST, DEFAULT_TRAIN

    if arg is None:
        return DEFAULT_TRAIN, DEFAULT_TEST
    parts = arg.split(":")
    try:
        if len(parts) > 2:
            raise ValueError
        n_train = int(parts[0])
        n_test = int(parts[1]) if len(parts) == 2 else DEFAULT_TEST
    except ValueError:
        raise DataError(f"bad synthetic dataset name {name!r}: use synthetic, synthetic:<n_train> or synthetic:<n_train>:<n_test>") from None
    if n_train < 10 or n_test < 10:
        raise DataError(f"bad synthetic dataset name {name!r}: n_train and n_test must be >= 10")
    return n_train, n_test


def check_dataset_name(name: str) -> str:
    """Validate a dataset name without loading anything (for config validation); returns it stripped."""
    kind, arg = _parse(name)
    if kind == "synthetic":
        _synthetic_sizes(name, arg)
    if kind == "imagefolder" and arg is not None and not arg:
        raise DataError(f"dataset name {name!r} has an empty path: use imagefolder:<path>")
    return name.strip()


def check_dataset_folder(name: str, root: str | os.PathLike | None = None) -> None:
    """An ``imagefolder`` dataset's folder (``root`` for a bare ``imagefolder``) exists with its
    train/ and test/ splits; other datasets pass (torchvision's download into their root). Cheap:
    for checking a sweep's input before any work starts."""
    kind, arg = _parse(check_dataset_name(name))
    if kind != "imagefolder":
        return
    path = arg if arg is not None else root
    if path is None or str(path) == "":
        raise DataError("dataset 'imagefolder' needs a folder: use imagefolder:<path> (or pass the folder as the data root)")
    from .imagefolder import check_folder

    check_folder(path)


def absolute_dataset_name(name: str, cwd: str | os.PathLike) -> str:
    """``imagefolder:<relative path>`` made absolute against ``cwd`` (``~`` expanded), so that a
    worker whose working directory differs reads the same folder; other names unchanged."""
    if not isinstance(name, str):
        return name
    kind, sep, arg = name.strip().partition(":")
    if kind.lower() != "imagefolder" or not sep or not arg:
        return name
    return f"{kind}:{absolute_path(arg, cwd)}"


def absolute_path(path: str, cwd: str | os.PathLike) -> str:
    """``path`` with ``~`` expanded, joined to ``cwd`` when relative (not resolved: links kept)."""
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a dataset by name (see the module docstring); every failure is one :class:`DataError`.

    ``root``: the data root for torchvision datasets, or the folder for a bare ``imagefolder``.
    ``download``: let torchvision download a missing dataset. ``cache_dir``: where decoded image
    folders (and GTSRB) are cached. ``seed``: the draw of the synthetic dataset (ignored by others).
    """
    kind, arg = _parse(name)
    check_dataset_name(name)
    if kind in ("cifar10", "cifar100"):
        from .torchvision_sets import load_cifar10, load_cifar100

        return (load_cifar10 if kind == "cifar10" else load_cifar100)(root, download=download)
    if kind == "gtsrb":
        from .torchvision_sets import load_gtsrb

        return load_gtsrb(root, download=download, cache_dir=cache_dir)
    if kind == "imagefolder":
        from .imagefolder import load_imagefolder

        path = arg if arg is not None else root
        if path is None or str(path) == "":
            raise DataError("dataset 'imagefolder' needs a folder: use imagefolder:<path> (or pass the folder as the data root)")
        return load_imagefolder(path, cache_dir=cache_dir)
    from .synthetic import load_synthetic

    n_train, n_test = _synthetic_sizes(name, arg)
    return load_synthetic(n_train, n_test, seed=seed)
