"""Kill trials: SIGKILL a writing command at chosen durable writes, rerun it, and count what went wrong.

A run of the command with ``FISHERSTORE_TEST_COUNT_FILE`` set counts its
durable writes (every ``write_all``, file fsync and directory fsync, the step
after a rename: ``fisherstore._io._fault_point``); that run is the reference.
Each trial then runs the command with ``FISHERSTORE_TEST_KILL_AFTER=N`` (the
process SIGKILLs itself right after its N-th durable write, so no cleanup code
runs), inspects what the kill left, reruns the command (with the resume flag
where the destination exists and the command resumes, as documented) and
compares the result with the reference.  Points are spread evenly over the
run, first and last write included, so they are the same on every machine.

A destination may be an URL (``remote=``: ``s3://bucket/prefix``; each trial
writes under its own prefix there, the reference too).  There the durable
writes are the object PUTs and the completed uploads (``storage.Remote``);
what a kill left is opened and verified through the URL, the rerun's result
is compared object by object with the reference's, and "nothing beside the
destination" means the listing of the trial's prefix holds the destination
alone.  An S3 multipart upload a kill abandoned is no object (listings and
reads do not see it); it is counted apart (``open_uploads``), not as debris.

Counted per trial: whether the killed run left a destination that claims to
be complete but is not (``wrong_complete``: must be 0), debris after the kill
(temporaries and lock files; expected, removed by the rerun) and after the
rerun (``debris_left``: must be 0), a rerun result that differs from the
reference (``mismatches``: must be 0) and a changed source (must be 0).
Used by ``tests/test_kills.py`` and ``benchmarks/bench_kills.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import TMP_PREFIX
from ..manifest import MANIFEST_NAME

if TYPE_CHECKING:
    from ..storage import Remote

__all__ = ["KillReport", "Trial", "count_writes", "kill_points", "killed_run", "run_kill_trials", "same_result"]

#: Manifest keys that record when (not what: a merge's ``provenance.merged.at`` too), or the free memory an
#: extraction's plan read at its start (``provenance.plan.budget_bytes``): they differ between any two runs.
_VOLATILE = ("created", "updated", "converted", "at", "budget_bytes")

#: A location a trial writes: a local path, or an URL's :class:`~fisherstore.storage.Remote`.
Where = Path | str


@dataclass
class Trial:
    """One killed run and its rerun."""

    point: int
    killed: bool
    after_kill: str  # "absent", "incomplete" or "complete"
    debris_after_kill: int
    wrong_complete: bool
    rerun_rc: int
    debris_left: int
    mismatch: bool
    source_changed: bool
    note: str = ""
    open_uploads: int = 0  # S3 multipart uploads left open (no objects: not debris; see the module docstring)


@dataclass
class KillReport:
    """Every trial of one command, and the counts that matter."""

    label: str
    command: str
    events: int
    trials: list[Trial] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """``trials, killed, absent/incomplete/complete after the kill, debris_after_kill, debris_left,
        wrong_complete, mismatches, source_changed``."""
        t = self.trials
        return {
            "trials": len(t),
            "killed": sum(x.killed for x in t),
            "absent_after_kill": sum(x.after_kill == "absent" for x in t),
            "incomplete_after_kill": sum(x.after_kill == "incomplete" for x in t),
            "complete_after_kill": sum(x.after_kill == "complete" for x in t),
            "debris_after_kill": sum(x.debris_after_kill > 0 for x in t),
            "debris_left": sum(x.debris_left > 0 for x in t),
            "wrong_complete": sum(x.wrong_complete for x in t),
            "mismatches": sum(x.mismatch for x in t),
            "source_changed": sum(x.source_changed for x in t),
            "open_uploads": sum(x.open_uploads > 0 for x in t),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "command": self.command,
            "events": self.events,
            "counts": self.counts(),
            "trials": [asdict(x) for x in self.trials],
        }


def kill_points(events: int, count: int) -> list[int]:
    """``count`` durable-write numbers spread evenly over ``1..events`` (fewer if the run has fewer writes).

    Args:
        events: the number of durable writes of an uninterrupted run.
        count: how many points to choose.

    Returns:
        The sorted, distinct points.
    """
    if events < 1 or count < 1:
        return []
    if count == 1:
        return [events // 2 or 1]
    return sorted({round(1 + i * (events - 1) / (count - 1)) for i in range(count)})


def _digest(path: Where | None, storage_options: dict[str, Any] | None = None) -> str:
    if isinstance(path, str):  # an URL: every object's name and bytes
        root = _remote(path, storage_options)
        h = hashlib.sha256()
        for rel in _objects(root):
            h.update(rel.encode())
            h.update(root.cat(rel))
        return h.hexdigest()
    if path is None or not path.exists():
        return ""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path)).encode() if p != path else b"")
        h.update(p.read_bytes())
    return h.hexdigest()


def _normal_manifest(data: bytes) -> Any:
    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in _VOLATILE}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    doc = strip(json.loads(data))
    if isinstance(doc, dict):  # the manifest's own digest covers its timestamps: it differs whenever they do
        doc.pop("digest", None)
    return doc


def same_result(a: Where, b: Where, storage_options: dict[str, Any] | None = None) -> str:
    """``""`` when stores (or files) ``a`` and ``b`` hold the same bytes, manifests equal but for timestamps.

    Args:
        a: a store directory or file, or the URL of a store (compared object by object).
        b: another.
        storage_options: the URLs' filesystem options.

    Returns:
        ``""``, or what differs (the first difference found).
    """
    if isinstance(a, str) or isinstance(b, str):
        return _same_objects(_remote(a, storage_options), _remote(b, storage_options))
    if a.is_file() or b.is_file():
        return "" if a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes() else f"{a.name} differs"
    fa = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    fb = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    return _same_contents("files", fa, fb, lambda rel: ((a / rel).read_bytes(), (b / rel).read_bytes()))


def _same_contents(what: str, fa: list[str], fb: list[str], read: Callable[[str], tuple[bytes, bytes]]) -> str:
    """``""`` when both listings match and each name's two contents (``read``) agree, JSON as documents."""
    if fa != fb:
        return f"{what} differ: {sorted(set(fa) ^ set(fb))[:5]}"
    for rel in fa:
        x, y = read(rel)
        if rel.endswith(".json"):
            if _normal_manifest(x) != _normal_manifest(y):
                return f"{rel} differs"
        elif x != y:
            return f"{rel} differs"
    return ""


