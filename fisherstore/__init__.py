"""fisherstore: extract, store, read and use the diagonal Fisher information of large language models.

The public API is re-exported here; see ARCHITECTURE.md for how the modules are cut.
Names are imported on first use (PEP 562), so ``import fisherstore`` and the
metadata commands of the CLI start without importing torch or transformers.
"""

from __future__ import annotations

import importlib

from .errors import (
    BadInputError,
    ChecksumMismatchError,
    CorruptDataError,
    FisherStoreError,
    IncompleteStoreError,
    StoreLockedError,
    StoreNotFoundError,
    TensorNotFoundError,
    UnsafePickleError,
)
from .errors import __all__ as _ERRORS

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing (~5 ms of `fisherstore --version`)
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

#: Public name → the module that defines it.
_EXPORTS: dict[str, str] = {
    # reading and writing stores
    "open_store": "store",
    "FisherStore": "store",
    "StoreWriter": "writer",
    "plan_groups": "writer",
    "convert": "conversion",
    "merge_stores": "merging",
    "MergeSummary": "merging",
    "verify": "verification",
    "info": "summary",
    "load_importance": "importance",
    "Manifest": "manifest",
    "TensorInfo": "manifest",
    "TensorSpec": "manifest",
    "GroupInfo": "manifest",
    # extraction
    "extract": "extraction",
    "ExtractConfig": "extraction",
    "ExtractSummary": "extraction",
    "load_model": "models",
    "LoadedModel": "models",
    "load_prompts": "prompts",
    "PromptSet": "prompts",
    # SVD masks
    "svd_store": "svd",
    "SVDConfig": "svd",
    "SVDResult": "svd",
    "decompose": "svd",
    "decompose_tensor": "svd",
    "open_masks": "masks",
    "write_masks": "masks",
    "describe_masks": "masks",
    "MaskStore": "masks",
    "plot_store": "plot",
    "register_bfloat16": "formats.zarr_bf16",
    # training
    "SubspaceProjector": "training",
    "ProjectorConfig": "training",
    "LayerScaler": "training",
    "ScaleRule": "training",
    "TrainingHooks": "training",
    "Coverage": "training",
    "attach_training": "training",
    "format_factor_table": "training",
    "blend_adapter": "blend",
    "BlendReport": "blend",
}

__all__ = ["__version__", *_EXPORTS, *_ERRORS]  # noqa: PLE0604 - the keys of _EXPORTS are str


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fisherstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # static analysers see the eager imports
    from .blend import BlendReport, blend_adapter
    from .conversion import convert
    from .extraction import ExtractConfig, ExtractSummary, extract
    from .importance import load_importance
    from .manifest import GroupInfo, Manifest, TensorInfo, TensorSpec
    from .masks import MaskStore, describe_masks, open_masks, write_masks
    from .merging import MergeSummary, merge_stores
    from .models import LoadedModel, load_model
    from .plot import plot_store
    from .prompts import PromptSet, load_prompts
    from .store import FisherStore, open_store
    from .summary import info
    from .svd import SVDConfig, SVDResult, decompose, decompose_tensor, svd_store
    from .training import (
        Coverage,
        LayerScaler,
        ProjectorConfig,
        ScaleRule,
        SubspaceProjector,
        TrainingHooks,
        attach_training,
        format_factor_table,
    )
    from .verification import verify
    from .writer import StoreWriter, plan_groups
