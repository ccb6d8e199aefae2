"""Reliability figures (issue 16): what verify-on-read costs, and the bit-flip table of ``fisherstore verify``.

``--part reads``: a SmolLM2-135M-shaped Fisher store (30 layers x 7 projections,
bf16, 212 MB; synthetic Fisher-like values) is written as safetensors, zarr
and compressed zarr; then each reader runs as its own child process (wall
time and peak RSS from ``wait4``, the read time measured inside the child,
imports excluded, with its CPU time) and reads every tensor of the store, with
``open_store(verify=False)`` and ``verify=True``:

  whole   ``store[name]`` for every tensor
  rows    ``store.iter_rows(name, 64)`` for every tensor (with verify, each
          tensor is first streamed once in 4 MiB buffers and checked)

each with a warm page cache (the store's files read by ``cat`` just before)
and a cold one (``sync``, then ``posix_fadvise(DONTNEED)`` on every file of
the store, which drops its clean pages without root).  The reader touches
one byte per 4 KiB page of what it gets, so a memory-mapped read that is
never touched is not counted as free.  Rounds interleave the variants.

``--part flips``: the campaign of ``tests/test_bitflips.py`` at full count
(>= 200 single-bit flips per backend), as a table of trials / caught /
no-op / lost per backend and location class.

Usage: python benchmarks/bench_reliability.py [--part reads flips] [--repeats 3] [--stores safetensors ...]
       [--workdir /tmp/fsrel]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/test_bitflips.py holds the flip campaign
from harness import python, run_child, this_command, write_results

GEN = r"""
import sys, torch
from fisherstore.testing import fisher_like, write_store
H, I, L = 576, 1536, 30      # SmolLM2-135M: hidden 576, intermediate 1536, 30 layers, 3 kv heads of 64
shapes = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (192, H), "self_attn.v_proj": (192, H),
          "self_attn.o_proj": (H, H), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
g = torch.Generator().manual_seed(0)
tensors = {f"model.layers.{l}.{k}.weight": fisher_like(s, g, torch.bfloat16)
           for l in range(L) for k, s in shapes.items()}
root = sys.argv[1]
if "st" in sys.argv[2:]:
    write_store(root + "/st", tensors, group_size=4)
if "z" in sys.argv[2:]:
    write_store(root + "/z", tensors, backend="zarr", group_size=4)
if "zc" in sys.argv[2:]:
    write_store(root + "/zc", tensors, backend="zarr", group_size=4, compression="blosc-zstd-bitshuffle")
print(len(tensors), sum(t.numel() * t.element_size() for t in tensors.values()))
"""

READ = r"""
import sys, time, torch
from fisherstore.store import open_store
import fisherstore.formats.safetensors, fisherstore.formats.zarr
path, verify, mode = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
touched = 0
t0, c0 = time.perf_counter(), time.process_time()
with open_store(path, verify=verify) as s:
    for name in s.names:
        blocks = [(0, s[name])] if mode == "whole" else s.iter_rows(name, 64)
        for _, x in blocks:
            touched += int(x.reshape(-1).view(torch.uint8)[::4096].sum())  # one byte per page
    assert not verify or len(s.verified) == len(s)
