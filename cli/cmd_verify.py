"""``fisherstore verify``: every tensor's checksum and size against the manifest."""

from __future__ import annotations

import argparse
import sys

from fisherstore.verification import verify

from ._common import add_storage_options, storage_options

EPILOG = """\
exit codes: 0 the store is sound; 1 a problem was found (each printed with the tensor name);
2 the path could not be opened as a store at all.

examples:
  fisherstore verify store/
  fisherstore verify fisher.pt        structure only: fisher.pt records no checksums
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check every tensor against the manifest (exit 1 on corruption)",
        description="Read every tensor once and compare its bytes with the checksum and size in the manifest.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="store directory, mask store or fisher.pt, or an URL of a store (s3://...)")
    add_storage_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    problems = verify(args.path, storage_options=storage_options(args))
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    if problems:
        print(f"{args.path}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{args.path}: OK")
    return 0
