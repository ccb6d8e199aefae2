"""The README's Python examples run (on the tiny Gemma-4, with a couple of prompts)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    blocks = _python_blocks()
    assert len(blocks) == 2, "the README's examples changed: update this test"
    code = "\n".join(blocks).replace('"smollm2"', '"tiny-gemma4"').replace("limit=32", "limit=2")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    summary = namespace["summary"]
    assert (summary.groups_total, summary.groups_run, summary.num_prompts) == (1, 1, 2)
    rows = namespace["rows"]
    assert rows.shape == (128, 64) and str(rows.dtype) == "torch.float32"
    assert set(namespace["importance"]) == {0, 1, 2, 3}
    assert namespace["U"].shape[1] == 16 and namespace["V"].shape[1] == 16
    assert (tmp_path / "fisher.pt").is_file() and (tmp_path / "masks" / "fisherstore.json").is_file()
    assert namespace["hooks"].projector.coverage.missing == {}
