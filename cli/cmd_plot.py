"""``fisherstore plot``: the layer-importance profile of a store, and energy vs rank of a mask store."""

from __future__ import annotations

import argparse

from fisherstore.plot import plot_store

from ._common import add_out_option

EPILOG = """\
A Fisher store (or fisher.pt) gets one panel: a stacked bar per decoder layer, split by
projection kind (q/k/v/o/gate/up/down), from the sums recorded in its manifest.
A mask store (from 'fisherstore svd') also gets the energy ||S_r||^2/||F||^2 captured by the
first r modes, averaged per kind: where the curves flatten is the rank worth keeping.
No tensor is read except the masks' small S vectors. Needs matplotlib
(pip install 'fisherstore[plot]').

examples:
  fisherstore plot store/ -o importance.png
  fisherstore plot masks/ -o masks.pdf --title 'gemma-4-31B-it, k=64'
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="plot layer importance (and, for masks, energy captured vs rank)",
        description="Draw the layer-importance profile of a Fisher store or mask store, and for a mask "
        "store the captured energy vs rank per projection kind.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="Fisher store, mask store, fisher.pt or .safetensors file")
    add_out_option(p, "image file to write; format from the suffix (.png, .pdf, .svg)", required=True, metavar="FILE")
    p.add_argument("--title", help="figure title (default: the path)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = plot_store(args.path, args.out, title=args.title)
    print(f"wrote {out}")
    return 0
