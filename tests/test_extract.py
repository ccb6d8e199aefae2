"""Fisher extraction checked against an independent per-sample-gradient reference (torch.func)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from transformers import AutoModelForCausalLM

from fisherstore import open_store
from fisherstore.errors import BadInputError
from fisherstore.extraction import (
    ExtractConfig,
    _sampled_labels,
    extract,
    parse_bytes,
    target_parameters,
)
from fisherstore.models import TINY_GEMMA4, load_model
from fisherstore.prompts import as_prompt_set, encode_prompts, load_prompts

MAX_LENGTH = 40


# one_thread, tiny and prompts: tests/conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")


def run(tiny, prompts, out, **kwargs):
    kwargs.setdefault("max_length", MAX_LENGTH)
    kwargs.setdefault("dtype", "fp32")
    summary = extract(tiny.model, tiny.tokenizer, prompts, out, ExtractConfig(**kwargs), provenance=tiny.provenance)
    with open_store(out) as store:
        return summary, {n: store[n] for n in store.names}


def reference_fisher(model, inputs, names, labels=None):
    """Mean over prompts of squared per-prompt gradients, by torch.func (no hooks, no groups, no store)."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def loss(tp, ids, y):
        logits = functional_call(model, tp, (ids,), {"use_cache": False}).logits[0, :-1].float()
        return F.cross_entropy(logits, y)

    per_sample_grad = grad(loss)
    total = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    for i, ids in enumerate(inputs):
        g = per_sample_grad(params, ids, ids[0, 1:] if labels is None else labels[i])
        for n in total:
            total[n] += g[n].float() ** 2
    return {n: t / len(inputs) for n, t in total.items()}


def assert_matches(got, ref, rtol=1e-4):
    assert sorted(got) == sorted(ref)
    for name, expected in ref.items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], expected, rtol=rtol, atol=1e-7 * float(expected.max()), msg=name)


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    inputs = encode_prompts(tiny.tokenizer, prompts, max_length=MAX_LENGTH)
    return reference_fisher(tiny.model, inputs, set(target_parameters(tiny.model)))


def test_grouped_runs_match_torch_func_reference(tiny, prompts, reference, tmp_path):
    results = {}
    for size in (1, 2, 4):  # one layer per group, two, all layers
        summary, results[size] = run(tiny, prompts, tmp_path / f"g{size}", group_size=size)
        assert summary.groups_total == summary.groups_run == 4 // size
        assert_matches(results[size], reference)
    # 26 tensors: full-attention layers 1 and 3 share k and v, so they have no v_proj.
    assert len(results[1]) == 26
    assert [n for n in results[1] if "v_proj" in n] == [f"model.layers.{i}.self_attn.v_proj.weight" for i in (0, 2)]
    for size in (2, 4):
        assert all(torch.equal(results[1][n], results[size][n]) for n in results[1]), f"group size {size} differs"


def test_sampled_estimator(tiny, prompts, tmp_path):
    inputs = encode_prompts(tiny.tokenizer, prompts, max_length=MAX_LENGTH)
    with torch.no_grad():
        labels = [
            _sampled_labels(tiny.model(input_ids=ids).logits[0, :-1].float(), 0, i) for i, ids in enumerate(inputs)
        ]
    assert not all(torch.equal(y, ids[0, 1:]) for y, ids in zip(labels, inputs, strict=True))
    names = set(target_parameters(tiny.model))
    _, one = run(tiny, prompts, tmp_path / "s1", estimator="sampled", group_size=1)
    assert_matches(one, reference_fisher(tiny.model, inputs, names, labels))
    summary, four = run(tiny, prompts, tmp_path / "s4", estimator="sampled", group_size=4)
    assert all(torch.equal(one[n], four[n]) for n in one)  # the same labels in every group
    _, other_seed = run(tiny, prompts, tmp_path / "seed1", estimator="sampled", group_size=4, seed=1)
    assert not all(torch.equal(one[n], other_seed[n]) for n in one)
    with open_store(tmp_path / "s4") as store:
        assert store.manifest.provenance["estimator"] == store.manifest.attrs["estimator"] == "sampled"
        assert store.manifest.provenance["seed"] == 0


