"""Content-addressed artifact cache for attack stages.

``<root>/<hash>/`` holds one stage's outputs plus ``manifest.json`` (SHA-256 of every file).
An entry counts only if its manifest verifies; anything else is treated as corrupt, moved aside
and rebuilt, never loaded. Builders write into a private temporary folder that is renamed into
place (atomic on one filesystem), and one ``flock`` per hash makes concurrent producers of the
same hash train once: the others wait and then find the finished entry.

With a ``remote`` :class:`~trainables.storage.Storage` (nodes that share no disk), ``root`` is the
node-local read-through copy and the remote holds the shared entries::

    <prefix>/<hash>/<writer-id>/<file>   one writer's complete copy of the entry's files
    <prefix>/<hash>/manifest.json        {"files": {name: sha256}, "folder": "<writer-id>"}

A writer uploads its files into its own fresh folder and writes the manifest LAST, so a remote
entry exists only once its manifest does, and a manifest always names a completely written
folder: writers on different nodes racing on one hash are safe (the last manifest wins, both
folders are complete). A fetched entry is verified file by file against the manifest before it
is moved into place; a missing manifest or a mismatching file counts as absent (rebuilt and
republished), never loaded. Superseded writer folders are left behind (a reader may be using one).
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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:          # trainables.storage imports pyarrow.fs (~0.3 s): only when remote is used
    from trainables.storage import Storage

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


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and "/" not in name and "\\" not in name


class ArtifactCache:
    """Entries under the local ``root``; with ``remote``, also shared through that storage under
    ``prefix`` (see the module docstring)."""

    def __init__(self, root: str | Path, remote: Storage | None = None, prefix: str = "cache"):
        self.root = Path(root).expanduser()
        self.remote = remote
        self.prefix = prefix.strip("/")

    def path(self, key_hash: str) -> Path:
        return self.root / key_hash

    def _lock(self, key_hash: str):
        return _locked(self.root / ".locks" / f"{key_hash}.lock")

    def _local(self, key_hash: str) -> Path | None:
        p = self.path(key_hash)
        return p if p.is_dir() and verify(p) else None

    def lookup(self, key_hash: str, progress: Callable[[str], None] = print) -> Path | None:
        """The verified local entry, else (with a remote) the remote one fetched into place,
        else None."""
        hit = self._local(key_hash)
        if hit is not None or self.remote is None:
            return self._shared(key_hash, hit, progress)
        with self._lock(key_hash):
            return self._local(key_hash) or self._fetch(key_hash, progress)

    def get_or_build(self, key_hash: str, build: Callable[[Path], None],
                     progress: Callable[[str], None] = print) -> tuple[Path, bool]:
        """``(entry path, built_now)``. ``build(tmpdir)`` writes the entry's files. With a remote,
        an entry found there is fetched instead of built, and a new build is published."""
        hit = self._local(key_hash)
        if hit is not None:
            return self._shared(key_hash, hit, progress), False
        with self._lock(key_hash):
            hit = self._local(key_hash)          # another producer finished while we waited
            if hit is not None:
                return hit, False
            if self.remote is not None:
                hit = self._fetch(key_hash, progress)
                if hit is not None:
                    return hit, False
            final = self.path(key_hash)
            if final.exists():
                progress(f"cache entry {final} is incomplete or corrupt: rebuilding it")
                self._discard(key_hash)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".build-{key_hash}-"))
            try:
                build(tmp)
                write_manifest(tmp)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if self.remote is not None:
                self._publish(key_hash, final, progress)
            return final, True

    def _shared(self, key_hash: str, hit: Path | None, progress) -> Path | None:
        """``hit``, a verified local entry, published first if the remote lacks it: the node's copy
        may come from another storage (or one since emptied), and the other nodes read the
        remote."""
        if hit is not None and self.remote is not None and self._remote_manifest(key_hash, progress) is None:
            progress(f"cache entry {key_hash} is on this node only: publishing it to {self.remote.url(self.prefix)}")
            self._publish(key_hash, hit, progress)
        return hit

    def _discard(self, key_hash: str) -> None:
        aside = self.root / f".corrupt-{key_hash}-{int(time.time())}-{uuid.uuid4().hex[:8]}"
        os.replace(self.path(key_hash), aside)
        shutil.rmtree(aside, ignore_errors=True)

    def _remote_key(self, key_hash: str, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, key_hash, *parts) if p)

    def _remote_manifest(self, key_hash: str, progress) -> tuple[dict[str, str], str] | None:
        """``(files, folder)`` of a well-formed remote manifest, else None."""
        key = self._remote_key(key_hash, MANIFEST)
        try:
            data = json.loads(self.remote.read_bytes(key))
        except FileNotFoundError:
            return None
        except ValueError:
            progress(f"remote cache manifest {self.remote.url(key)} is unreadable: ignoring it")
            return None
        files, folder = (data.get("files"), data.get("folder")) if isinstance(data, dict) else (None, None)
        if (not isinstance(files, dict) or not files or not _plain_name(folder)
                or not all(_plain_name(n) and isinstance(d, str) for n, d in files.items())):
            progress(f"remote cache manifest {self.remote.url(key)} is malformed: ignoring it")
            return None
        return files, folder

    def _fetch(self, key_hash: str, progress) -> Path | None:
        """Download the remote entry, verify every file against its manifest and move it into
        place; None (nothing loaded) when it is absent, incomplete or corrupt. Call under the lock."""
        found = self._remote_manifest(key_hash, progress)
        if found is None:
            return None
        files, folder = found
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".fetch-{key_hash}-"))
        try:
            for name, digest in files.items():
                key = self._remote_key(key_hash, folder, name)
                try:
                    self.remote.download_file(key, tmp / name)
                except FileNotFoundError:
                    progress(f"remote cache entry {self.remote.url(key)} is missing: ignoring the entry")
                    return None
                if _sha256(tmp / name) != digest:
                    progress(f"remote cache file {self.remote.url(key)} does not match its manifest: "
                             f"ignoring the entry")
                    return None
            write_manifest(tmp)
            final = self.path(key_hash)
            if final.exists():
                self._discard(key_hash)
            os.replace(tmp, final)
            progress(f"cache entry {key_hash} fetched from {self.remote.url(self._remote_key(key_hash))}")
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, key_hash: str, entry: Path, progress) -> None:
        """Upload the entry's files into a fresh writer folder, then the manifest naming it. A
        failure is reported, not raised: the local entry is good, only sharing is lost."""
        from trainables.storage import StorageError

        files = json.loads((entry / MANIFEST).read_text())["files"]
        folder = uuid.uuid4().hex
        try:
            for name in files:
                self.remote.upload_file(entry / name, self._remote_key(key_hash, folder, name))
            self.remote.write_text(self._remote_key(key_hash, MANIFEST),
                                   json.dumps({"files": files, "folder": folder}, indent=1))
        except (StorageError, OSError) as e:     # the build itself succeeded
            progress(f"could not publish cache entry {key_hash} to {self.remote.url(self.prefix)}: {e}")


def cache_for(local_root: str | Path, storage_uri: str | None = None,
              endpoint: str | None = None, prefix: str = "cache") -> ArtifactCache:
    """The cache a (Ray worker) process builds from plain config values: local-only when
    ``storage_uri`` is empty, else shared through that storage."""
    from trainables.storage import open_storage

    remote = open_storage(storage_uri, endpoint) if storage_uri else None
    return ArtifactCache(local_root, remote, prefix)
