"""Layer importance: the Fisher summed per decoder layer.

Users scale each layer's LoRA updates (or merge-time blend factor) by it.  The
sums come from the manifest, which recorded each tensor's sum as its bytes
were written, so computing importance never re-reads a store.  Only a source
without recorded sums (a legacy ``fisher.pt``) is streamed once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .manifest import Manifest

if TYPE_CHECKING:
    pass

__all__ = ["IMPORTANCE_NAME", "importance_document", "layer_sums", "load_importance"]

IMPORTANCE_NAME = "layer_importance.json"


def layer_sums(
    infos: dict, sums: dict[str, float] | None = None
) -> tuple[dict[int, float], dict[int, dict[str, float]]]:
    """Per-layer totals and per-layer-per-kind totals from tensor infos (and optional override sums)."""
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


def importance_document(manifest: Manifest, sums: dict[str, float] | None = None) -> dict[str, Any]:
    """The ``layer_importance.json`` document for a store's manifest.

    ``layers`` maps each layer index (as a string, JSON keys are strings) to
    the sum of every stored Fisher value of that layer; ``vector`` lists the
    same numbers in layer order; ``by_kind`` splits each layer by projection.
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


def load_importance(source: str | Any) -> dict[int, float]:
    """Layer importance from a store, a ``layer_importance.json`` file, a ``fisher.pt``, or a mapping/list.

    Accepts this project's document (``{"layers": {...}}``), a plain
    ``{layer: value}`` mapping and a plain list in layer order.
    """
    import json
    from pathlib import Path

    from .errors import BadInputError

    if hasattr(source, "layer_importance"):
        return source.layer_importance()
    data: Any = source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir() and not (path / "fisherstore.json").exists() and (path / IMPORTANCE_NAME).is_file():
            path = path / IMPORTANCE_NAME  # a folder holding only the importance document
        if path.suffix == ".json" and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadInputError(f"{path}: not valid JSON ({exc})") from None
        else:
            from .store import open_store

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