def test_bf16_store_is_the_rounded_fp32_mean(tiny, prompts, tmp_path):
    _, fp32 = run(tiny, prompts, tmp_path / "fp32", group_size=2)
    _, bf16 = run(tiny, prompts, tmp_path / "bf16", group_size=2, dtype="bf16")
    assert all(bf16[n].dtype == torch.bfloat16 and torch.equal(bf16[n], fp32[n].to(torch.bfloat16)) for n in fp32)


def test_provenance_summary_and_importance(tiny, prompts, tmp_path):
    summary, tensors = run(tiny, prompts, tmp_path / "p", group_size=2, dtype="bf16")
    with open_store(tmp_path / "p") as store:
        prov, attrs = store.manifest.provenance, store.manifest.attrs
        assert store.manifest.complete
    lengths = [ids.shape[1] for ids in encode_prompts(tiny.tokenizer, prompts, max_length=MAX_LENGTH)]
    assert prov["model"] == prov["tokenizer"] == TINY_GEMMA4 and prov["model_class"] == "Gemma4ForCausalLM"
    assert prov["config_hash"].startswith("sha256:") and prov["prompts_sha256"] == prompts.sha256
    assert prov["num_prompts"] == attrs["num_samples"] == 3 and prov["tokens"] == attrs["tokens"] == sum(lengths)
    assert (prov["max_length"], prov["chat_template"], prov["estimator"], prov["group_size"]) == (
        MAX_LENGTH,
        True,
        "empirical",
        2,
    )
    assert prov["chat_template_sha256"].startswith("sha256:") and prov["compute_dtype"] == "float32"
    assert set(prov["versions"]) == {"fisherstore", "torch", "transformers"}
    assert (summary.groups_total, summary.groups_run, summary.num_prompts) == (2, 2, 3)
    assert summary.tokens_per_pass == sum(lengths) and summary.tokens_processed == 2 * sum(lengths)
    assert len(summary.group_seconds) == 2 and 0 <= summary.writer_blocked_seconds < summary.seconds
    assert summary.peak_rss_bytes > 100 << 20 and summary.peak_device_bytes is None
    assert json.loads(json.dumps(summary.to_dict()))["group_seconds"] == list(summary.group_seconds)
    importance = json.loads((tmp_path / "p" / "layer_importance.json").read_text())
    for layer in range(4):
        expected = sum(t.double().sum().item() for n, t in tensors.items() if f"layers.{layer}." in n)
        assert importance["layers"][str(layer)] == pytest.approx(expected, rel=1e-5)
    assert importance["provenance"] == {"model": TINY_GEMMA4, "estimator": "empirical", "num_prompts": 3}


def test_model_is_left_without_grads_or_hooks(tiny, prompts, reference, tmp_path):
    tiny.model.train()  # dropout must not leak into the estimate, and the caller's mode comes back
    try:
        with torch.no_grad():  # extraction enables grad for itself
            _, tensors = run(tiny, prompts, tmp_path / "clean", group_size=4)
        assert tiny.model.training
    finally:
        tiny.model.eval()
    assert_matches(tensors, reference)
    assert all(not p.requires_grad and p.grad is None for p in tiny.model.parameters())
    # A leftover post-accumulate hook would square the gradient away and free it.
    weight = tiny.model.model.layers[0].self_attn.q_proj.weight
    weight.requires_grad_(True)
    try:
        ids = torch.tensor([[2, 10, 11, 12]])
        F.cross_entropy(tiny.model(input_ids=ids).logits[0, :-1], ids[0, 1:]).backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    finally:
        weight.requires_grad_(False)
        weight.grad = None


def test_resume_skips_complete_groups_and_refuses_other_inputs(tiny, prompts, tmp_path):
    out = tmp_path / "r"
    _, first = run(tiny, prompts, out, group_size=2)
    summary, again = run(tiny, prompts, out, group_size=2, resume=True)
    assert summary.groups_run == 0 and summary.groups_total == 2
    assert all(torch.equal(first[n], again[n]) for n in first)
    with pytest.raises(BadInputError, match="cannot resume: the store was extracted with prompts_sha256="):
        run(tiny, as_prompt_set(["Say hello.", "Say goodbye.", "Count to three."]), out, group_size=2, resume=True)
    with pytest.raises(BadInputError, match="cannot resume: the store was extracted with max_length=40"):
        run(tiny, prompts, out, group_size=2, resume=True, max_length=30)
    with pytest.raises(BadInputError, match="already exists"):
        run(tiny, prompts, out, group_size=2)


