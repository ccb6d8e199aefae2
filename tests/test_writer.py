import json
import threading

import pytest
import torch

from fisherstore import (
    BadInputError,
    IncompleteStoreError,
    StoreWriter,
    TensorSpec,
    open_store,
    plan_groups,
)
from fisherstore.manifest import Manifest

from .conftest import assert_same_tensors, write_store


def _plan(tensors, group_size=2):
    return plan_groups([TensorSpec.of(n, t) for n, t in tensors.items()], group_size)


def test_plan_groups_follows_layers_and_keeps_layerless_last(gemma_bf16):
    extra = {"model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}
    plan = _plan({**gemma_bf16, **extra}, group_size=3)
    assert [g.layers for g in plan] == [(0, 1, 2), (3,), ()]
    assert plan[-1].tensors[0].name == "model.norm.weight"
    # full-attention layers (1, 3) lack v_proj: 7 + 6 + 7 tensors in the first group
    assert len(plan[0].tensors) == 20 and len(plan[1].tensors) == 6


def test_write_read_round_trip(tmp_path, gemma_tensors):
    plan = _plan(gemma_tensors)
    with StoreWriter.create(tmp_path / "s", plan) as w:
        for g in plan:
            w.write_group(g.index, {s.name: gemma_tensors[s.name] for s in g.tensors})
        manifest = w.finish()
    assert manifest.complete
    with open_store(tmp_path / "s") as store:
        assert_same_tensors(store, gemma_tensors)
        for name, t in gemma_tensors.items():
            assert store.info(name).sum == pytest.approx(t.double().sum().item(), rel=1e-5)


def test_background_writes_release_the_caller(tmp_path, gemma_bf16):
    plan = _plan(gemma_bf16, group_size=1)
    w = StoreWriter.create(tmp_path / "s", plan)
    threads = []
    for g in plan:
        fut = w.submit_group(g.index, {s.name: gemma_bf16[s.name] for s in g.tensors})
        threads.append(fut)
    w.finish()
    assert all(f.done() and f.exception() is None for f in threads)
    assert w.blocked_seconds >= 0
    assert not any(t.name.startswith("fisherstore-writer") for t in threading.enumerate())
    with open_store(tmp_path / "s") as store:
        assert_same_tensors(store, gemma_bf16)


def test_interrupted_store_says_incomplete_and_resumes(tmp_path, gemma_bf16):
    write_store(tmp_path / "s", gemma_bf16, groups=[0])  # "crash" after group 0
    plan = _plan(gemma_bf16)
    m = Manifest.load(tmp_path / "s" / "fisherstore.json")
    assert not m.complete and [g.complete for g in m.groups] == [True, False]
    assert json.loads((tmp_path / "s" / "fisherstore.json").read_text())["complete"] is False
    with pytest.raises(IncompleteStoreError):
        StoreWriter.create(tmp_path / "s", plan, resume=True).finish()
    w = StoreWriter.create(tmp_path / "s", plan, resume=True)
    assert w.completed_groups == {0}
    w.write_group(1, {s.name: gemma_bf16[s.name] for s in plan[1].tensors})
    assert w.finish().complete
    with open_store(tmp_path / "s") as store:
        assert_same_tensors(store, gemma_bf16)


def test_failed_group_leaves_no_trace(tmp_path, gemma_bf16):
    plan = _plan(gemma_bf16)
    w = StoreWriter.create(tmp_path / "s", plan)
    bad = {s.name: gemma_bf16[s.name] for s in plan[0].tensors}
    first = plan[0].tensors[0].name
    bad[first] = bad[first].float()
    with pytest.raises(BadInputError, match="the plan says bfloat16"):
        w.write_group(0, bad)

    def chunks():
        yield b"\x00" * 10
        raise RuntimeError("source died")

    spec = plan[0].tensors[0]
    with pytest.raises(RuntimeError, match="source died"):
        w.stream_group(0, [(spec, chunks())])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["fisherstore.json"]
    assert w.completed_groups == set()


def test_resume_refuses_a_different_plan_and_existing_paths(tmp_path, gemma_bf16):
    plan = _plan(gemma_bf16)
    StoreWriter.create(tmp_path / "s", plan).close()
    with pytest.raises(BadInputError, match="cannot resume"):
        StoreWriter.create(tmp_path / "s", _plan(gemma_bf16, group_size=1), resume=True)
    with pytest.raises(BadInputError, match="already exists"):
        StoreWriter.create(tmp_path / "s", plan)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep")
    with pytest.raises(BadInputError, match="not a fisherstore store"):
        StoreWriter.create(tmp_path / "other", plan, overwrite=True)
    assert (tmp_path / "other" / "precious.txt").read_text() == "keep"


def test_importance_written_from_the_stream(tmp_path, gemma_bf16):
    plan = _plan(gemma_bf16)
    with StoreWriter.create(tmp_path / "s", plan) as w:
        for g in plan:
            w.write_group(g.index, {s.name: gemma_bf16[s.name] for s in g.tensors})
        w.finish()
    doc = json.loads((tmp_path / "s" / "layer_importance.json").read_text())
    for layer in range(4):
        expected = sum(t.double().sum().item() for n, t in gemma_bf16.items() if f"layers.{layer}." in n)
        assert doc["layers"][str(layer)] == pytest.approx(expected, rel=1e-6)
        assert sum(doc["by_kind"][str(layer)].values()) == pytest.approx(expected, rel=1e-6)
    assert set(doc["by_kind"]["1"]) == {"q", "k", "o", "gate", "up", "down"}  # no v_proj in full attention


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(tmp_path, gemma_bf16, bad):
    plan = _plan(gemma_bf16)
    tensors = {s.name: gemma_bf16[s.name].clone() for s in plan[0].tensors}
    first = plan[0].tensors[0].name
    tensors[first][3, 5] = bad
    w = StoreWriter.create(tmp_path / "s", plan)
    with pytest.raises(BadInputError, match=f"{first}.*non-finite"):
        w.write_group(0, tensors)
    assert w.completed_groups == set() and sorted(p.name for p in (tmp_path / "s").iterdir()) == ["fisherstore.json"]
