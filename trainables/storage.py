"""One storage location for everything a sweep shares across nodes that share no disk.

A location is a URI: a local folder (``/abs``, ``rel/path``, ``file:///abs``; on a cluster only
useful when it is a shared mount) or an S3 bucket prefix ``s3://bucket/prefix``, optionally on a
self-hosted S3-compatible store (``endpoint="http://127.0.0.1:9000"``, or ``AWS_ENDPOINT_URL``).
Credentials come from the environment as usual (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``);
the region from ``AWS_DEFAULT_REGION`` / ``AWS_REGION``, else ``us-east-1``.

Everything goes through ``pyarrow.fs`` (a dependency of Ray already), so the same filesystem
object can be handed to Ray Tune (:meth:`Storage.tune_storage`). S3 retries and timeouts are
bounded: a dead endpoint fails :meth:`Storage.check` in seconds instead of hanging a sweep.

Keys are relative, ``/``-separated paths under the location; ``..`` is refused.
"""
from __future__ import annotations

import errno
import functools
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

CONNECT_TIMEOUT_S = 3.0      # per connection attempt
REQUEST_TIMEOUT_S = 60.0     # a stalled transfer, not a whole (possibly large) transfer
MAX_ATTEMPTS = 3             # ordinary operations: ride out a blip
CHECK_ATTEMPTS = 1           # check(): fail fast, say what is wrong
_CHUNK = 8 << 20


class StorageError(Exception):
    """A storage location that is invalid, unreachable or unusable; the message names the URI."""


def _clean_rel(rel: str | os.PathLike) -> str:
    parts = [p for p in str(rel).replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StorageError(f"storage key {str(rel)!r} must not contain '..'")
    return "/".join(parts)


def _normalise_uri(uri: str | os.PathLike) -> str:
    raw = os.fspath(uri).strip() if uri is not None else ""
    if not raw:
        raise StorageError("empty storage URI: give a local path, file:///path or s3://bucket/prefix")
    parsed = urlparse(raw)
    scheme = parsed.scheme.lower()
    if scheme == "":
        return os.path.abspath(os.path.expanduser(raw))
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"storage URI {raw!r}: file:// URIs name a local path (file:///abs/path), "
                               f"not a host ({parsed.netloc!r})")
        path = unquote(parsed.path)
        if not path.startswith("/"):
            raise StorageError(f"storage URI {raw!r}: a file:// URI needs an absolute path")
        return os.path.abspath(path)
    if scheme == "s3":
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        if not bucket:
            raise StorageError(f"storage URI {raw!r} names no bucket: use s3://bucket/prefix")
        if parsed.query or parsed.fragment:
            raise StorageError(f"storage URI {raw!r}: no ?query or #fragment allowed")
        if ".." in prefix.split("/"):
            raise StorageError(f"storage URI {raw!r} must not contain '..'")
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    raise StorageError(f"unsupported storage scheme {scheme!r} in {raw!r}: "
                       f"use a local path, file:///path or s3://bucket/prefix")


def _parse_endpoint(endpoint: str, uri: str) -> tuple[str, str]:
    """``(scheme, host[:port])`` of an S3 endpoint; no scheme means https."""
    if "://" not in endpoint:
        endpoint = "https://" + endpoint
    p = urlparse(endpoint)
    if p.scheme not in ("http", "https") or not p.netloc or p.path.strip("/") or p.query:
        raise StorageError(f"S3 endpoint {endpoint!r} for {uri}: expected http(s)://host[:port]")
    return p.scheme, p.netloc


def _region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


