"""fisherstore: extract, store, read and use the diagonal Fisher of large language models.

The public API is re-exported here; see ARCHITECTURE.md for how the modules are cut.
"""

from __future__ import annotations

from .errors import (
    BadInputError,
    ChecksumMismatchError,
    CorruptDataError,
    FisherStoreError,
    IncompleteStoreError,
    StoreNotFoundError,
    TensorNotFoundError,
    UnsafePickleError,
)
from .blend import BlendReport, blend_adapter
from .extract import ExtractSummary, extract
from .importance import load_importance
from .manifest import GroupInfo, Manifest, TensorInfo, TensorSpec
from .models import LoadedModel, load_model
from .prompts import PromptSet, load_prompts
from .store import FisherStore, open_store
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
from .writer import StoreWriter, plan_groups

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "open_store",
    "FisherStore",
    "StoreWriter",
    "plan_groups",
    "load_importance",
    "extract",
    "ExtractSummary",
    "load_model",
    "LoadedModel",
    "load_prompts",
    "PromptSet",
    "SubspaceProjector",
    "ProjectorConfig",
    "LayerScaler",
    "ScaleRule",
    "TrainingHooks",
    "Coverage",
    "attach_training",
    "format_factor_table",
    "blend_adapter",
    "BlendReport",
    "Manifest",
    "TensorInfo",
    "TensorSpec",
    "GroupInfo",
    "FisherStoreError",
    "BadInputError",
    "CorruptDataError",
    "ChecksumMismatchError",
    "UnsafePickleError",
    "StoreNotFoundError",
    "TensorNotFoundError",
    "IncompleteStoreError",
]
