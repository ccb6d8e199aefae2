"""Checking a store against its manifest: every tensor's bytes, shape and checksum, and the metadata files.

Besides every tensor's CRC-32C, ``verify`` checks that each metadata file says
exactly what the manifest implies, so that a flipped bit anywhere that changes
what a reader takes from the store is reported (``tests/test_bitflips.py``):

* the manifest against its own ``digest`` (FORMAT.md §2);
* safetensors: every shard header (names, dtypes, shapes, offsets, ``__metadata__``)
  and the HF index (``weight_map``, ``total_size``);
* zarr: the root group's ``zarr.json`` and each array's, which must be the
  canonical rendering of its layout, with the store's compression and level;
* ``layer_importance.json``, which must be the manifest's sums.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import Checksum
from .errors import BadInputError, ChecksumMismatchError, CorruptDataError
from .manifest import (
    IMPORTANCE_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    document_digest,
    importance_document,
    parse_json,
)
from .progress import progress
from .storage import Remote, RemoteFile
from .store import FisherStore, open_store

__all__ = ["Problem", "metadata_problems", "verify"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store; ``name`` is the tensor (``None`` for the store as a whole)."""

    name: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.name}: {self.message}" if self.name else self.message


def verify(path: str | Path | FisherStore, *, storage_options: Mapping[str, Any] | None = None) -> list[Problem]:
    """Read every tensor once and compare it with the manifest; return the problems found.

    A store directory's metadata files are checked against the manifest too
    (:func:`metadata_problems`: the manifest's digest, shard headers, the HF
    index, ``zarr.json`` files, ``layer_importance.json``).  Sources without
    checksums (a legacy ``fisher.pt``) are checked for structure and
    readability only.

    Args:
        path: a store directory, mask store, ``fisher.pt``, or an open :class:`~fisherstore.store.FisherStore`
            (left open); or an URL of a store (``s3://bucket/store``).
        storage_options: keyword arguments of the URL's filesystem (credentials, ``endpoint_url``, ...).

    Returns:
        The problems, in store order; an empty list means the store is sound.
    """
    store = path if isinstance(path, FisherStore) else open_store(path, storage_options=storage_options)
    problems = []
    try:
        incomplete = store.manifest.missing_groups
        if incomplete:
            problems.append(Problem(None, f"incomplete: groups {incomplete} were never written (resume the run)"))
        if store.format in ("safetensors", "zarr"):  # a store, local or on an object store (not a bare file)
            problems += metadata_problems(store)
        bar: Any  # a tqdm bar, or a NullBar when quiet
        with progress(total=store.nbytes, desc="verify", unit="B", unit_scale=True, unit_divisor=1024) as bar:
            for name in store.names:
                info = store.info(name)
                checksum, nbytes = Checksum(), 0  # the sum is not rechecked: the checksum covers every byte
                try:
                    for chunk in store.iter_bytes(name):
                        checksum.update(chunk)
                        nbytes += len(chunk)
                        bar.update(len(chunk))
                except CorruptDataError as exc:
                    problems.append(Problem(name, str(exc)))
                    continue
                if nbytes != info.nbytes:
                    problems.append(Problem(name, f"{nbytes} bytes read, {info.nbytes} expected"))
                elif info.checksum and checksum.hexdigest() != info.checksum:
                    mismatch = ChecksumMismatchError.describe(checksum.hexdigest(), info.checksum)
                    problems.append(Problem(name, f"checksum mismatch: {mismatch}"))
    finally:
        if not isinstance(path, FisherStore):
            store.close()
    for p in problems:
        log.debug("verify: %s", p)
    return problems


#: The largest metadata document read whole (the manifest's cap: an HF index of a huge model is below it).
_MAX_DOC_BYTES = MAX_MANIFEST_BYTES


def _where(store: FisherStore, rel: str) -> str:
    """The path or URL of ``rel`` in a store (for messages)."""
    return store.path.url_of(rel) if isinstance(store.path, Remote) else str(store.path / rel)


def _exists(store: FisherStore, rel: str) -> bool:
    return store.path.exists(rel) if isinstance(store.path, Remote) else (store.path / rel).exists()


def _load_json(store: FisherStore, rel: str, cap: int = _MAX_DOC_BYTES) -> Any:
    """A small JSON document of a store (a file or an object); CorruptDataError when missing, over ``cap`` or not JSON.

    At most ``cap + 1`` bytes are read (one range request on an object store).
    """
    try:
        if isinstance(store.path, Remote):
            raw = store.path.cat(rel, limit=cap + 1)
        else:
            with open(store.path / rel, "rb") as fh:
                raw = fh.read(cap + 1)
    except FileNotFoundError:
        raise CorruptDataError(f"{rel} is missing") from None
    if len(raw) > cap:
        raise CorruptDataError(f"{rel} is over {cap >> 20} MiB")
    return parse_json(raw, rel)


