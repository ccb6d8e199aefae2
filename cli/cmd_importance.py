"""``fisherstore importance``: per-layer Fisher sums (layer_importance.json)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fisherstore._io import write_json_atomic
from fisherstore.store import open_store

from ._common import add_out_option, add_storage_options, print_json, storage_options

EPILOG = """\
For a store the sums come from its manifest (no data is read); a fisher.pt is streamed once.

examples:
  fisherstore importance store/                       print the table
  fisherstore importance fisher.pt -o layer_importance.json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "importance",
        help="per-layer Fisher sums → layer_importance.json",
        description="Sum the Fisher of each decoder layer (and per projection kind).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="store directory or fisher.pt, or an URL of a store (s3://...)")
    add_storage_options(p)
    add_out_option(p, "write the JSON document here", metavar="FILE", aliases=("--output",))
    p.add_argument("--json", action="store_true", help="print the JSON document instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_store(args.path, storage_options=storage_options(args)) as store:
        doc = store.importance_document()
    if args.out:
        write_json_atomic(Path(args.out), doc)
    if args.json:
        print_json(doc)
    else:
        total = sum(doc["vector"]) or 1.0
        print(f"{'layer':>5}  {'sum':>12}  {'share':>6}")
        for layer, value in doc["layers"].items():
            print(f"{layer:>5}  {value:12.6g}  {value / total:6.1%}")
    if args.out:
        print(f"wrote {args.out}")
    return 0