def _remote(url: Where, storage_options: dict[str, Any] | None) -> Remote:
    from ..storage import Remote, resolve

    where = resolve(str(url), storage_options)
    assert isinstance(where, Remote), url
    return where


def _objects(root: Remote) -> list[str]:
    """Every object under ``root``, relative to it, sorted (a fresh listing: nothing cached)."""
    fs = root.fs
    fs.invalidate_cache()
    return sorted(str(k)[len(root.root) + 1 :] for k in fs.find(root.root))


def _same_objects(a: Remote, b: Remote) -> str:
    return _same_contents("objects", _objects(a), _objects(b), lambda rel: (a.cat(rel), b.cat(rel)))


def _remote_debris(dst: Remote) -> list[str]:
    """Everything in the listing of ``dst``'s prefix but ``dst`` itself, and temporaries inside ``dst``."""
    beside = [n for n in dst.parent.listing() if n != dst.name]
    inside = [n for n in _objects(dst) if n.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]
    return beside + [f"{dst.name}/{n}" for n in inside]


def _remote_state(dst: Remote, storage_options: dict[str, Any] | None) -> tuple[str, bool]:
    """:func:`_state` through an URL."""
    names = dst.listing()
    if not names:
        return "absent", True
    if MANIFEST_NAME not in names:
        return "incomplete", True
    return _opened_state(dst.url, storage_options)


def _opened_state(where: str | Path, storage_options: dict[str, Any] | None) -> tuple[str, bool]:
    """The state of a store with a manifest: incomplete, or complete and whether it verifies."""
    from ..store import open_store
    from ..verification import verify

    try:
        with open_store(where, storage_options=storage_options) as store:
            complete = store.complete
    except Exception:
        return "incomplete", True
    if not complete:
        return "incomplete", True
    try:
        return "complete", not verify(where, storage_options=storage_options)
    except Exception:
        return "complete", False


def _open_uploads(dst: Remote) -> int:
    """S3 multipart uploads begun under ``dst`` and never completed or aborted (0 where the API has none)."""
    lister = getattr(dst.fs, "list_multipart_uploads", None)
    if lister is None:
        return 0
    bucket, _, prefix = dst.root.partition("/")
    try:
        uploads = lister(bucket)
    except Exception:
        return 0
    return sum(1 for u in uploads if str(u.get("Key", "")).startswith(prefix + "/"))