@dataclass(frozen=True)
class Storage:
    """A normalised storage location. ``uri`` is an absolute local path or ``s3://bucket[/prefix]``
    (no trailing ``/``); ``endpoint`` is the S3 endpoint (None: AWS). Construction validates and
    normalises both (an S3 location without ``endpoint`` takes ``AWS_ENDPOINT_URL``), so the
    object pickles to Ray workers as two plain strings."""

    uri: str
    endpoint: str | None = None

    def __post_init__(self):
        uri = _normalise_uri(self.uri)
        endpoint = self.endpoint.strip() if self.endpoint else None
        if uri.startswith("s3://"):
            endpoint = (endpoint or os.environ.get("AWS_ENDPOINT_URL", "").strip() or None)
            if endpoint:
                scheme, host = _parse_endpoint(endpoint, uri)
                endpoint = f"{scheme}://{host}"
        elif endpoint:
            raise StorageError(f"an S3 endpoint ({endpoint}) was given for the local storage {uri}")
        object.__setattr__(self, "uri", uri)
        object.__setattr__(self, "endpoint", endpoint)

    # the cached filesystem stays out of pickles and copies: a worker builds its own
    def __getstate__(self):
        return {"uri": self.uri, "endpoint": self.endpoint}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3://")

    def _s3(self, max_attempts: int) -> pafs.S3FileSystem:
        kw = {}
        if self.endpoint:
            kw["scheme"], kw["endpoint_override"] = _parse_endpoint(self.endpoint, self.uri)
        return pafs.S3FileSystem(
            region=_region(), connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **kw)

    @functools.cached_property
    def _fs(self) -> pafs.FileSystem:
        return pafs.LocalFileSystem() if self.is_local else self._s3(MAX_ATTEMPTS)

    @property
    def _base(self) -> str:
        return self.uri if self.is_local else self.uri[len("s3://"):]

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """``(filesystem, base path inside it)``: the pyarrow view of this location."""
        return self._fs, self._base

    def _path(self, rel) -> str:
        rel = _clean_rel(rel)
        return f"{self._base}/{rel}" if rel else self._base

    def url(self, rel: str = "") -> str:
        """Full URI (local: absolute path) of the relative key ``rel``."""
        rel = _clean_rel(rel)
        return f"{self.uri}/{rel}" if rel else self.uri

    def _fail(self, what: str, rel, exc: OSError) -> Exception:
        if isinstance(exc, FileNotFoundError):
            return FileNotFoundError(errno.ENOENT, f"{what}: not found", self.url(rel))
        return StorageError(f"{what} {self.url(rel)} failed: {exc}")

    def exists(self, rel: str) -> bool:
        """Whether a file, or any file under a folder, exists at ``rel``."""
        try:
            return self._fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound
        except OSError as e:
            raise self._fail("looking up", rel, e) from e

    def list_files(self, rel: str = "") -> list[str]:
        """Sorted paths (relative to ``rel``) of every file under ``rel``; [] when there are none."""
        base = self._path(rel)
        try:
            infos = self._fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as e:
            raise self._fail("listing", rel, e) from e
        return sorted(i.path[len(base):].lstrip("/") for i in infos if i.type == pafs.FileType.File)

    def read_bytes(self, rel: str) -> bytes:
        """The whole object; ``FileNotFoundError`` (naming the URI) when it is missing."""
        try:
            with self._fs.open_input_stream(self._path(rel)) as f:
                return f.read()
        except OSError as e:
            raise self._fail("reading", rel, e) from e

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def _local_target(self, rel) -> Path:
        target = Path(self._path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one object atomically: readers see the old content or the new, never a part
        (local: temporary file + ``os.replace``; S3: an object appears only once complete)."""
        try:
            if self.is_local:
                target = self._local_target(rel)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    os.replace(tmp, target)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                with self._fs.open_output_stream(self._path(rel)) as out:
                    out.write(data)
        except OSError as e:
            raise self._fail("writing", rel, e) from e

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def upload_file(self, local_path: str | Path, rel: str) -> None:
        """Copy one local file to ``rel`` (streamed; atomic as :meth:`write_bytes`)."""
        try:
            if self.is_local:
                target = self._local_target(rel)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
                os.close(fd)
                try:
                    shutil.copyfile(local_path, tmp)
                    os.replace(tmp, target)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                with open(local_path, "rb") as src, self._fs.open_output_stream(self._path(rel)) as out:
                    shutil.copyfileobj(src, out, _CHUNK)
        except OSError as e:
            raise self._fail(f"uploading {local_path} to", rel, e) from e

    def download_file(self, rel: str, local_path: str | Path) -> None:
        """Copy ``rel`` to a local file, via a temporary file so a failed copy leaves none."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local_path.parent, prefix=f".{local_path.name}.")
        try:
            with os.fdopen(fd, "wb") as dst, self._fs.open_input_stream(self._path(rel)) as src:
                shutil.copyfileobj(src, dst, _CHUNK)
            os.replace(tmp, local_path)
        except OSError as e:
            raise self._fail(f"downloading to {local_path}:", rel, e) from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def upload_dir(self, local_dir: str | Path, rel: str) -> list[str]:
        """Upload every file under ``local_dir`` (recursively) to ``rel/<its relative path>``;
        returns those relative paths."""
        local_dir = Path(local_dir)
        names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        for name in names:
            self.upload_file(local_dir / name, f"{_clean_rel(rel)}/{name}")
        return names

    def download_dir(self, rel: str, local_dir: str | Path) -> list[str]:
        """Download every file under ``rel`` into ``local_dir``, keeping relative paths;
        ``FileNotFoundError`` when there is none."""
        names = self.list_files(rel)
        if not names:
            raise FileNotFoundError(errno.ENOENT, "no files under", self.url(rel))
        for name in names:
            self.download_file(f"{_clean_rel(rel)}/{name}", Path(local_dir) / name)
        return names

    def delete(self, rel: str) -> None:
        """Delete a file, or a folder and everything under it; missing is fine. The root itself
        cannot be deleted (on S3 that could mean the bucket)."""
        if not _clean_rel(rel):
            raise StorageError(f"refusing to delete the storage root {self.uri}")
        path = self._path(rel)
        try:
            kind = self._fs.get_file_info(path).type
            if kind == pafs.FileType.File:
                self._fs.delete_file(path)
            elif kind == pafs.FileType.Directory:
                self._fs.delete_dir(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._fail("deleting", rel, e) from e

    def check(self) -> None:
        """Fail fast, before a sweep spends hours, with a :class:`StorageError` saying what is
        wrong: local: the folder cannot be created or written; S3: the endpoint is unreachable,
        the credentials are rejected, the bucket is missing, or the prefix is not writable."""
        if self.is_local:
            try:
                os.makedirs(self.uri, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=self.uri, prefix=".storage-check-"):
                    pass
            except OSError as e:
                raise StorageError(f"cannot use the local storage {self.uri}: "
                                   f"{e.strerror or e}") from None
            return
        where = self.endpoint or "AWS S3"
        bucket = self._base.split("/", 1)[0]
        fs = self._s3(CHECK_ATTEMPTS)
        try:
            info = fs.get_file_info(bucket)
        except OSError as e:
            raise StorageError(self._explain(e, where)) from None
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"storage {self.uri}: bucket {bucket!r} does not exist at {where} "
                               f"(or that endpoint is not an S3 service)")
        probe = f"{self._base}/.storage-check-{uuid.uuid4().hex}"
        try:
            with fs.open_output_stream(probe) as out:
                out.write(b"ok")
            fs.delete_file(probe)
        except OSError as e:
            raise StorageError(f"storage {self.uri}: cannot write there: {self._explain(e, where)}") from None

    def _explain(self, exc: OSError, where: str) -> str:
        text = str(exc)
        if "NETWORK_CONNECTION" in text or "curlCode" in text:
            return f"storage {self.uri}: cannot reach the S3 endpoint {where}: {text}"
        if any(s in text for s in ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE", "403")):
            return (f"storage {self.uri}: {where} rejected the credentials (AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY) or they lack permission: {text}")
        return f"storage {self.uri} at {where}: {text}"

    def tune_storage(self, rel: str = "") -> tuple[str, pafs.FileSystem | None]:
        """``(storage_path, storage_filesystem)`` for ``ray.tune.RunConfig``: a local path and
        None, or for S3 the bucket path without scheme plus this location's filesystem (Ray Tune
        ignores the endpoint, timeouts and region of an ``s3://`` string, so it gets the
        filesystem itself; it pickles to the workers, which take credentials from their env)."""
        if self.is_local:
            return self._path(rel), None
        return self._path(rel), self._s3(MAX_ATTEMPTS)


def open_storage(uri: str | os.PathLike, endpoint: str | None = None) -> Storage:
    """The :class:`Storage` at ``uri``; a :class:`StorageError` names what is wrong with it."""
    return Storage(os.fspath(uri), endpoint)
