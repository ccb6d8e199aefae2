"""Tensor names: what layer and kind a name denotes, and which names are safe.

Fisher tensors are keyed by the model's parameter names
(``model.layers.3.self_attn.q_proj.weight``; multimodal checkpoints such as
gemma-4-31B-it use ``model.language_model.layers.3...``).  Everything that
needs the layer index or the projection kind of a name goes through
:func:`parse_name`, so the rule lives in one place.
"""

from __future__ import annotations

import re

from .errors import BadInputError

__all__ = [
    "DEFAULT_TARGETS",
    "KINDS",
    "canonical_name",
    "parse_name",
    "target_regex",
    "validate_name",
]

#: The seven target linears of a decoder layer, in the order a layer holds them.
KINDS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

#: Default target pattern: the seven linears inside decoder layers.
DEFAULT_TARGETS = r"(^|\.)layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$"

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_KIND_RE = re.compile(r"(?:^|\.)(q|k|v|o|gate|up|down)_proj(?:\.|$)")
_SAFE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_MAX_NAME = 512

# Prefixes and infixes that wrappers (PEFT, multimodal towers) add to a parameter name.
_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)+")
_PEFT_INFIX = re.compile(r"\.base_layer(?=\.|$)")


def parse_name(name: str) -> tuple[int | None, str]:
    """Return ``(layer, kind)`` for a tensor name.

    ``layer`` is the decoder-layer index or ``None`` for tensors outside the
    layers; ``kind`` is one of :data:`KINDS` or ``"other"``.
    """
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else None
    k = _KIND_RE.search(name)
    return layer, (k.group(1) if k else "other")


def validate_name(name: object) -> str:
    """Return ``name`` if it is a safe tensor name, else raise :class:`BadInputError`.

    Names become file and array paths (zarr) and JSON keys, so they must not
    escape the store: only letters, digits, ``_ . -``, no empty component
    (``..``), no leading dot, at most 512 characters.
    """
    if not isinstance(name, str):
        raise BadInputError(f"tensor name must be a string, got {type(name).__name__}: {name!r}")
    if len(name) > _MAX_NAME or not _SAFE_RE.match(name) or ".." in name or name.endswith("."):
        raise BadInputError(
            f"unsafe tensor name {name!r}: names may hold only letters, digits, '_', '.', '-' "
            "(no path separators, no '..', no leading dot)"
        )
    return name


def canonical_name(module_or_param: str) -> str:
    """Map a wrapped module or parameter name to the Fisher tensor name.

    Strips PEFT's ``base_model.model.`` prefix and ``.base_layer`` infix and
    appends ``.weight`` to a module name, so
    ``base_model.model.model.layers.0.self_attn.q_proj`` →
    ``model.layers.0.self_attn.q_proj.weight``.
    """
    name = _PEFT_INFIX.sub("", _PEFT_PREFIX.sub("", module_or_param))
    if not name.endswith((".weight", ".bias")):
        name += ".weight"
    return name


def target_regex(targets: str | list[str] | None) -> re.Pattern[str]:
    """Compile a target selection: a regex, a comma list of kinds, or ``None`` for the default.

    ``"q,k,v"`` selects those kinds inside decoder layers; anything else is
    taken as a regular expression searched in the parameter name.
    """
    if targets is None:
        return re.compile(DEFAULT_TARGETS)
    items = targets if isinstance(targets, list) else [t.strip() for t in targets.split(",")]
    if items and all(t in KINDS for t in items):
        alt = "|".join(items)
        return re.compile(rf"(^|\.)layers\.\d+\.(self_attn|mlp)\.({alt})_proj\.weight$")
    pattern = "|".join(f"(?:{t})" for t in items) if isinstance(targets, list) else targets
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BadInputError(
            f"targets={targets!r} is neither a list of kinds {KINDS} nor a valid regex: {exc}", param="targets"
        ) from None
