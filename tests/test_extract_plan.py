"""Group size from memory (fisherstore.planning), device maps under the pipelined schedule, the chain guard."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from accelerate import dispatch_model
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput

from fisherstore import open_store
from fisherstore.errors import BadInputError
from fisherstore.extraction import ExtractConfig, extract, target_parameters
from fisherstore.manifest import TensorSpec
from fisherstore.models import TINY_GEMMA4, load_model, tiny_tokenizer
from fisherstore.planning import (
    MARGIN_FRACTION,
    MIN_MARGIN_BYTES,
    ExtractPlan,
    ModelShape,
    available_memory,
    estimate,
    plan_extraction,
)
from fisherstore.prompts import as_prompt_set, encode_prompts

MAX_LENGTH = 40


# one_thread, tiny and prompts: tests/conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokens(tiny, prompts):
    return [ids.shape[1] for ids in encode_prompts(tiny.tokenizer, prompts, max_length=MAX_LENGTH)]


@pytest.fixture(scope="module")
def specs(tiny):
    return [TensorSpec(n, tuple(p.shape), "float32") for n, p in target_parameters(tiny.model).items()]


def run(model, tokenizer, prompts, out, **kwargs):
    kwargs.setdefault("max_length", MAX_LENGTH)
    kwargs.setdefault("dtype", "fp32")
    summary = extract(model, tokenizer, prompts, out, ExtractConfig(**kwargs))
    with open_store(out) as store:
        return summary, {n: store[n] for n in store.names}


def assert_identical(a, b):
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_estimate_items_are_the_documented_arithmetic(tiny, specs, tokens):
    shape = ModelShape.of(tiny.model)
    config = tiny.model.config.get_text_config()
    assert (shape.hidden, shape.intermediate, shape.vocab, shape.dtype_bytes) == (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        4,
    )
    assert shape.attention_types == 2  # sliding and full attention
    layer_numel = [sum(s.numel for s in specs if f"layers.{i}." in s.name) for i in range(4)]
    total, longest, h = sum(tokens), max(tokens), shape.hidden
    per_layer = longest * h * (8 + 4 * shape.intermediate / h) * 4
    head = longest * shape.vocab * (4 + 8)
    assert shape.head_dim == 32  # per-layer head dims 16 and 32: the largest
    kwargs = sum(2 * (2 * n * shape.head_dim * 4 + n * n) + 8 * n for n in tokens)
    for size, groups in ((1, 4), (2, 2), (4, 1)):
        est = estimate(specs, size, shape, tokens, "pipelined")
        accumulators = max(4 * sum(layer_numel[i : i + size]) for i in range(0, 4, size))
        assert est["accumulators"] == accumulators
        assert est["gradient"] == 4 * max(s.numel for s in specs)  # fp32 model: no extra fp32 copy
        assert est["boundary_states"] == (groups - 1) * total * h * 4
        assert est["boundary_grads"] == (total * h * 4 if groups > 1 else 0)
        assert est["boundary_kwargs"] == (kwargs if groups > 1 else 0)
        assert est["activations"] == int(size * per_layer) + head
        assert est["total"] == sum(v for k, v in est.items() if k != "total")
        off = estimate(specs, size, shape, tokens, "pipelined", boundary_on_device=False)
        assert off["total"] == est["total"] - est["boundary_states"] - est["boundary_grads"]
    naive = estimate(specs, 1, shape, tokens, "naive")  # no boundaries; the lowest group runs every layer
    assert naive["boundary_states"] == naive["boundary_kwargs"] == 0
    assert naive["activations"] == int(4 * per_layer) + head


def test_auto_takes_the_largest_group_that_fits_and_refuses_a_budget_too_small(tiny, specs, tokens):
    shape = ModelShape.of(tiny.model)
    cpu = [torch.device("cpu")]
    totals = {s: estimate(specs, s, shape, tokens, "pipelined")["total"] for s in range(1, 5)}
    for budget in sorted(set(totals.values())):
        plan = plan_extraction(specs, shape, tokens, schedule="pipelined", devices=cpu, max_memory=budget)
        assert plan.group_size == max(s for s, t in totals.items() if t <= budget)
        assert (plan.budget_bytes, plan.budget_source, plan.source, plan.fits) == (budget, "max_memory", "auto", True)
        assert plan.estimated == estimate(specs, plan.group_size, shape, tokens, "pipelined")
        assert plan.boundary == ("none" if plan.group_size == 4 else "device")
    smallest = min(totals.values())
    with pytest.raises(BadInputError, match=r"max_memory 1000: the smallest group \(one layer\) needs \d+ bytes") as e:
        plan_extraction(specs, shape, tokens, schedule="pipelined", devices=cpu, max_memory=1000)
    assert e.value.param == "max_memory" and str(min(totals[1], smallest)) in str(e.value)
    given = plan_extraction(specs, shape, tokens, schedule="naive", devices=cpu, group_size=2, max_memory="1GiB")
    assert (given.group_size, given.source, given.boundary, given.budget_bytes) == (2, "group_size", "none", 1 << 30)
    assert ExtractPlan.from_dict(json.loads(json.dumps(given.to_dict()))) == given


def test_the_automatic_budget_is_memavailable_less_the_margin(tiny, specs, tokens):
    def mem_available():
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024

    before = mem_available()
    budget, source = available_memory([torch.device("cpu")])
    after = mem_available()
    assert source == "MemAvailable less margin"
    low, high = sorted((before, after))
    margin = max(int(low * MARGIN_FRACTION), MIN_MARGIN_BYTES)
    assert low - max(int(high * MARGIN_FRACTION), MIN_MARGIN_BYTES) - (64 << 20) <= budget <= high - margin + (64 << 20)
    plan = plan_extraction(
        specs, ModelShape.of(tiny.model), tokens, schedule="pipelined", devices=[torch.device("cpu")]
    )
    # a few MiB for the tiny model: one group whenever a GiB is free
    assert plan.estimated["total"] < 64 << 20 and plan.budget_source == source
    if plan.budget_bytes > 1 << 30:
        assert (plan.group_size, plan.boundary) == (4, "none")


def test_plan_is_recorded_shown_and_kept_by_a_resumed_run(tiny, specs, tokens, prompts, tmp_path, caplog):
    shape = ModelShape.of(tiny.model)
    budget = estimate(specs, 1, shape, tokens, "pipelined")["total"]
    assert all(estimate(specs, s, shape, tokens, "pipelined")["total"] > budget for s in (2, 3, 4))  # 1 fits, alone
    _, whole = run(tiny.model, tiny.tokenizer, prompts, tmp_path / "whole", group_size=1)
    calls = []

    def fail_in_the_lower_group(module, args):
        calls.append(
            torch.is_grad_enabled()
        )  # 3 calls in pass 1, then layer 1's group re-runs it, after layers 3 and 2 are submitted
        if sum(calls) > len(prompts):  # the chain guard's probe runs without grad: not counted
            raise RuntimeError("interrupted")

    out = tmp_path / "cut"
    handle = tiny.model.model.layers[1].register_forward_pre_hook(fail_in_the_lower_group)
    try:
        with caplog.at_level(logging.INFO, logger="fisherstore.extraction"), pytest.raises(RuntimeError):
            run(tiny.model, tiny.tokenizer, prompts, out, max_memory=budget)
    finally:
        handle.remove()
    assert "extraction plan: group size 1 (auto); budget" in caplog.text and "from max_memory" in caplog.text
    state = json.loads((out / "fisherstore.json").read_text())
    assert [g["complete"] for g in state["groups"]] == [False, False, True, True]
    recorded = state["provenance"]["plan"]
    assert (recorded["group_size"], recorded["source"], recorded["budget_bytes"]) == (1, "auto", budget)
    assert recorded["estimated"] == estimate(specs, 1, shape, tokens, "pipelined")
    # the budget now would give one group of 4 layers; the resumed run keeps the recorded 1
    summary, resumed = run(tiny.model, tiny.tokenizer, prompts, out, max_memory="1TiB", resume=True)
    assert (summary.group_size, summary.groups_total, summary.groups_run) == (1, 4, 2)
    assert summary.plan is not None and summary.plan.source == "recorded"
    assert dataclasses.replace(summary.plan, source="auto").to_dict() == recorded
    assert summary.to_dict()["plan"]["group_size"] == 1
    assert_identical(whole, resumed)


def test_cli_final_line_shows_the_plan(cli, tmp_path):
    code, out, _ = cli(
        "--quiet", "extract", TINY_GEMMA4, "-o", tmp_path / "c", "--num-prompts", "2", "--max-length", "16"
    )
    assert code == 0
    assert re.search(r"group size 4 \(auto, budget [\d.]+ [KMGT]?i?B from MemAvailable less margin", out), out
    assert "boundary tensors 0 B" in out
    with open_store(tmp_path / "c") as store:
        assert store.manifest.provenance["plan"]["group_size"] == store.manifest.provenance["group_size"] == 4


def test_max_length_below_2_is_refused_and_2_works(tiny, prompts, tmp_path):
    with pytest.raises(BadInputError, match=re.escape("max_length must be an integer >= 2 (a prompt needs")) as e:
        ExtractConfig(max_length=1)
    assert e.value.param == "max_length"
    summary, tensors = run(tiny.model, tiny.tokenizer, prompts, tmp_path / "two", max_length=2, group_size=2)
    assert summary.tokens_per_pass == 2 * len(prompts)
    assert all(torch.isfinite(t).all() for t in tensors.values()) and any(t.sum() > 0 for t in tensors.values())


def _split_map(model):
    """An explicit device map naming every top-level module and each decoder layer on its own (all on the CPU)."""
    device_map = {f"model.{name}": "cpu" for name, _ in model.model.named_children() if name != "layers"}
    device_map |= {f"model.layers.{i}": "cpu" for i in range(len(model.model.layers))}
    return device_map | {"lm_head": "cpu"}


@pytest.mark.parametrize("size", [1, 2])
def test_pipelined_under_a_device_map_equals_naive_and_no_map(tiny, prompts, tmp_path, size):
    _, plain = run(tiny.model, tiny.tokenizer, prompts, tmp_path / "plain", group_size=size)
    mapped = dispatch_model(copy.deepcopy(tiny.model), device_map=_split_map(tiny.model), force_hooks=True)
    assert all(hasattr(layer, "_hf_hook") for layer in mapped.model.layers)  # accelerate's hooks, really installed
    summary, pipelined = run(mapped, tiny.tokenizer, prompts, tmp_path / "p", group_size=size)
    _, naive = run(mapped, tiny.tokenizer, prompts, tmp_path / "n", group_size=size, schedule="naive")
    assert summary.schedule == "pipelined" and summary.boundary_bytes > 0
    assert_identical(pipelined, naive)  # fp32 on the CPU: bit-identical
    assert_identical(pipelined, plain)


class _Block(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = torch.nn.Linear(hidden, 2 * hidden, bias=False)
        self.mlp.down_proj = torch.nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, hidden_states):
        return hidden_states + self.mlp.down_proj(torch.tanh(self.mlp.up_proj(hidden_states)))


class _ChainLM(torch.nn.Module):
    """A small causal LM whose decoder loop halves the hidden state between layers for prompts over ``above`` tokens.

    So layer k's output is not layer k+1's input there: re-running a group
    from its recorded input and back-propagating the gradient recorded at the
    next group's input would miss the factor.
    """

    def __init__(self, above: int | None):
        super().__init__()
        self.config = PretrainedConfig(hidden_size=16, intermediate_size=32, vocab_size=128, num_hidden_layers=4)
        self.above = above
        torch.manual_seed(0)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(128, 16)
        self.model.layers = torch.nn.ModuleList(_Block(16) for _ in range(4))
        self.lm_head = torch.nn.Linear(16, 128, bias=False)
        self.requires_grad_(False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids, use_cache=False):
        hidden = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            hidden = layer(hidden)
            if self.above is not None and hidden.shape[1] > self.above:
                hidden = hidden * 0.5
        return CausalLMOutput(logits=self.lm_head(hidden))


def _reference(model, inputs):
    """Mean squared per-prompt gradient of every target, from one whole-model backward per prompt."""
    params = target_parameters(model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for ids in inputs:
        for p in params.values():
            p.requires_grad_(True)
        logits = model(input_ids=ids).logits[0, :-1]
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, ids[0, 1:]), list(params.values()))
        for p in params.values():
            p.requires_grad_(False)
        for n, g in zip(params, grads, strict=True):
            total[n] += g * g
    return {n: t / len(inputs) for n, t in total.items()}


def test_a_model_whose_layers_do_not_chain_falls_back_to_naive(tmp_path, caplog):
    tokenizer = tiny_tokenizer()
    prompts = as_prompt_set(["Say hello to the world.", "Count to three, slowly.", "Name a colour."])
    inputs = encode_prompts(tokenizer, prompts, max_length=MAX_LENGTH)
    chained = _ChainLM(above=None)
    summary, pipelined = run(chained, tokenizer, prompts, tmp_path / "chained", group_size=1)
    _, naive = run(chained, tokenizer, prompts, tmp_path / "chained-naive", group_size=1, schedule="naive")
    assert summary.schedule == "pipelined"  # no false alarm on a plain chain
    assert_identical(pipelined, naive)
    broken = _ChainLM(above=0)
    with caplog.at_level(logging.INFO, logger="fisherstore.extraction"):
        summary, tensors = run(broken, tokenizer, prompts, tmp_path / "broken", group_size=1)
    assert summary.schedule == "naive" and summary.boundary_bytes == 0
    assert "schedule naive: decoder layer 0's output is not layer 1's input" in caplog.text
    with open_store(tmp_path / "broken") as store:
        assert store.manifest.provenance["schedule"] == "naive"
    reference = _reference(broken, inputs)
    for name, expected in reference.items():
        torch.testing.assert_close(tensors[name], expected, rtol=1e-5, atol=1e-9 * float(expected.max()))
    # the shortest prompt chains, a longer one does not: the probe passes, pass 1's own check refuses
    lengths = sorted(ids.shape[1] for ids in inputs)
    with pytest.raises(BadInputError, match="pass schedule='naive'") as e:
        run(_ChainLM(above=lengths[0]), tokenizer, prompts, tmp_path / "late", group_size=1)
    assert e.value.param == "schedule"


def test_load_model_takes_an_explicit_device_map_as_json_and_records_it(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    device_map = _split_map(tiny.model)
    loaded = load_model(tmp_path / "m", device_map=json.dumps(device_map))
    assert loaded.provenance["device_map"] == device_map
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    with pytest.raises(BadInputError, match="device_map is not a valid JSON object") as e:
        load_model(tmp_path / "m", device_map="{nope")
    assert e.value.param == "device_map"


def test_recorded_plan_is_read_from_object_stores_too(gemma_bf16):
    from fisherstore.planning import recorded_plan
    from fisherstore.storage import resolve
    from fisherstore.writer import StoreWriter, plan_groups

    plan = ExtractPlan(3, "auto", 123456, "max_memory", "cpu")
    url = "memory://plans/recorded"
    groups = plan_groups([TensorSpec.of(n, t) for n, t in gemma_bf16.items()], 3)
    StoreWriter.create(url, groups, backend="zarr", provenance={"plan": plan.to_dict()}).close()
    assert recorded_plan(resolve(url)) == dataclasses.replace(plan, source="recorded")
    assert recorded_plan(resolve("memory://plans/nothing-here")) is None
