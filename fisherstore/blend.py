"""Blend a trained LoRA adapter by layer importance: scale each layer's ΔW by its factor.

A PEFT LoRA adapter adds ``ΔW = scaling·B·A`` to each adapted weight.  The
blend multiplies every ΔW of decoder layer ``l`` by ``alpha·factor_l``
(factors from :class:`fisherstore.training.ScaleRule`, ``alpha`` a global
blend strength) by multiplying ``B`` — and ``B``'s bias when the adapter
trains one — so the output is an ordinary adapter of the same config that
``PeftModel.from_pretrained`` loads.  LoRA deltas outside the decoder layers,
or in layers the importance does not list, are scaled by ``alpha`` only and
reported.  ``modules_to_save`` copies are not deltas and are kept as they are.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_dir, atomic_file, write_json_atomic
from .errors import BadInputError
from .importance import load_importance
from .naming import parse_name
from .training import ScaleRule, lora_variant_of_config

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BLEND_RECORD", "BlendReport", "blend_adapter"]

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_BIN = "adapter_model.bin"
#: Written beside the blended adapter: source, alpha, rule and the factor of every layer.
BLEND_RECORD = "fisherstore_blend.json"
# Keys of the B side of a LoRA delta (linear / conv ``lora_B``, embedding ``lora_embedding_B``).
_B_KEY = re.compile(r"(^|\.)lora_(embedding_)?B(\.|$)")
# Top-level files not copied to the output: weights and training state.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass
class BlendReport:
    """What :func:`blend_adapter` did."""

    out_dir: Path
    #: layer → multiplier applied to that layer's deltas (``alpha·factor``).
    factors: dict[int, float]
    #: tensor key → multiplier, for every B-side tensor that got a layer factor.
    scaled: dict[str, float] = field(default_factory=dict)
    #: tensor key → why it got no layer factor (it was scaled by alpha only).
    unscaled: dict[str, str] = field(default_factory=dict)


def _load_adapter(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA adapter directory, after checking its config says plain LoRA (no variant)."""
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise BadInputError(f"{adapter_dir}: no {ADAPTER_CONFIG}; give the directory a PEFT save_pretrained wrote")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise BadInputError(f"{config_path}: peft_type is {peft_type!r}; only LoRA adapters can be blended")
    variant = lora_variant_of_config(config)
    if variant is not None:
        raise BadInputError(
            f"{config_path}: {variant} adapters do not update W by B·A alone; their ΔW cannot be scaled per layer"
        )
    weights = adapter_dir / ADAPTER_WEIGHTS
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(weights)
        except (SafetensorError, OSError) as exc:
            raise BadInputError(f"{weights}: unreadable safetensors file ({exc})") from None
    elif (adapter_dir / _ADAPTER_BIN).is_file():
        try:
            tensors = torch.load(adapter_dir / _ADAPTER_BIN, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several unrelated types for a bad or unsafe pickle
            raise BadInputError(f"{adapter_dir / _ADAPTER_BIN}: not a loadable tensor dict ({exc})") from None
    else:
        raise BadInputError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} or {_ADAPTER_BIN}")
    return tensors


def blend_adapter(
    adapter_dir: str | os.PathLike[str],
    importance: Any,
    out_dir: str | os.PathLike[str],
    *,
    alpha: float = 1.0,
    rule: ScaleRule | None = None,
    overwrite: bool = False,
) -> BlendReport:
    """Write ``out_dir``: the adapter of ``adapter_dir`` with layer ``l``'s ΔW times ``alpha·factor_l``.

    ``importance`` is anything :func:`fisherstore.importance.load_importance`
    takes.  The output holds ``adapter_config.json`` (unchanged),
    ``adapter_model.safetensors``, the source's other small files (tokenizer,
    README) and :data:`BLEND_RECORD`.  It is assembled in a temporary
    directory and renamed into place, so ``out_dir`` is never half written.

    Args:
        adapter_dir: a saved PEFT LoRA adapter.
        importance: per-layer importance.
        out_dir: the directory to write (new or empty unless ``overwrite``).
        alpha: global blend strength multiplying every factor.
        rule: how importance becomes a per-layer factor (default :class:`~fisherstore.training.ScaleRule`).
        overwrite: replace an existing ``out_dir``.

    Returns:
        What was scaled and by how much.
    """
    src, out = Path(adapter_dir), Path(out_dir)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise BadInputError(f"alpha must be a finite number, got {alpha!r}", param="alpha")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BadInputError(f"{out} exists and is not empty; pass overwrite=True to replace it", param="overwrite")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise BadInputError(
            f"out_dir {out} is or contains the adapter directory {src}; choose another out_dir", param="out_dir"
        )
    rule = rule or ScaleRule()
    tensors = _load_adapter(src)
    values = load_importance(importance)
    factors = {layer: alpha * f for layer, f in rule.factors(values).items()}
    report = BlendReport(out, factors)
    blended = {}
    for key, tensor in tensors.items():
        if _B_KEY.search(key):
            layer = parse_name(key)[0]
            if layer is None:
                report.unscaled[key] = "outside the decoder layers"
                mult = alpha
            elif layer not in factors:
                report.unscaled[key] = f"layer {layer} has no importance value"
                mult = alpha
            else:
                mult = factors[layer]
                report.scaled[key] = mult
            tensor = (tensor.double() * mult).to(tensor.dtype)
        blended[key] = tensor.contiguous()
    if not report.scaled:
        raise BadInputError(f"{src}: no LoRA B tensor lies in a layer the importance covers; nothing to blend")
    if report.unscaled:
        log.warning(
            "blend: %d LoRA tensor(s) got alpha only: %s",
            len(report.unscaled),
            "; ".join(f"{k}: {why}" for k, why in list(report.unscaled.items())[:3]),
        )
    record = {
        "source": str(src.resolve()),
        "alpha": alpha,
        "rule": rule.to_dict(),
        "importance": {str(layer): v for layer, v in values.items()},
        "factors": {str(layer): f for layer, f in factors.items()},
        "unscaled": report.unscaled,
    }
    _write(src, out, blended, record)
    log.info("blend: wrote %s (%d tensors scaled over %d layers)", out, len(report.scaled), len(factors))
    return report


def _write(src: Path, out: Path, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """Assemble the output in a temporary sibling directory, then rename it onto ``out``."""
    from safetensors.torch import save

    with atomic_dir(out) as tmp:
        for item in sorted(src.iterdir()):
            if item.is_file() and item.name != BLEND_RECORD and not item.name.endswith(_SKIP_SUFFIXES):
                shutil.copy2(item, tmp / item.name)  # adapter_config.json, tokenizer files, README
            elif item.name not in (ADAPTER_WEIGHTS, _ADAPTER_BIN):
                log.debug("blend: not copied to the output: %s", item)
        with atomic_file(tmp / ADAPTER_WEIGHTS) as fh:
            fh.write(save(tensors, metadata={"format": "pt"}))
        write_json_atomic(tmp / BLEND_RECORD, record)
