"""Fuzzing the readers: mutated and random inputs may only fail with the project's own errors.

Targets: the fisher.pt reader (formats/legacy_pt.py), the bare safetensors
reader, the zarr reader (array metadata and shard index) and the manifest
parser (``Manifest.from_dict`` and ``Manifest.parse`` of the file's bytes).
Inputs are valid files mutated (byte flips, truncations, insertions,
overwrites; JSON values replaced anywhere in the document) and random JSON
structures.  Opening and then reading every tensor whole must either work or
raise a :class:`~fisherstore.errors.FisherStoreError`; anything else
(``KeyError``, ``RecursionError``, ``MemoryError``, ...) is a reader bug.

Bounded for CI: ``FISHERSTORE_FUZZ_EXAMPLES`` examples per target (default
60; the whole module runs in ~30 s on a loaded 2-core machine); set it to
e.g. 2000 for a long run.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fisherstore.errors import FisherStoreError
from fisherstore.formats.legacy_pt import LegacyPtSource
from fisherstore.formats.safetensors import SafetensorsFileSource
from fisherstore.manifest import Manifest
from fisherstore.store import open_store
from fisherstore.testing import write_store

EXAMPLES = int(os.environ.get("FISHERSTORE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a loaded CI machine: time is bounded by the example count
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 60,  # the default run is reproducible; a long run explores
    database=None,
)

TENSORS = {
    "model.layers.0.self_attn.q_proj.weight": torch.arange(24, dtype=torch.float32).reshape(4, 6).to(torch.bfloat16),
    "model.layers.0.mlp.up_proj.weight": torch.ones(3, 5, dtype=torch.float32),
    "model.layers.1.mlp.down_proj.weight": torch.full((5, 3), 0.5, dtype=torch.float32),
    "model.norm.weight": torch.ones(6, dtype=torch.bfloat16),
}


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fisherstore-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def good(work: Path) -> dict[str, Any]:
    torch.save(TENSORS, work / "good.pt")
    save_file(TENSORS, str(work / "good.safetensors"))
    zarr = write_store(work / "good-zarr", TENSORS, backend="zarr", group_size=1)
    zstd = write_store(work / "good-zstd", TENSORS, backend="zarr", group_size=1, compression="zstd", chunk_mb=1e-5)
    return {
        "pt": (work / "good.pt").read_bytes(),
        "st": (work / "good.safetensors").read_bytes(),
        "zarr": zarr,
        "zstd": zstd,
        "manifest": json.loads((zarr / "fisherstore.json").read_text()),
    }


# -- mutations ------------------------------------------------------------------------------------------
@st.composite
def mutated(draw: st.DrawFn, data: bytes, focus: tuple[int, int] | None = None) -> bytes:
    """``data`` after 1-4 byte flips, truncations, insertions or overwrites (positions in ``focus`` if given)."""
    out = bytearray(data)
    lo, hi = focus or (0, len(data))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        pos = draw(st.integers(min(lo, len(out)), max(min(hi, len(out)) - 1, min(lo, len(out)))))
        if op == "flip" and out:
            out[min(pos, len(out) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            value = draw(st.binary(min_size=1, max_size=8))
            out[pos : pos + len(value)] = value
    return bytes(out)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["../x", "/etc/passwd", "a\x00b", "complex128", "C128", "bfloat16", "F32", "zstd", "."]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON document (the document itself is ``()``)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def replaced(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with 1-3 values (anywhere, keys included) replaced by random JSON, or deleted."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            return draw(JSON_VALUES)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(path[-1])
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return doc


def _read_all(source: Any) -> None:
    for info in list(source.infos.values()):
        rows = info.shape[0] if info.shape else 1
        source.read_rows(info, 0, rows)


def _only_our_errors(action) -> None:
    """Run ``action``: it may succeed or raise one of the project's errors, with a message (the CLI's one line)."""
    try:
        action()
    except FisherStoreError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"


# -- fisher.pt -----------------------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_fuzz_fisher_pt(work, good, data):
    raw = good["pt"]
    pickle_at = raw.index(b"data.pkl") + 8  # mostly the pickle and the zip directory: where the parsing is
    focus = data.draw(st.sampled_from([None, (0, min(len(raw), pickle_at + 600)), (len(raw) - 400, len(raw))]))
    path = work / "m.pt"
    path.write_bytes(data.draw(mutated(raw, focus)))

    def run() -> None:
        with LegacyPtSource(path) as src:
            _read_all(src)

    _only_our_errors(run)


# -- bare safetensors -------------------------------------------------------------------------------------
def _header(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _read_safetensors(path: Path) -> None:
    """Open a bare .safetensors file and read every tensor of it."""
    src = SafetensorsFileSource(path)
    try:
        _read_all(src)
    finally:
        src.close()


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_bytes(work, good, data):
    raw = good["st"]
    n = struct.unpack("<Q", raw[:8])[0]
    focus = data.draw(st.sampled_from([None, (0, 8 + n)]))
    path = work / "m.safetensors"
    path.write_bytes(data.draw(mutated(raw, focus)))

    _only_our_errors(lambda: _read_safetensors(path))


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header_values(work, good, data):
    header, body = _header(good["st"])
    doc = data.draw(replaced(header))
    blob = json.dumps(doc).encode()
    path = work / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)

    _only_our_errors(lambda: _read_safetensors(path))


# -- zarr -------------------------------------------------------------------------------------------------------
def _fresh_copy(base: Path, work: Path) -> Path:
    dst = work / "z"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(base, dst)
    return dst


def _read_store(path: Path) -> None:
    with open_store(path) as store:
        for name in store.names:
            store.read(name)


@FUZZ
@given(data=st.data(), compressed=st.booleans())
def test_fuzz_zarr_metadata(work, good, data, compressed):
    store = _fresh_copy(good["zstd" if compressed else "zarr"], work)
    name = data.draw(st.sampled_from(sorted(TENSORS)))
    meta_path = store / name / "zarr.json"
    doc = data.draw(replaced(json.loads(meta_path.read_text())))
    meta_path.write_text(json.dumps(doc))
    _only_our_errors(lambda: _read_store(store))


@FUZZ
@given(data=st.data(), compressed=st.booleans())
def test_fuzz_zarr_shards(work, good, data, compressed):
    """Shard files mutated, mostly in the index (the last 16 bytes per chunk plus 4 of crc32c) and chunk headers."""
    store = _fresh_copy(good["zstd" if compressed else "zarr"], work)
    name = data.draw(st.sampled_from(sorted(TENSORS)))
    shard = next(p for p in (store / name).iterdir() if p.name != "zarr.json")
    raw = shard.read_bytes()
    focus = data.draw(st.sampled_from([None, (max(0, len(raw) - 68), len(raw)), (0, 16)]))
    shard.write_bytes(data.draw(mutated(raw, focus)))
    _only_our_errors(lambda: _read_store(store))


# -- the manifest ---------------------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_fuzz_manifest_values(good, data):
    doc = data.draw(replaced(good["manifest"]))
    _only_our_errors(lambda: Manifest.from_dict(doc, "fuzz"))


@FUZZ
@given(doc=JSON_VALUES)
def test_fuzz_manifest_random_structures(doc):
    _only_our_errors(lambda: Manifest.from_dict(doc, "fuzz"))


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_bytes(good, data):
    raw = json.dumps(good["manifest"], indent=1).encode()
    _only_our_errors(lambda: Manifest.parse(data.draw(mutated(raw)), "fuzz"))


def test_the_fuzz_targets_accept_their_unmutated_inputs(work, good):
    """The harness reads the good inputs without error, so a refusal under fuzzing comes from a mutation."""
    with LegacyPtSource(work / "good.pt") as src:
        _read_all(src)
        assert sorted(src.infos) == sorted(TENSORS)
    src2 = SafetensorsFileSource(work / "good.safetensors")
    _read_all(src2)
    assert sorted(src2.infos) == sorted(TENSORS)
    src2.close()
    for key in ("zarr", "zstd"):
        _read_store(good[key])
    assert sorted(Manifest.from_dict(good["manifest"]).tensors) == sorted(TENSORS)
