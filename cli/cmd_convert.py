"""``fisherstore convert``: between fisher.pt, safetensors stores and zarr stores."""

from __future__ import annotations

import argparse
from pathlib import Path

from fisherstore.conversion import TARGETS, convert, infer_target

from ._common import add_zarr_options, zarr_options

EPILOG = """\
The target format comes from --to, else from DST: *.pt → fisher.pt, *.zarr → zarr store,
anything else → safetensors store. Bytes stream through a bounded buffer (--chunk-mb), so
a 58 GB fisher.pt converts in a few hundred MB of memory. Checksums recorded in a source
store are verified on the way. DST appears only once complete.

examples:
  fisherstore convert fisher.pt store/
  fisherstore convert fisher.pt store.zarr --compression blosc-zstd-bitshuffle
  fisherstore convert store/ fisher-roundtrip.pt
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert between fisher.pt, safetensors and zarr stores",
        description="Stream every tensor of SRC into a new DST of another format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="store directory, fisher.pt or .safetensors file")
    p.add_argument("dst", help="new store directory or .pt file")
    p.add_argument("--to", choices=TARGETS, help="target format (default: from DST's name)")
    add_zarr_options(p)
    p.add_argument("--group-size", type=int, default=8, help="layers per shard when SRC is a single file (default 8)")
    p.add_argument("--buffer-mb", type=int, default=64, help="streaming buffer size in MiB (default 64)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace DST if it exists (only after the new one is complete)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    to = args.to or infer_target(Path(args.dst))
    convert(
        args.src,
        args.dst,
        to=to,
        backend_options=zarr_options(args, to),
        group_size=args.group_size,
        overwrite=args.overwrite,
        chunk_bytes=args.buffer_mb << 20,
    )
    print(f"wrote {args.dst} ({to})")
    return 0
