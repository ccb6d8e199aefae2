"""The legacy fisher.pt reader and writer: round trips with stock torch, row reads, hostile inputs, memory."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from fisherstore._io import TMP_PREFIX
from fisherstore.errors import BadInputError, CorruptDataError, FisherStoreError, UnsafePickleError
from fisherstore.formats.legacy_pt import LegacyPtSource
from fisherstore.formats.legacy_pt_writer import write_pt
from fisherstore.manifest import TensorSpec
from fisherstore.testing import fisher_like_tensors

ROOT = Path(__file__).resolve().parents[1]


# -- helpers ----------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The C-order bytes of a tensor (copied into fresh strides: views may keep odd ones on size-1 dims)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)


def assert_bit_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    assert torch.equal(_bits(got), _bits(want))


def _chunks(t: torch.Tensor, size: int | None = None) -> list[memoryview]:
    raw = memoryview(_bits(t).numpy())
    if size is None or not raw.nbytes:
        return [raw] if raw.nbytes else []
    return [raw[i : i + size] for i in range(0, raw.nbytes, size)]


def _write(path: Path, tensors: dict[str, torch.Tensor], chunk: int | None = None) -> list[TensorSpec]:
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    write_pt(path, specs, ((s, _chunks(tensors[s.name], chunk)) for s in specs))
    return specs


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with LegacyPtSource(path) as src:
        out = {}
        for name, info in src.infos.items():
            rows = info.shape[0] if info.shape else 1
            out[name] = src.read_rows(info, 0, rows)
        return out


def _rezip(src: Path, dst: Path, compression: int = zipfile.ZIP_STORED) -> None:
    """Copy a torch.save archive record by record with Python's zipfile (no alignment, no descriptors)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))


