"""One writer at a time, and the debris of writers that died.

**The lock.**  Every writer of a destination (a store being created, resumed,
overwritten or converted into, a mask store, a ``fisher.pt`` target) holds
:func:`lock_store` for the whole write.  Locally that is ``fcntl.flock`` on
``.<name>.fisherstore-lock`` *beside* the destination: one place whether the
destination exists yet or not, and where ``--overwrite`` and a conversion's
final rename cannot remove it.  The file records its holder (pid, host, start
token, command, since) so a second writer's one-line error names it.  The
kernel drops a flock when its process dies, however it dies, so a lock is
never stuck: a later writer gets the flock, finds the dead holder's record,
reports it as stale (a warning) and replaces it.  Release unlinks the file
while still holding the flock; an acquirer that locked an unlinked file
(``st_ino`` of the path differs from that of its descriptor) retries, so
unlinking cannot let two writers in.  Readers never take the lock: a complete
store is immutable, and a store being written shows only committed groups.

On S3 (``s3://…``) the lock is an *object* at the same place,
``.<name>.fisherstore-lock`` beside the destination's prefix (:class:`ObjectLock`),
holding the same record plus its lease.  It is created with a conditional
PUT (``If-None-Match: *``: of two writers exactly one succeeds) and renewed
by a thread every quarter lease with a conditional PUT on its own ETag
(``If-Match``).  A lock whose last renewal is older than its lease (the
server's clock: its ``Date`` against the object's ``Last-Modified``), or
whose holder ran on this host and is gone, is stale: it is reported and taken
over by a conditional PUT on the stale ETag, so that of two writers taking
over, one wins.  A holder whose renewal fails because another writer took
the lock over has *lost* it (:attr:`WriterLock.lost`); the store writer then
refuses to commit.  Release deletes the object.  The lease
(:data:`LEASE_SECONDS`, ``FISHERSTORE_LOCK_LEASE``) bounds how long a writer
may be frozen (a stopped process, a partitioned network) before another may
take over.  Other object stores (``memory://``, GCS, ...) get
:class:`UnguardedLock`: no lock, said once in the log.

**Debris.**  Temporary names record their owner (``_io.tmp_name``:
``.fstmp-<pid>-<token>@<host>~<label>``).  :func:`find_debris` lists what a
destination has lying around: temporary entries inside it, temporary entries
beside it that name it, and a lock file left by a dead holder; each with a
state — ``dead`` (same host, the process is gone or its pid was reused),
``alive``, ``elsewhere`` (another host: cannot be checked, never removed) or
``unknown``.  Inside a store, a temporary name without an owner (the backends'
shard and group temporaries) belongs to the store's writer, so it is dead
exactly when no live process holds the store's lock.  :func:`remove_stale`,
called by every writer once it holds the lock, removes the dead ones and
reports the others.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, cast

from ._io import TMP_PREFIX, Owner, parse_tmp_name, start_token, this_owner
from .errors import StoreLockedError
from .storage import Remote

__all__ = [
    "LOCK_SUFFIX",
    "Debris",
    "FileLock",
    "Holder",
    "UnguardedLock",
    "WriterLock",
    "find_debris",
    "lock_path",
    "lock_store",
    "object_writer",
    "owner_state",
    "read_holder",
    "remove_stale",
]

log = logging.getLogger(__name__)

#: The lock file of destination ``d`` is ``d.parent / f".{d.name}{LOCK_SUFFIX}"``.
LOCK_SUFFIX = ".fisherstore-lock"

_LOCK_TRIES = 50

#: How long an object-store lock holds without a renewal (seconds); its holder renews it every quarter lease.
LEASE_SECONDS = 60.0


def lock_path(dst: str | Path) -> Path:
    """Where the lock of destination ``dst`` lives: a hidden file beside it."""
    dst = Path(dst)
    return dst.parent / f".{dst.name}{LOCK_SUFFIX}"


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock: the owner, the command line and when it took the lock (UTC)."""

    owner: Owner
    command: str
    since: str

    def __str__(self) -> str:
        return f"{self.owner} ({self.command}, since {self.since})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.owner.pid,
            "host": self.owner.host,
            "token": self.owner.token,
            "command": self.command,
            "since": self.since,
        }

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder a lock file records; ``None`` for an empty or unreadable record."""
        try:
            d = json.loads(text)
            return cls(Owner(int(d["pid"]), str(d["token"]), str(d["host"])), str(d["command"]), str(d["since"]))
        except (ValueError, TypeError, KeyError):
            return None


def _command() -> str:
    """This process's command line, shortened, for a lock record."""
    argv = list(sys.argv) or ["python"]
    name = Path(argv[0]).name
    if name in ("main.py", "__main__.py", "-c", ""):
        name = "fisherstore" if "fisherstore" in argv[0] or name == "main.py" else "python"
    text = " ".join([name, *_redacted(argv[1:])])
    return text if len(text) <= 200 else text[:197] + "..."


