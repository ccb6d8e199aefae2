"""fisherstore.info: the facts ``fisherstore info`` prints, from the library."""

import json

import pytest
import torch

import fisherstore
from fisherstore import open_store
from fisherstore.masks import describe_masks, open_masks, write_masks
from fisherstore.testing import write_store


def test_info_of_a_fisher_store(make_store, gemma_bf16):
    path = make_store(gemma_bf16)
    doc = fisherstore.info(path)
    assert json.loads(json.dumps(doc)) == doc  # JSON-able as it is
    assert (doc["path"], doc["format"], doc["kind"], doc["complete"]) == (str(path), "safetensors", "fisher", True)
    assert doc["groups"] == {"total": 2, "complete": 2}
    assert doc["tensors"] == 26 and doc["dtypes"] == {"bfloat16": 26}
    assert doc["layers"] == {"count": 4, "first": 0, "last": 3}
    assert doc["kinds"]["v"] == 2 and doc["masks"] is None
    assert doc["bytes"] == sum(t.numel() * 2 for t in gemma_bf16.values())
    assert doc["largest"] == max(gemma_bf16, key=lambda n: (gemma_bf16[n].numel(), n))
    rows = {r["name"]: r for r in doc["tensor_list"]}
    assert list(rows) == open_store(path).names
    name = "model.layers.2.mlp.gate_proj.weight"
    t = gemma_bf16[name]
    assert (rows[name]["shape"], rows[name]["dtype"], rows[name]["layer"], rows[name]["kind"]) == (
        list(t.shape),
        "bfloat16",
        2,
        "gate",
    )
    assert rows[name]["sum"] == pytest.approx(t.double().sum().item(), rel=1e-6)


def test_info_of_an_open_store_leaves_it_open(make_store, gemma_bf16):
    path = make_store(gemma_bf16)
    with open_store(path) as store:
        assert fisherstore.info(store) == fisherstore.info(path)
        assert store.read(store.names[0]).shape == gemma_bf16[store.names[0]].shape  # still readable


def test_info_of_an_incomplete_store(tmp_path, gemma_bf16):
    write_store(tmp_path / "s", gemma_bf16, groups=[0])  # group 1 never written
    doc = fisherstore.info(tmp_path / "s")
    assert doc["complete"] is False and doc["groups"] == {"total": 2, "complete": 1}


def test_info_of_a_mask_store_has_the_mask_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 3, generator=g))
    v, _ = torch.linalg.qr(torch.randn(6, 3, generator=g))
    write_masks(tmp_path / "m", {"model.layers.0.self_attn.q_proj.weight": (u, torch.tensor([3.0, 2.0, 1.0]), v)})
    doc = fisherstore.info(tmp_path / "m")
    with open_masks(tmp_path / "m") as masks:
        assert doc["masks"] == describe_masks(masks)
    assert doc["kind"] == "masks" and doc["tensors"] == 3
    assert [(r["name"], r["shape"], r["rank"]) for r in doc["masks"]] == [
        ("model.layers.0.self_attn.q_proj.weight", [8, 6], 3)
    ]
