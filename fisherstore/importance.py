"""Layer importance: the Fisher summed per decoder layer.

Users scale each layer's LoRA updates (or merge-time blend factor) by it.  The
sums come from the manifest, which recorded each tensor's sum as its bytes
were written, so computing importance never re-reads a store.  Only a source
without recorded sums (a legacy ``fisher.pt``) is streamed once.  The
per-layer sums and the ``layer_importance.json`` document are views of a
manifest and live in :mod:`fisherstore.manifest`, below the store; this
module sits above the store and opens stores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import BadInputError
from .manifest import IMPORTANCE_NAME, MANIFEST_NAME, importance_document, layer_sums
from .storage import Remote, is_url, resolve
from .store import open_store

__all__ = ["IMPORTANCE_NAME", "importance_document", "layer_sums", "load_importance"]


def load_importance(source: str | Any, *, storage_options: Mapping[str, Any] | None = None) -> dict[int, float]:
    """Layer importance from a store, a ``layer_importance.json`` file, a ``fisher.pt``, or a mapping/list.

    Accepts this project's document (``{"layers": {...}}``), a plain
    ``{layer: value}`` mapping and a plain list in layer order.

    Args:
        source: a store or ``fisher.pt`` path (per-layer sums from its manifest or pickle, no tensor data
            read), a ``layer_importance.json`` path, an open :class:`~fisherstore.store.FisherStore`, a mapping
            or a list; or an URL of a store or of a ``layer_importance.json`` (``s3://bucket/store``).
        storage_options: keyword arguments of the URL's filesystem (credentials, ``endpoint_url``, ...).

    Returns:
        ``{layer: importance}``.
    """
    if hasattr(source, "layer_importance"):
        return source.layer_importance()
    data: Any = source
    if isinstance(source, str) and is_url(source):
        source = resolve(source, storage_options, param="source")  # file:// becomes a Path
    if isinstance(source, Remote):
        if not source.name.endswith(".json"):
            with open_store(source) as store:
                return store.layer_importance()
        try:
            data = json.loads(source.parent.cat(source.name))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"{source}: not valid JSON ({exc})") from None
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir() and not (path / MANIFEST_NAME).exists() and (path / IMPORTANCE_NAME).is_file():
            path = path / IMPORTANCE_NAME  # a folder holding only the importance document
        if path.suffix == ".json" and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadInputError(f"{path}: not valid JSON ({exc})") from None
        else:
            with open_store(path) as store:
                return store.layer_importance()
    if isinstance(data, dict) and "layers" in data:
        data = data["layers"]
    try:
        if isinstance(data, list):
            out = {i: float(v) for i, v in enumerate(data)}
        elif isinstance(data, dict):
            out = {int(k): float(v) for k, v in data.items()}
        else:
            raise TypeError(type(data).__name__)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"layer importance must map layer indices to numbers ({exc})") from None
    bad = [l for l, v in out.items() if not math.isfinite(v) or v < 0]
    if bad:
        raise BadInputError(f"layer importance must be finite and non-negative; layers {bad} are not")
    return dict(sorted(out.items()))
