"""A corpus of hostile and broken inputs, built from good ones by code (no binary blobs in the repository).

Each :class:`Bad` names what it is (``category``), which kind of input it
is (``kind``: what the CLI takes it as), how to build it from the good
inputs of :class:`Bases`, the words its one-line refusal must contain, and
what ``verify`` answers (2: it cannot be opened at all; 1: it opens and the
damage is found in the data).  ``tests/test_hostile_corpus.py`` runs every
case through the real CLI.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import torch

#: The marker a pickle's payload would create if it ran; its path is fixed per corpus directory.
MARKER = "PWNED"


@dataclass(frozen=True)
class Bases:
    """The good inputs a corpus case starts from (built once per test module)."""

    pt: Path  # a torch.save fisher.pt of the tiny Gemma tensors
    st_file: Path  # the same tensors as one bare .safetensors file
    st_store: Path  # a safetensors store of them
    zarr_store: Path
    zarr_zstd: Path  # compressed with zstd
    masks: Path  # a mask store (fisherstore svd --rank 2 of st_store)
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Bad:
    """One hostile input: ``build(dst_dir, bases)`` returns the path to give the CLI."""

    id: str
    category: str
    kind: str  # pt | st-file | store | masks | prompts
    build: Callable[[Path, Bases], Path]
    message: str
    verify: int = 2
    #: The commands that read the damaged part (default: every command for the kind, see COMMANDS).
    commands: tuple[str, ...] | None = None
    #: Run once in a child process with its peak RSS measured (decompression bombs, huge claimed sizes).
    bomb: bool = False


# -- fisher.pt ------------------------------------------------------------------------------------------
def _pt_entries(bases: Bases) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(bases.pt) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
    prefix = next(n for n in entries if n.endswith("data.pkl"))[: -len("data.pkl")]
    return prefix, entries


def _zip(path: Path, entries: dict[str, bytes], compress: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data, compress_type=(compress or {}).get(name, zipfile.ZIP_STORED))
    return path


def _with_pickle(data_pkl: bytes | Callable[[str], bytes], drop_data: bool = False) -> Callable[[Path, Bases], Path]:
    """A fisher.pt whose data.pkl is ``data_pkl`` (or ``data_pkl(marker path)``)."""

    def build(d: Path, bases: Bases) -> Path:
        prefix, entries = _pt_entries(bases)
        blob = data_pkl(str(d / MARKER)) if callable(data_pkl) else data_pkl
        entries[prefix + "data.pkl"] = blob
        if drop_data:
            entries = {n: b for n, b in entries.items() if "/data/" not in n}
        return _zip(d / "fisher.pt", entries)

    return build


class _Call:
    """Pickles as ``func(*args)``: what a hostile pickle asks the unpickler to run."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def _evil(make: Callable[[str], Any], protocol: int = 2) -> Callable[[str], bytes]:
    return lambda marker: pickle.dumps({"model.layers.0.mlp.up_proj.weight": make(marker)}, protocol=protocol)


def _pickle_ops(*ops: bytes) -> bytes:
    """A protocol-2 pickle from raw opcodes (PROTO 2 ... STOP)."""
    return b"\x80\x02" + b"".join(ops) + b"."


def _bytes_of(content: bytes) -> Callable[[Path, Bases], Path]:
    def build(d: Path, bases: Bases) -> Path:
        (d / "fisher.pt").write_bytes(content)
        return d / "fisher.pt"

    return build


def _truncated(keep: float) -> Callable[[Path, Bases], Path]:
    def build(d: Path, bases: Bases) -> Path:
        data = bases.pt.read_bytes()
        (d / "fisher.pt").write_bytes(data[: int(len(data) * keep)])
        return d / "fisher.pt"

    return build


def _saved(obj: Callable[[Bases], Any]) -> Callable[[Path, Bases], Path]:
    def build(d: Path, bases: Bases) -> Path:
        torch.save(obj(bases), d / "fisher.pt")
        return d / "fisher.pt"

    return build


def _renamed_pt(name: str) -> Callable[[Path, Bases], Path]:
    return _saved(lambda b: {name: next(iter(b.tensors.values()))})


def _zip_patch(
    patch: Callable[[bytearray, dict[str, int]], None], base: Callable[[Path, Bases], Path] | None = None
) -> Callable[[Path, Bases], Path]:
    """The good fisher.pt (or ``base``'s) with its central directory patched: ``patch(raw, {name: header offset})``."""

    def build(d: Path, bases: Bases) -> Path:
        src = bases.pt if base is None else base(d, bases)
        raw = bytearray(src.read_bytes())
        with zipfile.ZipFile(src) as zf:
            names = [i.filename for i in zf.infolist()]
            start = zf.start_dir
        where, pos = {}, start
        for name in names:  # central file headers, in order: 46 fixed bytes, name, extra, comment
            assert raw[pos : pos + 4] == b"PK\x01\x02"
            nlen, elen, clen = struct.unpack_from("<HHH", raw, pos + 28)
            where[name] = pos
            pos += 46 + nlen + elen + clen
        patch(raw, where)
        (d / "fisher.pt").write_bytes(bytes(raw))
        return d / "fisher.pt"

    return build


