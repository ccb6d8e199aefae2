"""Pictures of a store: the layer-importance profile and, for a mask store, energy captured vs rank.

The numbers come from manifests (recorded sums, per-tensor attrs) and, for
mask stores, the small S vectors; no Fisher tensor is read.  matplotlib is an
optional extra (``pip install 'fisherstore[plot]'``) imported only when a
picture is drawn; the data functions work without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import BadInputError
from .masks import MASK_KIND, MaskStore
from .naming import KINDS, parse_name
from .store import FisherStore, open_store

__all__ = ["energy_curves", "importance_profile", "plot_store"]

_ORDER = {kind: i for i, kind in enumerate((*KINDS, "other"))}


def importance_profile(store: FisherStore | MaskStore) -> dict[str, dict[int, float]]:
    """``kind → {layer: Fisher sum}`` over decoder layers.

    A Fisher store answers from its recorded sums (one streaming pass for a
    legacy ``fisher.pt`` without them); a mask store from the ``fisher_sum``
    its tensors recorded, ``{}`` when it has none.
    """
    out: dict[str, dict[int, float]] = {}
    if isinstance(store, MaskStore):
        for name in store.names:
            layer, kind = parse_name(name)
            value = store.attrs(name).get("fisher_sum")
            if layer is not None and value is not None:
                out.setdefault(kind, {})[layer] = out.get(kind, {}).get(layer, 0.0) + value
    else:
        for layer, kinds in store.importance_document()["by_kind"].items():
            for kind, value in kinds.items():
                out.setdefault(kind, {})[int(layer)] = value
    return {k: dict(sorted(out[k].items())) for k in sorted(out, key=lambda k: _ORDER.get(k, len(_ORDER)))}


def energy_curves(masks: MaskStore) -> dict[str, torch.Tensor]:
    """``kind → mean over its tensors of the energy captured by the first r modes``, r = 1..k.

    A tensor holding fewer than k modes (short side below k) contributes its
    last value beyond its rank; tensors without a known ‖F‖ are left out.
    """
    curves: dict[str, list[torch.Tensor]] = {}
    for name in masks.names:
        curve = masks.energy_curve(name)
        if curve is not None:
            curves.setdefault(parse_name(name)[1], []).append(curve)
    out = {}
    for kind in sorted(curves, key=lambda k: _ORDER.get(k, len(_ORDER))):
        k = max(c.numel() for c in curves[kind])
        padded = [torch.cat([c, c[-1:].expand(k - c.numel())]) for c in curves[kind]]
        out[kind] = torch.stack(padded).mean(dim=0)
    return out


def _figure_class() -> type[Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BadInputError(
            "fisherstore plot needs matplotlib: pip install 'fisherstore[plot]' (or matplotlib)"
        ) from None
    return Figure


def plot_store(path: str | Path, out: str | Path, *, title: str | None = None) -> Path:
    """Draw the profile of a Fisher store or a mask store into ``out`` (format from its suffix: png, pdf, svg).

    Fisher store: one panel, a stacked bar per layer split by projection
    kind.  Mask store: that panel (from the recorded source sums) and the
    mean energy captured vs rank per kind.

    Args:
        path: a Fisher store or a mask store.
        out: the image file to write.
        title: the figure's title (default: the store's path).

    Returns:
        ``out``.
    """
    Figure = _figure_class()
    with open_store(path) as store:
        if store.manifest.kind == MASK_KIND and "rank" in store.manifest.attrs:
            masks = MaskStore(store)
            profile, curves = importance_profile(masks), energy_curves(masks)
        else:
            profile, curves = importance_profile(store), {}
    panels = [p for p in ("importance" if profile else None, "energy" if curves else None) if p]
    if not panels:
        raise BadInputError(
            f"{path}: nothing to plot: no per-layer Fisher sums and no captured-energy figures recorded"
        )
    fig = Figure(figsize=(7.5 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        if panel == "importance":
            layers = sorted({layer for per in profile.values() for layer in per})
            bottom = [0.0] * len(layers)
            for kind, per in profile.items():
                heights = [per.get(layer, 0.0) for layer in layers]
                ax.bar(layers, heights, bottom=bottom, label=kind, width=0.8)
                bottom = [b + h for b, h in zip(bottom, heights)]
            ax.set_xlabel("layer")
            ax.set_ylabel("Fisher sum")
            ax.set_title("layer importance by projection")
        else:
            for kind, curve in curves.items():
                ax.plot(
                    range(1, curve.numel() + 1), curve.tolist(), label=kind, marker="." if curve.numel() <= 32 else None
                )
            ax.set_xlabel("rank r")
            ax.set_ylabel("energy captured  ||S_r||² / ||F||²")
            ax.set_title("captured energy vs rank (mean per kind)")
            ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or str(path))
    out = Path(out)
    fig.savefig(out, dpi=120)
    return out
