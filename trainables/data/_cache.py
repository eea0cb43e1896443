"""A small decoded-tensor cache shared by the folder-backed loaders (ImageFolder, GTSRB).

One file per source folder, named by a hash of the folder's absolute path, holding the decoded
uint8 tensors and a fingerprint of the folder (relative path, size and mtime of every file). A
load whose fingerprint differs from the stored one re-reads the folder. Files are written
atomically (a temporary name in the same directory, then ``os.replace``) and read with
``torch.load(weights_only=True)``: they hold tensors, strings and numbers only, never pickled code.
An unreadable, truncated or foreign cache file is ignored (and then overwritten).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the stored layout or the decoding changes


def default_cache_dir(subdir: str) -> Path:
    """``$SWEEP_CACHE_DIR`` if set, else ``~/.cache/backdoor-sweep/<subdir>``."""
    env = os.environ.get("SWEEP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "backdoor-sweep" / subdir


def cache_file(cache_dir: str | os.PathLike | None, kind: str, source: Path) -> Path:
    """Where the cache of ``source`` (an absolute path) lives."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(kind)
    key = hashlib.sha256(str(source).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return directory / f"{kind}-{key}.pt"


def fingerprint(entries: list[tuple[str, int, int]], *extra: Any) -> str:
    """A hash of (relative path, size, mtime_ns) for every file, plus any ``extra`` settings."""
    h = hashlib.sha256()
    h.update(repr((FORMAT,) + extra).encode())
    for rel, size, mtime in entries:
        h.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def load(path: Path, source: Path, fp: str) -> dict[str, Any] | None:
    """The cached payload if ``path`` holds a readable cache of ``source`` with fingerprint ``fp``."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or written by an incompatible version
        log.warning("ignoring unreadable dataset cache %s (%s); rebuilding it", path, exc)
        return None
    if not isinstance(payload, dict):
        return None
    if payload.get("format") != FORMAT or payload.get("source") != str(source):
        return None
    if payload.get("fingerprint") != fp:
        log.info("dataset cache %s is stale (the folder changed); re-reading %s", path, source)
        return None
    return payload


def save(path: Path, source: Path, fp: str, payload: dict[str, Any]) -> bool:
    """Write atomically; a cache that cannot be written is a warning, never an error."""
    payload = dict(payload, format=FORMAT, source=str(source), fingerprint=fp)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache must be readable by others
        os.replace(tmp, path)
        tmp = None
        return True
    except Exception as exc:  # a full disk, a read-only or vanished directory, ...
        warnings.warn(f"could not write the dataset cache {path}: {exc}", RuntimeWarning, stacklevel=3)
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