def _storages(where: dict[str, int]) -> list[str]:
    return sorted(n for n in where if "/data/" in n)


def _overlap(raw: bytearray, where: dict[str, int]) -> None:
    """Point the second storage's record at the first one's local header (two tensors, one set of bytes)."""
    a, b = _storages(where)[:2]
    struct.pack_into("<I", raw, where[b] + 42, struct.unpack_from("<I", raw, where[a] + 42)[0])


def _size_lie(raw: bytearray, where: dict[str, int]) -> None:
    struct.pack_into("<I", raw, where[_storages(where)[0]] + 24, 1 << 30)  # uncompressed size != compressed


def _past_end(raw: bytearray, where: dict[str, int]) -> None:
    name = _storages(where)[0]
    struct.pack_into("<II", raw, where[name] + 20, 1 << 30, 1 << 30)  # both sizes: 1 GiB in a small file


def _header_outside(raw: bytearray, where: dict[str, int]) -> None:
    struct.pack_into("<I", raw, where[_storages(where)[0]] + 42, 0xFFFFFF00)


def _bomb_pt(d: Path, bases: Bases) -> Path:
    """A tensor whose record is deflated: 1 GiB of zeros in ~1 MB (a zip bomb), referenced by the pickle."""
    prefix, entries = _pt_entries(bases)
    numel = 1 << 29  # bf16: 1 GiB
    entries = {n: b for n, b in entries.items() if "/data/" not in n}
    entries[prefix + "data.pkl"] = _forged_pickle(
        {"model.layers.0.mlp.up_proj.weight": (_Storage("0", numel), 0, (1 << 14, 1 << 15), (1 << 15, 1))}
    )
    path = _zip(d / "fisher.pt", entries)
    # Deflate of zeros is periodic: one fully flushed segment of 1 MiB, repeated, then a final empty block.
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = comp.compress(bytes(1 << 20)) + comp.flush(zlib.Z_FULL_FLUSH)
    _append_deflated(path, prefix + "data/0", segment * 1024 + b"\x03\x00", 1 << 30)
    return path


