"""Prompt sets: formats, the packaged default, validation messages, hashing, tokenization."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from tokenizers import processors

from fisherstore.errors import BadInputError
from fisherstore.models import tiny_tokenizer
from fisherstore.prompts import DEFAULT_PROMPTS, as_prompt_set, encode_prompts, load_prompts

# Three lines exactly as IFEval's input_data.jsonl lays them out (nulls in kwargs included).
IFEVAL_LINES = [
    {
        "key": 1000,
        "prompt": "Write a 300+ word summary of the wikipedia page. Do not use any commas.",
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
        "kwargs": [{}, {"relation": "at least", "num_words": 300}],
    },
    {
        "key": 1001,
        "prompt": "I am planning a trip to Japan, and I would like thee to write an itinerary.",
        "instruction_id_list": ["detectable_format:title"],
        "kwargs": [{"num_highlights": None}],
    },
    {
        "key": 1005,
        "prompt": "Write a resume for a fresh high school graduate who is seeking their first job.",
        "instruction_id_list": ["detectable_content:number_placeholders"],
        "kwargs": [{"num_placeholders": 12}],
    },
]


def user(text: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": text},)


def test_ifeval_layout_loads_without_preprocessing(tmp_path):
    path = tmp_path / "input_data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in IFEVAL_LINES))
    prompts = load_prompts(path)
    assert prompts.prompts == tuple(user(line["prompt"]) for line in IFEVAL_LINES)
    assert prompts.source == str(path)
    assert prompts.provenance()["num_prompts"] == 3


def test_default_set_is_200_distinct_ifeval_style_prompts():
    prompts = load_prompts()
    assert len(prompts) == 200 and prompts.source == DEFAULT_PROMPTS
    texts = [m[0]["content"] for m in prompts.prompts]
    assert len(set(texts)) == 200
    assert all(m[0]["role"] == "user" and len(m) == 1 for m in prompts.prompts)
    # The file keeps IFEval's layout, with instruction ids and kwargs that describe each prompt's constraints.
    from importlib import resources

    lines = [
        json.loads(x) for x in resources.files("fisherstore").joinpath("data/prompts.jsonl").read_text().splitlines()
    ]
    kinds = Counter(i.split(":")[0] for line in lines for i in line["instruction_id_list"])
    assert set(kinds) >= {
        "punctuation",
        "length_constraints",
        "change_case",
        "detectable_format",
        "keywords",
        "detectable_content",
        "startend",
        "combination",
        "language",
    }
    assert all(len(line["instruction_id_list"]) == len(line["kwargs"]) >= 1 for line in lines)
    assert len({i for line in lines for i in line["instruction_id_list"]}) >= 20
    assert load_prompts(limit=5).prompts == prompts.prompts[:5]


def test_chat_messages_and_plain_text(tmp_path):
    chat = tmp_path / "chat.jsonl"
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    chat.write_text(json.dumps({"messages": convo, "id": 7}) + "\n\n" + json.dumps({"prompt": "Hi"}) + "\n")
    assert load_prompts(chat).prompts == (tuple(convo), user("Hi"))
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\r\n\n   \nsecond, with {braces}\n")
    assert load_prompts(text).prompts == (user("first prompt"), user("second, with {braces}"))


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        ('{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": oops}\n', 3, "not valid JSON"),
        ('{"prompt": "ok"}\n{"text": "no field"}\n', 2, "no 'prompt' or 'messages' field"),
        ('{"prompt": ""}\n', 1, "non-empty string"),
        ('{"prompt": 5}\n', 1, "non-empty string"),
        ('["a list"]\n', 1, "expected an object"),
        ('{"messages": []}\n', 1, "non-empty list"),
        ('{"messages": [{"role": "user"}]}\n', 1, "message 0"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, line, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(BadInputError) as err:
        load_prompts(path)
    assert f"{path}:{line}:" in str(err.value) and fragment in str(err.value)


def test_bad_files(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(BadInputError, match=r"latin1\.txt:2: not UTF-8"):
        load_prompts(latin1)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(BadInputError, match="holds no prompts"):
        load_prompts(empty)
    with pytest.raises(BadInputError, match="missing.jsonl: cannot read"):
        load_prompts(tmp_path / "missing.jsonl")


def test_head_and_hash(tmp_path, caplog):
    path = tmp_path / "p.txt"
    path.write_text("a b\nc d\n")
    prompts = load_prompts(path)
    with caplog.at_level(logging.WARNING):
        assert len(prompts.head(10)) == 2
    assert "fewer than the 10 asked for" in caplog.text
    with pytest.raises(BadInputError, match=">= 1"):
        prompts.head(0)
    same = load_prompts(path).sha256
    path.write_text("a b\nc e\n")
    assert same == prompts.sha256 != load_prompts(path).sha256
    assert prompts.sha256.startswith("sha256:")


def test_in_memory_prompts():
    prompts = as_prompt_set(["one", [{"role": "user", "content": "two"}]])
    assert prompts.prompts == (user("one"), user("two")) and prompts.source == "in-memory"
    assert as_prompt_set(prompts) is prompts
    assert as_prompt_set(["one", "two"]).sha256 != as_prompt_set(["one", "three"]).sha256
    with pytest.raises(BadInputError, match="no prompts"):
        as_prompt_set([])


def test_encode_applies_chat_template_and_truncates():
    tok = tiny_tokenizer()
    prompts = as_prompt_set(["Hello", "x" * 100])
    ids = encode_prompts(tok, prompts, max_length=20)
    assert tok.decode(ids[0][0]) == "<bos><start_of_turn>user\nHello<end_of_turn>\n"
    assert ids[1].shape == (1, 20) and ids[0].dtype.is_floating_point is False
    raw = encode_prompts(tok, prompts, max_length=20, chat_template=False)
    assert tok.decode(raw[0][0]) == "<bos>Hello"


def test_encode_errors():
    tok = tiny_tokenizer()
    convo = as_prompt_set([[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]])
    with pytest.raises(BadInputError, match="conversations need the chat template"):
        encode_prompts(tok, convo, max_length=16, chat_template=False)
    no_bos = tiny_tokenizer()
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    with pytest.raises(BadInputError, match="prompt 1 has 1 token"):
        encode_prompts(no_bos, as_prompt_set(["ab", "a"]), max_length=16, chat_template=False)
    with pytest.raises(BadInputError, match="max_length must be >= 2"):
        encode_prompts(tok, convo, max_length=1)
    tok.chat_template = None
    with pytest.raises(BadInputError, match="no chat template; pass chat_template=False"):
        encode_prompts(tok, convo, max_length=16)


def test_dataset_files_need_datasets(tmp_path):
    path = tmp_path / "p.parquet"
    try:
        import datasets
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(BadInputError, match="needs the datasets package"):
            load_prompts(path)
        return
    data = datasets.Dataset.from_dict({"prompt": ["a b", "c d"], "key": [1, 2]})
    data.to_parquet(str(path))
    data.save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(path).prompts == load_prompts(tmp_path / "saved").prompts == (user("a b"), user("c d"))
