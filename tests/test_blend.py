"""``fisherstore blend`` / :func:`fisherstore.blend.blend_adapter` on a real PEFT adapter."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import KasaConfig

from fisherstore import training
from fisherstore.blend import ADAPTER_WEIGHTS, BLEND_RECORD, blend_adapter
from fisherstore.cli import cmd_blend
from fisherstore.errors import BadInputError
from fisherstore.naming import parse_name
from fisherstore.testing import tiny_gemma4_model
from fisherstore.training import LORA_VARIANTS, ScaleRule, lora_variant_of_config

from .conftest import tree_digest

IMPORTANCE = {0: 1.0, 1: 4.0, 2: 0.25}  # layer 3 deliberately missing


def deltas(model) -> dict[str, torch.Tensor]:
    return {
        n: m.get_delta_weight("default").detach().clone() for n, m in model.named_modules() if isinstance(m, LoraLayer)
    }


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A saved LoRA adapter (non-zero B, on all linears and the LM head) and its deltas."""
    model = get_peft_model(
        tiny_gemma4_model(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(path)
    (path / "README.md").write_text("an adapter\n")
    (path / "optimizer.pt").write_bytes(b"training state, not copied")
    return path, deltas(model)


def importance_file(tmp_path, obj=IMPORTANCE):
    path = tmp_path / "layer_importance.json"
    path.write_text(json.dumps({"layers": {str(k): v for k, v in obj.items()}}))
    return path


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_blend_output_loads_in_peft_with_scaled_deltas(tmp_path, adapter, alpha):
    src, original = adapter
    before = tree_digest(src)
    rule = ScaleRule(power=1.0)
    report = blend_adapter(src, importance_file(tmp_path), tmp_path / "out", alpha=alpha, rule=rule)
    factors = rule.factors(IMPORTANCE)
    assert report.factors == pytest.approx({l: alpha * f for l, f in factors.items()})
    loaded = PeftModel.from_pretrained(tiny_gemma4_model(), tmp_path / "out")
    blended = deltas(loaded)
    assert blended.keys() == original.keys() and len(blended) == 4 + 2 + 4 + 1  # q, v (layers 0, 2), down, lm_head
    for name, delta in blended.items():
        layer = parse_name(name)[0]
        mult = alpha * factors[layer] if layer in factors else alpha
        torch.testing.assert_close(delta, original[name] * mult, rtol=1e-5, atol=1e-6)
        assert original[name].abs().max() > 0
    # layer 3 and the LM head got alpha only, and were reported
    assert sorted({parse_name(k)[0] for k in report.unscaled}, key=str) == [3, None]
    assert len(report.scaled) == 8  # layers 0-2: q, v (0, 2), down
    record = json.loads((tmp_path / "out" / BLEND_RECORD).read_text())
    assert record["alpha"] == alpha and record["rule"]["power"] == 1.0 and set(record["factors"]) == {"0", "1", "2"}
    out_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out_files == ["README.md", "adapter_config.json", ADAPTER_WEIGHTS, BLEND_RECORD]
    assert tree_digest(src) == before  # the source adapter is untouched


def test_refuses_to_overwrite_and_rejects_bad_adapters(tmp_path, adapter):
    src, _ = adapter
    imp = importance_file(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(BadInputError, match="not empty"):
        blend_adapter(src, imp, tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep"
    blend_adapter(src, imp, tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "x").exists() and (tmp_path / "busy" / ADAPTER_WEIGHTS).is_file()
    with pytest.raises(BadInputError, match="contains the adapter"):
        blend_adapter(src, imp, src.parent, overwrite=True)
    with pytest.raises(BadInputError, match="adapter_config.json"):
        blend_adapter(tmp_path, imp, tmp_path / "o1")
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(BadInputError, match="DoRA"):
        blend_adapter(dora, imp, tmp_path / "o2")
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(BadInputError, match="IA3"):
        blend_adapter(dora, imp, tmp_path / "o3")
    with pytest.raises(BadInputError, match="nothing to blend"):
        blend_adapter(src, importance_file(tmp_path, {7: 1.0}), tmp_path / "o4")
    with pytest.raises(BadInputError, match="alpha"):
        blend_adapter(src, imp, tmp_path / "o5", alpha=float("nan"))
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3", "o4", "o5"))


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fisherstore")
    cmd_blend.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["blend", *argv])
    return args.func(args)


def test_cli_blend_and_dry_run(tmp_path, adapter, capsys):
    src, original = adapter
    imp = importance_file(tmp_path)
    assert _cli(str(src), "--importance", str(imp), "--out", str(tmp_path / "dry"), "--dry-run") == 0
    assert not (tmp_path / "dry").exists()
    table = capsys.readouterr().out
    assert "factor = clip((importance / geomean) ** -0.5, 0.1, 10)" in table
    assert (
        _cli(
            str(src),
            "--importance",
            str(imp),
            "--out",
            str(tmp_path / "o"),
            "--alpha",
            "2",
            "--power",
            "1",
            "--max-factor",
            "3",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "wrote" in out and "alpha only" in out and "layers.3." in out
    factors = ScaleRule(power=1.0, max_factor=3.0).factors(IMPORTANCE)
    blended = deltas(PeftModel.from_pretrained(tiny_gemma4_model(), tmp_path / "o"))
    name = "base_model.model.model.layers.2.self_attn.q_proj"
    assert factors[2] == 3.0  # clipped: (0.25 / 1) ** -1 = 4
    torch.testing.assert_close(blended[name], original[name] * 2 * factors[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(BadInputError, match="not empty"):
        _cli(str(src), "--importance", str(imp), "--out", str(tmp_path / "o"))


def test_blend_of_plain_lora_imports_neither_peft_nor_transformers(tmp_path, adapter):
    """The variant check is decided from the fixed tables for every field PEFT writes for plain LoRA."""
    imp = importance_file(tmp_path)
    code = (
        "import sys; from fisherstore.blend import blend_adapter; "
        f"blend_adapter({str(adapter[0])!r}, {str(imp)!r}, {str(tmp_path / 'o')!r}); "
        "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert (tmp_path / "o" / ADAPTER_WEIGHTS).is_file()
    written = json.loads((adapter[0] / "adapter_config.json").read_text())
    assert set(written) <= training._PLAIN_LORA_FIELDS | set(LORA_VARIANTS)


def test_refuses_adapters_of_every_lora_variant(tmp_path):
    imp = importance_file(tmp_path)
    kasa = get_peft_model(tiny_gemma4_model(0), LoraConfig(r=4, target_modules=["q_proj"], kasa_config=KasaConfig()))
    kasa.save_pretrained(tmp_path / "kasa")
    with pytest.raises(BadInputError, match="KaSA adapters do not update W by B·A alone"):
        blend_adapter(tmp_path / "kasa", imp, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    plain = {"peft_type": "LORA", "use_dora": False, "kasa_config": None, "init_lora_weights": True}
    assert lora_variant_of_config(plain) is None
    assert [
        lora_variant_of_config({**plain, **extra})
        for extra in ({"use_dora": True}, {"alora_invocation_tokens": [3]}, {"init_lora_weights": "mica"})
    ] == ["DoRA", "aLoRA", "MiCA"]
    assert lora_variant_of_config({**plain, "init_lora_weights": "pissa_niter_4", "task_type": "CAUSAL_LM"}) is None


def test_variants_newer_than_the_table_are_refused_through_peft(monkeypatch):
    """A truthy field the tables do not know is looked up in PEFT (here BD-LoRA, hidden from the table)."""
    table = {k: v for k, v in LORA_VARIANTS.items() if k != "use_bdlora"}
    monkeypatch.setattr(training, "LORA_VARIANTS", table)
    monkeypatch.setattr(training, "_VARIANT_FIELDS", frozenset(table) - training._VARIANT_INITS)
    assert lora_variant_of_config({"peft_type": "LORA", "use_bdlora": {"x": 1}}) == "use_bdlora"
    assert lora_variant_of_config({"peft_type": "LORA", "not_a_lora_field": 1}) is None
