import argparse
import sys

import pytest
import torch

from fisherstore import BadInputError, open_store
from fisherstore.cli import cmd_plot
from fisherstore.masks import open_masks, write_masks
from fisherstore.plot import energy_curves, importance_profile, plot_store
from fisherstore.svd import SVDConfig, svd_store

image = pytest.importorskip("matplotlib.image")


@pytest.fixture
def source(make_store, gemma_bf16):
    return make_store(gemma_bf16)


@pytest.fixture
def masks(tmp_path, source):
    svd_store(source, tmp_path / "masks", SVDConfig(rank=8))
    return tmp_path / "masks"


def _expected_profile(tensors: dict[str, torch.Tensor]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for name, t in tensors.items():
        layer = int(name.split(".")[2])
        kind = name.split(".")[4].removesuffix("_proj")
        out.setdefault(kind, {})[layer] = t.double().sum().item()
    return out


def test_importance_profile_of_a_store_and_of_its_masks(source, masks, gemma_bf16):
    expected = _expected_profile(gemma_bf16)
    with open_store(source) as s:
        profile = importance_profile(s)
    with open_masks(masks) as m:
        from_masks = importance_profile(m)
    for got in (profile, from_masks):
        assert list(got) == ["q", "k", "v", "o", "gate", "up", "down"]  # model order of kinds
        assert got["v"].keys() == {0, 2}  # full-attention layers 1 and 3 have no v_proj
        for kind, per_layer in expected.items():
            assert got[kind] == pytest.approx(per_layer, rel=1e-4)


def test_energy_curves_are_per_kind_means(masks):
    with open_masks(masks) as m:
        curves = energy_curves(m)
        for kind, curve in curves.items():
            names = [n for n in m.names if f".{kind}_proj." in n]
            assert curve.shape == (8,)
            assert torch.all(curve[1:] >= curve[:-1]) and curve[-1] <= 1
            assert curve[-1].item() == pytest.approx(sum(m.energy(n) for n in names) / len(names), rel=1e-9)
            assert curve[0].item() == pytest.approx(sum(m.energy(n, rank=1) for n in names) / len(names), rel=1e-9)


def test_short_tensors_pad_with_their_last_value(tmp_path, source, gemma_bf16):
    name = "model.layers.0.self_attn.k_proj.weight"  # 32 x 64
    u, s, vh = torch.linalg.svd(gemma_bf16[name].float(), full_matrices=False)
    other = "model.layers.2.self_attn.k_proj.weight"
    u2, s2, vh2 = torch.linalg.svd(gemma_bf16[other].float(), full_matrices=False)
    write_masks(
        tmp_path / "m", {name: (u[:, :2], s[:2], vh[:2].T), other: (u2[:, :4], s2[:4], vh2[:4].T)}, source=source
    )
    with open_masks(tmp_path / "m") as m:
        curve = energy_curves(m)["k"]
        assert curve.shape == (4,)
        assert curve[3].item() == pytest.approx((m.energy(name) + m.energy(other)) / 2)


@pytest.mark.parametrize("which", ["store", "masks"])
def test_plot_writes_an_image(tmp_path, source, masks, which):
    out = plot_store(source if which == "store" else masks, tmp_path / "p.png", title="t")
    pixels = image.imread(out)
    height, width = pixels.shape[:2]
    # one panel for a store, two side by side for masks (7.5 in each at 120 dpi)
    assert height == 540 and width == (900 if which == "store" else 1800)
    assert pixels[..., :3].std() > 0.05  # something was drawn


def test_plot_refuses_masks_with_nothing_to_show(tmp_path):
    write_masks(
        tmp_path / "m", {"model.layers.0.mlp.up_proj.weight": (torch.eye(4)[:, :1], torch.ones(1), torch.eye(4)[:, :1])}
    )
    with pytest.raises(BadInputError, match="nothing to plot"):
        plot_store(tmp_path / "m", tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_missing_matplotlib_is_a_clear_error(tmp_path, source, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an uninstalled extra looks like
    with pytest.raises(BadInputError, match=r"fisherstore plot needs matplotlib: pip install 'fisherstore\[plot\]'"):
        plot_store(source, tmp_path / "p.png")


def test_command(tmp_path, masks, capsys):
    parser = argparse.ArgumentParser()
    cmd_plot.register(parser.add_subparsers())
    args = parser.parse_args(["plot", str(masks), "-o", str(tmp_path / "m.svg")])
    assert args.func(args) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'm.svg'}\n"
    assert (tmp_path / "m.svg").read_text().lstrip().startswith("<?xml")
