import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from fisherstore import BadInputError, TensorNotFoundError, open_store
from fisherstore.errors import CorruptDataError
from fisherstore.manifest import GroupInfo, TensorSpec
from fisherstore.masks import (
    MASK_KIND,
    MaskTriple,
    describe_masks,
    energy_and_residual,
    mask_specs,
    mask_triples,
    open_masks,
    plan_mask_groups,
    source_identity,
    write_masks,
)

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.3.mlp.down_proj.weight"


def _exact_modes(f: torch.Tensor, k: int):
    u, s, vh = torch.linalg.svd(f.float(), full_matrices=False)
    return u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].T.contiguous()


@pytest.fixture
def source(make_store, gemma_bf16):
    return make_store(gemma_bf16, group_size=2)


@pytest.fixture
def modes(gemma_bf16):
    return {name: _exact_modes(t, 4) for name, t in gemma_bf16.items()}


def test_round_trip_with_source(tmp_path, source, gemma_bf16, modes):
    write_masks(tmp_path / "m", modes, source=source, params={"note": "exact"})
    with open_masks(tmp_path / "m") as m, open_store(source) as src:
        assert m.names == list(gemma_bf16) and len(m) == len(gemma_bf16)
        assert m.rank == 4 and Q in m and "nope" not in m
        assert m.params == {"note": "exact"}
        assert m.source == source_identity(src)
        assert m.manifest.kind == MASK_KIND
        # groups mirror the source's layer groups
        assert [g.layers for g in m.manifest.groups] == [g.layers for g in src.manifest.groups]
        for name, (U, S, V) in modes.items():
            got = m.get(name)
            assert all(torch.equal(a, b) for a, b in zip(got, (U, S, V))), name
            f = gemma_bf16[name].double()
            true_residual = torch.linalg.matrix_norm(f - (U.double() * S.double()) @ V.double().T).item()
            total = f.square().sum().item()
            # sqrt(‖F‖² − ‖S‖²) is as exact as fp32 S allows: its square to ~1e-7 of ‖F‖²
            assert abs(m.residual(name) ** 2 - true_residual**2) <= 1e-6 * total, name
            assert m.energy(name) == pytest.approx(S.double().square().sum().item() / total, rel=1e-6)
            assert m.attrs(name)["fisher_sum"] == pytest.approx(src.info(name).sum)
            assert m.shape(name) == tuple(f.shape)


def test_rank_prefix_device_and_dtype(tmp_path, modes):
    write_masks(tmp_path / "m", modes)
    with open_masks(tmp_path / "m") as m:
        U, S, V = m.get(DOWN, rank=2, device="cpu", dtype=torch.float64)
        U4, S4, V4 = modes[DOWN]
        assert U.dtype == torch.float64 and U.is_contiguous() and V.is_contiguous()
        assert U.shape == (64, 2) and S.shape == (2,) and V.shape == (128, 2)
        assert (
            torch.equal(U, U4[:, :2].double())
            and torch.equal(S, S4[:2].double())
            and torch.equal(V, V4[:, :2].double())
        )
        with pytest.raises(BadInputError, match=r"rank 5 .* must be an integer in 1\.\.4"):
            m.get(DOWN, rank=5)
        with pytest.raises(BadInputError, match="rank 0"):
            m.get(DOWN, rank=0)
        with pytest.raises(TensorNotFoundError, match="no masks for tensor 'x'"):
            m.get("x")


def test_without_source_energy_is_unknown(tmp_path, modes):
    write_masks(tmp_path / "m", modes)
    with open_masks(tmp_path / "m") as m:
        assert m.energy(Q) is None and m.residual(Q) is None and m.energy(Q, rank=2) is None
        assert m.energy_curve(Q) is None and m.source == {}
        # one group per layer when there is no source to follow
        assert [g.layers for g in m.manifest.groups] == [(0,), (1,), (2,), (3,)]
        assert (tmp_path / "m" / "masks.safetensors.index.json").exists()


def test_energy_at_lower_rank_and_curve(tmp_path, source, gemma_bf16, modes):
    write_masks(tmp_path / "m", modes, source=source)
    with open_masks(tmp_path / "m") as m:
        f = gemma_bf16[DOWN].double()
        total = f.square().sum().item()
        S = modes[DOWN][1].double()
        assert m.energy(DOWN, rank=1) == pytest.approx(S[0].item() ** 2 / total, rel=1e-6)
        assert m.residual(DOWN, rank=2) == pytest.approx(math.sqrt(total - S[:2].square().sum().item()), rel=1e-6)
        curve = m.energy_curve(DOWN)
        assert curve.shape == (4,) and torch.all(curve[1:] >= curve[:-1])
        assert curve[-1].item() == pytest.approx(m.energy(DOWN), rel=1e-12)


def test_transform_param_is_applied_to_the_source_norm(tmp_path, source, gemma_bf16):
    f = gemma_bf16[Q].float().sqrt()
    write_masks(tmp_path / "m", {Q: _exact_modes(f, 3)}, source=source, params={"transform": "sqrt"})
    with open_masks(tmp_path / "m") as m:
        assert m.attrs(Q)["total_energy"] == pytest.approx(f.double().square().sum().item(), rel=1e-6)


def test_source_identity_follows_bytes_not_path(tmp_path, source, make_store, gemma_bf16):
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    changed = dict(gemma_bf16)
    changed[Q] = changed[Q] * 2
    with open_store(source) as a, open_store(copy) as b, open_store(make_store(changed)) as c:
        ia, ib, ic = source_identity(a), source_identity(b), source_identity(c)
    assert ia["tensors_sha256"] == ib["tensors_sha256"] and ia["path"] != ib["path"]
    assert ia["tensors_sha256"] != ic["tensors_sha256"]
    assert ia["tensors"] == len(gemma_bf16) and ia["format"] == "safetensors"


