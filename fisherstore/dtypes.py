"""The one dtype vocabulary of the API and the CLI.

Canonical names are torch's without the prefix (``"bfloat16"``, ``"float32"``,
``"float16"``): they are what manifests record, what every function returns
and what error messages print.  People also write ``bf16``, ``fp32``,
``half``, ``torch.bfloat16`` or a ``torch.dtype``; :func:`canonical_dtype`
is the one place such aliases are read.  This module imports no torch, so
byte-moving commands stay light.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .errors import BadInputError

__all__ = ["ALIASES", "canonical_dtype"]

#: Spellings accepted for a dtype, each mapped to its canonical name.
ALIASES: dict[str, str] = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}


def canonical_dtype(
    value: Any, *, param: str = "dtype", allowed: Iterable[str] | None = None, refused: Mapping[str, str] | None = None
) -> str:
    """The canonical name of a dtype written as an alias, a canonical name or a ``torch.dtype``.

    Args:
        value: ``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"``, ``torch.bfloat16``...
        param: the parameter being parsed, named in the error.
        allowed: canonical names this parameter accepts (default: any known dtype).
        refused: canonical names refused with a reason of their own (``{"float16": "dtype fp16 is refused: ..."}``).

    Returns:
        The canonical name, e.g. ``"bfloat16"``.

    Raises:
        BadInputError: ``value`` is no known dtype, is refused, or is not one of ``allowed``.
    """
    text = str(value).strip().lower().removeprefix("torch.")
    name = ALIASES.get(text)
    if refused and name is not None and name in refused:
        raise BadInputError(refused[name], param=param)
    choices = tuple(allowed) if allowed is not None else tuple(dict.fromkeys(ALIASES.values()))
    if name is None or name not in choices:
        raise BadInputError(f"{param} must be one of {', '.join(choices)}, got {value!r}", param=param)
    return name
