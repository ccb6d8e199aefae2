"""What a store holds, as one JSON-able dict: the facts ``fisherstore info`` prints.

The library gathers them (metadata only, no tensor bytes read) so the CLI only
formats them, and a script gets the same facts from :func:`info` that a user
reads on the terminal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._guard import find_debris, object_writer, owner_state, read_holder
from .formats import BACKENDS, get_backend
from .storage import Remote
from .store import FisherStore, open_store

__all__ = ["info"]


def info(
    path_or_store: str | Path | FisherStore, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Summarise a store, mask store or legacy ``fisher.pt`` from its metadata.

    Args:
        path_or_store: a store directory, mask store, ``fisher.pt`` or ``.safetensors`` file, or an open
            :class:`~fisherstore.store.FisherStore` (left open); or an URL of a store (``s3://bucket/store``).
        storage_options: keyword arguments of the URL's filesystem (credentials, ``endpoint_url``, ...).

    Returns:
        A JSON-able dict: ``path, format, kind, complete, groups ({total, complete}), tensors (count),
        layers ({count, first, last}), bytes, dtypes and kinds (counts), largest (a tensor name),
        backend_options, provenance, attrs``; ``tensor_list``, one row per tensor (``name, shape, dtype,
        layer, kind, sum`` and the tensor's attributes); and ``masks``, for a mask store the rows of
        :func:`fisherstore.masks.describe_masks`, else ``None``; ``writer``, the live process writing it
        (``pid, host, command, since``) or ``None``; ``debris``, what writers left in and beside it
        (``path, kind, state, owner, bytes``; state ``dead`` is removed by the next writer,
        ``alive``/``elsewhere``/``unknown`` is left alone).
    """
    if isinstance(path_or_store, FisherStore):
        return _info(path_or_store)
    with open_store(path_or_store, storage_options=storage_options) as store:
        return _info(store)


def _check_metadata(store: FisherStore) -> None:
    """Refuse a store whose files' own metadata (shard headers, array ``zarr.json``) disagree with its manifest.

    A manifest alone is no proof: a shard header that says ``C128`` or an
    array of another shape would only be found by ``convert`` or ``verify``.
    This reads metadata only (a header per shard, a small JSON per array);
    on an object store (``store.path`` a :class:`Remote`) the backend makes
    the same checks by range and size requests.
    """
    m = store.manifest
    if m.backend not in BACKENDS:  # a fisher.pt or a bare .safetensors: checked when it was opened
        return
    backend = get_backend(m.backend, store.path, m.backend_options)
    try:
        for name in store.names:
            backend.check_metadata(store.info(name))
    finally:
        backend.close()


def _info(store: FisherStore) -> dict[str, Any]:
    m = store.manifest
    _check_metadata(store)
    infos = [store.info(n) for n in store.names]
    layers = store.layers
    masks = None
    if m.kind == "masks":
        from .masks import MaskStore, describe_masks  # torch: only a mask store needs it

        masks = describe_masks(MaskStore(store))
    return {
        "path": str(store.path),
        "format": store.format,
        "kind": m.kind,
        "complete": store.complete,
        "groups": {"total": len(m.groups), "complete": len(m.groups) - len(m.missing_groups)},
        "tensors": len(infos),
        "layers": {
            "count": len(layers),
            "first": layers[0] if layers else None,
            "last": layers[-1] if layers else None,
        },
        "bytes": store.nbytes,
        "dtypes": dict(Counter(i.dtype for i in infos)),
        "kinds": dict(Counter(i.kind for i in infos)),
        "largest": max(((i.nbytes, i.name) for i in infos), default=(0, None))[1],
        "backend_options": m.backend_options,
        "provenance": m.provenance,
        "attrs": m.attrs,
        "tensor_list": [
            {
                "name": i.name,
                "shape": list(i.shape),
                "dtype": i.dtype,
                "layer": i.layer,
                "kind": i.kind,
                "sum": i.sum,
                **i.attrs,
            }
            for i in infos
        ],
        "masks": masks,
        **_guard_state(store.path),
    }


def _guard_state(path: Path | Remote) -> dict[str, Any]:
    """``writer`` (a live lock holder) and ``debris`` of the store at ``path``.

    Object stores have no temporaries (no debris); on S3 the writer is the live holder of the lock object.
    """
    if not isinstance(path, Path):
        remote_holder = object_writer(path)
        return {"writer": remote_holder.to_dict() if remote_holder else None, "debris": []}
    holder = read_holder(path)
    live = holder is not None and owner_state(holder.owner) == "alive"
    return {
        "writer": holder.to_dict() if live and holder is not None else None,
        "debris": [d.to_dict() for d in find_debris(path)],
    }
