"""``fisherstore info``: what is in a store, a mask store or a fisher.pt."""

from __future__ import annotations

import argparse
from typing import Any

from fisherstore._guard import find_debris
from fisherstore.errors import StoreNotFoundError
from fisherstore.summary import info

from ._common import (
    add_storage_options,
    format_kind_summary,
    format_mask_table,
    human_bytes,
    print_json,
    storage_options,
)

EPILOG = """\
examples:
  fisherstore info fisher.pt            tensors, layers, bytes of a legacy file (reads only its pickle)
  fisherstore info store/ --json        the same as JSON, with the provenance
  fisherstore info store/ --tensors     one line per tensor: shape, dtype, sum
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="summarise a store, mask store or fisher.pt",
        description="Print what a store, mask store or legacy fisher.pt holds: tensor count, layers, bytes, "
        "dtypes, completeness and provenance. Reads metadata only.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="store directory, mask store, fisher.pt or .safetensors file, or an URL (s3://...)")
    add_storage_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        summary = info(args.path, storage_options=storage_options(args))
    except StoreNotFoundError as exc:  # a killed first write leaves no store, but maybe its leftovers
        debris = [] if "://" in str(args.path) else find_debris(args.path)
        if not debris:
            raise
        names = ", ".join(d.path.name for d in debris)
        raise StoreNotFoundError(
            f"{exc} (but {len(debris)} leftovers of writers lie beside it: {names}; "
            "rerunning the command that writes it removes those of dead writers)"
        ) from None
    masks, rows = summary.pop("masks"), summary.pop("tensor_list")
    if args.json:
        extra = {"tensor_list": rows} if args.tensors else {}
        print_json({**summary, **extra, **({"masks": masks} if masks is not None else {})})
        return 0
    print(format_summary(summary))
    if masks is not None:
        print(format_mask_table(masks))
        print("  energy captured per kind:")
        print(format_kind_summary(masks))
    if args.tensors and rows:
        print(format_tensor_list(rows))
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    """The head of ``info``'s text output: state, counts, bytes, options, provenance and attributes."""
    groups, layers = summary["groups"], summary["layers"]
    state = (
        "complete" if summary["complete"] else f"INCOMPLETE ({groups['complete']} of {groups['total']} groups written)"
    )
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary["kinds"].items()))
    lines = [
        f"{summary['path']}: {summary['kind']} {summary['format']}, {state}",
        f"  tensors  {summary['tensors']}  ({kinds})",
    ]
    if layers["count"]:
        lines.append(f"  layers   {layers['count']}  ({layers['first']}..{layers['last']})")
    nbytes = summary["bytes"]
    lines.append(f"  bytes    {human_bytes(nbytes)}  ({nbytes:,})  dtypes {summary['dtypes']}")
    if summary["backend_options"]:
        lines.append(f"  options  {summary['backend_options']}")
    extra = {**summary["provenance"], **summary["attrs"]}
    width = max([8, *map(len, extra)])
    lines.extend(f"  {key:<{width}} {value}" for key, value in extra.items())
    lines.extend(format_guard(summary))
    return "\n".join(lines)


def format_guard(summary: dict[str, Any]) -> list[str]:
    """The ``writing`` line (a live writer holds the lock) and the ``debris`` line (leftovers of writers)."""
    lines = []
    writer = summary.get("writer")
    if writer:
        lines.append(
            f"  writing  by pid {writer['pid']} on {writer['host']} ({writer['command']}, since {writer['since']})"
        )
    debris = summary.get("debris") or []
    if debris:
        dead = [d for d in debris if d["state"] == "dead"]
        kept = [d for d in debris if d["state"] != "dead"]
        parts = []
        if dead:
            parts.append(
                f"{len(dead)} of dead writers ({human_bytes(sum(d['bytes'] for d in dead))}; "
                "the next --resume, --overwrite or rerun removes them)"
            )
        if kept:
            states = ", ".join(sorted({d["state"] for d in kept}))
            parts.append(f"{len(kept)} of writers that may be running ({states}; left alone)")
        lines.append(f"  debris   {'; '.join(parts)}: {', '.join(d['path'] for d in debris)}")
    return lines


def format_tensor_list(rows: list[dict[str, Any]]) -> str:
    """One line per tensor: name, shape, dtype, sum and its attributes."""
    width = max((len(r["name"]) for r in rows), default=10)
    lines = []
    for r in rows:
        extra = "".join(
            f"  {k}={v:.4g}" if isinstance(v, float) else f"  {k}={v}"
            for k, v in r.items()
            if k not in ("name", "shape", "dtype", "layer", "kind", "sum")
        )
        lines.append(f"  {r['name']:<{width}}  {r['shape']!s:>14}  {r['dtype']:<8}  sum={r['sum']:.6g}{extra}")
    return "\n".join(lines)