@pytest.mark.parametrize("estimator", ["empirical", "sampled"])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_pipelined_schedule_is_bit_identical_to_naive(tiny, prompts, tmp_path, estimator, size):
    naive_summary, naive = run(tiny, prompts, tmp_path / "n", group_size=size, estimator=estimator, schedule="naive")
    summary, pipelined = run(tiny, prompts, tmp_path / "p", group_size=size, estimator=estimator)
    assert (naive_summary.schedule, summary.schedule, naive_summary.boundary_bytes) == ("naive", "pipelined", 0)
    tokens = sum(ids.shape[1] for ids in encode_prompts(tiny.tokenizer, prompts, max_length=MAX_LENGTH))
    # fp32 hidden states entering each of the groups below the top one, plus one boundary's gradients (none for one)
    groups = 4 // size
    assert summary.boundary_bytes == 4 * tokens * tiny.model.config.hidden_size * (groups if groups > 1 else 0)
    assert sorted(naive) == sorted(pipelined) and len(naive) == 26
    assert all(torch.equal(naive[n], pipelined[n]) for n in naive)
    with open_store(tmp_path / "p") as store:
        assert store.manifest.provenance["schedule"] == "pipelined"


def test_kv_shared_gemma4_falls_back_to_naive_and_matches_a_whole_model_backward(tiny, prompts, tmp_path, caplog):
    config = copy.deepcopy(tiny.model.config)
    config.num_kv_shared_layers = 2  # layers 2 and 3 reuse the k/v of the last "store" layers, 0 and 1
    # per-layer inputs too: transformers 5.24 slices them unconditionally at the first KV-shared layer
    config.hidden_size_per_layer_input = 8
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    assert [layer.self_attn.is_kv_shared_layer for layer in model.model.layers] == [False, False, True, True]
    shared = dataclasses.replace(tiny, model=model)
    inputs = encode_prompts(tiny.tokenizer, prompts, max_length=MAX_LENGTH)
    reference = reference_fisher(model, inputs, set(target_parameters(model)))
    for size in (1, 4):
        with caplog.at_level(logging.INFO, logger="fisherstore.extraction"):
            summary, tensors = run(shared, prompts, tmp_path / f"kv{size}", group_size=size)
        assert (summary.schedule, summary.boundary_bytes) == ("naive", 0)
        assert "schedule naive: the model shares k/v across layers (num_kv_shared_layers=2)" in caplog.text
        with open_store(tmp_path / f"kv{size}") as store:
            assert store.manifest.provenance["schedule"] == "naive"
        assert_matches(tensors, reference)
        caplog.clear()


def test_interrupted_pipelined_run_resumes_to_the_bit_identical_store(tiny, prompts, tmp_path):
    _, whole = run(tiny, prompts, tmp_path / "whole", group_size=1)
    calls = []

    def fail_in_group_2(module, args):
        # 3 calls in pass 1, then group 2 (layer 1) re-runs: stop there, after groups 4 and 3 are submitted
        calls.append(torch.is_grad_enabled())
        if sum(calls) > len(prompts):  # the chain guard's probe runs without grad: not counted
            raise RuntimeError("interrupted")

    out = tmp_path / "cut"
    handle = tiny.model.model.layers[1].register_forward_pre_hook(fail_in_group_2)
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            run(tiny, prompts, out, group_size=1)
    finally:
        handle.remove()
    state = json.loads((out / "fisherstore.json").read_text())
    assert [g["complete"] for g in state["groups"]] == [False, False, True, True]
    summary, resumed = run(tiny, prompts, out, group_size=1, resume=True)
    assert (summary.groups_run, summary.groups_total, summary.schedule) == (2, 4, "pipelined")
    assert sorted(resumed) == sorted(whole) and all(torch.equal(whole[n], resumed[n]) for n in whole)