def test_describe_masks_rows(tmp_path, source, modes):
    write_masks(tmp_path / "m", modes, source=source)
    with open_masks(tmp_path / "m") as m:
        rows = describe_masks(m)
    assert [r["name"] for r in rows] == list(modes)
    row = next(r for r in rows if r["name"] == DOWN)
    assert row["layer"] == 3 and row["kind"] == "down" and row["shape"] == [64, 128] and row["rank"] == 4
    assert row["method"] == "given" and 0 < row["energy"] <= 1 and row["residual"] > 0
    assert json.dumps(rows)  # plain JSON for `info --json`


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({Q: (torch.zeros(64, 2), torch.zeros(3), torch.zeros(64, 2))}, "need U m×r, S r, V n×r"),
        ({Q: (torch.zeros(64, 2), torch.zeros(2))}, r"must be a \(U, S, V\) tuple"),
        (
            {Q: (torch.zeros(64, 2), torch.zeros(2, dtype=torch.float64), torch.zeros(64, 2))},
            "share one floating dtype",
        ),
        ({Q: (torch.zeros(64, 2, dtype=torch.int32),) * 2 + (torch.zeros(2, dtype=torch.int32),)}, "need U m×r"),
        ({}, "no masks given"),
    ],
)
def test_write_masks_rejects_bad_input(tmp_path, bad, match):
    with pytest.raises(BadInputError, match=match):
        write_masks(tmp_path / "m", bad)
    assert not (tmp_path / "m").exists()


def test_write_masks_checks_shapes_against_source(tmp_path, source):
    with pytest.raises(BadInputError, match="give a 64x32 matrix, the source tensor is 64x64"):
        write_masks(tmp_path / "m", {Q: (torch.zeros(64, 2), torch.zeros(2), torch.zeros(32, 2))}, source=source)
    with pytest.raises(TensorNotFoundError):
        write_masks(
            tmp_path / "m",
            {"model.layers.0.nope.weight": (torch.zeros(4, 1), torch.zeros(1), torch.zeros(4, 1))},
            source=source,
        )


def test_open_masks_refuses_a_fisher_store(source):
    with pytest.raises(BadInputError, match="is a 'fisher' store, not a mask store; make one with 'fisherstore svd"):
        open_masks(source)


@pytest.mark.parametrize(
    ("captured", "total", "energy", "residual"),
    [(3.0, 4.0, 0.75, 1.0), (4.0 + 1e-9, 4.0, 1.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 9.0, 0.0, 3.0)],
)
def test_energy_and_residual(captured, total, energy, residual):
    assert energy_and_residual(captured, total) == pytest.approx((energy, residual))


def test_mask_triples_of_a_plan_and_of_a_written_store(tmp_path, source, modes):
    plan = plan_mask_groups([(Q, 64, 32, 4, 0), (DOWN, 16, 64, 2, 1), ("lm_head.weight", 8, 8, 8, 1)], "float32")
    assert [[t.name for t in mask_triples(g)] for g in plan] == [[Q], [DOWN, "lm_head.weight"]]
    assert mask_triples(plan[0]) == [MaskTriple(Q, *mask_specs(Q, 64, 32, 4, "float32"))]
    assert mask_triples(plan[1])[0].v == TensorSpec(DOWN + ".V", (64, 2), "float32")
    write_masks(tmp_path / "m", modes, source=source)
    with open_masks(tmp_path / "m") as m:
        names = [t.name for g in m.manifest.groups for t in mask_triples(g)]
        assert names == m.names and len(names) == len(modes)


def _spec(name, shape, dtype="float32"):
    return TensorSpec(name, shape, dtype)


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        ((_spec("a.S", (2,)), _spec("a.U", (4, 2)), _spec("a.V", (3, 2))), r"expected tensors \['a.S.U'"),
        (
            (_spec("a.U", (4, 2)), _spec("a.S", (2,))),
            r"expected tensors \['a.U', 'a.S', 'a.V'\] at position 0, got \['a.U', 'a.S'\]",
        ),
        ((_spec("a.U", (4, 2)), _spec("b.S", (2,)), _spec("b.V", (3, 2))), r"expected tensors \['a.U', 'a.S', 'a.V'\]"),
        (
            (*mask_specs("a", 4, 3, 2, "float32"), _spec("b.U", (4, 2)), _spec("b.S", (3,)), _spec("b.V", (3, 2))),
            r"'b' needs U m×r, S r, V n×r in one dtype; got U \[4, 2\] float32, S \[3\]",
        ),
        (
            (_spec("a.U", (4, 2)), _spec("a.S", (2,), "bfloat16"), _spec("a.V", (3, 2))),
            r"'a' needs U m×r, S r, V n×r in one dtype; got U \[4, 2\] float32, S \[2\] bfloat16",
        ),
    ],
)
def test_mask_triples_refuse_a_malformed_group(specs, match):
    with pytest.raises(CorruptDataError, match=r"mask group 7: " + match):
        mask_triples(GroupInfo(7, (), specs))


def test_masks_does_not_import_svd():
    """The mask store format sits below the SVD: reading masks never loads fisherstore.svd."""
    code = (
        "import sys, fisherstore.masks; print('fisherstore.svd' in sys.modules, 'fisherstore._svd_core' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