def _append_deflated(path: Path, name_str: str, body: bytes, size: int) -> None:
    """Add a member whose bytes are already deflated (zipfile cannot write one): local header, body, directory."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        start, count = zf.start_dir, len(zf.infolist()) + 1
    name = name_str.encode()
    crc = 0  # never checked: nothing inflates it
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(body), size, len(name), 0)
    central_entry = struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(body), size, len(name), 0, 0, 0, 0, 0, start
    )
    central = raw[start : raw.rindex(b"PK\x05\x06")] + central_entry + name
    new_start = start + len(local) + len(name) + len(body)
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), new_start, 0)
    path.write_bytes(raw[:start] + local + name + body + central + eocd)


def _drop_records(d: Path, bases: Bases) -> Path:
    prefix, entries = _pt_entries(bases)
    return _zip(d / "fisher.pt", {n: b for n, b in entries.items() if "/data/" not in n})


def _expanded(d: Path, bases: Bases) -> Path:
    """A 2**31 x 2**31 tensor claimed from a 1-element storage (stride 0: torch's expand)."""
    big = torch.zeros(1, dtype=torch.float32).expand(1 << 31, 1 << 31)
    torch.save({"model.layers.0.mlp.up_proj.weight": big}, d / "fisher.pt")
    return d / "fisher.pt"


class _Storage:
    """Stands for a storage in :func:`_forged_pickle`: pickled as torch.save's persistent id."""

    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


def _forged_pickle(tensors: dict[str, tuple[_Storage, int, tuple[int, ...], tuple[int, ...]]]) -> bytes:
    """A data.pkl as torch.save writes it, with storage ids, sizes and strides of our choosing."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, _Storage):
                return ("storage", torch.BFloat16Storage, obj.key, "cpu", obj.numel)
            return None

    buf = io.BytesIO()
    rebuild = torch._utils._rebuild_tensor_v2
    Pickler(buf, protocol=2).dump(
        {
            n: _Call(rebuild, st, off, size, stride, False, collections.OrderedDict())
            for n, (st, off, size, stride) in tensors.items()
        }
    )
    return buf.getvalue()


def _huge_numel(d: Path, bases: Bases) -> Path:
    """A persistent id claiming 2**60 elements for a small record."""
    return _with_pickle(
        _forged_pickle({"model.layers.0.mlp.up_proj.weight": (_Storage("0", 1 << 60), 0, (4, 8), (8, 1))})
    )(d, bases)


PT: list[Bad] = [
    Bad("pt-empty", "truncated/empty", "pt", _bytes_of(b""), "not a fisherstore store"),
    *(
        Bad(f"pt-truncated-{int(k * 100)}", "truncated/empty", "pt", _truncated(k), "fisher.pt")
        for k in (0.1, 0.5, 0.97)
    ),
    Bad("pt-wrong-magic", "wrong magic", "pt", _bytes_of(b"GIF89a" + bytes(100)), "not a fisherstore store"),
    Bad("pt-legacy-raw-pickle", "wrong magic", "pt", _bytes_of(pickle.dumps({"a": 1}, protocol=2)), "pre-1.6"),
    Bad(
        "pt-os-system",
        "pickle global",
        "pt",
        _with_pickle(_evil(lambda m: _Call(os.system, f"touch {m}"))),
        "posix.system",
    ),
    Bad(
        "pt-builtins-eval",
        "pickle global",
        "pt",
        _with_pickle(_evil(lambda m: _Call(eval, f"open({m!r}, 'w')"))),
        "refusing to unpickle global",
    ),
    Bad(
        "pt-builtins-exec-proto4",
        "pickle global",
        "pt",
        _with_pickle(_evil(lambda m: _Call(exec, f"open({m!r}, 'w')"), 4)),
        "refusing to unpickle global",
    ),
    Bad(
        "pt-subprocess",
        "pickle global",
        "pt",
        _with_pickle(_evil(lambda m: _Call(__import__("subprocess").check_call, ["touch", m]))),
        "refusing to unpickle global",
    ),
    Bad(
        "pt-importlib",
        "pickle global",
        "pt",
        _with_pickle(_evil(lambda m: _Call(__import__("importlib").import_module, "antigravity"))),
        "refusing to unpickle global",
    ),
    Bad(
        "pt-torch-load",
        "pickle global",
        "pt",
        _with_pickle(_evil(lambda m: _Call(torch.load, m))),
        "refusing to unpickle global",
    ),
    Bad(
        "pt-inst-opcode",
        "pickle global",
        "pt",
        _with_pickle(lambda m: b"(S'touch " + m.encode() + b"'\nios\nsystem\n."),
        "refusing pickle opcode",
    ),
    Bad(
        "pt-newobj-opcode",
        "pickle global",
        "pt",
        _with_pickle(_pickle_ops(b"cbuiltins\nobject\n)\x81")),
        "opcode NEWOBJ",
    ),
    Bad(
        "pt-huge-memo",
        "pickle huge object",
        "pt",
        _with_pickle(_pickle_ops(b"}r\x00\xb0\x9a\x3b\x00")),
        "out of sequence",
    ),
    Bad(
        "pt-huge-string",
        "pickle huge object",
        "pt",
        _with_pickle(_pickle_ops(b"\x8d" + (1 << 40).to_bytes(8, "little") + b"abc")),
        "not a valid pickle",
    ),
    Bad("pt-huge-numel", "pickle huge object", "pt", _huge_numel, "but the pickle says"),
    Bad("pt-expanded-huge", "pickle huge object", "pt", _expanded, "expanded view", bomb=True),
    Bad("pt-zip-bomb", "zip bomb / ZIP lies", "pt", _bomb_pt, "is compressed", bomb=True),
    Bad("pt-zip-overlap", "zip bomb / ZIP lies", "pt", _zip_patch(_overlap), "overlap"),
    Bad("pt-zip-size-lie", "zip bomb / ZIP lies", "pt", _zip_patch(_size_lie), "sizes differ"),
    Bad(
        "pt-zip-past-end",
        "zip bomb / ZIP lies",
        "pt",
        _zip_patch(
            _past_end,
            lambda d, b: _with_pickle(
                _forged_pickle({"model.layers.0.mlp.up_proj.weight": (_Storage("0", 1 << 29), 0, (4, 8), (8, 1))})
            )(d, b),
        ),
        "points outside the file",
    ),
    Bad("pt-zip-header-outside", "zip bomb / ZIP lies", "pt", _zip_patch(_header_outside), "outside the file"),
    Bad("pt-no-pickle", "structure", "pt", _with_pickle(b"", drop_data=False), "not a valid pickle"),
    Bad("pt-missing-record", "structure", "pt", _with_pickle(lambda m: b"", drop_data=True), "not a valid pickle"),
    Bad("pt-missing-storages", "structure", "pt", _drop_records, "missing from the archive"),
    Bad("pt-not-a-dict", "structure", "pt", _saved(lambda b: list(b.tensors.values())[:2]), "expected a dict"),
    Bad(
        "pt-value-not-tensor",
        "structure",
        "pt",
        _saved(lambda b: {"model.layers.0.mlp.up_proj.weight": 3}),
        "expected tensors",
    ),
    Bad(
        "pt-complex128",
        "dtype not allowed",
        "pt",
        _saved(lambda b: {"a.weight": torch.ones(2, 2, dtype=torch.complex128)}),
        "cannot store",
    ),
    Bad(
        "pt-uint16",
        "dtype not allowed",
        "pt",
        _saved(lambda b: {"a.weight": torch.ones(2, 2, dtype=torch.uint16)}),
        "cannot store",
    ),
    Bad("pt-name-dotdot", "hostile name", "pt", _renamed_pt("../../x"), "unsafe tensor name"),
    Bad("pt-name-absolute", "hostile name", "pt", _renamed_pt("/etc/passwd"), "unsafe tensor name"),
    Bad("pt-name-nul", "hostile name", "pt", _renamed_pt("model.layers.0\x00.w"), "unsafe tensor name"),
    Bad("pt-name-long", "hostile name", "pt", _renamed_pt("a" * 600), "unsafe tensor name"),
    Bad("pt-name-empty", "hostile name", "pt", _renamed_pt(""), "unsafe tensor name"),
]


# -- bare .safetensors -------------------------------------------------------------------------------------
def _st_raw(header: bytes | dict[str, Any], data: bytes = b"", n: int | None = None) -> Callable[[Path, Bases], Path]:
    def build(d: Path, bases: Bases) -> Path:
        blob = json.dumps(header).encode() if isinstance(header, dict) else header
        length = len(blob) if n is None else n
        (d / "x.safetensors").write_bytes(struct.pack("<q", length) + blob + data)
        return d / "x.safetensors"

    return build


def _st_lie(lie: Callable[[dict[str, Any], str], None], cut: int = 0) -> Callable[[Path, Bases], Path]:
    """The good bare file with its header rewritten by ``lie(header, first tensor name)``."""

    def build(d: Path, bases: Bases) -> Path:
        raw = bases.st_file.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        lie(header, next(k for k in header if k != "__metadata__"))
        blob = json.dumps(header).encode()
        out = struct.pack("<Q", len(blob)) + blob + raw[8 + n :]
        (d / "x.safetensors").write_bytes(out[: len(out) - cut])
        return d / "x.safetensors"

    return build


def _raw_file(content: bytes) -> Callable[[Path, Bases], Path]:
    def build(d: Path, bases: Bases) -> Path:
        (d / "x.safetensors").write_bytes(content)
        return d / "x.safetensors"

    return build


def _shift_second(h: dict[str, Any], name: str) -> None:
    """Move the second tensor (in file order) 2 bytes back, into the first one's bytes."""
    second = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[1]
    h[second]["data_offsets"] = [o - 2 for o in h[second]["data_offsets"]]


def _set(key: str, value: Any) -> Callable[[dict[str, Any], str], None]:
    return lambda h, name: h[name].update({key: value})


def _rename(new: str) -> Callable[[dict[str, Any], str], None]:
    return lambda h, name: h.update({new: h.pop(name)})


_ONE = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
ST: list[Bad] = [
    Bad("st-empty", "truncated/empty", "st-file", _st_raw(b"", n=0), "safetensors"),
    Bad(
        "st-7-bytes",
        "truncated/empty",
        "st-file",
        _raw_file(b"\x07" * 7),
        "not a fisherstore store",
    ),
    Bad("st-truncated-data", "truncated/empty", "st-file", _st_lie(lambda h, n: None, cut=100), "truncated or padded"),
    Bad(
        "st-wrong-magic",
        "wrong magic",
        "st-file",
        _raw_file(b"\x89HDF\r\n\x1a\n" + bytes(64)),
        "not a fisherstore store",
    ),
    Bad("st-header-over-cap", "header lies", "st-file", _st_raw(b'{"a": 1}', n=1 << 40), "header length", bomb=True),
    Bad("st-header-negative", "header lies", "st-file", _st_raw(b'{"a": 1}', n=-8), "header length"),
    Bad("st-header-past-eof", "header lies", "st-file", _st_raw(b'{"a": 1}', n=4096), "header length"),
    Bad("st-not-json", "header lies", "st-file", _st_raw(b"{nope"), "not valid JSON"),
    Bad("st-not-utf8", "header lies", "st-file", _st_raw(b'{"\xff\xfe": 1}'), "not valid JSON"),
    Bad(
        "st-deep-nesting",
        "header lies",
        "st-file",
        _st_raw(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "nested too deeply",
    ),
    Bad("st-bigint", "header lies", "st-file", _st_raw(b'{"a": {"shape": [' + b"9" * 5000 + b"]}}"), "not valid JSON"),
    Bad("st-past-the-end", "header lies", "st-file", _st_lie(_set("data_offsets", [0, 10_000_000])), "spans"),
    Bad(
        "st-overlap",
        "header lies",
        "st-file",
        _st_lie(_shift_second),
        "overlaps",
    ),
    Bad(
        "st-hole",
        "header lies",
        "st-file",
        _st_raw({"a": _ONE, "b": {**_ONE, "data_offsets": [8, 12]}}, bytes(12)),
        "hole",
    ),
    Bad("st-wrong-shape", "header lies", "st-file", _st_lie(_set("shape", [4, 9])), "needs"),
    Bad("st-huge-shape", "header lies", "st-file", _st_lie(_set("shape", [1 << 32, 1 << 32])), "needs", bomb=True),
    Bad("st-bool-shape", "header lies", "st-file", _st_raw({"a": {**_ONE, "shape": [True]}}, bytes(4)), "bad shape"),
    Bad(
        "st-negative-offset",
        "header lies",
        "st-file",
        _st_raw({"a": {**_ONE, "data_offsets": [-4, 0]}}, bytes(4)),
        "bad data_offsets",
    ),
    Bad(
        "st-dtype-list",
        "dtype not allowed",
        "st-file",
        _st_raw({"a": {**_ONE, "dtype": ["F32"]}}, bytes(4)),
        "unknown dtype",
    ),
    Bad("st-dtype-x99", "dtype not allowed", "st-file", _st_lie(_set("dtype", "X99")), "unknown dtype"),
    Bad(
        "st-dtype-c128",
        "dtype not allowed",
        "st-file",
        _st_raw({"a": {"dtype": "C128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        "unknown dtype 'C128'",
    ),
    Bad(
        "st-dtype-f8",
        "dtype not allowed",
        "st-file",
        _st_raw({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)),
        "unknown dtype 'F8_E4M3'",
    ),
    Bad(
        "st-metadata-not-strings",
        "header lies",
        "st-file",
        _st_raw({"__metadata__": {"a": 1}, "a": _ONE}, bytes(4)),
        "__metadata__",
    ),
    Bad("st-name-dotdot", "hostile name", "st-file", _st_lie(_rename("../../x")), "unsafe tensor name"),
    Bad("st-name-absolute", "hostile name", "st-file", _st_lie(_rename("/etc/passwd")), "unsafe tensor name"),
    Bad("st-name-nul", "hostile name", "st-file", _st_lie(_rename("a\x00b")), "unsafe tensor name"),
    Bad("st-name-long", "hostile name", "st-file", _st_lie(_rename("a" * 600)), "unsafe tensor name"),
]


# -- stores (safetensors and zarr) ------------------------------------------------------------------------
def _store(base: Callable[[Bases], Path], change: Callable[[Path], None]) -> Callable[[Path, Bases], Path]:
    def build(d: Path, bases: Bases) -> Path:
        dst = d / "store"
        shutil.copytree(base(bases), dst)
        change(dst)
        return dst

    return build


def _st(b: Bases) -> Path:
    return b.st_store


def _zarr(b: Bases) -> Path:
    return b.zarr_store


def _manifest_bytes(content: bytes) -> Callable[[Path], None]:
    return lambda store: (store / "fisherstore.json").write_bytes(content)


def _manifest(change: Callable[[dict[str, Any], str], None]) -> Callable[[Path], None]:
    """Rewrite the manifest after ``change(manifest, first tensor name)``."""

    def apply(store: Path) -> None:
        m = json.loads((store / "fisherstore.json").read_text())
        change(m, next(iter(m["tensors"])))
        (store / "fisherstore.json").write_text(json.dumps(m))

    return apply


def _drop(key: str) -> Callable[[dict[str, Any], str], None]:
    return lambda m, name: m["tensors"][name].pop(key)


def _tset(key: str, value: Any) -> Callable[[dict[str, Any], str], None]:
    return lambda m, name: m["tensors"][name].update({key: value})


def _mrename(new: str) -> Callable[[dict[str, Any], str], None]:
    def change(m: dict[str, Any], name: str) -> None:
        m["tensors"][new] = m["tensors"].pop(name)
        for g in m["groups"]:
            for t in g["tensors"]:
                if t["name"] == name:
                    t["name"] = new

    return change


def _sparse_manifest(store: Path) -> None:
    with open(store / "fisherstore.json", "r+b") as fh:
        fh.truncate(300 << 20)  # 300 MiB of holes: costs no disk, would cost 300 MiB of memory if read whole


def _first_shard(store: Path) -> Path:
    return sorted(store.glob("fisher-*.safetensors"))[0]


def _shard_header(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(store: Path) -> None:
        shard = _first_shard(store)
        raw = shard.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = change(raw[8 : 8 + n])
        assert len(header) == n
        shard.write_bytes(raw[:8] + header + raw[8 + n :])

    return apply


def _truncate(path_of: Callable[[Path], Path], keep: int) -> Callable[[Path], None]:
    def apply(store: Path) -> None:
        p = path_of(store)
        p.write_bytes(p.read_bytes()[:keep])

    return apply


def _first_array(store: Path) -> Path:
    name = next(iter(json.loads((store / "fisherstore.json").read_text())["tensors"]))
    return store / name


def _zarr_json(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(store: Path) -> None:
        p = _first_array(store) / "zarr.json"
        meta = json.loads(p.read_text())
        change(meta)
        p.write_text(json.dumps(meta))

    return apply


def _sharding(meta: dict[str, Any]) -> dict[str, Any]:
    return meta["codecs"][0]["configuration"]


def _shard_file(store: Path) -> Path:
    return next(p for p in _first_array(store).iterdir() if p.name != "zarr.json")


def _index_lie(store: Path) -> None:
    """Rewrite the first shard's index to point its first chunk past the data, with a valid crc32c."""
    p = _shard_file(store)
    raw = bytearray(p.read_bytes())
    meta = json.loads((p.parent / "zarr.json").read_text())
    chunks = _sharding(meta)["chunk_shape"][0]
    n = -(-meta["chunk_grid"]["configuration"]["chunk_shape"][0] // chunks)
    start = len(raw) - 16 * n - 4
    struct.pack_into("<Q", raw, start, len(raw))  # offset of chunk 0: the end of the file
    raw[-4:] = google_crc32c.value(bytes(raw[start:-4])).to_bytes(4, "little")
    p.write_bytes(bytes(raw))


def _zstd_lie(store: Path) -> None:
    """Change the decoded size a compressed chunk's zstd frame header claims."""
    p = _shard_file(store)
    raw = bytearray(p.read_bytes())
    assert raw[:4] == b"\x28\xb5\x2f\xfd"
    raw[5] ^= 0x40  # a bit of the frame content size
    p.write_bytes(bytes(raw))


def _remove(path_of: Callable[[Path], Path]) -> Callable[[Path], None]:
    return lambda store: path_of(store).unlink()


_MANIFEST = ("info", "verify", "convert", "importance", "svd")
_DATA = ("verify", "convert")  # damage found once tensor bytes are read
_FILES = ("info", "verify", "convert")  # damage in a file's own metadata: info checks it too

STORE: list[Bad] = [
    Bad("manifest-empty", "truncated/empty", "store", _store(_st, _manifest_bytes(b"")), "not valid JSON"),
    Bad(
        "manifest-truncated",
        "truncated/empty",
        "store",
        _store(_st, lambda s: _truncate(lambda x: x / "fisherstore.json", 200)(s)),
        "not valid JSON",
    ),
    Bad(
        "manifest-array", "manifest fields", "store", _store(_st, _manifest_bytes(b"[1, 2]")), "expected a JSON object"
    ),
    Bad(
        "manifest-wrong-format",
        "wrong magic",
        "store",
        _store(_st, _manifest(lambda m, n: m.update(format="safetensors"))),
        "format is",
    ),
    Bad(
        "manifest-future-version",
        "manifest fields",
        "store",
        _store(_st, _manifest(lambda m, n: m.update(version=99))),
        "upgrade fisherstore",
    ),
    Bad(
        "manifest-version-true",
        "manifest fields",
        "store",
        _store(_st, _manifest(lambda m, n: m.update(version=True))),
        "not supported",
    ),
    Bad(
        "manifest-no-tensors",
        "manifest fields",
        "store",
        _store(_st, _manifest(lambda m, n: m.pop("tensors"))),
        "'tensors' an object",
    ),
    *(
        Bad(
            f"manifest-no-{key}",
            "manifest fields",
            "store",
            _store(_st, _manifest(_drop(key))),
            f"missing field {key!r}",
        )
        for key in ("shape", "dtype", "group", "location", "checksum", "sum")
    ),
    Bad(
        "manifest-complete-missing-tensor",
        "manifest fields",
        "store",
        _store(_st, _manifest(lambda m, n: m["tensors"].pop(n))),
        "has no entry",
    ),
    Bad(
        "manifest-dtype-complex128",
        "dtype not allowed",
        "store",
        _store(_st, _manifest(_tset("dtype", "complex128"))),
        "unknown dtype 'complex128'",
    ),
    Bad(
        "manifest-shape-2e64",
        "manifest fields",
        "store",
        _store(_st, _manifest(_tset("shape", [1 << 40, 1 << 40]))),
        "over 2**63 bytes",
    ),
    Bad(
        "manifest-sum-overflow",
        "manifest fields",
        "store",
        _store(
            _st,
            lambda s: (s / "fisherstore.json").write_text(
                (s / "fisherstore.json").read_text().replace('"sum": ', '"sum": 1' + "0" * 400 + ', "_": ', 1)
            ),
        ),
        "sum must be a number",
    ),
    Bad(
        "manifest-bigint",
        "manifest fields",
        "store",
        _store(
            _st,
            lambda s: (s / "fisherstore.json").write_text(
                (s / "fisherstore.json").read_text().replace('"version": 1', '"version": ' + "9" * 5000, 1)
            ),
        ),
        "not valid JSON",
    ),
    Bad(
        "manifest-deep-nesting",
        "manifest fields",
        "store",
        _store(_st, _manifest_bytes(b'{"format": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
        "nested too deeply",
    ),
    Bad("manifest-over-cap", "manifest fields", "store", _store(_st, _sparse_manifest), "MiB cap", bomb=True),
    Bad(
        "manifest-name-dotdot",
        "hostile name",
        "store",
        _store(_st, _manifest(_mrename("../../x"))),
        "unsafe tensor name",
    ),
    Bad(
        "manifest-name-absolute",
        "hostile name",
        "store",
        _store(_st, _manifest(_mrename("/etc/passwd"))),
        "unsafe tensor name",
    ),
    Bad("manifest-name-nul", "hostile name", "store", _store(_st, _manifest(_mrename("a\x00b"))), "unsafe tensor name"),
    Bad(
        "manifest-name-long", "hostile name", "store", _store(_st, _manifest(_mrename("a" * 600))), "unsafe tensor name"
    ),
    Bad(
        "manifest-location-dotdot",
        "hostile name",
        "store",
        _store(_st, _manifest(lambda m, n: m["tensors"][n]["location"].update(file="../../etc/passwd"))),
        "not a shard name",
        1,
        _FILES,
    ),
    Bad(
        "manifest-location-absolute",
        "hostile name",
        "store",
        _store(_st, _manifest(lambda m, n: m["tensors"][n]["location"].update(file="/etc/x.safetensors"))),
        "not a shard name",
        1,
        _FILES,
    ),
    Bad(
        "shard-missing",
        "missing chunk/shard",
        "store",
        _store(_st, _remove(_first_shard)),
        "shard file is missing",
        1,
        _FILES,
    ),
    Bad(
        "shard-truncated",
        "truncated/empty",
        "store",
        _store(_st, _truncate(_first_shard, 4000)),
        "truncated or padded",
        1,
        _FILES,
    ),
    Bad(
        "shard-dtype-lie",
        "header lies",
        "store",
        _store(_st, _shard_header(lambda h: h.replace(b'"BF16"', b'"F16" ', 1))),
        "manifest says",
        1,
        _FILES,
    ),
    Bad(
        "shard-dtype-c128",
        "dtype not allowed",
        "store",
        _store(_st, _shard_header(lambda h: h.replace(b'"BF16"', b'"C128"', 1))),
        "unknown dtype 'C128'",
        1,
        _FILES,
    ),
    Bad(
        "shard-header-over-cap",
        "header lies",
        "store",
        _store(
            _st, lambda s: _first_shard(s).write_bytes(struct.pack("<Q", 1 << 40) + _first_shard(s).read_bytes()[8:])
        ),
        "header length",
        1,
        _FILES,
    ),
    Bad(
        "zarr-json-missing",
        "missing chunk/shard",
        "store",
        _store(_zarr, _remove(lambda s: _first_array(s) / "zarr.json")),
        "is missing",
        1,
        _FILES,
    ),
    Bad(
        "zarr-json-not-json",
        "truncated/empty",
        "store",
        _store(_zarr, _truncate(lambda s: _first_array(s) / "zarr.json", 50)),
        "not valid JSON",
        1,
        _FILES,
    ),
    Bad(
        "zarr-json-over-cap",
        "header lies",
        "store",
        _store(_zarr, lambda s: (_first_array(s) / "zarr.json").write_bytes(b" " * (2 << 20))),
        "over 1 MiB",
        1,
        _FILES,
    ),
    Bad(
        "zarr-dtype-complex128",
        "dtype not allowed",
        "store",
        _store(_zarr, _zarr_json(lambda m: m.update(data_type="complex128"))),
        "data_type 'complex128'",
        1,
        _FILES,
    ),
    Bad(
        "zarr-shape-mismatch",
        "zarr metadata",
        "store",
        _store(_zarr, _zarr_json(lambda m: m.update(shape=[m["shape"][0] + 1, *m["shape"][1:]]))),
        "the manifest says",
        1,
        _FILES,
    ),
    Bad(
        "zarr-chunk-zero",
        "zarr metadata",
        "store",
        _store(_zarr, _zarr_json(lambda m: _sharding(m).update(chunk_shape=[0, *_sharding(m)["chunk_shape"][1:]]))),
        "not an array in the layout",
        1,
        _FILES,
    ),
    Bad(
        "zarr-chunk-bomb",
        "zarr metadata",
        "store",
        _store(
            _zarr,
            _zarr_json(
                lambda m: (
                    _sharding(m).update(chunk_shape=[1 << 30, *_sharding(m)["chunk_shape"][1:]]),
                    m["chunk_grid"]["configuration"].update(chunk_shape=[1 << 30, *_sharding(m)["chunk_shape"][1:]]),
                    m.update(shape=[1 << 30, *m["shape"][1:]]),
                )
            ),
        ),
        "not an array in the layout",
        1,
        _FILES,
        bomb=True,
    ),
    Bad(
        "zarr-codec-unknown",
        "zarr metadata",
        "store",
        _store(
            _zarr, _zarr_json(lambda m: _sharding(m)["codecs"].append({"name": "gzip", "configuration": {"level": 1}}))
        ),
        "not an array in the layout",
        1,
        _FILES,
    ),
    Bad(
        "zarr-separator-escape",
        "hostile name",
        "store",
        _store(_zarr, _zarr_json(lambda m: m["chunk_key_encoding"]["configuration"].update(separator="/../"))),
        "not an array in the layout",
        1,
        _FILES,
    ),
    Bad(
        "zarr-location-dotdot",
        "hostile name",
        "store",
        _store(_zarr, _manifest(lambda m, n: m["tensors"][n]["location"].update(array="../x"))),
        "not a safe name",
        1,
        _FILES,
    ),
    Bad(
        "zarr-shard-missing",
        "missing chunk/shard",
        "store",
        _store(_zarr, _remove(_shard_file)),
        "is missing",
        1,
        _FILES,
    ),
    Bad(
        "zarr-shard-truncated",
        "truncated/empty",
        "store",
        _store(_zarr, _truncate(_shard_file, 100)),
        "shard index",
        1,
        _DATA,
    ),
    Bad("zarr-index-lies", "header lies", "store", _store(_zarr, _index_lie), "lies outside the shard", 1, _DATA),
    Bad(
        "zarr-zstd-size-lie",
        "zip bomb / ZIP lies",
        "store",
        _store(lambda b: b.zarr_zstd, _zstd_lie),
        "does not decompress",
        1,
        _DATA,
    ),
]


# -- mask stores --------------------------------------------------------------------------------------------
def _masks(change: Callable[[dict[str, Any]], None]) -> Callable[[Path, Bases], Path]:
    def build(d: Path, bases: Bases) -> Path:
        dst = d / "masks"
        shutil.copytree(bases.masks, dst)
        m = json.loads((dst / "fisherstore.json").read_text())
        change(m)
        (dst / "fisherstore.json").write_text(json.dumps(m))
        return dst

    return build


def _drop_v(m: dict[str, Any]) -> None:
    """Remove one tensor's ``.V`` from the plan and the tensors: the triple is broken."""
    g = m["groups"][0]
    v = next(t for t in g["tensors"] if t["name"].endswith(".V"))
    g["tensors"].remove(v)
    m["tensors"].pop(v["name"])


def _s_shape(m: dict[str, Any]) -> None:
    g = m["groups"][0]
    s = next(t for t in g["tensors"] if t["name"].endswith(".S"))
    s["shape"] = [s["shape"][0] + 1]
    m["tensors"][s["name"]]["shape"] = s["shape"]


MASKS: list[Bad] = [
    Bad(
        "masks-kind-invalid",
        "manifest fields",
        "masks",
        _masks(lambda m: m.update(kind="maskz")),
        "kind must be one of",
    ),
    # verify checks bytes, which are sound here: only the commands that read the masks' layout refuse these
    Bad("masks-no-rank", "manifest fields", "masks", _masks(lambda m: m["attrs"].pop("rank")), "'rank'", 0, ("info",)),
    Bad(
        "masks-rank-string",
        "manifest fields",
        "masks",
        _masks(lambda m: m["attrs"].update(rank="8")),
        "'rank'",
        0,
        ("info",),
    ),
    Bad("masks-triple-broken", "manifest fields", "masks", _masks(_drop_v), "expected tensors", 0, ("info",)),
    Bad("masks-s-shape", "header lies", "masks", _masks(_s_shape), "manifest says", 1),
]


# -- prompt files ---------------------------------------------------------------------------------------------
def _prompts(content: bytes) -> Callable[[Path, Bases], Path]:
    def build(d: Path, bases: Bases) -> Path:
        (d / "prompts.jsonl").write_bytes(content)
        return d / "prompts.jsonl"

    return build


PROMPTS: list[Bad] = [
    Bad("prompts-empty", "truncated/empty", "prompts", _prompts(b""), "holds no prompts"),
    Bad("prompts-not-utf8", "wrong magic", "prompts", _prompts(b'{"prompt": "\xff"}\n'), "not UTF-8"),
    Bad(
        "prompts-truncated", "truncated/empty", "prompts", _prompts(b'{"prompt": "a"}\n{"prompt": "b'), "not valid JSON"
    ),
    Bad(
        "prompts-deep-nesting",
        "prompt fields",
        "prompts",
        _prompts(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
        "nested too deeply",
    ),
    Bad(
        "prompts-bigint",
        "prompt fields",
        "prompts",
        _prompts(b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}\n"),
        "not valid JSON",
    ),
    Bad("prompts-not-object", "prompt fields", "prompts", _prompts(b'"a prompt"\n'), "expected an object"),
    Bad(
        "prompts-prompt-not-string",
        "prompt fields",
        "prompts",
        _prompts(b'{"prompt": ["a"]}\n'),
        "must be a non-empty string",
    ),
]

CORPUS: list[Bad] = [*PT, *ST, *STORE, *MASKS, *PROMPTS]

#: The commands each kind of input is given to (cases narrow them with ``commands``).
COMMANDS: dict[str, tuple[str, ...]] = {
    "pt": _MANIFEST,
    "st-file": _MANIFEST,
    "store": _MANIFEST,
    "masks": ("info", "verify"),
    "prompts": ("extract",),
}


def argv(command: str, src: Path, out: Path) -> list[str]:
    """The command line that reads ``src`` (writing, where the command writes, only to ``out``)."""
    return {
        "info": ["info", str(src)],
        "verify": ["verify", str(src)],
        "convert": ["convert", str(src), "-o", str(out), "--to", "safetensors"],
        "importance": ["importance", str(src), "-o", str(out)],
        "svd": ["svd", str(src), "--rank", "2", "-o", str(out)],
        "extract": ["extract", "tiny-gemma4", "--prompts", str(src), "--out", str(out)],
    }[command]