def test_non_layer_targets_fall_back_to_naive(tiny, prompts, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fisherstore.extraction"):
        summary, tensors = run(tiny, prompts, tmp_path / "e", group_size=2, targets=r"embed_tokens|q_proj")
    assert summary.schedule == "naive" and len(tensors) == 5
    assert "schedule naive: some target weights are outside the decoder layers" in caplog.text


def test_targets_select_weights(tiny, prompts, tmp_path):
    _, tensors = run(tiny, prompts, tmp_path / "t", group_size=4, targets="q,down")
    assert sorted(tensors) == sorted(
        f"model.layers.{i}.{k}.weight" for i in range(4) for k in ("self_attn.q_proj", "mlp.down_proj")
    )
    with pytest.raises(BadInputError, match="matches no parameter"):
        run(tiny, prompts, tmp_path / "none", targets=r"lora_A")


def test_bad_options_found_inside_extract_write_nothing(tiny, prompts, tmp_path):
    # ExtractConfig refuses its own bad fields before extract runs (test_extract_config_refuses_bad_fields_naming_them);
    # these are refused by extract itself, which must do so before it creates the store
    with pytest.raises(BadInputError, match="matches no parameter"):
        run(tiny, prompts, tmp_path / "a", targets=r"lora_A")
    with pytest.raises(BadInputError, match=r"the smallest group \(one layer\) needs"):
        run(tiny, prompts, tmp_path / "b", max_memory=1024)
    assert not any((tmp_path / x).exists() for x in "ab")


def test_memory_sizes():
    # group sizing from memory: tests/test_extract_plan.py
    # one meaning everywhere (svd --max-memory too): bare K/M/G and KiB/MiB/GiB binary, KB/MB/GB decimal
    assert [parse_bytes(v) for v in ("8GiB", "500MB", "1.5G", "1024", 7, "64k")] == [
        8 << 30,
        500 * 10**6,
        int(1.5 * (1 << 30)),
        1024,
        7,
        65536,
    ]
    for bad in ("lots", "-1G", "0", "5 parsecs", "1.5GiB2", True):
        with pytest.raises(BadInputError, match="size"):
            parse_bytes(bad)


def test_device_map_loaded_model_gives_the_same_fisher(tiny, prompts, reference, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    mapped = load_model(tmp_path / "m", device_map="auto")
    summary = extract(
        mapped.model,
        mapped.tokenizer,
        prompts,
        tmp_path / "s",
        ExtractConfig(group_size=2, dtype="fp32", max_length=MAX_LENGTH),
        provenance=mapped.provenance,
    )
    on_gpu = next(mapped.model.parameters()).device.type == "cuda"  # "auto" maps onto a GPU where there is one
    with open_store(tmp_path / "s") as store:
        # fp32 on a GPU sums in another order: elementwise differences of ~3e-4 were measured on an H200
        assert_matches({n: store[n] for n in store.names}, reference, rtol=1e-3 if on_gpu else 1e-4)
        assert store.manifest.provenance["model_format"] == "hf"
    assert summary.groups_run == 2


def test_cli_extract(cli, tmp_path):
    code, out, _ = cli(
        "--quiet",
        "extract",
        TINY_GEMMA4,
        "--out",
        tmp_path / "c",
        "--num-prompts",
        "2",
        "--max-length",
        "24",
        "--group-size",
        "2",
        "--json",
    )
    assert code == 0
    summary = json.loads(out)
    assert (summary["groups_total"], summary["num_prompts"], summary["estimator"]) == (2, 2, "empirical")
    with open_store(tmp_path / "c") as store:
        assert len(store) == 26 and store.manifest.complete and store.info(store.names[0]).dtype == "bfloat16"
    code, _, err = cli("extract", TINY_GEMMA4, "--out", tmp_path / "d", "--dtype", "fp16")
    assert code == 2 and "fp16 is refused" in err and not (tmp_path / "d").exists()
    code, _, err = cli(
        "extract", TINY_GEMMA4, "--out", tmp_path / "e", "--backend", "safetensors", "--compression", "zstd"
    )
    assert code == 2 and "--compression applies to zarr targets only" in err


def _cli_extract(out, *extra):
    return [
        sys.executable,
        "-m",
        "fisherstore.cli.main",
        "--quiet",
        "extract",
        TINY_GEMMA4,
        "--out",
        str(out),
        "--group-size",
        "1",
        "--num-prompts",
        "120",
        "--max-length",
        "64",
        "--dtype",
        "fp32",
        "--schedule",
        "naive",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_mid_group_then_resume_is_bit_identical(tmp_path, cli):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli_extract(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    manifest = killed / "fisherstore.json"
    try:
        while True:
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
            assert time.monotonic() < deadline, "group 0 was never committed"
            try:
                groups = json.loads(manifest.read_text())["groups"]
            except (FileNotFoundError, json.JSONDecodeError):
                groups = []
            if groups and groups[0]["complete"]:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = json.loads(manifest.read_text())
    assert state["complete"] is False and state["groups"][0]["complete"] and not state["groups"][-1]["complete"]
    code, _, err = cli("verify", killed)
    assert code == 1 and "incomplete" in err

    subprocess.run(_cli_extract(killed, "--resume"), env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run(_cli_extract(whole), env=env, check=True, capture_output=True)
    assert cli("verify", killed)[0] == 0
    with open_store(killed) as a, open_store(whole) as b:
        assert a.names == b.names and len(a) == 26 and a.manifest.complete
        for name in a.names:
            assert a.info(name).checksum == b.info(name).checksum, name
            assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_smollm2_matches_torch_func_reference(tmp_path):
    smol = load_model()
    prompts = load_prompts(limit=2)
    summary = extract(
        smol.model,
        smol.tokenizer,
        prompts,
        tmp_path / "s",
        ExtractConfig(group_size=8, dtype="fp32", max_length=24),
        provenance=smol.provenance,
    )
    assert (summary.groups_total, summary.group_size) == (4, 8)
    inputs = encode_prompts(smol.tokenizer, prompts, max_length=24)
    reference = reference_fisher(smol.model, inputs, set(target_parameters(smol.model)))
    assert len(reference) == 210
    with open_store(tmp_path / "s") as store:
        assert store.manifest.provenance["model_format"] == "gguf"
        assert_matches({n: store[n] for n in store.names}, reference)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("estimator", "fisher", "estimator 'fisher' is not one of empirical, sampled"),
        ("dtype", "int8", "dtype must be one of bfloat16, float32, got 'int8'"),
        ("dtype", "float16", "dtype fp16 is refused: Fisher values span ~20 decades"),
        ("dtype", "fp16", "dtype fp16 is refused: Fisher values span ~20 decades and ~8% of them flush to zero"),
        ("group_size", "many", "group_size 'many' is neither 'auto' nor a positive integer"),
        ("group_size", 0, "group_size must be >= 1, got 0"),
        ("max_memory", "lots", "max_memory: size 'lots'"),
        ("max_length", 0, "max_length must be an integer >= 2, got 0"),
        ("seed", -1, "seed must be an integer >= 0, got -1"),
        ("schedule", "fast", "schedule 'fast' is not one of pipelined, naive"),
    ],
)
def test_extract_config_refuses_bad_fields_naming_them(field, value, message):
    with pytest.raises(BadInputError, match=re.escape(message)) as info:
        ExtractConfig(**{field: value})
    assert info.value.param == field


def test_extract_config_reads_aliases_once_and_has_one_help_line_per_field():
    config = ExtractConfig(dtype="bf16", group_size="3")
    assert (config.dtype, config.group_size) == ("bfloat16", 3)
    assert (ExtractConfig(dtype="fp32").dtype, ExtractConfig().dtype, ExtractConfig().group_size) == (
        "float32",
        "bfloat16",
        "auto",
    )
    helps = {f.name: ExtractConfig.help(f.name) for f in dataclasses.fields(ExtractConfig)}
    assert len(helps) == 13 and all(isinstance(h, str) and h for h in helps.values())
    assert helps["seed"] == "seed of the sampled estimator's labels (default 0)"


def test_cli_extract_help_comes_from_the_config_and_errors_name_flags(cli, tmp_path):
    code, out, _ = cli("extract", "--help")
    assert code == 0
    out = " ".join(out.split())
    assert "-o OUT, --out OUT" in out and " ".join(ExtractConfig.help("estimator").split()) in out
    code, _, err = cli("extract", TINY_GEMMA4, "-o", tmp_path / "x", "--dtype", "bf16", "--max-length", "0")
    assert code == 2 and "--max-length must be an integer >= 2, got 0" in err and not (tmp_path / "x").exists()