def _canonical(doc: Any) -> str:
    """A JSON document's canonical text: equal texts iff the documents say the same (1 and 1.0 differ)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def metadata_problems(store: FisherStore) -> list[Problem]:
    """What is wrong with a store's metadata files (module docstring); tensor bytes are not read.

    The same checks run for a store on an object store (``store.path`` a
    :class:`~fisherstore.storage.Remote`): each document is one capped GET,
    each shard header one or two range requests.

    Args:
        store: an open store (safetensors or zarr backend), a directory or an object-store prefix.

    Returns:
        The problems, manifest first; a problem about one tensor names it.
    """
    problems: list[Problem] = []
    try:
        doc = _load_json(store, MANIFEST_NAME)
        recorded = doc.get("digest") if isinstance(doc, dict) else None
        if recorded is None:
            unknown = sorted(set(doc) - set(store.manifest.to_dict())) if isinstance(doc, dict) else []
            if unknown:  # a manifest from before digests has none, and no other keys either
                problems.append(Problem(None, f"{MANIFEST_NAME}: no digest, and unknown keys {unknown}"))
        elif recorded != document_digest(doc):
            problems.append(
                Problem(
                    None,
                    f"{MANIFEST_NAME}: its content hashes to {document_digest(doc)}, its digest says {recorded!r}: "
                    "it was changed after it was written",
                )
            )
    except CorruptDataError as exc:
        problems.append(Problem(None, str(exc)))
    checks = _safetensors_problems if store.format == "safetensors" else _zarr_problems
    problems += checks(store)
    if store.manifest.kind == "fisher" and _exists(store, IMPORTANCE_NAME):
        try:
            if _canonical(_load_json(store, IMPORTANCE_NAME)) != _canonical(importance_document(store.manifest)):
                problems.append(Problem(None, f"{IMPORTANCE_NAME} disagrees with the manifest's sums"))
        except CorruptDataError as exc:
            problems.append(Problem(None, str(exc)))
    return problems


def _safetensors_problems(store: FisherStore) -> list[Problem]:
    """Each shard header and the HF index against the manifest."""
    from .formats.safetensors import SHARD_METADATA, read_header

    problems: list[Problem] = []
    infos = store.manifest.tensors
    by_file: dict[str, list[str]] = {}
    for name, info in infos.items():
        by_file.setdefault(str(info.location.get("file")), []).append(name)
    for file, names in by_file.items():
        if Path(file).name != file or file.startswith(".") or not file.endswith(".safetensors"):
            continue  # not a shard name: the tensor loop reports it for each of its tensors, nothing is opened
        try:
            if isinstance(store.path, Remote):
                obj = RemoteFile(store.path, file)
                _, entries, metadata = read_header(obj, str(obj))
            else:
                fd = os.open(store.path / file, os.O_RDONLY)
                try:
                    _, entries, metadata = read_header(fd, str(store.path / file))
                finally:
                    os.close(fd)
        except OSError:
            continue  # the tensor loop reports a missing shard for each of its tensors
        except CorruptDataError as exc:
            problems.append(Problem(names[0], str(exc)))
            continue
        if metadata != SHARD_METADATA:
            problems.append(Problem(None, f"{file}: header __metadata__ is {metadata}, expected {SHARD_METADATA}"))
        for name in names:
            info = infos[name]
            expected = (info.dtype, info.shape, *info.location.get("offsets", ()))
            if entries.get(name) != expected:
                problems.append(Problem(name, f"{file}: header entry is {entries.get(name)}, manifest says {expected}"))
        for name in sorted(set(entries) - set(names)):
            problems.append(Problem(name, f"{file}: header lists it, the manifest does not place it there"))
    prefix = store.manifest.backend_options.get("prefix", "fisher")
    index_name = f"{prefix}.safetensors.index.json"
    try:
        index = _load_json(store, index_name)
    except CorruptDataError as exc:
        return [*problems, Problem(None, str(exc))]
    expected_map = {n: i.location.get("file") for n, i in infos.items()}
    expected_index = {"metadata": {"total_size": sum(i.nbytes for i in infos.values())}, "weight_map": expected_map}
    if _canonical(index) != _canonical(expected_index):
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        weight_map = weight_map if isinstance(weight_map, dict) else {}
        wrong = sorted(n for n in {*weight_map, *infos} if weight_map.get(n) != expected_map.get(n))
        for name in wrong:
            problems.append(
                Problem(
                    name,
                    f"{index_name} maps it to {weight_map.get(name)!r}, the manifest to {expected_map.get(name)!r}",
                )
            )
        if not wrong:
            problems.append(Problem(None, f"{index_name} disagrees with the manifest (metadata or layout)"))
    return problems


def _zarr_problems(store: FisherStore) -> list[Problem]:
    """The root group's and every array's ``zarr.json``: exactly what fisherstore writes for the manifest."""
    from .formats.zarr import _GROUP_META, _MAX_META_BYTES, _Layout
    from .naming import validate_name

    problems: list[Problem] = []
    try:
        if _canonical(_load_json(store, "zarr.json", _MAX_META_BYTES)) != _canonical(_GROUP_META):
            problems.append(Problem(None, "zarr.json (the root group) is not the zarr v3 group fisherstore writes"))
    except CorruptDataError as exc:
        problems.append(Problem(None, f"root {exc}"))
    options = store.manifest.backend_options
    for name, info in store.manifest.tensors.items():
        try:
            rel = f"{validate_name(info.location.get('array'))}/zarr.json"
            meta_path = _where(store, rel)
            meta = _load_json(store, rel, _MAX_META_BYTES)
            layout = _Layout.from_metadata(meta, meta_path)
        except BadInputError:  # CorruptDataError included
            continue  # the tensor loop reports it, naming the tensor
        if _canonical(meta) != _canonical(layout.metadata()):
            problems.append(Problem(name, f"{meta_path}: not the canonical metadata of its layout"))
        elif (layout.compression, layout.level) != (options.get("compression"), options.get("level")):
            problems.append(
                Problem(
                    name,
                    f"{meta_path}: compression {layout.compression} level {layout.level}, the store's options say "
                    f"{options.get('compression')} level {options.get('level')}",
                )
            )
    return problems
