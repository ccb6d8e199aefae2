"""The hostile-input corpus (tests/hostile_corpus.py) through the real CLI.

For every case and every command that reads it: the one-line refusal with
its words and exit 2 (or exit 1 from ``verify`` for damage found in the
data), no code from a pickle run (the marker its payload would create is
absent), the input unchanged, nothing written beside it or to the
destination.  The decompression bombs and huge claimed sizes also run in a
child process whose peak RSS is measured, and a few cases check the real
exit code and the single stderr line of the installed entry point.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_store
from .hostile_corpus import COMMANDS, CORPUS, MARKER, Bad, Bases, argv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bases(tmp_path_factory, gemma_bf16) -> Bases:
    import torch
    from safetensors.torch import save_file

    from fisherstore.masks import write_masks

    root = tmp_path_factory.mktemp("bases")
    torch.save(gemma_bf16, root / "fisher.pt")
    save_file(dict(gemma_bf16), str(root / "fisher.safetensors"))
    gen = torch.Generator().manual_seed(0)
    masks = {  # two layers of rank-2 modes: any orthonormal U, V will do for a layout test
        f"model.layers.{i}.mlp.up_proj.weight": (
            torch.linalg.qr(torch.randn(8, 2, generator=gen))[0],
            torch.tensor([2.0, 1.0]),
            torch.linalg.qr(torch.randn(6, 2, generator=gen))[0],
        )
        for i in range(2)
    }
    write_masks(root / "masks", masks)
    return Bases(
        pt=root / "fisher.pt",
        st_file=root / "fisher.safetensors",
        st_store=write_store(root / "st", gemma_bf16),
        zarr_store=write_store(root / "zarr", gemma_bf16, backend="zarr"),
        zarr_zstd=write_store(root / "zarr-zstd", gemma_bf16, backend="zarr", compression="zstd"),
        masks=root / "masks",
        tensors=dict(gemma_bf16),
    )


def _digest(path: Path) -> list[tuple[str, int, int | str]]:
    """Names, sizes and contents (hashes; size and mtime for the 300 MiB sparse manifest) of a file or tree."""
    import hashlib

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out: list[tuple[str, int, int | str]] = []
    for p in files:
        st = p.stat()
        content = st.st_mtime_ns if st.st_size > 64 << 20 else hashlib.sha256(p.read_bytes()).hexdigest()
        out.append((str(p.relative_to(path.parent)), st.st_size, content))
    return out


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_the_corpus_is_large_and_varied():
    """>= 40 cases, ids unique, every category of issue 16 present."""
    ids = [c.id for c in CORPUS]
    assert len(ids) == len(set(ids)) and len(ids) >= 40, len(ids)
    by_category = collections.Counter(c.category for c in CORPUS)
    for category in (
        "truncated/empty",
        "wrong magic",
        "zip bomb / ZIP lies",
        "pickle global",
        "pickle huge object",
        "header lies",
        "zarr metadata",
        "dtype not allowed",
        "missing chunk/shard",
        "manifest fields",
        "hostile name",
    ):
        assert by_category[category] >= 2, (category, by_category)
    assert {c.kind for c in CORPUS} == set(COMMANDS)


def _fast_ids() -> set[str]:
    """The first case of each (damaged file class, category, expected exit): the fast suite's share.

    The file class is the id's prefix (``pt``, ``st``, ``manifest``, ``shard``,
    ``zarr``, ``masks``, ``prompts``); every other case runs with ``-m slow``.
    """
    first: dict[tuple[str, str, int], str] = {}
    for c in CORPUS:
        first.setdefault((c.id.split("-")[0], c.category, c.verify), c.id)
    return set(first.values())


FAST = _fast_ids()


def test_the_fast_share_covers_every_file_class_and_category():
    """The fast subset still holds a case of every file class, category and exit code of the corpus."""
    fast = [c for c in CORPUS if c.id in FAST]
    assert 20 <= len(fast) < len(CORPUS), len(fast)
    for key in (lambda c: c.id.split("-")[0], lambda c: c.category, lambda c: c.verify):
        assert {key(c) for c in fast} == {key(c) for c in CORPUS}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if c.id in FAST else pytest.mark.slow) for c in CORPUS], ids=lambda c: c.id
)
def test_hostile_input_is_refused_by_every_command_that_reads_it(cli, tmp_path, bases, case: Bad):
    work = tmp_path / "work"
    work.mkdir()
    src = case.build(work, bases)
    digest = _digest(src)
    listing = _listing(tmp_path)
    commands = case.commands or COMMANDS[case.kind]
    for command in commands:
        out = tmp_path / f"out-{command}"
        code, stdout, err = cli(*argv(command, src, out))
        expected = case.verify if command == "verify" else 2
        assert code == expected, (command, code, stdout, err)
        if code == 2:
            assert err.startswith("fisherstore: error:") and err.count("\n") == 1, (command, err)
        else:  # verify: one BAD line per damaged tensor, then the count
            assert err.startswith("BAD ") and err.rstrip("\n").splitlines()[-1].endswith("problem(s) found"), err
        assert case.message in err, (command, err)
        assert "internal error" not in err and "Traceback" not in err
        assert not (work / MARKER).exists(), f"{case.id}: the pickle's payload ran"
        assert _digest(src) == digest, f"{case.id}: {command} modified its input"
        assert _listing(tmp_path) == listing, f"{case.id}: {command} left {_listing(tmp_path) - listing}"


_PROBE = """
import io, json, resource, sys, contextlib
from fisherstore.cli.main import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, err.getvalue(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss])
print(json.dumps(results))
"""

#: Peak RSS growth allowed while refusing the bombs, over the same child's peak after it read good inputs
#: of each kind (the interpreter with numpy and torch: 400-500 MB); one bomb opened would take its claimed
#: size (1 GiB and up).
_RSS_GROWTH_CAP_KB = 256 << 10
BOMBS = [c for c in CORPUS if c.bomb]


def test_bombs_are_refused_before_allocating(tmp_path, bases):
    """Every bomb in one child process: one line, exit 2 (1 from verify), peak RSS far below any claimed size.

    Peak RSS only grows, so the peak after each bomb bounds what that bomb took.
    """
    assert len(BOMBS) >= 5
    warm = [  # good inputs through the same commands first: imports and caches are in the baseline
        ["--quiet", *argv(command, src, tmp_path / f"warm-{i}-{command}")]
        for i, src in enumerate((bases.pt, bases.st_store, bases.zarr_store))
        for command in ("info", "convert", "verify")
    ]
    runs = []
    for case in BOMBS:
        work = tmp_path / case.id
        work.mkdir()
        src = case.build(work, bases)
        for command in ("info", "convert", "verify"):
            runs.append((case, command, ["--quiet", *argv(command, src, work / "out")]))
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(warm + [a for _, _, a in runs])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])  # the commands print their own lines first
    assert [r[0] for r in results[: len(warm)]] == [0] * len(warm), results[: len(warm)]
    baseline_kb = results[len(warm) - 1][2]
    for (case, command, _), (code, err, peak_kb) in zip(runs, results[len(warm) :], strict=True):
        assert code == (case.verify if command == "verify" else 2), (case.id, command, err)
        assert case.message in err, (case.id, command, err)
        if code == 2:
            assert err.startswith("fisherstore: error:") and err.count("\n") == 1, err
        growth = peak_kb - baseline_kb
        assert growth < _RSS_GROWTH_CAP_KB, f"{case.id} {command}: peak RSS {peak_kb >> 10} MiB, +{growth >> 10} MiB"
        assert not (tmp_path / case.id / "out").exists()


@pytest.mark.parametrize("case_id", ["pt-os-system", pytest.param("zarr-dtype-complex128", marks=pytest.mark.slow)])
def test_the_installed_command_exits_2_with_one_stderr_line(tmp_path, bases, case_id):
    """The console script (a real process): exit status 2, exactly one line on stderr, nothing on stdout."""
    case = next(c for c in CORPUS if c.id == case_id)
    work = tmp_path / "work"
    work.mkdir()
    src = case.build(work, bases)
    exe = Path(sys.executable).with_name("fisherstore")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fisherstore.cli.main"]
    proc = subprocess.run([*cmd, "info", str(src)], capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr.startswith("fisherstore: error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert case.message in proc.stderr
    assert not (work / MARKER).exists()


def test_a_pickle_marker_would_be_seen(tmp_path):
    """The marker check can fail: unpickling the corpus's os.system payload with pickle itself creates it."""
    import pickle

    from .hostile_corpus import _Call

    marker = tmp_path / MARKER
    pickle.loads(pickle.dumps(_Call(os.system, f"touch {marker}")))  # the payload, run on purpose
    assert marker.exists()


