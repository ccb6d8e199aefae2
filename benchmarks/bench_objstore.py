"""Object storage benchmark (issue 15): convert and one-tensor reads, local directory vs a loopback S3 server.

A synthetic Fisher ``fisher.pt`` (``--layers`` decoder layers of Fisher-like
bf16 tensors shaped like a scaled-down Gemma MLP + attention) is converted into
a zarr store twice, each in its own child process: into a local directory and
into ``s3://`` on moto's S3 server running on 127.0.0.1
(:class:`fisherstore.testing.s3.S3Server`, whose proxy counts every request
and byte on the server side).  Then, again one child process each, one whole
tensor (the largest) and a 64-row slice of it are read from either store.

Reported per run: wall time of the child (start-up included), the time of the
operation itself (measured inside the child, after imports), peak RSS, and
for S3 the requests and bytes that crossed the wire.  The loopback server is
moto (Python, in memory), so S3 times measure the protocol and the server,
not a network: read them as an upper bound on overhead, and the byte counts
as exact.

Usage: python benchmarks/bench_objstore.py [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import python, run_child, this_command, write_results

MAKE_PT = r"""
import sys, torch
from fisherstore.testing import fisher_like
g = torch.Generator().manual_seed(0)
hidden, inter, kv = 1024, 4096, 256
shapes = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
          "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
tensors = {}
for layer in range(int(sys.argv[2])):
    for kind, shape in shapes.items():
        part = "self_attn" if kind in "qkvo" else "mlp"
        tensors[f"model.layers.{layer}.{part}.{kind}_proj.weight"] = fisher_like(shape, g).to(torch.bfloat16)
torch.save(tensors, sys.argv[1])
"""

CONVERT = r"""
import json, sys, time
from fisherstore.conversion import convert
from fisherstore.formats import zarr  # noqa: F401 - imported before the clock starts, as READ imports torch
if "://" in sys.argv[2]:
    import s3fs  # noqa: F401
opts = json.loads(sys.argv[3]) or None
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], to="zarr", storage_options=opts)
print(json.dumps({"op_s": time.perf_counter() - t}))
"""

READ = r"""
import json, sys, time
import torch  # imported before the clock starts: the read, not torch's import, is measured
from fisherstore import open_store
if "://" in sys.argv[1]:
    import s3fs  # noqa: F401 - likewise s3fs's import (~1 s): reported in wall, not in op
opts = json.loads(sys.argv[3]) or None
t = time.perf_counter()
with open_store(sys.argv[1], storage_options=opts) as store:
    rows = json.loads(sys.argv[4])
    x = store.read(sys.argv[2], tuple(rows) if rows else None)
    total = float(x.float().sum())
print(json.dumps({"op_s": time.perf_counter() - t, "bytes": x.numel() * x.element_size(), "sum": total}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    from fisherstore.testing.s3 import S3Server

    work = Path(tempfile.mkdtemp(prefix="bench-objstore-"))
    runs = []
    try:
        pt = work / "fisher.pt"
        run_child("make fisher.pt", python(MAKE_PT, str(pt), str(args.layers)))
        pt_bytes = pt.stat().st_size
        name = "model.layers.0.mlp.down_proj.weight"
        with S3Server() as s3:
            s3.make_bucket("bench")
            opts = json.dumps(s3.options)
            local, remote = str(work / "local.zarr"), "s3://bench/fisher.zarr"
            cases = [
                ("convert fisher.pt → zarr", CONVERT, [str(pt), local, "null"], [str(pt), remote, opts]),
                ("read one tensor (8 MiB)", READ, [local, name, "null", "null"], [remote, name, opts, "null"]),
                ("read 64 rows of it", READ, [local, name, "null", "[512, 576]"], [remote, name, opts, "[512, 576]"]),
            ]
            for label, code, local_args, remote_args in cases:
                for where, argv in (("local", local_args), ("s3", remote_args)):
                    s3.clear()
                    run = run_child(f"{label} [{where}]", python(code, *argv))
                    requests = s3.requests if where == "s3" else []
                    runs.append(
                        {
                            "case": label,
                            "where": where,
                            "wall_s": round(run.wall_s, 3),
                            "op_s": round(json.loads(run.stdout)["op_s"], 3),
                            "peak_rss_mb": round(run.peak_rss_mb, 1),
                            "requests": len(requests),
                            "bytes_up": sum(r.sent for r in requests),
                            "bytes_down": sum(r.received for r in requests),
                            "result": json.loads(run.stdout),
                        }
                    )
                    print(runs[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"fisher.pt: {args.layers} layers, {pt_bytes / 2**20:.1f} MiB (bf16); S3 = moto server on 127.0.0.1 behind a "
        "counting proxy. op = the operation inside the child (after imports); wall includes interpreter start-up.",
        "",
        "| case | where | op s | wall s | peak RSS MiB | requests | bytes up | bytes down |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['case']} | {r['where']} | {r['op_s']:.3f} | {r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['requests'] if r['where'] == 's3' else '-'} | {r['bytes_up'] if r['where'] == 's3' else '-'} | "
            f"{r['bytes_down'] if r['where'] == 's3' else '-'} |"
        )
    write_results(
        "objstore", this_command(), {"layers": args.layers, "pt_bytes": pt_bytes, "runs": runs}, "\n".join(lines)
    )


if __name__ == "__main__":
    main()
