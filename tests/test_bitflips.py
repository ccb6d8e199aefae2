"""Single-bit flips in every file of a store: ``fisherstore verify`` must catch each flip that changes meaning.

Four stores (safetensors, zarr, compressed zarr, a mask store written by
``fisherstore svd``) are written once; each trial flips one bit at a seeded
random position of one location class, runs ``fisherstore verify``
in-process through the CLI's ``main`` and restores the byte.

**Meaningful.** A flip changes meaning unless every reader of the file
reads the same thing from it afterwards:

* a JSON file (the manifest, the HF index, a ``zarr.json``,
  ``layer_importance.json``): the flip is a no-op iff the file still parses
  and its parsed document has the same canonical JSON text (sorted keys, no
  whitespace; ``1`` and ``1.0`` differ), e.g. ``1e-05`` → ``1E-05``;
* a safetensors shard: every byte is read (the 8-byte header length, the
  header, whose trailing spaces are part of the JSON text, and tensor data,
  which has no holes by the format's rules), so a flip in the header is a
  no-op iff the header parses to the same canonical JSON, and a flip in the
  data always changes meaning;
* a zarr shard: a flip in the shard index (offsets, sizes and their CRC-32C)
  always changes meaning; a flip in the chunk bytes (including the
  ``chunk padding`` class: an uncompressed edge chunk's fill past the last row) is a no-op iff
  zarr-python, an independent reader, still reads the array and returns
  exactly the original values (a flip in an edge chunk's padding past the
  last row, or in a compressor header field that decoding ignores).

**Caught**: exit 1 with ``BAD`` lines (naming the tensor whose bytes hold a
data flip), or, for the manifest only, exit 2 with one ``error:`` line (the
manifest does not parse or validate).  **Lost**: a meaningful flip that
verify passes (exit 0).  **Crash**: anything else (an internal error).  Lost
and crash must be 0.  A no-op flip that verify flags anyway is counted as
``flagged`` (conservative, allowed).

The default suite runs a small seeded subset per backend; the full count
(>= 200 flips per backend) is ``@slow`` and also what
``benchmarks/bench_reliability.py`` reports.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch

from fisherstore.cli.main import main as cli_main
from fisherstore.manifest import Manifest
from fisherstore.testing import fisher_like, write_store

BACKENDS = ("safetensors", "zarr", "zarr-compressed", "masks")
#: Flips per location class and backend in the full run (each backend's total is >= 200).
FULL = {
    "safetensors": {"data": 70, "shard header": 50, "HF index": 30, "manifest": 40, "importance": 10},
    "zarr": {
        "data": 60,
        "chunk padding": 10,
        "shard index": 40,
        "array metadata": 40,
        "manifest": 40,
        "importance": 10,
    },
    "zarr-compressed": {"data": 70, "shard index": 40, "array metadata": 40, "manifest": 40, "importance": 10},
    "masks": {"data": 70, "shard header": 50, "HF index": 30, "manifest": 50},
}
#: Flips per location class in the default (fast) suite.
FAST = 1


def small_tensors() -> dict[str, torch.Tensor]:
    """Nine small tensors over four layers: 50-row up_proj (edge chunks padded in zarr), a 1-d fp32 norm."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(4):
        tensors[f"model.layers.{layer}.self_attn.q_proj.weight"] = fisher_like((16, 32), g, torch.bfloat16)
        tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = fisher_like((50, 32), g, torch.bfloat16)
    tensors["model.norm.weight"] = torch.rand(32, generator=g)
    return tensors


def verify_cli(path: Path) -> tuple[int, str]:
    """``fisherstore --quiet verify PATH`` in-process: (exit code, stderr)."""
    err = StringIO()
    with redirect_stdout(StringIO()), redirect_stderr(err):
        code = cli_main(["--quiet", "verify", str(path)])
    return code, err.getvalue()


def build_stores(root: Path) -> dict[str, Path]:
    """The four stores under ``root`` (zarr with 1 KiB chunks and 2 KiB shards: several of each per array)."""
    tensors = small_tensors()
    zarr_opts = {"chunk_mb": 1 / 1024, "shard_mb": 2 / 1024}
    stores = {
        "safetensors": write_store(root / "st", tensors),
        "zarr": write_store(root / "z", tensors, backend="zarr", **zarr_opts),
        "zarr-compressed": write_store(
            root / "zc", tensors, backend="zarr", compression="blosc-zstd-bitshuffle", **zarr_opts
        ),
    }
    with redirect_stdout(StringIO()), redirect_stderr(StringIO()):
        assert cli_main(["--quiet", "svd", str(stores["safetensors"]), "--rank", "2", "-o", str(root / "m")]) == 0
    stores["masks"] = root / "m"
    for path in stores.values():
        assert verify_cli(path) == (0, ""), path  # the pristine stores are sound
    return stores


