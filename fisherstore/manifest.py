"""The store manifest (``fisherstore.json``) as small, validated dataclasses.

The manifest is the single source of truth about a store: what tensors exist,
where their bytes are, their checksums and sums, which layer groups were
planned and which are complete.  ``from_dict`` validates everything it reads
and quotes the bad value, because a manifest is input like any other file.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .digests import sha256_of
from .errors import CorruptDataError
from .naming import parse_name, validate_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMPORTANCE_NAME",
    "ITEMSIZES",
    "MANIFEST_NAME",
    "GroupInfo",
    "Manifest",
    "TensorInfo",
    "TensorSpec",
    "document_digest",
    "dtype_name",
    "importance_document",
    "layer_sums",
    "now_iso",
    "parse_json",
    "torch_dtype",
]

FORMAT_NAME = "fisherstore"
#: The largest manifest read: ~2 KB per tensor, so this is millions of tensors; checked before anything is read.
MAX_MANIFEST_BYTES = 256 << 20
FORMAT_VERSION = 1
MANIFEST_NAME = "fisherstore.json"
#: The per-layer importance document a store keeps beside its manifest (:func:`importance_document`).
IMPORTANCE_NAME = "layer_importance.json"

#: What a store's tensors are (the manifest's ``kind``).
STORE_KINDS = ("fisher", "masks")

_CHECKSUM_RE = re.compile(r"crc32c:[0-9a-fA-F]{8}")

#: Storable dtypes, by the name the manifest uses, with their sizes in bytes.
#: Plain data, so that code which only moves bytes never has to import torch.
ITEMSIZES: dict[str, int] = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}


class _TorchDtypes(Mapping[str, "torch.dtype"]):
    """Manifest dtype name → torch dtype; torch is imported on the first value lookup, not before.

    Iterating, ``len`` and ``in`` need only the names (:data:`ITEMSIZES`), so
    listing the storable dtypes in a message costs no torch import.
    """

    def __getitem__(self, name: str) -> torch.dtype:
        if name not in ITEMSIZES:
            raise KeyError(name)
        import torch

        return getattr(torch, name)

    def __iter__(self) -> Iterator[str]:
        return iter(ITEMSIZES)

    def __len__(self) -> int:
        return len(ITEMSIZES)


#: Storable dtypes, by the name the manifest uses (values are torch dtypes, resolved lazily).
DTYPES: Mapping[str, torch.dtype] = _TorchDtypes()


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of a torch dtype (``torch.bfloat16`` → ``"bfloat16"``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZES:
        raise CorruptDataError(f"dtype {dtype} is not storable; use one of {sorted(ITEMSIZES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name (imports torch)."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise CorruptDataError(f"unknown dtype {name!r}; expected one of {sorted(ITEMSIZES)}") from None


def _dtype(value: Any) -> str:
    """Validate a manifest dtype name and return it."""
    if not isinstance(value, str) or value not in ITEMSIZES:
        raise CorruptDataError(f"unknown dtype {value!r}; expected one of {sorted(ITEMSIZES)}")
    return value


def parse_json(raw: bytes | bytearray | str, where: str) -> Any:
    """Parse a JSON document of a store (manifest, header, array metadata); :class:`CorruptDataError` if it is not.

    ``json.loads`` raises more than ``JSONDecodeError`` on hostile bytes:
    ``UnicodeDecodeError``, ``ValueError`` for an integer of over 4300 digits
    and ``RecursionError`` for arrays nested some thousand deep; each becomes
    one line naming ``where``.

    Args:
        raw: the document's bytes (UTF-8) or text.
        where: the file (or object) it came from, named in the error.

    Returns:
        The parsed value (any JSON type: callers check the shape they need).
    """
    try:
        return json.loads(raw)
    except RecursionError:
        raise CorruptDataError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise CorruptDataError(f"{where}: not valid JSON ({' '.join(str(exc).split())})") from None


def _bool(value: Any, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(where, f"{key} must be true or false, got {value!r}")
    return value


def _bad(where: str, msg: str) -> CorruptDataError:
    return CorruptDataError(f"{where}: {msg}")


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise _bad(where, f"shape must be a list of non-negative integers, got {value!r:.200}")
    return tuple(value)


#: The largest finite float: JSON integers beyond it have no float (``float(10**400)`` overflows).
_MAX_FLOAT = 1.7976931348623157e308
#: Tensor sizes are 64-bit byte counts everywhere (safetensors offsets, zarr shard indices, file offsets).
_MAX_NBYTES = 1 << 63


def _sized(shape: tuple[int, ...], dtype: str, where: str) -> tuple[int, ...]:
    """``shape`` if a tensor of it in ``dtype`` has fewer than 2**63 bytes (no real file can hold more)."""
    if math.prod(shape) * ITEMSIZES[dtype] >= _MAX_NBYTES:
        raise _bad(where, f"shape {list(shape)!r:.200} of {dtype} is over 2**63 bytes: no file holds that")
    return shape


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be before it is written: name, shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        validate_name(self.name)
        _dtype(self.dtype)

    @property
    def numel(self) -> int:
        """Elements of the tensor (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor in its dtype."""
        return self.numel * ITEMSIZES[self.dtype]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        """The spec of an existing tensor: its shape and dtype under ``name``."""
        return cls(name, tuple(tensor.shape), dtype_name(tensor.dtype))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form written to the manifest (:meth:`from_dict` reads it back)."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Any, where: str = "spec") -> TensorSpec:
        """A spec from its manifest form, validated; errors name ``where``."""
        if not isinstance(d, dict):
            raise _bad(where, f"expected an object, got {d!r}")
        try:
            dtype = _dtype(d.get("dtype"))
            return cls(validate_name(d.get("name")), _sized(_shape(d.get("shape"), where), dtype, where), dtype)
        except CorruptDataError:
            raise
        except ValueError as exc:
            raise _bad(where, str(exc)) from None


@dataclass(frozen=True)
class TensorInfo:
    """A written tensor: its spec plus where its bytes are and what they hash and sum to."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    group: int
    location: dict[str, Any]
    checksum: str
    sum: float
    layer: int | None = None
    kind: str = "other"
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> TensorSpec:
        """The planned name, shape and dtype of this tensor."""
        return TensorSpec(self.name, self.shape, self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor as stored."""
        return self.spec.nbytes

    @property
    def itemsize(self) -> int:
        """Bytes of one element."""
        return ITEMSIZES[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The stored dtype as a torch dtype (imports torch)."""
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form written to the manifest (:meth:`from_dict` reads it back)."""
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "layer": self.layer,
            "kind": self.kind,
            "group": self.group,
            "location": self.location,
            "checksum": self.checksum,
            "sum": self.sum,
            "attrs": self.attrs,
        }

    @classmethod
    def from_dict(cls, name: str, d: Any) -> TensorInfo:
        """The entry of tensor ``name`` from its manifest form, validated (FORMAT.md §2)."""
        where = f"tensor {name!r}"
        try:
            validate_name(name)
        except ValueError as exc:
            raise CorruptDataError(f"manifest: {exc}") from None
        if not isinstance(d, dict):
            raise _bad(where, f"expected an object, got {d!r}")
        for key in ("shape", "dtype", "group", "location", "checksum", "sum"):
            if key not in d:
                raise _bad(where, f"missing field {key!r}")
        layer, kind = parse_name(name)
        group = d["group"]
        if not isinstance(group, int) or isinstance(group, bool) or group < 0:
            raise _bad(where, f"group must be a non-negative integer, got {group!r}")
        if not isinstance(d["location"], dict):
            raise _bad(where, f"location must be an object, got {d['location']!r}")
        if not isinstance(d["checksum"], str) or not _CHECKSUM_RE.fullmatch(d["checksum"]):
            raise _bad(where, f"checksum must look like 'crc32c:xxxxxxxx', got {d['checksum']!r}")
        if (
            not isinstance(d["sum"], (int, float))
            or isinstance(d["sum"], bool)
            or (isinstance(d["sum"], int) and abs(d["sum"]) > _MAX_FLOAT)
        ):
            raise _bad(where, f"sum must be a number, got {d['sum']!r:.100}")
        attrs = d.get("attrs", {})
        if not isinstance(attrs, dict):
            raise _bad(where, f"attrs must be an object, got {attrs!r}")
        dtype = _dtype(d["dtype"])
        return cls(
            name=name,
            shape=_sized(_shape(d["shape"], where), dtype, where),
            dtype=dtype,
            group=group,
            location=d["location"],
            checksum=d["checksum"],
            sum=float(d["sum"]),
            layer=layer,
            kind=kind,
            attrs=attrs,
        )


@dataclass(frozen=True)
class GroupInfo:
    """One planned unit of work (a layer group): its tensors and whether it is written."""

    index: int
    layers: tuple[int, ...]
    tensors: tuple[TensorSpec, ...]
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form written to the manifest (:meth:`from_dict` reads it back)."""
        return {
            "index": self.index,
            "layers": list(self.layers),
            "complete": self.complete,
            "tensors": [t.to_dict() for t in self.tensors],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> GroupInfo:
        """A group from its manifest form, validated; errors name ``where``."""
        if not isinstance(d, dict):
            raise _bad(where, f"expected an object, got {d!r}")
        index = d.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise _bad(where, f"index must be a non-negative integer, got {index!r}")
        tensors = d.get("tensors", [])
        if not isinstance(tensors, list):
            raise _bad(where, f"tensors must be a list, got {tensors!r}")
        return cls(
            index=index,
            layers=_shape(d.get("layers", []), where),
            tensors=tuple(TensorSpec.from_dict(t, f"{where} tensor {i}") for i, t in enumerate(tensors)),
            complete=_bool(d.get("complete", False), where, "complete"),
        )


def _check_plan(groups: tuple[GroupInfo, ...], tensors: Mapping[str, TensorInfo], where: str) -> None:
    """Enforce the plan's MUSTs of docs/FORMAT.md §2, as the writer does when it creates a store.

    Group indices are ``0..N-1`` in order; a tensor is planned once; every
    entry of ``tensors`` is planned in the group it names, with the planned
    shape and dtype; a complete group has an entry for each of its tensors.
    """
    indices = [g.index for g in groups]
    if indices != list(range(len(groups))):
        raise _bad(where, f"groups: indices must be 0..N-1 in order, got {indices}")
    planned: dict[str, tuple[int, TensorSpec]] = {}
    for g in groups:
        for spec in g.tensors:
            if spec.name in planned:
                raise _bad(
                    where, f"groups: tensor {spec.name!r} is planned in group {planned[spec.name][0]} and {g.index}"
                )
            planned[spec.name] = (g.index, spec)
    for info in tensors.values():
        entry = planned.get(info.name)
        if entry is None or entry[0] != info.group:
            raise _bad(where, f"tensors: {info.name!r} names group {info.group}, whose plan does not list it")
        spec = entry[1]
        if spec != info.spec:
            raise _bad(
                where,
                f"tensors: {info.name!r} is {list(info.shape)} {info.dtype}, "
                f"its group's plan says {list(spec.shape)} {spec.dtype}",
            )
    for g in groups:
        missing = [s.name for s in g.tensors if s.name not in tensors]
        if g.complete and missing:
            raise _bad(where, f"groups: group {g.index} is complete but tensors has no entry for {missing[0]!r}")


@dataclass(frozen=True)
class Manifest:
    """Everything ``fisherstore.json`` says about a store."""

    backend: str
    groups: tuple[GroupInfo, ...]
    tensors: dict[str, TensorInfo]
    kind: str = "fisher"
    backend_options: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    updated: str = ""

    @property
    def complete(self) -> bool:
        """Whether every planned group is written."""
        return bool(self.groups) and all(g.complete for g in self.groups)

    @property
    def missing_groups(self) -> list[int]:
        """Indices of the planned groups not written yet (empty for a complete store)."""
        return [g.index for g in self.groups if not g.complete]

    def with_group(self, group: GroupInfo, infos: list[TensorInfo]) -> Manifest:
        """A copy with ``group`` replaced and ``infos`` recorded, tensors kept in planned order.

        Groups may complete in any order (a resumed run, or extraction's top-down
        pipelined schedule); the store's tensor order stays the plan's.
        """
        groups = tuple(group if g.index == group.index else g for g in self.groups)
        recorded = {**self.tensors, **{i.name: i for i in infos}}
        planned = [t.name for g in groups for t in g.tensors if t.name in recorded]
        tensors = {n: recorded[n] for n in planned} | recorded
        return replace(self, groups=groups, tensors=tensors, updated=now_iso())

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form written to ``fisherstore.json`` (:meth:`from_dict` reads it back), with its digest."""
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "backend": self.backend,
            "backend_options": self.backend_options,
            "complete": self.complete,
            "created": self.created,
            "updated": self.updated,
            "groups": [g.to_dict() for g in self.groups],
            "tensors": {n: t.to_dict() for n, t in self.tensors.items()},
            "provenance": self.provenance,
            "attrs": self.attrs,
        }
        doc["digest"] = document_digest(doc)
        return doc

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_NAME) -> Manifest:
        """A manifest from its JSON form, enforcing every MUST of FORMAT.md §2 (CorruptDataError otherwise)."""
        if not isinstance(d, dict):
            raise _bad(where, f"expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT_NAME:
            raise _bad(where, f"format is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        version = d.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1 or version > FORMAT_VERSION:
            raise _bad(
                where,
                f"version {version!r} is not supported (this fisherstore reads 1..{FORMAT_VERSION}); "
                "upgrade fisherstore",
            )
        backend = d.get("backend")
        if not isinstance(backend, str):
            raise _bad(where, f"backend must be a string, got {backend!r}")
        groups = d.get("groups")
        tensors = d.get("tensors")
        if not isinstance(groups, list) or not isinstance(tensors, dict):
            raise _bad(where, "'groups' must be a list and 'tensors' an object")
        for key in ("backend_options", "provenance", "attrs"):
            if not isinstance(d.get(key, {}), dict):
                raise _bad(where, f"{key!r} must be an object")
        kind = d.get("kind", "fisher")
        if kind not in STORE_KINDS:
            raise _bad(where, f"kind must be one of {', '.join(STORE_KINDS)}, got {kind!r}")
        for key in ("created", "updated"):
            if not isinstance(d.get(key, ""), str):
                raise _bad(where, f"{key} must be an ISO-8601 string, got {d[key]!r}")
        if "complete" in d:
            _bool(d["complete"], where, "complete")
        parsed_groups = tuple(GroupInfo.from_dict(g, f"{where} group {i}") for i, g in enumerate(groups))
        try:
            parsed = {n: TensorInfo.from_dict(n, t) for n, t in tensors.items()}
        except CorruptDataError as exc:  # name the file: a tensor's entry alone does not say which manifest
            raise _bad(where, str(exc).removeprefix("manifest: ")) from None
        _check_plan(parsed_groups, parsed, where)
        return cls(
            backend=backend,
            groups=parsed_groups,
            tensors=parsed,
            kind=kind,
            backend_options=d.get("backend_options", {}),
            provenance=d.get("provenance", {}),
            attrs=d.get("attrs", {}),
            created=str(d.get("created", "")),
            updated=str(d.get("updated", "")),
        )

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read and validate a manifest file."""
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_MANIFEST_BYTES:  # refused before its bytes are in memory
                    raise CorruptDataError(
                        f"{path}: manifest is {size} bytes, over the {MAX_MANIFEST_BYTES >> 20} MiB cap"
                    )
                raw = fh.read(MAX_MANIFEST_BYTES + 1)  # + 1: a file that grew since fstat is still caught
        except FileNotFoundError:
            raise CorruptDataError(f"{path}: manifest missing") from None
        return cls.parse(raw, str(path))

    @classmethod
    def parse(cls, raw: bytes | bytearray, where: str) -> Manifest:
        """Validate a manifest's bytes, wherever they were read from (a file, an object store's GET).

        The one manifest parser: :meth:`load` (local files) and
        ``store.load_manifest`` (object stores) both end here, so the cap and
        the JSON checks of :func:`parse_json` hold for either.

        Args:
            raw: the manifest document's bytes (callers read at most ``MAX_MANIFEST_BYTES + 1`` of them).
            where: what to name in errors (its path or URL).

        Returns:
            The validated manifest; over the 256 MiB cap, not JSON or not FORMAT.md §2 is CorruptDataError.
        """
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CorruptDataError(f"{where}: manifest is over the {MAX_MANIFEST_BYTES >> 20} MiB cap")
        return cls.from_dict(parse_json(raw, where), where)


def document_digest(doc: Mapping[str, Any]) -> str:
    """The ``digest`` a manifest records of itself: SHA-256 of its canonical JSON, the ``digest`` key left out.

    Canonical: keys sorted, no spaces, ASCII escapes, Python's shortest float
    spelling; so the digest depends only on the parsed document, never on its
    whitespace, and ``fisherstore verify`` detects any change to what the
    manifest says (FORMAT.md §2).

    Args:
        doc: the manifest as a JSON document (a ``dict``); a ``digest`` key in it is ignored.

    Returns:
        ``"sha256:<hex>"``.
    """
    body = {k: v for k, v in doc.items() if k != "digest"}
    return sha256_of(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def layer_sums(
    infos: Mapping[str, TensorInfo], sums: Mapping[str, float] | None = None
) -> tuple[dict[int, float], dict[int, dict[str, float]]]:
    """Per-layer totals and per-layer-per-kind totals of tensor infos' recorded sums.

    Args:
        infos: tensor infos by name (a manifest's ``tensors``).
        sums: sums that replace the recorded ones (for sources that record none).

    Returns:
        ``({layer: total}, {layer: {kind: total}})``, in layer order.
    """
    totals: dict[int, float] = {}
    by_kind: dict[int, dict[str, float]] = {}
    for name, info in infos.items():
        if info.layer is None:
            continue
        value = (sums or {}).get(name, info.sum)
        totals[info.layer] = totals.get(info.layer, 0.0) + value
        kinds = by_kind.setdefault(info.layer, {})
        kinds[info.kind] = kinds.get(info.kind, 0.0) + value
    order = sorted(totals)
    return {l: totals[l] for l in order}, {l: by_kind[l] for l in order}


def importance_document(manifest: Manifest, sums: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The ``layer_importance.json`` document for a store's manifest.

    ``layers`` maps each layer index (as a string, JSON keys are strings) to
    the sum of every stored Fisher value of that layer; ``vector`` lists the
    same numbers in layer order; ``by_kind`` splits each layer by projection.
    It lives with the manifest because it is a view of it: the writer stores it
    and a store serves it without any tensor being read.

    Args:
        manifest: the store's manifest.
        sums: sums that replace the recorded ones (see :func:`layer_sums`).

    Returns:
        The JSON-ready document.
    """
    totals, by_kind = layer_sums(manifest.tensors, sums)
    return {
        "format": "fisherstore-layer-importance",
        "version": 1,
        "layers": {str(l): v for l, v in totals.items()},
        "vector": list(totals.values()),
        "by_kind": {str(l): k for l, k in by_kind.items()},
        "provenance": {
            k: manifest.provenance[k] for k in ("model", "estimator", "num_prompts") if k in manifest.provenance
        },
    }


def now_iso() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
