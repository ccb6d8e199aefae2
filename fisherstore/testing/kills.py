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
from typing import Any

from .._io import TMP_PREFIX
from ..manifest import MANIFEST_NAME

__all__ = ["KillReport", "Trial", "kill_points", "run_kill_trials", "same_result"]

#: Manifest keys that record when (not what), or the free memory an extraction's plan read at its start
#: (``provenance.plan.budget_bytes``): they differ between any two runs of the same command.
_VOLATILE = ("created", "updated", "converted", "budget_bytes")


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


def _digest(path: Path | None) -> str:
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


def same_result(a: Path, b: Path) -> str:
    """``""`` when stores (or files) ``a`` and ``b`` hold the same bytes, manifests equal but for timestamps.

    Args:
        a: a store directory or file.
        b: another.

    Returns:
        ``""``, or what differs (the first difference found).
    """
    if a.is_file() or b.is_file():
        return "" if a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes() else f"{a.name} differs"
    fa = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    fb = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    if fa != fb:
        return f"files differ: {sorted(set(fa) ^ set(fb))[:5]}"
    for rel in fa:
        x, y = (a / rel).read_bytes(), (b / rel).read_bytes()
        if rel.endswith(".json"):
            if _normal_manifest(x) != _normal_manifest(y):
                return f"{rel} differs"
        elif x != y:
            return f"{rel} differs"
    return ""


def _debris(dst: Path) -> list[str]:
    """Everything beside ``dst`` in its own trial folder, and temporaries inside it."""
    beside = [p.name for p in dst.parent.iterdir() if p.name != dst.name]
    inside = [p.name for p in dst.iterdir() if p.name.startswith(TMP_PREFIX)] if dst.is_dir() else []
    return beside + [f"{dst.name}/{n}" for n in inside]


def _state(dst: Path) -> tuple[str, bool]:
    """What a killed run left at ``dst``, and whether it verifies (only meaningful when it claims completeness)."""
    from ..store import open_store
    from ..verification import verify

    if not dst.exists() or (dst.is_dir() and not (dst / MANIFEST_NAME).exists() and not any(dst.iterdir())):
        return "absent", True
    if dst.is_dir() and not (dst / MANIFEST_NAME).exists():
        return "incomplete", True
    try:
        with open_store(dst) as store:
            complete = store.complete
    except Exception:
        return "incomplete", True
    if not complete:
        return "incomplete", True
    try:
        return "complete", not verify(dst)
    except Exception:
        return "complete", False


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


def run_kill_trials(
    label: str,
    argv: Callable[[Path], list[str]],
    work: Path,
    *,
    name: str,
    points: int,
    source: Path | None = None,
    resume_flag: str | None = None,
    env: dict[str, str] | None = None,
    fork: bool = False,
) -> KillReport:
    """Run ``argv(dst)`` once whole, then killed at ``points`` durable writes, each followed by a rerun.

    Args:
        label: what the report calls the command.
        argv: the CLI arguments writing to ``dst`` (a fresh destination per trial, alone in its folder).
        work: a scratch folder (created).
        name: the destination's file name (``out``, ``out.zarr``).
        points: how many kill points (spread by :func:`kill_points`).
        source: a path the command only reads (checked unchanged after every trial), if any.
        resume_flag: the flag a rerun adds when the killed run left a destination (``--resume``), if any.
        env: extra environment for the command.
        fork: run each command in a forked child instead of a new interpreter (fast; no torch work).

    Returns:
        The report; each trial's rerun destination is removed once compared.
    """
    work.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, **(env or {})}
    for key in ("FISHERSTORE_TEST_KILL_AFTER", "FISHERSTORE_TEST_ENOSPC_AFTER", "FISHERSTORE_TEST_COUNT_FILE"):
        base.pop(key, None)
    ref = work / "reference" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    count_file = work / "events.txt"
    rc, err = _run(argv(ref), {**base, "FISHERSTORE_TEST_COUNT_FILE": str(count_file)}, fork)
    if rc != 0:
        raise RuntimeError(f"{label}: the uninterrupted run failed ({rc}): {err[-2000:]}")
    events = int(count_file.read_text())
    report = KillReport(label, " ".join(["fisherstore", *map(str, argv(Path(name)))]), events)
    source_digest = _digest(source)
    for n in kill_points(events, points):
        dst = work / f"kill-{n:05d}" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        killed = _run(argv(dst), {**base, "FISHERSTORE_TEST_KILL_AFTER": str(n)}, fork)[0] == -signal.SIGKILL
        after, verifies = _state(dst)
        wrong = after == "complete" and (not verifies or bool(same_result(dst, ref)))
        debris_after = len(_debris(dst))
        extra = [resume_flag] if resume_flag and dst.exists() else []
        rerun_rc, rerun_err = _run([*argv(dst), *extra], base, fork)
        note = ""
        ok_rerun = rerun_rc == 0 or (after == "complete" and "already exists" in rerun_err)
        if not ok_rerun:
            note = f"rerun failed ({rerun_rc}): {rerun_err.strip()[-300:]}"
        diff = same_result(dst, ref) if ok_rerun and dst.exists() else "no result"
        mismatch = bool(diff)
        if ok_rerun and diff:
            note = diff
        left = _debris(dst)
        if left:
            note = (note + "; " if note else "") + f"left: {left[:4]}"
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
                source_changed=_digest(source) != source_digest,
                note=note,
            )
        )
        shutil.rmtree(dst.parent, ignore_errors=True)
    return report


def cli_argv(*args: str | Path) -> list[str]:
    """``python -m fisherstore.cli.main --quiet ARGS`` in this interpreter."""
    return [sys.executable, "-m", "fisherstore.cli.main", "--quiet", *map(str, args)]
