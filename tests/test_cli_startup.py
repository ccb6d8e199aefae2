"""Start-up cost of the CLI: what ``--version`` and a quiet ``convert`` import, and that bars still show on a TTY.

Timings are too noisy to assert on a shared machine; the modules a command
imports are not.  tqdm.auto alone pulls in asyncio and importlib.metadata
(~90 ms), numpy ~120 ms.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import fisherstore
from fisherstore.store import open_store
from fisherstore.testing import fisher_like_tensors

from .conftest import assert_same_tensors

ROOT = Path(__file__).resolve().parents[1]
#: Never needed by --version; tqdm & co. only when a bar is drawn.
HEAVY = ("numpy", "torch", "tqdm", "asyncio", "importlib.metadata", "logging", "multiprocessing", "fisherstore._io")
#: Never needed by a conversion nobody watches.
NOT_FOR_QUIET = ("torch", "tqdm", "asyncio", "importlib.metadata", "multiprocessing", "transformers")


def _run_main(args: list[str], env: dict[str, str] | None = None) -> tuple[int, list[str], str, str]:
    """Run ``main(args)`` in a fresh interpreter; return (exit code, modules it imported, stdout, stderr)."""
    code = textwrap.dedent(
        f"""
        import json, sys
        before = set(sys.modules)
        from fisherstore.cli.main import main
        try:
            rc = main({args!r})
        except SystemExit as e:
            rc = e.code
        sys.stdout.flush()
        print(json.dumps([rc, sorted(set(sys.modules) - before)]), file=sys.__stdout__)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    *out, last = r.stdout.rstrip("\n").split("\n")
    rc, modules = json.loads(last)
    return rc, modules, "\n".join(out), r.stderr


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return sorted({n for n in names for m in modules if m == n or m.startswith(n + ".")})


@pytest.fixture(scope="module")
def fisher_pt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = fisher_like_tensors()
    path = tmp_path_factory.mktemp("startup") / "fisher.pt"
    torch.save(tensors, path)
    return path, tensors


def test_version_imports_nothing_heavy():
    rc, modules, out, err = _run_main(["--version"])
    assert (rc, out, err) == (0, f"fisherstore {fisherstore.__version__}", "")
    assert "fisherstore.cli.main" in modules  # the probe sees what main imported
    assert _loaded(modules, HEAVY) == []
    assert "typing" not in modules


def test_version_of_the_installed_command():
    r = subprocess.run(
        [sys.executable, "-m", "fisherstore.cli.main", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, f"fisherstore {fisherstore.__version__}\n", "")


def test_pyproject_takes_the_version_from_the_package():
    from setuptools.config.pyprojecttoml import read_configuration

    assert read_configuration(ROOT / "pyproject.toml")["project"]["version"] == fisherstore.__version__


SPELLINGS = {  # how the destination (and buffer) is given: the old positional DST, the documented -o/--buffer-size
    "positional": lambda dst: [str(dst)],
    "out-and-buffer-size": lambda dst: ["-o", str(dst), "--buffer-size", "1MiB"],
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "piped"])
@pytest.mark.parametrize("to", ["safetensors", "zarr"])
def test_convert_without_a_terminal_imports_no_bar(fisher_pt, tmp_path, quiet, to, spelling):
    """Nor, without compression, numcodecs (~60 ms with the multiprocessing it pulls in).

    The documented spelling (-o, --buffer-size parsed by fisherstore.sizes) imports no more than the old one.
    """
    src, tensors = fisher_pt
    dst = tmp_path / "st"
    args = [*(["--quiet"] if quiet else []), "--no-fsync", "convert", str(src), *SPELLINGS[spelling](dst), "--to", to]
    rc, modules, out, err = _run_main(args)
    assert (rc, out, err) == (0, f"wrote {dst} ({to})", "")
    assert "fisherstore.conversion" in modules and "numpy" in modules
    assert _loaded(modules, (*NOT_FOR_QUIET, "numcodecs")) == []
    with open_store(dst) as store:
        assert_same_tensors(store, tensors)


def _run_on_tty(args: list[str]) -> tuple[int, str, str]:
    """Run the CLI with stderr on an 80x24 pseudo-terminal; return (exit code, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once the child closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "fisherstore.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            text=True,
        )
        os.close(slave)
        out, _ = p.communicate(timeout=300)
        reader.join(timeout=30)
    finally:
        os.close(master)
    return p.returncode, out, b"".join(chunks).decode("utf-8", "replace")


def test_convert_on_a_terminal_draws_a_bar(fisher_pt, tmp_path):
    src, tensors = fisher_pt
    rc, out, tty = _run_on_tty(["--no-fsync", "convert", str(src), str(tmp_path / "st")])
    assert (rc, out) == (0, f"wrote {tmp_path / 'st'} (safetensors)\n")
    assert "convert → safetensors" in tty and "%|" in tty
    with open_store(tmp_path / "st") as store:
        assert_same_tensors(store, tensors)


def test_quiet_convert_on_a_terminal_draws_nothing(fisher_pt, tmp_path):
    src, _ = fisher_pt
    rc, out, tty = _run_on_tty(["--quiet", "--no-fsync", "convert", str(src), str(tmp_path / "st")])
    assert (rc, out, tty) == (0, f"wrote {tmp_path / 'st'} (safetensors)\n", "")