def _zip_with_pickle(path: Path, payload: bytes, extra: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", b"3\n")
        for name, data in (extra or {}).items():
            z.writestr(f"archive/{name}", data)


SMALL = {
    "bf16": lambda g: torch.randn(5, 7, generator=g).to(torch.bfloat16),
    "fp32": lambda g: torch.randn(4, 3, 2, generator=g),
    "fp16": lambda g: torch.randn(6, 3, generator=g).half(),
    "fp64": lambda g: torch.randn(3, generator=g).double(),
    "int64": lambda g: torch.randint(-(2**40), 2**40, (4, 2), generator=g),
    "int8": lambda g: torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
    "bool": lambda g: torch.rand(3, 3, generator=g) > 0.5,
    "scalar": lambda g: torch.tensor(3.5, dtype=torch.bfloat16),
    "vector": lambda g: torch.randn(11, generator=g),
    "empty": lambda g: torch.empty(0, 4),
    "empty_mid": lambda g: torch.empty(3, 0, 2, dtype=torch.float16),
}


def small_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t.{k}": make(g) for k, make in SMALL.items()}


@pytest.fixture(scope="module")
def gemma() -> dict[str, torch.Tensor]:
    return fisher_like_tensors()


# -- reading files written by torch.save ------------------------------------------------------------


@pytest.mark.parametrize(
    "save_kwargs",
    [{}, {"_use_new_zipfile_serialization": True}, {"pickle_protocol": 4}, {"pickle_protocol": 5}],
    ids=["default", "explicit-zip", "protocol-4", "protocol-5"],
)
def test_reads_torch_save_bit_exactly(tmp_path: Path, save_kwargs: dict) -> None:
    tensors = small_tensors()
    path = tmp_path / "fisher.pt"
    torch.save(tensors, path, **save_kwargs)
    got = _read_all(path)
    assert list(got) == list(tensors)  # pickle order
    for name, t in tensors.items():
        assert_bit_identical(got[name], t)


def test_infos_describe_the_tensors(tmp_path: Path, gemma: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "fisher.pt"
    torch.save(gemma, path)
    with LegacyPtSource(path) as src:
        assert list(src.infos) == list(gemma)
        raw = path.read_bytes()
        for name, info in src.infos.items():
            t = gemma[name]
            assert info.shape == tuple(t.shape) and info.dtype == "bfloat16" and info.group == 0
            assert info.layer == int(name.split(".layers.")[1].split(".")[0])
            assert info.kind == name.split(".")[-2].removesuffix("_proj")
            assert info.checksum == "" and info.sum != info.sum  # NaN: unknown in this format
            assert info.location["record"].startswith("fisher/data/")
            off = info.location["offset"]
            assert raw[off : off + info.nbytes] == _bits(t).numpy().tobytes()


def test_reads_state_dicts_parameters_and_file_objects(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4)
    sd_path = tmp_path / "sd.pt"
    torch.save(lin.state_dict(), sd_path)  # OrderedDict with _metadata (BUILD opcode)
    got = _read_all(sd_path)
    assert list(got) == ["weight", "bias"]
    assert_bit_identical(got["weight"], lin.weight.detach())

    par_path = tmp_path / "par.pt"
    torch.save({"p": torch.nn.Parameter(torch.arange(4.0))}, par_path)
    assert_bit_identical(_read_all(par_path)["p"], torch.arange(4.0))

    buf = io.BytesIO()
    torch.save({"x": torch.arange(6, dtype=torch.int32)}, buf)  # archive prefix "archive/"
    obj_path = tmp_path / "obj.pt"
    obj_path.write_bytes(buf.getvalue())
    with LegacyPtSource(obj_path) as src:
        assert src.infos["x"].location["record"] == "archive/data/0"
        assert_bit_identical(src.read_rows(src.infos["x"], 2, 5), torch.arange(2, 5, dtype=torch.int32))


def test_shared_storages_views_and_strides(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tensors = {
        "base": base,
        "rows": base[2:5],  # same storage, storage offset
        "column": base[:, 3],  # 1-d, stride 10
        "transposed": base.t(),  # stride (1, 10)
        "strided": base[1::2, ::3],
        "scalar_view": base[5, 9],
    }
    path = tmp_path / "views.pt"
    torch.save(tensors, path)
    with zipfile.ZipFile(path) as z:  # one storage on disk for all of them
        assert sum(n.split("/", 1)[1].startswith("data/") for n in z.namelist()) == 1
    with LegacyPtSource(path) as src:
        for name, t in tensors.items():
            info = src.infos[name]
            rows = t.shape[0] if t.dim() else 1
            assert_bit_identical(src.read_rows(info, 0, rows), t)
            for start, stop in [(0, 0), (0, 1), (rows // 2, rows), (1, max(1, rows - 1))]:
                if t.dim() and start <= stop <= rows:
                    assert_bit_identical(src.read_rows(info, start, stop), t[start:stop])


def test_row_ranges_equal_slices(tmp_path: Path, gemma: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "fisher.pt"
    _write(path, gemma)
    rng = random.Random(0)
    with LegacyPtSource(path) as src:
        for name, t in gemma.items():
            info = src.infos[name]
            for _ in range(3):
                a, b = sorted(rng.randrange(t.shape[0] + 1) for _ in range(2))
                assert_bit_identical(src.read_rows(info, a, b), t[a:b])
        with pytest.raises(BadInputError, match="out of range"):
            src.read_rows(info, 0, t.shape[0] + 1)


def test_reads_archives_written_by_other_zip_writers(tmp_path: Path) -> None:
    tensors = small_tensors(1)
    torch.save(tensors, tmp_path / "orig.pt")
    _rezip(tmp_path / "orig.pt", tmp_path / "plain.pt")  # unaligned data, sizes in local headers
    got = _read_all(tmp_path / "plain.pt")
    for name, t in tensors.items():
        assert_bit_identical(got[name], t)


def test_close_and_context_manager(tmp_path: Path) -> None:
    path = tmp_path / "fisher.pt"
    torch.save({"a": torch.ones(3)}, path)
    with LegacyPtSource(path) as src:
        info = src.infos["a"]
        assert torch.equal(src.read_rows(info, 0, 3), torch.ones(3))
    with pytest.raises(BadInputError, match="closed"):
        src.read_rows(info, 0, 3)
    src.close()  # idempotent


# -- writing files that torch.load reads -------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 7, 1 << 20], ids=["whole", "tiny-chunks", "1MiB-chunks"])
def test_write_pt_loads_with_torch(tmp_path: Path, gemma: dict[str, torch.Tensor], chunk: int | None) -> None:
    tensors = {**small_tensors(2), **gemma}
    path = tmp_path / "fisher.pt"
    _write(path, tensors, chunk)
    for kwargs in ({}, {"mmap": True}):
        loaded = torch.load(path, weights_only=True, **kwargs)
        assert list(loaded) == list(tensors)
        for name, t in tensors.items():
            assert_bit_identical(loaded[name], t)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC-32 is right
        data = [i for i in z.infolist() if "/data/" in i.filename]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    with LegacyPtSource(path) as src:
        for info in src.infos.values():
            assert info.location["offset"] % 64 == 0
    assert len(data) == len(tensors)
    got = _read_all(path)
    for name, t in tensors.items():
        assert_bit_identical(got[name], t)


def test_write_pt_matches_torch_save_layout(tmp_path: Path, gemma: dict[str, torch.Tensor]) -> None:
    """Same records, offsets and bytes as torch.save, up to the (random-ish) serialization id."""
    tensors = {**small_tensors(3), **gemma}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ours, theirs = tmp_path / "a" / "fisher.pt", tmp_path / "b" / "fisher.pt"
    _write(ours, tensors)
    torch.save(tensors, theirs)
    with zipfile.ZipFile(ours) as za, zipfile.ZipFile(theirs) as zb:
        layout_a = [(i.filename, i.header_offset, i.file_size, i.flag_bits) for i in za.infolist()]
        layout_b = [(i.filename, i.header_offset, i.file_size, i.flag_bits) for i in zb.infolist()]
        assert layout_a == layout_b
        sid = za.getinfo("fisher/.data/serialization_id")
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert len(a) == len(b)
    assert a[: sid.header_offset] == b[: sid.header_offset]


def test_write_pt_output_is_unchanged_for_a_fixed_input(tmp_path: Path) -> None:
    """The bytes written for a fixed input, pinned: any change to the record layout or the pickle shows here."""
    import hashlib

    specs = [
        TensorSpec("model.layers.0.mlp.up_proj.weight", (3, 4), "bfloat16"),
        TensorSpec("scalar", (), "float32"),
        TensorSpec("empty", (0, 5), "int64"),
        TensorSpec("flags", (5,), "bool"),
        TensorSpec("halves", (2, 2, 2), "float16"),
    ]
    path = tmp_path / "fixed.pt"
    write_pt(path, specs, ((s, [bytes(range(s.nbytes))]) for s in specs))
    raw = path.read_bytes()
    assert len(raw) == 2627
    assert hashlib.sha256(raw).hexdigest() == "879d95060850b775f5f9d5d70c3a08f55b1cfd5ccabd7c28ec6066fc6870fe59"


def test_write_pt_accepts_typed_memoryviews(tmp_path: Path) -> None:
    t = torch.randn(8, 4)
    spec = TensorSpec.of("w", t)
    path = tmp_path / "typed.pt"
    write_pt(path, [spec], [(spec, [memoryview(t.numpy()[:3]), memoryview(t.numpy()[3:])])])  # format 'f', 2-d
    assert_bit_identical(torch.load(path, weights_only=True)["w"], t)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TMP_PREFIX))


def test_write_pt_is_atomic_on_errors(tmp_path: Path) -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    spec = TensorSpec.of("w", t)
    other = TensorSpec.of("v", t)
    path = tmp_path / "fisher.pt"

    def failing():
        yield spec, _chunks(t, 8)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_pt(path, [spec, other], failing())
    with pytest.raises(BadInputError, match="tensor 'w' got 8 bytes, but its spec declares 48"):
        write_pt(path, [spec], [(spec, [b"\0" * 8])])
    with pytest.raises(BadInputError, match="tensor 'w' got more bytes than the 48"):
        write_pt(path, [spec], [(spec, [b"\0" * 100])])
    with pytest.raises(BadInputError, match="expected"):
        write_pt(path, [spec, other], [(other, _chunks(t)), (spec, _chunks(t))])
    with pytest.raises(BadInputError, match="stopped after 1 of 2"):
        write_pt(path, [spec, other], [(spec, _chunks(t))])
    with pytest.raises(BadInputError, match="twice"):
        write_pt(path, [spec, spec], [])
    assert not path.exists()
    assert _leftovers(tmp_path) == []

    path.write_bytes(b"old contents")  # a failed write leaves an existing file untouched
    with pytest.raises(BadInputError):
        write_pt(path, [spec], [(spec, [b"\0" * 8])])
    assert path.read_bytes() == b"old contents"
    assert _leftovers(tmp_path) == []


# -- hostile and wrong inputs -------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.0, 0.02, 0.5, 0.9, -30, -1])
def test_truncated_files(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "fisher.pt"
    torch.save(small_tensors(), path)
    raw = path.read_bytes()
    cut = int(len(raw) * keep) if keep >= 0 else len(raw) + int(keep)
    path.write_bytes(raw[:cut])
    with pytest.raises(CorruptDataError) as err:
        LegacyPtSource(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_file_truncated_after_open(tmp_path: Path) -> None:
    path = tmp_path / "fisher.pt"
    t = torch.arange(1000, dtype=torch.float32).reshape(100, 10)
    torch.save({"w": t}, path)
    with LegacyPtSource(path) as src:
        info = src.infos["w"]
        os.truncate(path, info.location["offset"] + 400)
        assert_bit_identical(src.read_rows(info, 0, 10), t[:10])  # still there
        with pytest.raises(CorruptDataError, match="truncated"):
            src.read_rows(info, 5, 20)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _EvilShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("evil", [_Evil, _EvilShell], ids=["builtins.eval", "os.system"])
def test_pickle_calling_a_global_is_refused_and_not_executed(tmp_path: Path, evil: type) -> None:
    canary = tmp_path / "canary"
    payload = pickle.dumps({"w": evil(canary)}, protocol=2)
    pickle.loads(payload)  # the payload is live: plain pickle runs it ...
    assert canary.exists()
    canary.unlink()
    path = tmp_path / "evil.pt"
    _zip_with_pickle(path, payload)
    with pytest.raises(UnsafePickleError, match="refusing to unpickle global '(__builtin__.eval|posix.system)'"):
        LegacyPtSource(path)
    assert not canary.exists()  # ... ours does not


def test_global_hidden_in_a_storage_reference_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", _Evil(canary), "0", "cpu", 4) if obj == "S" else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": "S"})
    path = tmp_path / "evil.pt"
    _zip_with_pickle(path, buf.getvalue(), {"data/0": b"\0" * 16})
    with pytest.raises(UnsafePickleError, match="__builtin__.eval"):
        LegacyPtSource(path)
    assert not canary.exists()


@pytest.mark.parametrize(
    "payload, error, message",
    [
        (b"\x80\x02}r\x00\x00\x00\xf0.", CorruptDataError, "memo entry 4026531840 out of sequence"),
        (b"\x80\x02ccollections\nOrderedDict\n)\x81.", UnsafePickleError, "refusing pickle opcode NEWOBJ"),
        (b"\x80\x02\x82\x01.", UnsafePickleError, "refusing pickle opcode EXT1"),
        (b"\x80\x02}q\x00(X\x01\x00\x00\x00a", CorruptDataError, "not a valid pickle"),
    ],
    ids=["forged-memo-index", "newobj", "extension-code", "truncated"],
)
def test_pickle_opcodes_are_checked_before_unpickling(
    tmp_path: Path, payload: bytes, error: type, message: str
) -> None:
    """A forged memo index would make the C unpickler allocate gigabytes; odd opcodes are refused up front."""
    path = tmp_path / "forged.pt"
    _zip_with_pickle(path, payload)
    with pytest.raises(error, match=message):
        LegacyPtSource(path)


@pytest.mark.parametrize(
    "obj, message",
    [
        ([torch.ones(2), torch.zeros(2)], "holds list, expected a dict name -> tensor"),
        (torch.ones(3), "holds tensor, expected a dict"),
        ({"w": torch.ones(2), "step": 5}, "value for 'step' is int, expected tensors"),
        ({"model": {"w": torch.ones(2)}}, "value for 'model' is dict, expected tensors"),
        ({"w": torch.ones(2), "names": ["a"]}, "value for 'names' is list"),
        ({3: torch.ones(2)}, "key 3 \\(int\\), expected tensor names"),
        ({"u": torch.ones(2).untyped_storage()}, "value for 'u' is a bare storage"),
        ({"e": torch.ones(3)[:1].expand(1000, 1000)}, "1000000 elements but its storage only 3"),
        ({"../../x": torch.ones(2)}, "unsafe tensor name '../../x'"),
        ({"c": torch.zeros(2, dtype=torch.complex64)}, "cannot store"),
    ],
    ids=[
        "list",
        "tensor",
        "int-value",
        "nested-dict",
        "list-value",
        "int-key",
        "storage",
        "expanded",
        "path-name",
        "complex",
    ],
)
def test_wrong_contents_are_bad_input(tmp_path: Path, obj: object, message: str) -> None:
    path = tmp_path / "fisher.pt"
    torch.save(obj, path)
    with pytest.raises(BadInputError, match=message) as err:
        LegacyPtSource(path)
    assert not isinstance(err.value, CorruptDataError)
    assert str(path) in str(err.value)


def test_legacy_non_zip_file_says_to_resave(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(BadInputError, match="re-save it with a recent torch"):
        LegacyPtSource(path)


@pytest.mark.parametrize(
    "records, error, message",
    [
        ({"archive/data.pkl": None, "archive/byteorder": b"big"}, BadInputError, "big-endian"),
        ({"archive/data.pkl": None, "archive/constants.pkl": b""}, BadInputError, "TorchScript"),
        ({"archive/version": b"3\n"}, BadInputError, "found 0"),
        ({"a/data.pkl": None, "b/data.pkl": None}, BadInputError, "found 2"),
    ],
    ids=["big-endian", "torchscript", "no-pickle", "two-pickles"],
)
def test_archive_level_refusals(tmp_path: Path, records: dict, error: type, message: str) -> None:
    payload = pickle.dumps({}, protocol=2)
    path = tmp_path / "odd.pt"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records.items():
            z.writestr(name, payload if data is None else data)
    with pytest.raises(error, match=message):
        LegacyPtSource(path)


def test_not_a_zip_at_all(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(b"hello, this is not a torch file" * 10)
    with pytest.raises(BadInputError, match="not a torch.save zip archive"):
        LegacyPtSource(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CorruptDataError, match="empty"):
        LegacyPtSource(empty)


def test_compressed_record_is_rejected(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(100)}, tmp_path / "orig.pt")
    path = tmp_path / "deflated.pt"
    _rezip(tmp_path / "orig.pt", path, zipfile.ZIP_DEFLATED)
    with pytest.raises(BadInputError, match="is compressed \\(method 8\\)"):
        LegacyPtSource(path)


def _central_entry(raw: bytes, record_suffix: str) -> int:
    """Byte position of the central-directory entry whose name ends with ``record_suffix``."""
    pos = raw.find(b"PK\x01\x02")
    while pos >= 0:
        nlen = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46 : pos + 46 + nlen].decode().endswith(record_suffix):
            return pos
        pos = raw.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(f"no central entry for {record_suffix}")


@pytest.mark.parametrize(
    "where, message",
    [
        ("header-offset", "has its header at byte 1000000000, outside the file"),
        ("compressed-size", "sizes differ"),
        ("local-extra-length", "points outside the file data"),
        ("header-offset-into-padding", "no ZIP local header"),
    ],
)
def test_record_offsets_outside_the_file(tmp_path: Path, where: str, message: str) -> None:
    path = tmp_path / "fisher.pt"
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, path)
    raw = bytearray(path.read_bytes())
    entry = _central_entry(raw, "/data/0")
    header = struct.unpack_from("<I", raw, entry + 42)[0]
    if where == "header-offset":
        struct.pack_into("<I", raw, entry + 42, 10**9)
    elif where == "compressed-size":
        struct.pack_into("<I", raw, entry + 20, 10**9)
    elif where == "local-extra-length":
        struct.pack_into("<H", raw, header + 28, 65_000)
    else:
        struct.pack_into("<I", raw, entry + 42, header - 3)
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match=message):
        LegacyPtSource(path)


def _point_at_first_record(raw: bytearray) -> None:
    """Make the central entry of storage 1 point at storage 0's local header (two names, one set of bytes)."""
    first = struct.unpack_from("<I", raw, _central_entry(raw, "/data/0") + 42)[0]
    struct.pack_into("<I", raw, _central_entry(raw, "/data/1") + 42, first)


def _second_disk(raw: bytearray) -> None:
    struct.pack_into("<H", raw, _central_entry(raw, "/data/1") + 34, 1)  # "disk number start"


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (_point_at_first_record, CorruptDataError, "storages '0' and '1' overlap"),
        (_second_disk, BadInputError, "multi-disk zip archives are not supported"),
    ],
    ids=["overlapping-records", "multi-disk"],
)
def test_central_directory_lies(tmp_path: Path, mutate, error: type, message: str) -> None:
    path = tmp_path / "fisher.pt"
    torch.save({"a": torch.arange(16.0), "b": torch.ones(16)}, path)  # two storages of the same size
    raw = bytearray(path.read_bytes())
    mutate(raw)
    path.write_bytes(bytes(raw))
    with pytest.raises(error, match=message):
        LegacyPtSource(path)


