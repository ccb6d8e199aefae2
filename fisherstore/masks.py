"""The mask store: top-k singular modes of Fisher tensors, in the store container.

A mask store is an ordinary fisherstore store (either backend) whose manifest
says ``kind: "masks"``.  For every source Fisher tensor ``F`` (m×n) it holds
three tensors, written in the same group as their siblings:

* ``<name>.U`` — m×r, orthonormal columns (left singular vectors),
* ``<name>.S`` — r, non-increasing singular values,
* ``<name>.V`` — n×r, orthonormal columns (right singular vectors),

so that ``F ≈ U diag(S) Vᵀ`` with ``r = min(k, m, n)``.  Groups mirror the
source store's layer groups, so a resumed ``fisherstore svd`` redoes at most
one group.

Manifest ``attrs``: ``rank`` (the k asked for), ``method``, ``params`` (how
the modes were computed) and ``source`` (:func:`source_identity`: the source
path plus a hash of its tensors' names, shapes and checksums, so a mask store
can be checked against the Fisher it came from).  Per-tensor ``attrs`` sit on
``<name>.S``: ``source`` (the Fisher tensor name), ``shape`` ([m, n]),
``energy`` (‖S‖² / ‖F‖²_F, the fraction of squared Frobenius norm captured),
``residual`` (‖F − U S Vᵀ‖_F = sqrt(‖F‖² − ‖S‖²)), ``total_energy`` (‖F‖²_F),
``fisher_sum`` (the source tensor's sum, for layer importance) and
``method`` (``exact``, ``randomized`` or ``given``).  When the masks were
written without their source (:func:`write_masks` with ``source=None``) the
energy figures and ``fisher_sum`` are ``null``.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _svd_core as core
from .errors import BadInputError, CorruptDataError, TensorNotFoundError
from .formats.base import rows_of
from .manifest import GroupInfo, Manifest, TensorSpec, dtype_name
from .naming import parse_name
from .storage import Remote
from .store import FisherStore, open_store
from .writer import StoreWriter, plan_groups

__all__ = [
    "MASK_KIND",
    "MaskStore",
    "MaskTriple",
    "describe_masks",
    "energy_and_residual",
    "mask_attrs",
    "mask_backend_options",
    "mask_names",
    "mask_specs",
    "mask_triples",
    "open_masks",
    "plan_mask_groups",
    "source_identity",
    "write_masks",
]

#: ``Manifest.kind`` of a mask store.
MASK_KIND = "masks"
_SUFFIXES = (".U", ".S", ".V")


def mask_names(name: str) -> tuple[str, str, str]:
    """The stored names ``(<name>.U, <name>.S, <name>.V)`` of a Fisher tensor's modes."""
    return (name + _SUFFIXES[0], name + _SUFFIXES[1], name + _SUFFIXES[2])


def mask_specs(name: str, m: int, n: int, rank: int, dtype: str) -> tuple[TensorSpec, TensorSpec, TensorSpec]:
    """The specs of U (m×r), S (r) and V (n×r) for a Fisher tensor ``name``."""
    u, s, v = mask_names(name)
    return TensorSpec(u, (m, rank), dtype), TensorSpec(s, (rank,), dtype), TensorSpec(v, (n, rank), dtype)


@dataclass(frozen=True)
class MaskTriple:
    """The planned ``<name>.U``, ``<name>.S``, ``<name>.V`` of one source Fisher tensor ``name``."""

    name: str
    u: TensorSpec
    s: TensorSpec
    v: TensorSpec


def mask_triples(group: GroupInfo) -> list[MaskTriple]:
    """The triples of a mask-store group, in order, checked against the layout of the module docstring.

    Args:
        group: a group of a mask store's plan or manifest.

    Returns:
        One :class:`MaskTriple` per source tensor, in group order.

    Raises:
        CorruptDataError: the group's tensors are not consecutive ``<name>.U``, ``<name>.S``,
            ``<name>.V`` of shapes m×r, r and n×r in one dtype.
    """
    specs = group.tensors
    triples = []
    for i in range(0, len(specs), 3):
        found = specs[i : i + 3]
        u = found[0]
        name = u.name.removesuffix(_SUFFIXES[0])
        expected = mask_names(name)
        if len(found) < 3 or tuple(t.name for t in found) != expected:
            raise CorruptDataError(
                f"mask group {group.index}: expected tensors {list(expected)} at position {i}, "
                f"got {[t.name for t in found]}"
            )
        s, v = found[1], found[2]
        if (
            len(u.shape) != 2
            or len(v.shape) != 2
            or s.shape != (u.shape[1],)
            or v.shape[1] != u.shape[1]
            or not u.dtype == s.dtype == v.dtype
        ):
            raise CorruptDataError(
                f"mask group {group.index}: {name!r} needs U m×r, S r, V n×r in one dtype; got "
                f"U {list(u.shape)} {u.dtype}, S {list(s.shape)} {s.dtype}, V {list(v.shape)} {v.dtype}"
            )
        triples.append(MaskTriple(name, u, s, v))
    return triples


