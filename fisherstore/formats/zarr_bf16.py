"""The zarr-extensions ``bfloat16`` data type for zarr-python.

fisherstore writes bf16 zarr arrays with ``"data_type": "bfloat16"``, which
tensorstore reads natively.  For zarr-python, this module defines the type
(numpy dtype ``ml_dtypes.bfloat16``) and importing it registers the type
(also ``fisherstore.register_bfloat16()``).  fisherstore's own zarr backend
does not need zarr-python, whose import alone cost more than converting a
GB; it imports this module only where zarr-python is already loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import ml_dtypes
import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.npy.float import BaseFloat

__all__ = ["BFloat16", "register_bfloat16"]


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat[Any, Any]):
    """The zarr-extensions ``bfloat16`` data type for zarr-python (numpy dtype ``ml_dtypes.bfloat16``).

    It behaves like the core float types (fill values, JSON) except that only
    little-endian storage can be decoded: numpy has no big-endian bfloat16.
    """

    dtype_cls = type(np.dtype(ml_dtypes.bfloat16))
    _zarr_v3_name: ClassVar[Literal["bfloat16"]] = "bfloat16"
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()  # zarr v2 has no bfloat16

    @property
    def item_size(self) -> int:
        return 2

    def to_native_dtype(self) -> np.dtype[Any]:
        if self.endianness != "little":
            raise ValueError("big-endian bfloat16 has no numpy dtype; read this array with tensorstore")
        return np.dtype(ml_dtypes.bfloat16)

    def from_json_scalar(self, data: Any, *, zarr_format: Any) -> Any:
        # "0x" + 4 hex digits is a bf16 bit pattern; the base class would read it as float16 bits.
        if isinstance(data, str) and data.startswith("0x") and len(data) == 6:
            return np.array(int(data, 16), dtype=np.uint16).view(ml_dtypes.bfloat16)[()]
        return super().from_json_scalar(data, zarr_format=zarr_format)


def register_bfloat16() -> None:
    """Register :class:`BFloat16` with zarr-python, unless some ``bfloat16`` type already is (idempotent)."""
    if "bfloat16" not in data_type_registry.contents:
        data_type_registry.register("bfloat16", BFloat16)


register_bfloat16()
