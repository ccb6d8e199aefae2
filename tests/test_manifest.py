import json

import pytest

from fisherstore.errors import CorruptDataError
from fisherstore.manifest import Manifest, TensorSpec


def _manifest_dict(**tensor_overrides):
    tensor = {
        "shape": [4, 8],
        "dtype": "bfloat16",
        "group": 0,
        "location": {"file": "fisher-00001-of-00001.safetensors", "offsets": [0, 64]},
        "checksum": "crc32c:00000000",
        "sum": 1.5,
    }
    tensor.update(tensor_overrides)
    name = tensor.pop("_name", "model.layers.0.self_attn.q_proj.weight")
    return {
        "format": "fisherstore",
        "version": 1,
        "backend": "safetensors",
        "groups": [
            {
                "index": 0,
                "layers": [0],
                "complete": True,
                "tensors": [{"name": name, "shape": [4, 8], "dtype": "bfloat16"}],
            }
        ],
        "tensors": {name: tensor},
    }


def test_round_trip():
    m = Manifest.from_dict(_manifest_dict())
    again = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m
    info = m.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert (info.layer, info.kind, info.nbytes, m.complete) == (0, "q", 64, True)


@pytest.mark.parametrize(
    "override,message",
    [
        ({"shape": [4, -1]}, "shape"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
        ({"group": 3}, "group 3"),
        ({"checksum": "md5:x"}, "crc32c"),
        ({"sum": "big"}, "sum must be a number"),
        ({"_name": "../../x"}, "unsafe tensor name '../../x'"),
        ({"location": "here"}, "location"),
    ],
)
def test_bad_fields_are_quoted(override, message):
    with pytest.raises(CorruptDataError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Manifest.from_dict(_manifest_dict(**override))


@pytest.mark.parametrize("top", [{"format": "other"}, {"version": 99}, {"groups": {}}])
def test_bad_top_level(top):
    d = _manifest_dict()
    d.update(top)
    with pytest.raises(CorruptDataError):
        Manifest.from_dict(d)


def test_load_rejects_non_json(tmp_path):
    p = tmp_path / "fisherstore.json"
    p.write_bytes(b"\xff\x00not json")
    with pytest.raises(CorruptDataError, match="not valid JSON"):
        Manifest.load(p)


def test_spec_nbytes():
    assert TensorSpec("a", (3, 5), "float32").nbytes == 60
