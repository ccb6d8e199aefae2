"""Where a store lives: a location string resolved to a local :class:`~pathlib.Path` or an fsspec :class:`Remote`.

A location is a local path (``runs/fisher``, ``/data/f.pt``), a ``file://``
URL (the same local path) or any other fsspec URL (``s3://bucket/store``,
``memory://x`` for tests, ``gs://``, ``az://`` ... where their fsspec
package is installed).  Local paths keep every fast path of the rest of the
package (``pread``, ``mmap``, temp file + ``rename``); a :class:`Remote` is an
fsspec filesystem and a root on it, read with range requests and written
object by object.  An URL is never taken for a local path: ``s3://b/x`` used
to become a local folder ``s3:``.

fsspec (and s3fs) are imported only when an URL is resolved, so importing
fisherstore and every local command stay as fast as before.  Credentials
and endpoints come the usual way (the environment, ``~/.aws``, fsspec's
configuration such as ``FSSPEC_S3_ENDPOINT_URL``), plus ``storage_options``:
keyword arguments of the filesystem (``{"endpoint_url": ..., "anon": true}``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

from . import _io
from .errors import BadInputError, CorruptDataError

__all__ = ["UPLOAD_BLOCK_BYTES", "Remote", "RemoteFile", "is_url", "resolve"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_MANGLED = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:$")  # Path("s3://b/x").parts[0] == "s3:"

#: Block size of uploads: what an object being written holds in memory before it is sent as one part of a
#: multipart upload (S3's minimum part is 5 MiB), so memory stays bounded whatever the object's size.
UPLOAD_BLOCK_BYTES = 8 << 20

#: Bytes fetched with a file's first read (a safetensors header usually fits), saving a second round trip.
HEAD_BYTES = 64 << 10


def is_url(location: object) -> bool:
    """Whether ``location`` is written as an URL (``scheme://...``), ``file://`` included."""
    return isinstance(location, str) and _URL.match(location) is not None


def resolve(
    location: str | Path | Remote, storage_options: Mapping[str, Any] | None = None, *, param: str = "path"
) -> Path | Remote:
    """A location as a local path or an fsspec :class:`Remote`; URLs are never taken for local paths.

    Args:
        location: a local path, a ``file://`` URL or an fsspec URL (``s3://bucket/store``, ``memory://x``).
        storage_options: keyword arguments of the URL's filesystem (ignored for local paths).
        param: the API parameter the location came from, named in errors.

    Returns:
        A :class:`~pathlib.Path` for local locations, else a :class:`Remote`.
    """
    if isinstance(location, Remote):
        return location
    if isinstance(location, Path):
        if not location.is_absolute() and location.parts and _MANGLED.match(location.parts[0]):
            raise BadInputError(
                f"{param} {str(location)!r} looks like an URL that pathlib collapsed ('{location.parts[0]}/...'); "
                "pass URLs as strings",
                param=param,
            )
        return location
    if not isinstance(location, str):
        raise BadInputError(f"{param} must be a path or an URL string, got {type(location).__name__}", param=param)
    match = _URL.match(location)
    if match is None:
        return Path(location)
    scheme = match.group(1).lower()
    if scheme == "file":
        from urllib.parse import unquote, urlparse

        parsed = urlparse(location)
        if parsed.netloc not in ("", "localhost"):
            raise BadInputError(f"{param} {location!r}: file:// URLs name local paths (file:///abs/path)", param=param)
        return Path(unquote(parsed.path))
    return _remote(location, scheme, dict(storage_options or {}), param)


def _remote(url: str, scheme: str, options: dict[str, Any], param: str) -> Remote:
    try:
        import fsspec
        from fsspec.core import url_to_fs
        from fsspec.registry import known_implementations, registry
    except ImportError:
        raise BadInputError(
            f"{param} {url!r} is an URL; reading and writing URLs needs fsspec: pip install 'fisherstore[s3]'",
            param=param,
        ) from None
    if scheme not in known_implementations and scheme not in registry:
        raise BadInputError(
            f"{param} {url!r}: unknown URL scheme {scheme!r} (local paths, file://, memory://, s3:// and the other "
            "fsspec schemes are understood)",
            param=param,
        )
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        hint = known_implementations.get(scheme, {}).get("err") or str(exc)
        raise BadInputError(
            f"{param} {url!r}: the {scheme}:// filesystem is not installed ({hint}; for s3:// pip install "
            "'fisherstore[s3]')",
            param=param,
        ) from None
    try:
        fs, root = url_to_fs(url, **options)
    except TypeError as exc:
        raise BadInputError(
            f"storage_options {options!r} are not accepted by the {scheme}:// filesystem ({exc})",
            param="storage_options",
        ) from None
    root = root.rstrip("/")
    if not root or (scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs") and "/" not in root):
        raise BadInputError(
            f"{param} {url!r}: give a path inside the bucket ({scheme}://bucket/store), not a bucket itself",
            param=param,
        )
    remote = Remote(fs, root, url.rstrip("/"))
    with contextlib.suppress(Exception):  # a listing cached earlier in this process must not hide new objects
        fs.invalidate_cache(root)
    return remote


class Remote:
    """A root on an fsspec filesystem: objects are named by paths relative to it (``"a/zarr.json"``).

    Every call translates the filesystem's errors into fisherstore's: a missing
    object is ``FileNotFoundError``, refused access is ``PermissionError``
    naming the object, missing credentials are a
    :class:`~fisherstore.errors.BadInputError` on ``storage_options``; the
    CLI prints each as one line and exits 2.
    """

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root
        self.url = url

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and other.fs is self.fs and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def protocols(self) -> tuple[str, ...]:
        """The filesystem's protocol names (``("s3", "s3a")``, ``("memory",)``), the first the canonical one."""
        protocol = self.fs.protocol
        return tuple(protocol) if isinstance(protocol, (tuple, list)) else (str(protocol),)

    @property
    def name(self) -> str:
        """The last part of the root (as ``Path.name``)."""
        return self.root.rsplit("/", 1)[-1]

    def key(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` under the root."""
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        """The URL of ``rel`` under the root (for messages)."""
        return f"{self.url}/{rel}" if rel else self.url

    @property
    def parent(self) -> Remote:
        """The remote one level up (as ``Path.parent``)."""
        return Remote(self.fs, self.root.rpartition("/")[0], self.url.rpartition("/")[0])

    def child(self, rel: str) -> Remote:
        """The remote rooted at ``rel`` under this root."""
        return Remote(self.fs, self.key(rel), self.url_of(rel))

    @contextlib.contextmanager
    def errors(self, rel: str = "") -> Iterator[None]:
        """Translate a filesystem's errors while working on ``rel`` (see the class docstring)."""
        where = self.url_of(rel)
        try:
            yield
        except (BadInputError, FileExistsError):
            raise
        except FileNotFoundError as exc:
            if exc.filename:
                raise
            raise FileNotFoundError(errno.ENOENT, _message(exc) or "not found", where) from None
        except PermissionError as exc:
            raise PermissionError(
                errno.EACCES,
                f"permission denied ({_message(exc)}): check the credentials and the bucket's policy",
                where,
            ) from None
        except OSError as exc:
            if exc.filename or exc.strerror:
                raise
            raise OSError(exc.errno or errno.EIO, _message(exc), where) from None
        except Exception as exc:
            module = type(exc).__module__ or ""
            if not module.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs")):
                raise
            if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
                raise BadInputError(
                    f"{where}: no credentials for {self.url.split('://')[0]}:// ({_message(exc)}); set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile in ~/.aws, or storage_options "
                    'such as {"anon": true}',
                    param="storage_options",
                ) from None
            raise OSError(errno.EIO, f"{type(exc).__name__}: {_message(exc)}", where) from None

    # -- reading ------------------------------------------------------------------------------------
    def cat(self, rel: str, limit: int | None = None) -> bytes:
        """The whole object ``rel`` (small ones only: manifests, metadata), or its first ``limit`` bytes.

        With ``limit`` it is one range request, so a reader that caps a
        document (``limit`` = cap + 1) never fetches more than that of a huge one.
        """
        with self.errors(rel):
            if limit is None:
                return cast(bytes, self.fs.cat_file(self.key(rel)))
            return cast(bytes, self.fs.cat_file(self.key(rel), start=0, end=limit))

    def read(self, rel: str, start: int, end: int, where: str | None = None) -> bytes:
        """Bytes ``[start, end)`` of object ``rel`` in one range request; a short object is CorruptDataError."""
        if end <= start:
            return b""
        with self.errors(rel):
            data = cast(bytes, self.fs.cat_file(self.key(rel), start=start, end=end))
        if len(data) != end - start:
            raise CorruptDataError(
                f"{where or self.url_of(rel)}: object ends {end - start - len(data)} bytes early (truncated?)"
            )
        return data

    def read_ranges(self, rel: str, ranges: Sequence[tuple[int, int]], where: str | None = None) -> list[bytes]:
        """Several ``[start, end)`` ranges of object ``rel``, fetched concurrently where the filesystem can."""
        if len(ranges) == 1:
            return [self.read(rel, *ranges[0], where=where)]
        with self.errors(rel):
            key = self.key(rel)
            out = cast(
                list[bytes], self.fs.cat_ranges([key] * len(ranges), [r[0] for r in ranges], [r[1] for r in ranges])
            )
        for (start, end), data in zip(ranges, out, strict=True):
            if isinstance(data, BaseException):
                with self.errors(rel):
                    raise data
            if len(data) != end - start:
                raise CorruptDataError(
                    f"{where or self.url_of(rel)}: object ends {end - start - len(data)} bytes early (truncated?)"
                )
        return out

    def size(self, rel: str) -> int:
        """The size of object ``rel`` (one metadata request)."""
        with self.errors(rel):
            return int(self.fs.size(self.key(rel)))

    def exists(self, rel: str = "") -> bool:
        """Whether ``rel`` is an object or a non-empty prefix."""
        with self.errors(rel):
            return bool(self.fs.exists(self.key(rel)))

    def is_file(self) -> bool:
        """Whether the root itself is an object (a bare file) rather than a prefix."""
        with self.errors():
            return bool(self.fs.isfile(self.root))

    def listing(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (empty when there is nothing)."""
        key = self.key(rel)
        try:
            with self.errors(rel):
                extra = {"refresh": True} if _takes_refresh(self.fs) else {}
                entries = self.fs.ls(key, detail=False, **extra)
        except FileNotFoundError:
            return []
        names = [str(e.get("name", "")) if isinstance(e, dict) else str(e) for e in entries]
        return [n.rstrip("/").rsplit("/", 1)[-1] for n in names if n.rstrip("/") != key]

    # -- writing ------------------------------------------------------------------------------------
    def put(self, rel: str, data: bytes) -> None:
        """Write object ``rel`` in one request (a PUT is atomic on S3: readers see the old or the new object)."""
        with self.errors(rel):
            self.fs.pipe_file(self.key(rel), data)
        if _io._FAULTS:  # the object exists: a durable write, as a rename's directory fsync is locally
            _io._fault_point(self.url_of(rel), before=False)

    def put_json(self, rel: str, obj: Any) -> None:
        """``obj`` as indented JSON in one PUT (the local counterpart is ``_io.write_json_atomic``)."""
        self.put(rel, (json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n").encode())

    def open_write(self, rel: str) -> BinaryIO:
        """A file object writing object ``rel`` in parts of :data:`UPLOAD_BLOCK_BYTES` (multipart on S3).

        The object appears when the file is closed; a file abandoned without
        ``close`` leaves no object (an S3 multipart upload that is never
        completed: invisible to listings and reads, its parts kept, and billed,
        by S3 until aborted or removed by a bucket lifecycle rule).
        """
        with self.errors(rel):
            fh = self.fs.open(self.key(rel), "wb", block_size=UPLOAD_BLOCK_BYTES)
        return cast(BinaryIO, _Upload(fh, self.url_of(rel)) if _io._FAULTS else fh)

    def rm(self, rel: str = "", *, recursive: bool = False) -> None:
        """Remove ``rel`` (a whole prefix with ``recursive``); nothing there is fine."""
        with contextlib.suppress(FileNotFoundError), self.errors(rel):
            self.fs.rm(self.key(rel), recursive=recursive)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.key(rel))


class _Upload:
    """An upload whose completion (``close``, once the object exists) is a fault point of the reliability tests."""

    def __init__(self, fh: Any, where: str) -> None:
        self._fh = fh
        self._where = where

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def write(self, data: Any) -> int:
        return cast(int, self._fh.write(data))

    def close(self) -> None:
        done = self._fh.closed
        self._fh.close()
        if not done:
            _io._fault_point(self._where, before=False)

    def __enter__(self) -> _Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _takes_refresh(fs: Any) -> bool:
    return type(fs).__module__.startswith("s3fs")


def _message(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())


class RemoteFile:
    """One object read by ranges, with its size and first :data:`HEAD_BYTES` fetched once.

    Header parsers take it where they take a file descriptor
    (``formats.safetensors.read_header``): :attr:`size` for ``fstat`` and
    :meth:`pread` for ``pread``.
    """

    def __init__(self, remote: Remote, rel: str) -> None:
        self.remote = remote
        self.rel = rel
        self._size: int | None = None
        self._head = b""

    def __str__(self) -> str:
        return self.remote.url_of(self.rel)

    @property
    def size(self) -> int:
        """The object's size in bytes."""
        if self._size is None:
            self._size = self.remote.size(self.rel)
            self._head = self.remote.read(self.rel, 0, min(self._size, HEAD_BYTES))
        return self._size

    def pread(self, nbytes: int, offset: int, where: str) -> bytes:
        """Exactly ``nbytes`` at ``offset`` (a short object is :class:`~fisherstore.errors.CorruptDataError`)."""
        if self.size >= 0 and offset + nbytes <= len(self._head):  # .size fetches the head once
            return self._head[offset : offset + nbytes]
        return self.remote.read(self.rel, offset, offset + nbytes, where)
