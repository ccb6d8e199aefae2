"""``fisherstore info``: what is in a store, a mask store or a fisher.pt."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from fisherstore.store import FisherStore, open_store

from ._common import format_kind_summary, format_mask_table, human_bytes, print_json

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
    p.add_argument("path", help="store directory, mask store, fisher.pt or .safetensors file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.set_defaults(func=run)


def summary(store: FisherStore) -> dict[str, Any]:
    """The facts ``info`` prints, as a JSON-able dict."""
    m = store.manifest
    infos = [store.info(n) for n in store.names]
    layers = store.layers
    return {
        "path": str(store.path),
        "format": store.format,
        "kind": m.kind,
        "complete": store.complete,
        "groups": {"total": len(m.groups), "complete": sum(g.complete for g in m.groups)},
        "tensors": len(infos),
        "layers": {
            "count": len(layers),
            "first": layers[0] if layers else None,
            "last": layers[-1] if layers else None,
        },
        "bytes": store.nbytes,
        "dtypes": dict(Counter(i.dtype for i in infos)),
        "kinds": dict(Counter(i.kind for i in infos)),
        "largest": max(((i.nbytes, i.name) for i in infos), default=(0, None))[1],
        "backend_options": m.backend_options,
        "provenance": m.provenance,
        "attrs": m.attrs,
    }


def run(args: argparse.Namespace) -> int:
    with open_store(args.path) as store:
        info = summary(store)
        masks = None
        if store.manifest.kind == "masks":
            from fisherstore.masks import MaskStore, describe_masks

            masks = describe_masks(MaskStore(store))
        rows = [
            {
                "name": n,
                "shape": list(i.shape),
                "dtype": i.dtype,
                "layer": i.layer,
                "kind": i.kind,
                "sum": i.sum,
                **i.attrs,
            }
            for n, i in ((n, store.info(n)) for n in store.names)
        ]
    if args.json:
        extra = {"tensor_list": rows} if args.tensors else {}
        print_json({**info, **extra, **({"masks": masks} if masks is not None else {})})
        return 0
    state = (
        "complete"
        if info["complete"]
        else f"INCOMPLETE ({info['groups']['complete']} of {info['groups']['total']} groups written)"
    )
    layers = info["layers"]
    print(f"{info['path']}: {info['kind']} {info['format']}, {state}")
    print(f"  tensors  {info['tensors']}  ({', '.join(f'{k} {v}' for k, v in sorted(info['kinds'].items()))})")
    if layers["count"]:
        print(f"  layers   {layers['count']}  ({layers['first']}..{layers['last']})")
    print(f"  bytes    {human_bytes(info['bytes'])}  ({info['bytes']:,})  dtypes {info['dtypes']}")
    if info["backend_options"]:
        print(f"  options  {info['backend_options']}")
    extra = {**info["provenance"], **info["attrs"]}
    width = max([8, *map(len, extra)])
    for key, value in extra.items():
        print(f"  {key:<{width}} {value}")
    if masks is not None:
        print(format_mask_table(masks))
        print("  energy captured per kind:")
        print(format_kind_summary(masks))
    if args.tensors:
        width = max((len(r["name"]) for r in rows), default=10)
        for r in rows:
            extra = "".join(
                f"  {k}={v:.4g}" if isinstance(v, float) else f"  {k}={v}"
                for k, v in r.items()
                if k not in ("name", "shape", "dtype", "layer", "kind", "sum")
            )
            print(f"  {r['name']:<{width}}  {r['shape']!s:>14}  {r['dtype']:<8}  sum={r['sum']:.6g}{extra}")
    return 0