# -- where the bytes are ---------------------------------------------------------------------------------
@dataclass
class Region:
    """Bytes ``[begin, end)`` of one file, of one location class; ``owner`` is the tensor a data region holds."""

    path: Path
    begin: int
    end: int
    kind: str
    owner: str | None = None


def regions(store: Path) -> list[Region]:
    """Every byte of every file in the store, cut into location classes."""
    manifest = Manifest.load(store / "fisherstore.json")
    out: list[Region] = []
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        size = path.stat().st_size
        if path.name == "fisherstore.json":
            out.append(Region(path, 0, size, "manifest"))
        elif path.name == "layer_importance.json":
            out.append(Region(path, 0, size, "importance"))
        elif path.name.endswith(".safetensors.index.json"):
            out.append(Region(path, 0, size, "HF index"))
        elif path.name == "zarr.json":
            out.append(Region(path, 0, size, "array metadata"))
        elif path.suffix == ".safetensors":
            n = int.from_bytes(path.read_bytes()[:8], "little")
            out.append(Region(path, 0, 8 + n, "shard header"))
            for name, info in manifest.tensors.items():
                if info.location["file"] == path.name and info.nbytes:
                    begin, end = info.location["offsets"]
                    out.append(Region(path, begin, end, "data", name))
        else:  # a zarr shard: chunks, then the index of (offset, nbytes) pairs and their CRC-32C
            name = path.parent.name
            meta = json.loads((path.parent / "zarr.json").read_text())
            sharding = meta["codecs"][0]["configuration"]
            per_shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // sharding["chunk_shape"][0]
            index = 16 * per_shard + 4
            pad = _padding(meta, path, per_shard) if len(sharding["codecs"]) == 1 else 0
            out.append(Region(path, 0, size - index - pad, "data", name))
            if pad:
                out.append(Region(path, size - index - pad, size - index, "chunk padding", name))
            out.append(Region(path, size - index, size, "shard index", name))
    return out


