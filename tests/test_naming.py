import pytest

from fisherstore.errors import BadInputError
from fisherstore.naming import canonical_name, parse_name, target_regex, validate_name

PARSE_CASES = [
    ("model.layers.3.self_attn.q_proj.weight", (3, "q")),
    ("model.layers.12.mlp.down_proj.weight", (12, "down")),
    ("model.language_model.layers.59.self_attn.o_proj.weight", (59, "o")),
    ("model.layers.0.input_layernorm.weight", (0, "other")),
    ("model.embed_tokens.weight", (None, "other")),
    ("lm_head.weight", (None, "other")),
    ("model.layers.7.self_attn.k_proj.weight.U", (7, "k")),
]


@pytest.mark.parametrize("name,expected", PARSE_CASES)
def test_parse_name(name, expected):
    assert parse_name(name) == expected


@pytest.mark.parametrize(
    "bad", ["../../x", "/etc/passwd", "a/b", "", ".hidden", "a..b", "x\x00y", "a b", "a.", "é", 3, None, "x" * 600]
)
def test_validate_name_rejects_unsafe(bad):
    with pytest.raises(BadInputError, match="tensor name"):
        validate_name(bad)


def test_validate_name_accepts_model_names():
    assert validate_name("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    "wrapped,canonical",
    [
        ("base_model.model.model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.weight"),
        ("base_model.model.model.layers.2.mlp.up_proj.base_layer", "model.layers.2.mlp.up_proj.weight"),
        ("model.layers.2.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight"),
    ],
)
def test_canonical_name(wrapped, canonical):
    assert canonical_name(wrapped) == canonical


def test_target_regex_kinds_and_default():
    default = target_regex(None)
    assert default.search("model.layers.1.self_attn.v_proj.weight")
    assert not default.search("model.layers.1.input_layernorm.weight")
    qk = target_regex("q,k")
    assert qk.search("model.layers.1.self_attn.k_proj.weight")
    assert not qk.search("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(BadInputError, match="neither"):
        target_regex("([")