def plan_mask_groups(entries: Sequence[tuple[str, int, int, int, int]], dtype: str) -> tuple[GroupInfo, ...]:
    """Plan a mask store: one group per source group, in source-group order.

    ``entries`` are ``(source name, m, n, rank, source group index)`` in
    source order.  Indices are renumbered densely (a source group whose
    tensors were all filtered out gets no mask group).
    """
    by_group: dict[int, list[tuple[str, int, int, int]]] = {}
    for name, m, n, rank, group in entries:
        by_group.setdefault(group, []).append((name, m, n, rank))
    plan = []
    for index, key in enumerate(sorted(by_group)):
        members = by_group[key]
        layers = sorted({layer for name, *_ in members if (layer := parse_name(name)[0]) is not None})
        specs = tuple(spec for name, m, n, rank in members for spec in mask_specs(name, m, n, rank, dtype))
        plan.append(GroupInfo(index, tuple(layers), specs))
    return tuple(plan)


def energy_and_residual(captured: float, total_energy: float) -> tuple[float, float]:
    """``(‖S‖²/‖F‖², ‖F − U S Vᵀ‖_F)`` from the captured ‖S‖² and ‖F‖²_F.

    ‖F − U S Vᵀ‖² = ‖F‖² − ‖S‖² holds because U S Vᵀ = U Uᵀ F is an
    orthogonal projection of F; the difference is clamped at 0 against
    rounding.  An all-zero F is captured exactly (energy 1, residual 0).
    """
    energy = min(1.0, captured / total_energy) if total_energy > 0 else 1.0
    return energy, math.sqrt(max(0.0, total_energy - captured))


def mask_attrs(
    source_name: str,
    shape: tuple[int, int],
    *,
    captured: float,
    total_energy: float | None,
    method: str,
    fisher_sum: float | None = None,
) -> dict[str, Any]:
    """Per-tensor attrs (stored on ``<name>.S``, see the module docstring).

    ``captured`` is ‖S‖² (from fp32 values, before any downcast),
    ``total_energy`` is ‖F‖²_F or ``None`` when unknown, ``fisher_sum`` the
    source tensor's recorded sum, kept so a mask store alone can show the
    layer-importance profile (``fisherstore plot``).
    """
    energy, residual = (None, None) if total_energy is None else energy_and_residual(captured, total_energy)
    return {
        "source": source_name,
        "shape": list(shape),
        "method": method,
        "energy": energy,
        "residual": residual,
        "total_energy": total_energy,
        "fisher_sum": fisher_sum if fisher_sum is not None and math.isfinite(fisher_sum) else None,
    }