def _debris(dst: Path) -> list[str]:
    """Everything beside ``dst`` in its own trial folder, and temporaries inside it."""
    beside = [p.name for p in dst.parent.iterdir() if p.name != dst.name]
    inside = [p.name for p in dst.iterdir() if p.name.startswith(TMP_PREFIX)] if dst.is_dir() else []
    return beside + [f"{dst.name}/{n}" for n in inside]


def _state(dst: Path) -> tuple[str, bool]:
    """What a killed run left at ``dst``, and whether it verifies (only meaningful when it claims completeness)."""
    if not dst.exists() or (dst.is_dir() and not (dst / MANIFEST_NAME).exists() and not any(dst.iterdir())):
        return "absent", True
    if dst.is_dir() and not (dst / MANIFEST_NAME).exists():
        return "incomplete", True
    return _opened_state(dst, None)


def _run(args: Sequence[str], env: dict[str, str], fork: bool) -> tuple[int, str]:
    """Run the CLI with ``args``: ``(exit code or -signal, stderr)``.

    ``fork``: in a forked child of this process (no interpreter start-up, for the fast tests; only for
    commands that run no torch thread pools), the fault points set directly instead of through ``env``.
    """
    if not fork:
        done = subprocess.run(cli_argv(*args), env=env, capture_output=True, text=True, check=False)
        return done.returncode, done.stderr
    import itertools
    import tempfile

    with tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 70
            try:
                os.dup2(err.fileno(), 2)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115  (pytest swaps sys.stderr)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                import importlib

                from .. import _io

                main = importlib.import_module("fisherstore.cli.main").main  # the CLI sits above the library

                _io._KILL_AFTER = int(env.get("FISHERSTORE_TEST_KILL_AFTER", "0"))
                _io._FAULTS = True
                _io._events = itertools.count(1)
                code = main(["--quiet", *map(str, args)])
                if env.get("FISHERSTORE_TEST_COUNT_FILE"):
                    Path(env["FISHERSTORE_TEST_COUNT_FILE"]).write_text(f"{_io._last_event}\n")
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        status = _wait(pid)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), err.read().decode(errors="replace")