def test_record_listed_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.pt"
    with pytest.warns(UserWarning, match="Duplicate name"):
        _zip_with_pickle(path, pickle.dumps({}, protocol=2), {"version": b"3\n"})
    with pytest.raises(CorruptDataError, match="'archive/version' is listed twice"):
        LegacyPtSource(path)


def test_huge_central_directory_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """An end record declaring a 300 MiB directory in a (sparse) 300 MiB file: refused, not read into memory."""
    path = tmp_path / "huge.pt"
    cd_size = 300 << 20
    with path.open("wb") as fh:
        fh.write(b"PK\x03\x04")
        fh.seek(cd_size + 64)
        eocd = fh.tell()
        fh.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, cd_size, eocd - cd_size, 0))
    with pytest.raises(CorruptDataError, match=f"central directory is {cd_size} bytes, over the 256 MiB"):
        LegacyPtSource(path)


def test_storage_size_mismatch_and_missing_record(tmp_path: Path) -> None:
    t = torch.arange(8, dtype=torch.float32)
    torch.save({"w": t}, tmp_path / "orig.pt")
    with zipfile.ZipFile(tmp_path / "orig.pt") as z:
        records = {i.filename.split("/", 1)[1]: z.read(i) for i in z.infolist()}
    short = tmp_path / "short.pt"
    _zip_with_pickle(short, records["data.pkl"], {"data/0": records["data/0"][:-4]})
    with pytest.raises(CorruptDataError, match="holds 28 bytes"):
        LegacyPtSource(short)
    missing = tmp_path / "missing.pt"
    _zip_with_pickle(missing, records["data.pkl"])
    with pytest.raises(CorruptDataError, match="missing"):
        LegacyPtSource(missing)