def mask_backend_options(backend: str, options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Backend options for a mask store: safetensors shards are named ``masks-0000i-of-0000N`` unless told otherwise."""
    if options is None and backend == "safetensors":
        return {"prefix": "masks"}
    return options


def source_identity(store: FisherStore) -> dict[str, Any]:
    """What identifies the Fisher a mask store was computed from.

    ``tensors_sha256`` hashes every tensor's name, dtype, shape and checksum
    in store order, so two stores with the same bytes have the same identity
    wherever they live; ``path`` is where it was read from.
    """
    h = hashlib.sha256()
    for name in store.names:
        info = store.info(name)
        h.update(f"{name}\t{info.dtype}\t{list(info.shape)}\t{info.checksum}\n".encode())
    return {
        "path": str(store.path) if isinstance(store.path, Remote) else str(Path(store.path).resolve()),
        "format": store.format,
        "kind": store.manifest.kind,
        "tensors": len(store),
        "tensors_sha256": h.hexdigest(),
    }


class MaskStore:
    """Lazy, read-only access to a mask store (see :func:`open_masks`)."""

    def __init__(self, store: FisherStore) -> None:
        self.store = store
        rank = store.manifest.attrs.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise CorruptDataError(
                f"{store.path}: mask store manifest attrs 'rank' must be an integer >= 1, got {rank!r:.50}; "
                "it was not written by fisherstore"
            )
        written = set(store.names)
        #: source tensor → its stored ``<name>.S`` (the tensor holding its attrs), for every written triple.
        self._names = {t.name: t.s.name for g in store.manifest.groups for t in mask_triples(g) if t.s.name in written}

    @property
    def path(self) -> Path | Remote:
        """The mask store directory (or its :class:`~fisherstore.storage.Remote` on an object store)."""
        return self.store.path

    @property
    def manifest(self) -> Manifest:
        """The mask store's manifest."""
        return self.store.manifest

    @property
    def names(self) -> list[str]:
        """Source Fisher tensor names, in store order."""
        return list(self._names)

    @property
    def rank(self) -> int:
        """The k the store was made with (a tensor holds ``min(k, m, n)`` modes)."""
        return int(self.manifest.attrs["rank"])

    @property
    def source(self) -> dict[str, Any]:
        """The source store's identity (:func:`source_identity`), ``{}`` when unknown."""
        return dict(self.manifest.attrs.get("source") or {})

    @property
    def params(self) -> dict[str, Any]:
        """How the modes were computed (oversampling, power iterations, transform, ...)."""
        return dict(self.manifest.attrs.get("params") or {})

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def attrs(self, name: str) -> dict[str, Any]:
        """The per-tensor attrs of ``name`` (see the module docstring)."""
        return dict(self.store.info(self._stored(name)).attrs)

    def shape(self, name: str) -> tuple[int, int]:
        """``(m, n)`` of the source Fisher tensor."""
        u, _, v = mask_names(name)
        self._stored(name)
        return self.store.shape(u)[0], self.store.shape(v)[0]

    def available_rank(self, name: str) -> int:
        """How many modes are stored for ``name`` (``min(k, m, n)``)."""
        return self.store.shape(self._stored(name))[0]

    def energy(self, name: str, rank: int | None = None) -> float | None:
        """Fraction of ‖F‖²_F captured by the first ``rank`` modes (all stored ones by default); ``None`` if unknown."""
        if rank is None:
            return self.attrs(name)["energy"]
        total = self.attrs(name)["total_energy"]
        return None if total is None else energy_and_residual(_captured(self._singular_values(name, rank)), total)[0]

    def residual(self, name: str, rank: int | None = None) -> float | None:
        """‖F − U_r S_r V_rᵀ‖_F for the first ``rank`` modes (all stored ones by default); ``None`` if unknown."""
        if rank is None:
            return self.attrs(name)["residual"]
        total = self.attrs(name)["total_energy"]
        return None if total is None else energy_and_residual(_captured(self._singular_values(name, rank)), total)[1]

    def energy_curve(self, name: str) -> torch.Tensor | None:
        """Energy captured by the first r modes for r = 1..available (fp64); ``None`` if ‖F‖ is unknown."""
        total = self.attrs(name)["total_energy"]
        if total is None:
            return None
        captured = self._singular_values(name, self.available_rank(name)).double().square().cumsum(0)
        return (captured / total).clamp(max=1.0) if total > 0 else torch.ones_like(captured)

    def get(
        self,
        name: str,
        rank: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, V)`` of the first ``rank`` modes (U m×r, S r, V n×r), contiguous, on ``device`` in ``dtype``."""
        r = self._check_rank(name, rank)
        u, s, v = mask_names(name)
        out = []
        for stored, index in ((u, (slice(None), slice(0, r))), (s, (slice(0, r),)), (v, (slice(None), slice(0, r)))):
            t = self.store.read(stored)[index]
            out.append(t.to(device=device, dtype=dtype).contiguous())
        return out[0], out[1], out[2]

    def _singular_values(self, name: str, rank: int) -> torch.Tensor:
        r = self._check_rank(name, rank)
        return self.store.read(self._stored(name))[:r]

    def _check_rank(self, name: str, rank: int | None) -> int:
        available = self.available_rank(name)
        if rank is None:
            return available
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= available:
            raise BadInputError(
                f"{self.path}: rank {rank!r} for {name!r} must be an integer in 1..{available} "
                f"(the store holds {available} modes of it; recompute the masks with a larger rank for more)",
                param="rank",
            )
        return rank

    def _stored(self, name: str) -> str:
        try:
            return self._names[name]
        except KeyError:
            raise TensorNotFoundError(
                f"{self.path}: no masks for tensor {name!r} (it holds {len(self._names)} tensors)"
            ) from None

    def close(self) -> None:
        """Release the underlying store's open files."""
        self.store.close()

    def __enter__(self) -> MaskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MaskStore({str(self.path)!r}, {len(self)} tensors, rank {self.manifest.attrs.get('rank')})"


def open_masks(path: str | Path, *, storage_options: Mapping[str, Any] | None = None, verify: bool = True) -> MaskStore:
    """Open a mask store for lazy reading; refuses a store of any other kind.

    Masks are small (``U``, ``S``, ``V`` of rank k per tensor) and read whole,
    so checking their checksums costs one CRC-32C pass over bytes already in
    memory: it is on by default here, unlike :func:`~fisherstore.store.open_store`.

    Args:
        path: a mask store directory written by :func:`write_masks` or ``fisherstore svd``, or its URL.
        storage_options: keyword arguments of the URL's filesystem (credentials, ``endpoint_url``, ...).
        verify: check each tensor's CRC-32C on its first read (a corrupt mask raises
            :class:`~fisherstore.errors.ChecksumMismatchError` instead of reaching a model).

    Returns:
        The :class:`MaskStore`; masks are read on :meth:`MaskStore.get`.
    """
    store = open_store(path, storage_options=storage_options, verify=verify)
    if store.manifest.kind != MASK_KIND:
        kind = store.manifest.kind
        store.close()
        raise BadInputError(
            f"{path} is a {kind!r} store, not a mask store; make one with 'fisherstore svd {path} --rank K -o MASKS'"
        )
    if "rank" not in store.manifest.attrs:
        store.close()
        raise BadInputError(f"{path}: mask store manifest has no 'rank' attribute; it was not written by fisherstore")
    return MaskStore(store)


def write_masks(
    path: str | Path,
    masks: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    backend: str = "safetensors",
    source: str | Path | FisherStore | None = None,
    params: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write ``{name: (U, S, V)}`` as a mask store at ``path`` (which must not exist).

    Every entry needs U m×r, S r, V n×r of one floating dtype.  With
    ``source`` (a store or its path) the names must be tensors of it with
    shape m×n; its identity is recorded, groups follow its layer groups and
    each tensor's captured energy and residual are computed by streaming the
    source once (through ``params["transform"]`` if given).  Without it,
    groups are one per layer and the energy figures are ``null``.
    ``params`` is recorded as the manifest's ``params``.

    Args:
        path: the new mask store directory.
        masks: ``{tensor name: (U, S, V)}``.
        backend: the container format.
        source: the Fisher store the masks were computed from, for energies and groups.
        params: how the masks were made (recorded as is).
        storage_options: keyword arguments of the filesystem of ``path`` or ``source`` when they are URLs.
    """
    if not masks:
        raise BadInputError(f"{path}: no masks given; write_masks needs at least one (U, S, V)")
    dtype = _check_masks(masks)
    params = dict(params or {})
    store = (
        source
        if isinstance(source, FisherStore) or source is None
        else open_store(source, storage_options=storage_options)
    )
    try:
        if store is None:
            specs = [
                spec
                for name, (U, S, V) in masks.items()
                for spec in mask_specs(name, U.shape[0], V.shape[0], S.shape[0], dtype)
            ]
            plan = plan_groups(specs, 1)
            attrs = {
                name: mask_attrs(
                    name, (U.shape[0], V.shape[0]), captured=_captured(S), total_energy=None, method="given"
                )
                for name, (U, S, V) in masks.items()
            }
            identity: dict[str, Any] = {}
        else:
            entries = []
            for name, (U, S, V) in masks.items():
                m, n = rows_of(store.info(name).shape)
                if (U.shape[0], V.shape[0]) != (m, n):
                    raise BadInputError(
                        f"{name!r}: U and V give a {U.shape[0]}x{V.shape[0]} matrix, the source tensor is {m}x{n}"
                    )
                entries.append((name, m, n, S.shape[0], store.info(name).group))
            plan = plan_mask_groups(entries, dtype)
            transform = params.get("transform", "none")
            attrs = {
                name: mask_attrs(
                    name,
                    (U.shape[0], V.shape[0]),
                    captured=_captured(S),
                    total_energy=frobenius_sq(store, name, transform),
                    method="given",
                    fisher_sum=store.info(name).sum,
                )
                for name, (U, S, V) in masks.items()
            }
            identity = source_identity(store)
        manifest_attrs = {
            "rank": max(S.shape[0] for _, S, _ in masks.values()),
            "method": "given",
            "params": params,
            "source": identity,
        }
        writer = StoreWriter.create(
            path,
            plan,
            backend=backend,
            backend_options=mask_backend_options(backend),
            kind=MASK_KIND,
            attrs=manifest_attrs,
            storage_options=storage_options,
        )
        with writer:
            for group in plan:
                tensors = {}
                group_attrs = {}
                for triple in mask_triples(group):
                    U, S, V = masks[triple.name]
                    tensors.update(
                        {
                            triple.u.name: U.detach().cpu().contiguous(),
                            triple.s.name: S.detach().cpu().contiguous(),
                            triple.v.name: V.detach().cpu().contiguous(),
                        }
                    )
                    group_attrs[triple.s.name] = attrs[triple.name]
                writer.write_group(group.index, tensors, group_attrs)
            writer.finish()
    finally:
        if store is not None and store is not source:
            store.close()


def frobenius_sq(store: FisherStore, name: str, transform: str = "none") -> float:
    """‖T(F)‖²_F of a store tensor, streamed in bounded blocks (T = ``transform``).

    Args:
        store: the Fisher store.
        name: a tensor of it.
        transform: a key of :data:`~fisherstore._svd_core.TRANSFORMS`.

    Returns:
        The squared Frobenius norm (fp32 row norms summed in fp64).
    """
    return core.frobenius_sq(functools.partial(store.iter_rows, name), store.info(name).shape, transform)


def _captured(S: torch.Tensor) -> float:
    """‖S‖² accumulated in fp64."""
    return float(S.detach().double().square().sum())


def _check_masks(masks: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> str:
    """Validate the (U, S, V) triples; return their common dtype name."""
    dtypes = set()
    for name, triple in masks.items():
        if not (
            isinstance(triple, (tuple, list)) and len(triple) == 3 and all(isinstance(t, torch.Tensor) for t in triple)
        ):
            raise BadInputError(f"masks[{name!r}] must be a (U, S, V) tuple of tensors")
        U, S, V = triple
        if U.ndim != 2 or S.ndim != 1 or V.ndim != 2 or not (U.shape[1] == S.shape[0] == V.shape[1] >= 1):
            raise BadInputError(
                f"masks[{name!r}]: need U m×r, S r, V n×r with r >= 1; "
                f"got U {list(U.shape)}, S {list(S.shape)}, V {list(V.shape)}"
            )
        if not (U.dtype == S.dtype == V.dtype and U.dtype.is_floating_point):
            raise BadInputError(
                f"masks[{name!r}]: U, S, V must share one floating dtype; got {U.dtype}, {S.dtype}, {V.dtype}"
            )
        dtypes.add(U.dtype)
    if len(dtypes) != 1:
        raise BadInputError(f"all masks must share one dtype; got {sorted(map(str, dtypes))}")
    return dtype_name(dtypes.pop())


def describe_masks(masks: MaskStore) -> list[dict[str, Any]]:
    """One row per tensor for ``fisherstore info MASKS``: metadata only, no tensor bytes read.

    Keys: ``name, layer, kind, shape ([m, n]), rank (stored modes), method,
    energy, residual, total_energy`` (the last three may be ``None``).

    Args:
        masks: an open mask store.

    Returns:
        The rows, in store order.
    """
    rows = []
    for name in masks.names:
        attrs = masks.attrs(name)
        layer, kind = parse_name(name)
        rows.append(
            {
                "name": name,
                "layer": layer,
                "kind": kind,
                "shape": list(masks.shape(name)),
                "rank": masks.available_rank(name),
                "method": attrs.get("method"),
                "energy": attrs.get("energy"),
                "residual": attrs.get("residual"),
                "total_energy": attrs.get("total_energy"),
            }
        )
    return rows
