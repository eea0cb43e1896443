"""Content-addressed artifact cache for attack stages.

``<root>/<hash>/`` holds one stage's outputs plus ``manifest.json`` (SHA-256 of every file).
An entry counts only if its manifest verifies; anything else is treated as corrupt, moved aside
and rebuilt, never loaded. Builders write into a private temporary folder that is renamed into
place (atomic on one filesystem), and one ``flock`` per hash makes concurrent producers of the
same hash train once: the others wait and then find the finished entry.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

MANIFEST = "manifest.json"


def spec_hash(key: dict) -> str:
    """Stable short hash of a JSON-able spec (sorted keys, no whitespace)."""
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify(folder: Path) -> bool:
    """True when ``folder`` has a manifest and every listed file matches its hash."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return bool(files) and all(_sha256(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ArtifactCache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, key_hash: str) -> Path:
        return self.root / key_hash

    def lookup(self, key_hash: str) -> Path | None:
        p = self.path(key_hash)
        return p if p.is_dir() and verify(p) else None

    def get_or_build(self, key_hash: str, build: Callable[[Path], None],
                     progress: Callable[[str], None] = print) -> tuple[Path, bool]:
        """``(entry path, built_now)``. ``build(tmpdir)`` writes the entry's files."""
        hit = self.lookup(key_hash)
        if hit is not None:
            return hit, False
        with _locked(self.root / ".locks" / f"{key_hash}.lock"):
            hit = self.lookup(key_hash)          # another producer finished while we waited
            if hit is not None:
                return hit, False
            final = self.path(key_hash)
            if final.exists():
                progress(f"cache entry {final} is incomplete or corrupt: rebuilding it")
                aside = self.root / f".corrupt-{key_hash}-{int(time.time())}"
                os.replace(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".build-{key_hash}-"))
            try:
                build(tmp)
                write_manifest(tmp)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return final, True