#: The store cases again, uploaded to memory:// (bar the 300 MiB sparse manifest): the caps and checks hold
#: for object-store reads too, which take other code paths (range reads, ``Remote.cat``).
_REMOTE = [c for c in CORPUS if c.kind == "store" and c.id != "manifest-over-cap"]
_remote_ids = itertools.count()


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if c.id in FAST else pytest.mark.slow) for c in _REMOTE], ids=lambda c: c.id
)
def test_hostile_store_on_an_object_store_is_refused_alike(cli, tmp_path, bases, case: Bad):
    """The same one-line refusal (or verify's exit 1) for the store uploaded to memory://; nothing written locally."""
    fsspec = pytest.importorskip("fsspec")
    work = tmp_path / "work"
    work.mkdir()
    src = case.build(work, bases)
    root = f"/hostile-corpus/{case.id}-{next(_remote_ids)}"
    fs = fsspec.filesystem("memory")
    fs.put(str(src), root, recursive=True)
    try:
        for command in [c for c in case.commands or COMMANDS[case.kind] if c in ("info", "verify")]:
            code, stdout, err = cli(command, f"memory://{root}")
            assert code == (case.verify if command == "verify" else 2), (command, code, stdout, err)
            assert "internal error" not in err and "Traceback" not in err, err
            if code == 2:
                assert err.startswith("fisherstore: error:") and err.count("\n") == 1, (command, err)
            assert case.message in err or case.message.replace(" file", " object") in err, (command, err)
    finally:
        fs.rm(root, recursive=True)
    assert _listing(tmp_path) == {"work", *(str(p.relative_to(tmp_path)) for p in work.rglob("*"))}