def _padding(meta: dict, path: Path, per_shard: int) -> int:
    """Bytes of fill value past the last row at the end of an uncompressed shard (0 unless it holds the edge)."""
    shape = meta["shape"]
    if len(shape) < 2:
        return 0
    chunk_rows = meta["codecs"][0]["configuration"]["chunk_shape"][0]
    last_chunk = -(-shape[0] // chunk_rows) - 1
    if path.name.split(".")[1] != str(last_chunk // per_shard):
        return 0
    row_bytes = int(np.prod(shape[1:])) * {"bfloat16": 2, "float32": 4}[meta["data_type"]]
    return ((last_chunk + 1) * chunk_rows - shape[0]) * row_bytes


def pick(regions_of_kind: list[Region], rng: random.Random) -> tuple[Region, int]:
    """A uniformly random byte among the regions (weighted by size)."""
    total = sum(r.end - r.begin for r in regions_of_kind)
    at = rng.randrange(total)
    for r in regions_of_kind:
        if at < r.end - r.begin:
            return r, r.begin + at
        at -= r.end - r.begin
    raise AssertionError("unreachable")


# -- what a flip means -----------------------------------------------------------------------------------
def _canonical_json(raw: bytes) -> str | None:
    try:
        return json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    except (UnicodeDecodeError, ValueError):
        return None


def _zarr_values(array_dir: Path) -> bytes | None:
    """The array's bytes as zarr-python reads them, ``None`` if it refuses."""
    import zarr

    import fisherstore

    fisherstore.register_bfloat16()
    try:
        return np.ascontiguousarray(zarr.open_array(store=str(array_dir), mode="r")[...]).tobytes()
    except Exception:  # any refusal of the independent reader means the flip changed meaning
        return None


def meaningful(region: Region, pos: int, before: bytes, after: bytes, pristine: dict[Path, bytes]) -> bool:
    """Whether flipping ``before`` into ``after`` (the whole file) changes what a reader takes from it."""
    if region.kind in ("manifest", "importance", "HF index", "array metadata"):
        return _canonical_json(after) is None or _canonical_json(after) != _canonical_json(before)
    if region.kind == "shard header":
        if pos < 8:
            return True
        n = int.from_bytes(before[:8], "little")
        head = _canonical_json(after[8 : 8 + n])
        return head is None or head != _canonical_json(before[8 : 8 + n])
    if region.kind == "shard index" or region.path.suffix == ".safetensors":
        return True
    values = _zarr_values(region.path.parent)  # a zarr chunk byte: does the independent reader still agree?
    return values is None or values != pristine[region.path.parent]


# -- trials ----------------------------------------------------------------------------------------------
@dataclass
class Trial:
    backend: str
    kind: str
    file: str
    pos: int
    bit: int
    meaningful: bool
    code: int
    outcome: str  # caught | noop | flagged | lost | crash
    message: str = ""


@dataclass
class Campaign:
    trials: list[Trial] = field(default_factory=list)

    def table(self) -> list[dict[str, object]]:
        """Rows (backend, location class, trials, caught, no-op, flagged no-op, lost, crash)."""
        counts: dict[tuple[str, str], Counter[str]] = {}
        for t in self.trials:
            counts.setdefault((t.backend, t.kind), Counter())[t.outcome] += 1
        rows: list[dict[str, object]] = []
        for (backend, kind), c in counts.items():
            rows.append(
                {
                    "backend": backend,
                    "location": kind,
                    "trials": sum(c.values()),
                    "caught": c["caught"],
                    "no-op": c["noop"] + c["flagged"],
                    "no-op flagged": c["flagged"],
                    "lost": c["lost"],
                    "crash": c["crash"],
                }
            )
        return rows


@contextmanager
def flipped(path: Path, pos: int, bit: int) -> Iterator[tuple[bytes, bytes]]:
    """The file with one bit flipped for the duration; yields (before, after) contents."""
    before = path.read_bytes()
    after = bytearray(before)
    after[pos] ^= 1 << bit
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(after[pos : pos + 1]), pos)
        yield before, bytes(after)
    finally:
        os.pwrite(fd, before[pos : pos + 1], pos)
        os.close(fd)


def judge(region: Region, is_meaningful: bool, code: int, err: str) -> str:
    if not is_meaningful:
        return "noop" if code == 0 else "flagged" if code in (1, 2) and "internal error" not in err else "crash"
    if code == 1 and "internal error" not in err and "BAD " in err:
        if region.kind == "data" and region.owner is not None and region.owner not in err:
            return "crash"  # caught, but blamed on another tensor
        return "caught"
    if code == 2 and region.kind == "manifest" and err.count("\n") == 1 and "fisherstore: error:" in err:
        return "caught"
    return "lost" if code == 0 else "crash"


def run_campaign(
    root: Path, quotas: Callable[[str], dict[str, int]], seed: int = 0, backends: tuple[str, ...] = BACKENDS
) -> Campaign:
    """Write the stores under ``root`` and run every trial; ``quotas(backend)`` gives flips per location class."""
    stores = build_stores(root)
    campaign = Campaign()
    for backend in backends:
        store = stores[backend]
        rng = random.Random(f"{seed}-{backend}")
        all_regions = regions(store)
        pristine = {
            p: _zarr_values(p) for p in {r.path.parent for r in all_regions if r.kind == "shard index"}
        }  # zarr arrays as zarr-python reads them intact
        for kind, n in quotas(backend).items():
            of_kind = [r for r in all_regions if r.kind == kind]
            assert of_kind, f"{backend} has no {kind}"
            for _ in range(n):
                region, pos = pick(of_kind, rng)
                bit = rng.randrange(8)
                with flipped(region.path, pos, bit) as (before, after):
                    is_meaningful = meaningful(region, pos, before, after, pristine)
                    code, err = verify_cli(store)
                outcome = judge(region, is_meaningful, code, err)
                first = next((line for line in err.splitlines()), "")
                campaign.trials.append(
                    Trial(
                        backend,
                        kind,
                        str(region.path.relative_to(store)),
                        pos,
                        bit,
                        is_meaningful,
                        code,
                        outcome,
                        first[:300],
                    )
                )
        assert verify_cli(store) == (0, ""), f"{backend}: a flip was not restored"
    shutil.rmtree(root)
    return campaign


def _assert_nothing_lost(campaign: Campaign) -> None:
    bad = [t for t in campaign.trials if t.outcome in ("lost", "crash")]
    assert not bad, "\n".join(f"{t.outcome}: {t}" for t in bad[:10])
    assert sum(t.outcome == "caught" for t in campaign.trials) > len(campaign.trials) // 2


def test_bit_flips_fast_subset(tmp_path):
    campaign = run_campaign(tmp_path / "flips", lambda b: dict.fromkeys(FULL[b], FAST), seed=1)
    assert len(campaign.trials) == sum(FAST * len(q) for q in FULL.values())
    _assert_nothing_lost(campaign)


@pytest.mark.slow
def test_bit_flips_full(tmp_path):
    campaign = run_campaign(tmp_path / "flips", lambda b: FULL[b], seed=0)
    per_backend = Counter(t.backend for t in campaign.trials)
    assert all(per_backend[b] >= 200 for b in BACKENDS), per_backend
    _assert_nothing_lost(campaign)
