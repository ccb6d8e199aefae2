"""Child-process measurement shared by the benchmarks: wall time and peak RSS of each command.

Every competitor runs as its own child process so that its peak resident set
(``ru_maxrss`` from ``wait4``, which counts resident mapped file pages too) is
its own.  Results are written as JSON plus a Markdown table that quotes the
exact command that produced them.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Run:
    """One measured child process."""

    label: str
    wall_s: float
    peak_rss_mb: float
    stdout: str
    returncode: int


def run_child(label: str, argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> Run:
    """Run ``argv`` as a child; return its wall time and peak RSS (MiB, from ``wait4``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if check and rc != 0:
        raise RuntimeError(f"{label} failed ({rc}): {stderr[-2000:]}")
    return Run(label, wall, usage.ru_maxrss / 1024, stdout.strip(), rc)


def python(code: str, *args: str) -> list[str]:
    """argv running ``code`` in a fresh interpreter of this venv."""
    return [sys.executable, "-c", code, *args]


def machine() -> dict[str, object]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}


def write_results(name: str, command: str, payload: dict, table: str) -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (with the command that made them)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **payload,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=lambda o: asdict(o)) + "\n")
    (RESULTS / f"{name}.md").write_text(
        f"# {name}\n\nCommand: `{command}`\n\nMachine: {payload['machine']}, {payload['date']}\n\n{table}\n"
    )


def this_command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)
