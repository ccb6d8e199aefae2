import json
import re

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


def _second_group(d, **group):
    d["groups"].append({"index": 1, "layers": [1], "complete": False, "tensors": [], **group})


def _planned_twice(d):
    _second_group(d, tensors=[dict(d["groups"][0]["tensors"][0])])


def _unplanned_tensor(d):
    d["groups"][0]["tensors"] = []
    d["groups"][0]["complete"] = False


def _plan_disagrees(d):
    d["groups"][0]["tensors"][0]["shape"] = [8, 4]


def _complete_but_missing(d):
    d["tensors"] = {}


def _indices_out_of_order(d):
    _second_group(d)
    d["groups"].reverse()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: d.update(kind="weights"), "kind must be one of fisher, masks, got 'weights'"),
        (lambda d: d.update(created=17), "created must be an ISO-8601 string, got 17"),
        (lambda d: d.update(complete="yes"), "complete must be true or false, got 'yes'"),
        (lambda d: d["groups"][0].update(complete=1), "complete must be true or false, got 1"),
        (lambda d: d["groups"][0].update(index=1), "groups: indices must be 0..N-1 in order, got [1]"),
        (_indices_out_of_order, "groups: indices must be 0..N-1 in order, got [1, 0]"),
        (_planned_twice, "groups: tensor 'model.layers.0.self_attn.q_proj.weight' is planned in group 0 and 1"),
        (_unplanned_tensor, "tensors: 'model.layers.0.self_attn.q_proj.weight' names group 0, whose plan does not"),
        (_plan_disagrees, "tensors: 'model.layers.0.self_attn.q_proj.weight' is [4, 8] bfloat16, its group's plan"),
        (_complete_but_missing, "groups: group 0 is complete but tensors has no entry for 'model.layers.0"),
        (lambda d: d["tensors"]["model.layers.0.self_attn.q_proj.weight"].update(checksum="crc32c:xyz"), "crc32c"),
        (lambda d: d["groups"][0]["tensors"][0].update(shape=[4, 8.0]), "shape must be a list of non-negative"),
        (lambda d: d["groups"][0]["tensors"][0].update(dtype="int4"), "unknown dtype 'int4'"),
    ],
)
def test_from_dict_enforces_the_format_musts(corrupt, message):
    d = _manifest_dict()
    corrupt(d)
    with pytest.raises(CorruptDataError, match=re.escape(message)):
        Manifest.from_dict(d)


def test_from_dict_accepts_a_partial_store():
    d = _manifest_dict()
    _second_group(d, tensors=[{"name": "model.layers.1.self_attn.q_proj.weight", "shape": [2], "dtype": "float32"}])
    m = Manifest.from_dict(d)
    assert (m.complete, m.missing_groups, list(m.tensors)) == (False, [1], ["model.layers.0.self_attn.q_proj.weight"])