print(time.perf_counter() - t0, time.process_time() - c0)
"""

STORES = {"safetensors": "st", "zarr (none)": "z", "zarr (blosc-zstd-bitshuffle)": "zc"}


def files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def warm(path: Path) -> None:
    subprocess.run(["cat", *map(str, files(path))], stdout=subprocess.DEVNULL, check=True)


def cold(path: Path) -> None:
    subprocess.run(["sync"], check=True)
    for p in files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_reads(work: Path, repeats: int, stores: list[str]) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    gen = python(GEN, str(work), *(STORES[s] for s in stores))
    n, nbytes = run_child("generate", gen, env={"FISHERSTORE_NO_FSYNC": "1"}).stdout.split()
    print(f"{n} tensors, {int(nbytes) / 1e6:.0f} MB", flush=True)
    variants = [
        (store, mode, cache, verify)
        for store in stores
        for mode in ("whole", "rows")
        for cache in ("warm", "cold")
        for verify in (False, True)
    ]
    runs: dict[tuple, list] = {v: [] for v in variants}
    for round_ in range(repeats):
        print(f"round {round_ + 1}/{repeats}", flush=True)
        for v in variants:
            store, mode, cache, verify = v
            path = work / STORES[store]
            (warm if cache == "warm" else cold)(path)
            r = run_child(str(v), python(READ, str(path), "1" if verify else "0", mode))
            wall, cpu = map(float, r.stdout.splitlines()[-1].split())
            runs[v].append((wall, r.peak_rss_mb, r.wall_s, cpu))
            print(
                f"  {store:<30} {mode:<5} {cache:<4} verify={verify!s:<5} {wall:7.3f} s  cpu {cpu:7.3f} s", flush=True
            )
    rows = []
    for v in variants:
        store, mode, cache, verify = v
        off = runs[(store, mode, cache, False)]
        rows.append(
            {
                "store": store,
                "reads": mode,
                "cache": cache,
                "verify": verify,
                "read_s": statistics.median(r[0] for r in runs[v]),
                "runs_s": [r[0] for r in runs[v]],
                "x_verify_off": statistics.median(r[0] / o[0] for r, o in zip(runs[v], off)),
                "cpu_s": statistics.median(r[3] for r in runs[v]),
                "cpu_x_verify_off": statistics.median(r[3] / o[3] for r, o in zip(runs[v], off)),
                "peak_rss_mb": statistics.median(r[1] for r in runs[v]),
                "child_wall_s": statistics.median(r[2] for r in runs[v]),
            }
        )
    shutil.rmtree(work)
    return {"tensors": int(n), "tensor_bytes": int(nbytes), "rows": rows}


def reads_table(res: dict) -> str:
    lines = [
        f"Every tensor of a SmolLM2-135M-shaped store ({res['tensors']} bf16 tensors, "
        f"{res['tensor_bytes'] / 1e6:.0f} MB), read in a child process; read s = median inside the child "
        "(imports excluded); CPU s = the child's user + system time over the same span (less sensitive to "
        "other load than wall time); x off = median ratio to the same variant without verify, within a round.",
        "",
        "| store | reads | cache | verify | read s | runs s | MB/s | x off | CPU s | CPU x off | peak RSS MiB |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        runs = " ".join(f"{x:.3f}" for x in r["runs_s"])
        lines.append(
            f"| {r['store']} | {r['reads']} | {r['cache']} | {'on' if r['verify'] else 'off'} | {r['read_s']:.3f} "
            f"| {runs} | {res['tensor_bytes'] / 1e6 / r['read_s']:.0f} | {r['x_verify_off']:.2f} "
            f"| {r['cpu_s']:.3f} | {r['cpu_x_verify_off']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


#: The seed of the flip positions (``tests/test_bitflips.py``'s full run uses the same).
FLIP_SEED = 0


def bench_flips(work: Path) -> dict:
    from tests.test_bitflips import FULL, run_campaign

    if work.exists():
        shutil.rmtree(work)
    campaign = run_campaign(work, lambda b: FULL[b], seed=FLIP_SEED)
    return flips_summary(campaign.table(), [t.__dict__ for t in campaign.trials])


def flips_summary(rows: list[dict], trials: list[dict]) -> dict:
    """What results/reliability.json keeps: counts per backend and location class, and per backend.

    Each row also splits ``caught`` by verify's exit code (1: a BAD line, 2: a
    manifest that no longer parses); the trials themselves (800 of them, the
    position, bit and message of each) are not kept: the seed and the command
    reproduce them.
    """
    by_code = Counter((t["backend"], t["kind"], t["code"]) for t in trials if t["outcome"] == "caught")
    out_rows = [
        r
        | {
            "caught exit 1": by_code[(r["backend"], r["location"], 1)],
            "caught exit 2": by_code[(r["backend"], r["location"], 2)],
        }
        for r in rows
    ]
    totals: dict[str, dict[str, int]] = {}
    for r in out_rows:
        t = totals.setdefault(str(r["backend"]), Counter())
        for k, v in r.items():
            if isinstance(v, int):
                t[k] += v
    return {"seed": FLIP_SEED, "rows": out_rows, "totals": {b: dict(t) for b, t in totals.items()}}


def flips_table(res: dict) -> str:
    lines = [
        "Single-bit flips at seeded random positions; `fisherstore verify` after each (tests/test_bitflips.py "
        "defines the location classes and what counts as meaningful). no-op = the flip changes nothing any "
        "reader takes from the file; lost = a meaningful flip verify passed.",
        "",
        "| backend | location | trials | caught | no-op | lost |",
        "|---|---|---:|---:|---:|---:|",
    ]
    totals: dict[str, list[int]] = {}
    for r in res["rows"]:
        lost = r["lost"] + r["crash"]
        lines.append(f"| {r['backend']} | {r['location']} | {r['trials']} | {r['caught']} | {r['no-op']} | {lost} |")
        t = totals.setdefault(r["backend"], [0, 0, 0, 0])
        for i, k in enumerate((r["trials"], r["caught"], r["no-op"], lost)):
            t[i] += k
    for backend, (trials, caught, noop, lost) in totals.items():
        lines.append(f"| **{backend}** | **all** | **{trials}** | **{caught}** | **{noop}** | **{lost}** |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", choices=("reads", "flips"), default=["reads", "flips"])
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the read benchmark")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fisherstore-reliability"))
    ap.add_argument("--stores", nargs="+", choices=list(STORES), default=list(STORES), help="stores to read")
    args = ap.parse_args()
    if "flips" in args.part:
        res = bench_flips(args.workdir / "flips")
        write_results("reliability", this_command(), res, flips_table(res))
        print(flips_table(res))
    if "reads" in args.part:
        res = bench_reads(args.workdir / "reads", args.repeats, args.stores)
        write_results("verify_reads", this_command(), res, reads_table(res))
        print(reads_table(res))


if __name__ == "__main__":
    main()
