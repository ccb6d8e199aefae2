"""Storage backends, looked up by name.

``safetensors`` and ``zarr`` are store backends (directories with a
manifest); ``legacy_pt`` is the read/write support for single ``fisher.pt``
files and is not a store backend.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from ..storage import Remote
from .base import Backend

__all__ = ["BACKENDS", "get_backend"]

#: Backend name → module defining it (imported on first use: zarr is slow to import).
BACKENDS: dict[str, tuple[str, str]] = {
    "safetensors": ("fisherstore.formats.safetensors", "SafetensorsBackend"),
    "zarr": ("fisherstore.formats.zarr", "ZarrBackend"),
}


def get_backend(name: str, root: Path | Remote, options: dict[str, Any] | None = None) -> Backend:
    """Instantiate the backend called ``name`` rooted at ``root`` (a local directory or a :class:`Remote`)."""
    try:
        module, cls = BACKENDS[name]
    except KeyError:
        raise BadInputError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}", param="backend") from None
    return getattr(importlib.import_module(module), cls)(root, options)