def _redacted(args: list[str]) -> list[str]:
    """``args`` without storage options (credentials: ``--storage-options JSON`` or any JSON object argument)."""
    out = []
    for i, arg in enumerate(args):
        if arg.startswith("--storage-options="):
            arg = "--storage-options=…"
        elif arg.lstrip().startswith("{") or (i and args[i - 1] == "--storage-options"):
            arg = "…"
        out.append(arg)
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def owner_state(owner: Owner) -> str:
    """``"alive"``, ``"dead"`` or ``"elsewhere"`` (another host: cannot be checked) for ``owner``.

    A pid that exists but started at another time (or boot) than the token
    says is a reused pid: the owner is dead.  A zombie has exited: dead.
    """
    me = this_owner()
    if owner.host != me.host:
        return "elsewhere"
    if owner == me:
        return "alive"
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass  # it exists, under another user
    if owner.token != "0" and start_token(owner.pid) != owner.token:
        return "dead"
    return "alive"


class WriterLock:
    """The one-writer lock of a destination; release it once (idempotent), or use it as a context manager.

    Attributes:
        target: the destination locked (a path or URL, as given).
        stale: the record of a dead holder this lock replaced (reported as a warning), else ``None``.
    """

    target: str
    stale: Holder | None = None
    #: Why the lock is no longer ours although not released (another writer took it over), else ``None``.
    lost: str | None = None

    def release(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def held(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FileLock(WriterLock):
    """``fcntl.flock`` on the lock file beside a local destination (see the module docstring)."""

    def __init__(self, dst: str | Path, command: str | None = None) -> None:
        self.target = str(dst)
        self.path = lock_path(dst)
        self._fd: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_LOCK_TRIES):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:  # a read-only or full destination: name it, not the hidden lock file
                raise OSError(exc.errno, exc.strerror, str(dst)) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                record = _read_fd(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
                holder = Holder.parse(record)
                who = str(holder) if holder else f"another process (its record in {self.path} is not written yet)"
                raise StoreLockedError(
                    f"{dst} is being written by {who}; one writer at a time: wait for it to finish or stop it"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) it between our open and our flock: try the new file
                os.close(fd)
                continue
            self._fd = fd
            break
        else:
            raise StoreLockedError(f"{dst}: could not take its lock {self.path} after {_LOCK_TRIES} tries")
        self.stale = Holder.parse(_read_fd(fd))
        if self.stale is not None:
            log.warning(
                "%s: its lock was left by %s, which is gone (killed or crashed); taking it over", dst, self.stale
            )
        mine = json.dumps(Holder(this_owner(), command or _command(), _now()).to_dict()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, mine, 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the flock (in that order: see the module docstring)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(self.path)
        finally:
            os.close(fd)

    def __del__(self) -> None:  # a writer dropped without close(): do not keep the lock (or its file)
        with contextlib.suppress(Exception):
            self.release()


class ObjectLock(WriterLock):
    """A lock object beside a destination on S3, renewed by a thread (see the module docstring).

    Attributes:
        url: the lock object's URL.
        lease: seconds the lock holds without a renewal.
    """

    def __init__(self, dst: Remote, command: str | None = None, lease: float | None = None) -> None:
        self.target = str(dst)
        self._dst = dst  # errors name the destination, not the hidden lock object
        self._remote = dst.parent
        self._rel = f".{dst.name}{LOCK_SUFFIX}"
        self.url = self._remote.url_of(self._rel)
        self.lease = _lease() if lease is None else float(lease)
        self._bucket, _, self._key = self._remote.key(self._rel).partition("/")
        self._record = {**Holder(this_owner(), command or _command(), _now()).to_dict(), "lease_seconds": self.lease}
        self._etag: str | None = None
        self._stop = threading.Event()
        for _ in range(_LOCK_TRIES):
            try:
                self._etag = self._put(IfNoneMatch="*")
                break
            except FileExistsError:
                pass
            if self._take_over():
                break
        else:
            raise StoreLockedError(f"{self.target}: could not take its lock {self.url} after {_LOCK_TRIES} tries")
        self._thread = threading.Thread(target=self._renew, name=f"fisherstore-lock {self.url}", daemon=True)
        self._thread.start()

    @property
    def held(self) -> bool:
        return self._etag is not None and self.lost is None

    def _put(self, **condition: str) -> str:
        """PUT this holder's record under ``condition``; its new ETag.  A failed condition is FileExistsError."""
        body = json.dumps({**self._record, "renewed": _now()}).encode()
        try:
            with self._dst.errors():
                out = self._remote.fs.call_s3("put_object", Bucket=self._bucket, Key=self._key, Body=body, **condition)
        except OSError as exc:
            if isinstance(exc, FileExistsError) or "PreconditionFailed" in f"{exc} {exc.__cause__}":
                raise FileExistsError(errno.EEXIST, "the lock object changed", self.url) from None
            raise
        return str(out["ETag"])

    def _take_over(self) -> bool:
        """Take over the existing lock object if it is stale; False when it went away first (try again)."""
        found = _lock_object(self._dst)
        if found is None:
            return False
        etag, age, lease, holder = found
        gone = holder is not None and owner_state(holder.owner) == "dead"
        who = str(holder) if holder else f"an unknown writer (unreadable record in {self.url})"
        if age <= lease and not gone:
            raise StoreLockedError(
                f"{self.target} is being written by {who}, its lock renewed {age:.0f} s ago (lease {lease:.0f} s); "
                "one writer at a time: wait for it to finish or stop it"
            )
        try:
            self._etag = self._put(IfMatch=etag)
        except FileExistsError:
            raise StoreLockedError(f"{self.target}: another writer took over its stale lock {self.url} first") from None
        self.stale = holder
        why = "is gone (killed or crashed)" if gone else f"has not renewed it for {age:.0f} s (lease {lease:.0f} s)"
        log.warning("%s: its lock was left by %s, which %s; taking it over", self.target, who, why)
        return True

    def _renew(self) -> None:
        """The renewal thread: a conditional PUT on our own ETag every quarter lease until released or lost."""
        while not self._stop.wait(self.lease / 4):
            etag = self._etag
            if etag is None:
                return
            try:
                self._etag = self._put(IfMatch=etag)
            except FileExistsError:
                self.lost = f"another writer took over {self.url}"
                log.error("%s: lost its lock: %s; this run will not commit", self.target, self.lost)
                return
            except OSError as exc:  # a network error: try again; the lease covers a few misses
                log.warning("%s: could not renew its lock %s (%s); retrying", self.target, self.url, exc)

    def release(self) -> None:
        """Stop renewing, then delete the lock object if it is still ours."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        etag, self._etag = self._etag, None
        if etag is None or self.lost is not None:
            return
        with contextlib.suppress(OSError):
            with self._dst.errors():
                head = self._remote.fs.call_s3("head_object", Bucket=self._bucket, Key=self._key)
            if str(head["ETag"]) == etag:
                self._remote.rm(self._rel)


def _lock_object(dst: Remote) -> tuple[str, float, float, Holder | None] | None:
    """``dst``'s lock object: its ETag, age (server clock), lease and holder; None if there is none."""
    rel = f".{dst.name}{LOCK_SUFFIX}"
    bucket, _, key = dst.parent.key(rel).partition("/")
    try:
        with dst.errors():
            head = dst.parent.fs.call_s3("head_object", Bucket=bucket, Key=key)
            record = cast(bytes, dst.parent.fs.cat_file(dst.parent.key(rel))).decode(errors="replace")
    except FileNotFoundError:
        return None
    try:
        lease = float(json.loads(record).get("lease_seconds", LEASE_SECONDS))
    except (ValueError, TypeError, AttributeError):
        lease = LEASE_SECONDS
    return str(head["ETag"]), _age(head), lease, Holder.parse(record)


def object_writer(dst: Remote) -> Holder | None:
    """The live holder of ``dst``'s S3 lock object (renewed within its lease, not a dead local process), if any.

    Reads only (a HEAD and a GET): never takes the lock.
    """
    if not _on_s3(dst):
        return None
    found = _lock_object(dst)
    if found is None:
        return None
    _, age, lease, holder = found
    return holder if holder is not None and age <= lease and owner_state(holder.owner) != "dead" else None


def _on_s3(dst: Remote) -> bool:
    """Whether ``dst`` is on S3 (conditional PUTs: the lock object works there)."""
    return "s3" in dst.protocols


def _lease() -> float:
    """:data:`LEASE_SECONDS`, or ``FISHERSTORE_LOCK_LEASE`` (seconds) when set."""
    try:
        return max(0.1, float(os.environ.get("FISHERSTORE_LOCK_LEASE", "") or LEASE_SECONDS))
    except ValueError:
        return LEASE_SECONDS


def _age(head: dict[str, Any]) -> float:
    """Seconds since the object of a HEAD response was written, on the server's clock."""
    date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(date) if date else None
    modified = head["LastModified"]
    if now is None:
        return time.time() - modified.timestamp()
    return (now - modified).total_seconds()


class UnguardedLock(WriterLock):
    """No lock: for object stores without conditional writes (``memory://``, ...)."""

    def __init__(self, dst: str | Path | Remote) -> None:
        self.target = str(dst)
        self._held = True
        log.info("%s: no writer lock on this kind of object store; do not run two writers on it", dst)

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        self._held = False


def lock_store(dst: str | Path | Remote, *, command: str | None = None) -> WriterLock:
    """Take the one-writer lock of ``dst``; :class:`~fisherstore.errors.StoreLockedError` names a live holder.

    Args:
        dst: the destination (store directory or file, or a resolved :class:`~fisherstore.storage.Remote`)
            about to be written; a local parent is created if missing.
        command: what to record as the holder's command (default: this process's command line).

    Returns:
        The held lock: a :class:`FileLock` locally, an :class:`ObjectLock` on S3, an :class:`UnguardedLock`
        on other object stores; release it when the write is finished or abandoned.
    """
    if isinstance(dst, Remote):
        return ObjectLock(dst, command) if _on_s3(dst) else UnguardedLock(dst)
    if "://" in str(dst):
        return UnguardedLock(dst)
    return FileLock(dst, command)


def _read_fd(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return os.pread(fd, 4096, 0).decode()
    return ""


def read_holder(dst: str | Path) -> Holder | None:
    """The record in ``dst``'s lock file, if there is one (a live writer's, or a dead one's left behind).

    Reads only: never takes or probes the lock, so a reader cannot get in a writer's way.
    """
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return Holder.parse(lock_path(dst).read_text())
    return None


@dataclass(frozen=True)
class Debris:
    """A leftover of a writer: a temporary file or directory, or a lock file of a dead holder."""

    path: Path
    kind: str  # "temp" or "lock"
    state: str  # "dead", "alive", "elsewhere" or "unknown"
    owner: Owner | None
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        owner = None if self.owner is None else {"pid": self.owner.pid, "host": self.owner.host}
        return {"path": str(self.path), "kind": self.kind, "state": self.state, "owner": owner, "bytes": self.nbytes}


def _size(path: Path) -> int:
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
    except OSError:
        return 0


def _entries(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def find_debris(dst: str | Path, lock: WriterLock | None = None) -> list[Debris]:
    """What writers of ``dst`` left: temporaries inside it, temporaries beside it naming it, a dead holder's lock file.

    Args:
        dst: a store directory or destination file (need not exist).
        lock: ``dst``'s lock when the caller holds it: then no other writer can be at work on ``dst``, so its
            unowned temporaries are dead and its own lock file is not debris.

    Returns:
        One :class:`Debris` per leftover, in name order (inside first).
    """
    dst = Path(dst)
    held = lock is not None and lock.held
    holder = None if held else read_holder(dst)
    writer = "dead" if held or holder is None else owner_state(holder.owner)
    found: list[Debris] = []
    if dst.is_dir() and not dst.is_symlink():
        for name in _entries(dst):
            if not name.startswith(TMP_PREFIX):
                continue
            parsed = parse_tmp_name(name)
            state = writer if parsed is None else _tagged_state(parsed[0], held)
            found.append(Debris(dst / name, "temp", state, parsed[0] if parsed else None, _size(dst / name)))
    label = dst.name[:96] + "."
    for name in _entries(dst.parent):
        if name.startswith(TMP_PREFIX):
            parsed = parse_tmp_name(name)
            if parsed is not None and parsed[1].startswith(label):
                path = dst.parent / name
                found.append(Debris(path, "temp", _tagged_state(parsed[0], False), parsed[0], _size(path)))
        elif name == lock_path(dst).name and not held:
            state = "unknown" if holder is None else owner_state(holder.owner)
            if state != "alive":
                path = dst.parent / name
                found.append(Debris(path, "lock", state, holder.owner if holder else None, _size(path)))
    return found


def _tagged_state(owner: Owner, held: bool) -> str:
    """The state of a temporary owned by ``owner``; under our own lock, one of ours is a leftover too."""
    if held and owner == this_owner():
        return "dead"
    return owner_state(owner)


def remove_stale(dst: str | Path, lock: WriterLock) -> list[Debris]:
    """Remove the debris of dead writers of ``dst`` (the caller holds ``lock``); report what must stay.

    Args:
        dst: the destination being written.
        lock: its held lock.

    Returns:
        What was removed.
    """
    removed = []
    for d in find_debris(dst, lock):
        if d.state != "dead":
            why = {
                "alive": f"its writer {d.owner} is still running",
                "elsewhere": f"its writer ran on {d.owner.host if d.owner else 'another host'}, which cannot be "
                "checked from here",
            }.get(d.state, "its owner is unknown")
            log.warning(
                "left %s (%d bytes) in place: %s; remove it by hand once that writer is gone", d.path, d.nbytes, why
            )
            continue
        try:
            shutil.rmtree(d.path) if d.path.is_dir() and not d.path.is_symlink() else d.path.unlink()
        except FileNotFoundError:
            continue
        removed.append(d)
        who = f" of {d.owner}" if d.owner else ""
        log.warning("removed %s (%d bytes), a leftover%s of a writer that is gone", d.path, d.nbytes, who)
    return removed