def test_random_corruption_only_raises_fisherstore_errors(tmp_path: Path) -> None:
    """Byte flips anywhere: either the file still reads, or a FisherStoreError says why; nothing else escapes."""
    path = tmp_path / "fisher.pt"
    torch.save(small_tensors(), path)
    raw = path.read_bytes()
    rng = random.Random(1234)
    outcomes = collections.Counter()
    for _ in range(300):
        data = bytearray(raw)
        for _ in range(rng.choice([1, 2, 8])):
            data[rng.randrange(len(data))] = rng.randrange(256)
        bad = tmp_path / "bad.pt"
        bad.write_bytes(bytes(data))
        try:
            with LegacyPtSource(bad) as src:
                for info in src.infos.values():
                    src.read_rows(info, 0, info.shape[0] if info.shape else 1)
            outcomes["ok"] += 1
        except FisherStoreError as exc:
            assert "\n" not in str(exc)
            outcomes[type(exc).__name__] += 1
    assert outcomes["CorruptDataError"] > 0  # the mutations do hit the structure


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        LegacyPtSource(tmp_path / "nope.pt")
    with pytest.raises(BadInputError, match="not a regular file"):
        LegacyPtSource(tmp_path)


# -- memory -------------------------------------------------------------------------------------


def test_reading_one_tensor_keeps_memory_bounded(tmp_path: Path) -> None:
    """A child reads one small tensor and 10 rows of a 200 MB one: its peak RSS grows by far less than the file.

    The peak is Linux's VmHWM, reset after the imports (``/proc/self/clear_refs``).
    """
    big_rows, cols = 50_000, 1_000  # 200 MB of fp32
    specs = [TensorSpec("small", (4, 4), "float32"), TensorSpec("big", (big_rows, cols), "float32")]
    block = torch.arange(2_000 * cols, dtype=torch.float32).reshape(2_000, cols)  # 8 MB, repeated
    path = tmp_path / "big.pt"
    write_pt(
        path,
        specs,
        [
            (specs[0], [memoryview(torch.ones(16).numpy())]),
            (specs[1], [memoryview(block.numpy())] * (big_rows // 2_000)),
        ],
    )
    assert path.stat().st_size > 200e6
    child = textwrap.dedent(
        """
        import json, re, sys
        import torch
        from fisherstore.formats.legacy_pt import LegacyPtSource
        status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak (VmHWM) to the current RSS, past the imports
        base = status("VmRSS")
        with LegacyPtSource(sys.argv[1]) as src:
            small = src.read_rows(src.infos["small"], 0, 4)
            rows = src.read_rows(src.infos["big"], 2_010, 2_020)
            after_small = status("VmHWM")
            whole = src.read_rows(src.infos["big"], 0, src.infos["big"].shape[0])  # control: this one is big
            after_whole = status("VmHWM")
        print(json.dumps({"small": small.sum().item(), "rows": rows[:, :3].tolist(),
                          "d_small": after_small - base, "d_whole": after_whole - base}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", child, str(path)], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["small"] == 16.0
    assert res["rows"] == block[10:20, :3].tolist()
    assert res["d_small"] < 16e6, res
    assert res["d_whole"] > 150e6, res  # the measurement does see a full read


# -- files past 4 GiB (ZIP64) ----------------------------------------------------------------------


@pytest.mark.slow
def test_zip64_offsets_and_sizes(tmp_path: Path) -> None:
    """A record of 4 GiB (size needs ZIP64) followed by one whose header sits past 4 GiB (offset needs ZIP64)."""
    huge = TensorSpec("huge", (1 << 20, 1 << 12), "uint8")  # exactly 4 GiB
    block = torch.arange(256, dtype=torch.uint8).repeat(1 << 18)  # 64 MiB pattern
    head, tail = torch.arange(10, dtype=torch.float32), torch.arange(20, dtype=torch.bfloat16).reshape(4, 5)
    specs = [TensorSpec.of("head", head), huge, TensorSpec.of("tail", tail)]
    path = tmp_path / "zip64.pt"
    try:
        write_pt(
            path,
            specs,
            [(specs[0], _chunks(head)), (huge, [memoryview(block.numpy())] * 64), (specs[2], _chunks(tail))],
        )
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            assert infos["zip64/data/1"].file_size == 1 << 32
            assert infos["zip64/data/2"].header_offset > 1 << 32
            assert z.read("zip64/data/2") == _bits(tail).numpy().tobytes()  # CRC checked by zipfile
        loaded = torch.load(path, weights_only=True, mmap=True)
        assert_bit_identical(loaded["tail"], tail)
        assert_bit_identical(loaded["huge"][-3:], block.reshape(-1, 1 << 12)[-3:])
        del loaded
        with LegacyPtSource(path) as src:
            assert_bit_identical(src.read_rows(src.infos["tail"], 1, 3), tail[1:3])
            assert_bit_identical(
                src.read_rows(src.infos["huge"], (1 << 20) - 2, 1 << 20), block.reshape(-1, 1 << 12)[-2:]
            )
            assert_bit_identical(src.read_rows(src.infos["head"], 0, 10), head)
    finally:
        path.unlink(missing_ok=True)


def test_written_pickle_is_byte_identical_to_torch_save():
    """data.pkl is produced without importing torch, yet equals what torch.save pickles for the same dict."""
    from fisherstore.formats.legacy_pt_writer import _pickle_specs

    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 4, dtype=torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(4, 3, dtype=torch.bfloat16),
        "scalar": torch.zeros((), dtype=torch.float32),
        "empty": torch.zeros(0, 5, dtype=torch.int64),
        "flags": torch.ones(5, dtype=torch.bool),
        "halves": torch.ones(2, 2, 2, dtype=torch.float16),
    }
    buf = io.BytesIO()
    torch.save(tensors, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        (pkl,) = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        reference = zf.read(pkl)
    assert _pickle_specs([TensorSpec.of(n, t) for n, t in tensors.items()]) == reference


def test_byte_paths_do_not_import_torch(tmp_path):
    """fisher.pt → safetensors → zarr → fisher.pt, verify and importance run without importing torch.

    (The torch import costs seconds per command.)
    """
    torch.save(fisher_like_tensors(), tmp_path / "fisher.pt")
    code = textwrap.dedent(
        f"""
        import sys
        from fisherstore.conversion import convert
        from fisherstore.verification import verify
        from fisherstore.store import open_store
        root = {str(tmp_path)!r}
        convert(root + "/fisher.pt", root + "/st")
        convert(root + "/st", root + "/z.zarr")
        convert(root + "/z.zarr", root + "/zc.zarr", backend_options={{"compression": "blosc-lz4-bitshuffle"}})
        convert(root + "/st", root + "/back.pt")
        assert verify(root + "/st") == [] and verify(root + "/back.pt") == []
        with open_store(root + "/st") as s:
            assert s.layer_importance()
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