def _wait(pid: int, timeout: float = 600.0) -> int:
    """The wait status of child ``pid``; a child still running after ``timeout`` seconds is killed (a hang)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.02)


def count_writes(
    args: Sequence[str | Path], work: Path, *, env: dict[str, str] | None = None, fork: bool = False
) -> int:
    """Run the CLI with ``args`` once, uninterrupted, and return how many durable writes it made.

    Args:
        args: the command's arguments (after ``fisherstore``).
        work: a folder for the count file.
        env: extra environment for the command.
        fork: run it in a forked child of this process (see :func:`run_kill_trials`).

    Returns:
        The number of durable writes (the largest kill point).
    """
    count_file = work / "events.txt"
    rc, err = _run(list(map(str, args)), {**_base(env), "FISHERSTORE_TEST_COUNT_FILE": str(count_file)}, fork)
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed ({rc}): {err[-2000:]}")
    return int(count_file.read_text())


def killed_run(
    args: Sequence[str | Path], after: int, *, env: dict[str, str] | None = None, fork: bool = False
) -> tuple[int, str]:
    """Run the CLI with ``args``, SIGKILLed right after its ``after``-th durable write.

    Args:
        args: the command's arguments (after ``fisherstore``).
        after: the durable write after which the process kills itself.
        env: extra environment for the command.
        fork: run it in a forked child of this process (see :func:`run_kill_trials`).

    Returns:
        ``(exit code, stderr)``; the exit code is ``-signal.SIGKILL`` when the kill happened.
    """
    return _run(list(map(str, args)), {**_base(env), "FISHERSTORE_TEST_KILL_AFTER": str(after)}, fork)


def _base(env: dict[str, str] | None) -> dict[str, str]:
    base = {**os.environ, **(env or {})}
    for key in ("FISHERSTORE_TEST_KILL_AFTER", "FISHERSTORE_TEST_ENOSPC_AFTER", "FISHERSTORE_TEST_COUNT_FILE"):
        base.pop(key, None)
    return base


def run_kill_trials(
    label: str,
    argv: Callable[[Where], list[Any]],
    work: Path,
    *,
    name: str,
    points: int,
    source: Where | None = None,
    resume_flag: str | None = None,
    env: dict[str, str] | None = None,
    fork: bool = False,
    remote: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> KillReport:
    """Run ``argv(dst)`` once whole, then killed at ``points`` durable writes, each followed by a rerun.

    Args:
        label: what the report calls the command.
        argv: the CLI arguments writing to ``dst`` (a fresh destination per trial, alone in its folder).
        work: a scratch folder (created).
        name: the destination's file name (``out``, ``out.zarr``).
        points: how many kill points (spread by :func:`kill_points`).
        source: a path (or an URL) the command only reads (checked unchanged after every trial), if any.
        resume_flag: the flag a rerun adds when the killed run left a destination (``--resume``), if any.
        env: extra environment for the command.
        fork: run each command in a forked child instead of a new interpreter (fast; no torch work).
        remote: an URL prefix (``s3://bucket/kills``): the destinations are URLs under it, one prefix per trial
            (``argv`` gets the URL as a string); ``None``: local folders under ``work``.
        storage_options: the URL's filesystem options, for inspecting what a trial left (the command gets its
            own through ``argv`` or ``env``).

    Returns:
        The report; each trial's rerun destination is removed once compared.
    """
    work.mkdir(parents=True, exist_ok=True)
    base = _base(env)
    ref: Where
    if remote is None:
        ref = work / "reference" / name
        ref.parent.mkdir(parents=True, exist_ok=True)
    else:
        ref = f"{remote.rstrip('/')}/reference/{name}"
    events = count_writes(argv(ref), work, env=env, fork=fork)
    shown: Where = f"{remote.rstrip('/')}/…/{name}" if remote else Path(name)
    report = KillReport(label, " ".join(["fisherstore", *map(str, argv(shown))]), events)
    source_digest = _digest(source, storage_options)
    for n in kill_points(events, points):
        dst: Where
        if remote is None:
            dst = work / f"kill-{n:05d}" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
        else:
            dst = f"{remote.rstrip('/')}/kill-{n:05d}/{name}"
        killed = killed_run(argv(dst), n, env=env, fork=fork)[0] == -signal.SIGKILL
        if isinstance(dst, str):
            at = _remote(dst, storage_options)
            after, verifies = _remote_state(at, storage_options)
            debris_after = len(_remote_debris(at))
            uploads = _open_uploads(at)
            exists = after != "absent"
        else:
            after, verifies = _state(dst)
            debris_after = len(_debris(dst))
            uploads = 0
            exists = dst.exists()
        wrong = after == "complete" and (not verifies or bool(same_result(dst, ref, storage_options)))
        extra = [resume_flag] if resume_flag and exists else []
        rerun_rc, rerun_err = _run([*map(str, argv(dst)), *extra], base, fork)
        note = ""
        ok_rerun = rerun_rc == 0 or (after == "complete" and "already exists" in rerun_err)
        if not ok_rerun:
            note = f"rerun failed ({rerun_rc}): {rerun_err.strip()[-300:]}"
        if isinstance(dst, str):
            left = _remote_debris(at)
            diff = same_result(dst, ref, storage_options) if ok_rerun and at.listing() else "no result"
        else:
            left = _debris(dst)
            diff = same_result(dst, ref) if ok_rerun and dst.exists() else "no result"
        mismatch = bool(diff)
        if ok_rerun and diff:
            note = diff
        if left:
            note = (note + "; " if note else "") + f"left: {left[:4]}"
        if wrong:
            note = (
                (note + "; " if note else "")
                + "complete after the kill but "
                + ("does not verify" if not verifies else same_result(dst, ref, storage_options))
            )
        report.trials.append(
            Trial(
                point=n,
                killed=killed,
                after_kill=after,
                debris_after_kill=debris_after,
                wrong_complete=wrong,
                rerun_rc=rerun_rc,
                debris_left=len(left),
                mismatch=mismatch,
                source_changed=_digest(source, storage_options) != source_digest,
                note=note,
                open_uploads=uploads,
            )
        )
        if isinstance(dst, str):
            at.parent.rm(recursive=True)
        else:
            shutil.rmtree(dst.parent, ignore_errors=True)
    return report


def cli_argv(*args: str | Path) -> list[str]:
    """``python -m fisherstore.cli.main --quiet ARGS`` in this interpreter."""
    return [sys.executable, "-m", "fisherstore.cli.main", "--quiet", *map(str, args)]
