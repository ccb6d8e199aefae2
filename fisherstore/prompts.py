"""Prompt sets for Fisher extraction: loading, validating, hashing, tokenizing.

A prompt is a chat conversation (a tuple of ``{"role", "content"}`` messages);
a bare prompt string becomes one user turn.  Accepted files:

* JSON lines (``.jsonl``, ``.ndjson``, ``.json``), one object per line with a
  ``prompt`` string (IFEval's ``input_data.jsonl`` layout; other fields such as
  ``key``, ``instruction_id_list`` and ``kwargs`` are ignored) or a chat
  ``messages`` list;
* plain text, one prompt per non-blank line;
* a ``.parquet`` file or a ``datasets.save_to_disk`` folder with a ``prompt``
  or ``messages`` column, when the ``datasets`` package is installed.

Without a file, the 200 IFEval-style prompts shipped in
``fisherstore/data/prompts.jsonl`` are used.  Every problem is a
:class:`~fisherstore.errors.BadInputError` naming the file and line (or row).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .digests import sha256_of, sha256_tag
from .errors import BadInputError

__all__ = ["DEFAULT_PROMPTS", "Messages", "PromptSet", "as_prompt_set", "encode_prompts", "load_prompts"]

log = logging.getLogger(__name__)

#: One conversation: ``({"role": ..., "content": ...}, ...)``.
Messages = tuple[dict[str, str], ...]

#: Name under which the packaged default prompt set is recorded in provenance.
DEFAULT_PROMPTS = "fisherstore:data/prompts.jsonl"

_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}


@dataclass(frozen=True)
class PromptSet:
    """Validated prompts plus where they came from (for the store's provenance)."""

    prompts: tuple[Messages, ...]
    source: str
    sha256: str

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int) -> PromptSet:
        """The first ``n`` prompts (all of them, with a warning, when there are fewer)."""
        if n < 1:
            raise BadInputError(f"number of prompts (limit) must be >= 1, got {n}", param="limit")
        if n > len(self.prompts):
            log.warning(
                "%s holds %d prompts, fewer than the %d asked for; using all of them", self.source, len(self.prompts), n
            )
        return PromptSet(self.prompts[:n], self.source, self.sha256)

    def provenance(self) -> dict[str, Any]:
        """``prompts`` (source), ``prompts_sha256`` (of the file) and ``num_prompts``."""
        return {"prompts": self.source, "prompts_sha256": self.sha256, "num_prompts": len(self.prompts)}


def load_prompts(path: str | os.PathLike[str] | None = None, limit: int | None = None) -> PromptSet:
    """Load prompts from ``path`` (see the module docstring), or the packaged default set.

    ``limit`` keeps only the first prompts.  Raises :class:`BadInputError` naming
    the file and line of the first bad entry.

    Args:
        path: a JSON-lines, text or parquet file or a datasets folder; ``None`` for the packaged prompts.
        limit: keep only the first ``limit`` prompts (>= 1).

    Returns:
        The prompts with their source and content digest.
    """
    if path is None:
        raw = resources.files("fisherstore").joinpath("data/prompts.jsonl").read_bytes()
        prompts = PromptSet(tuple(_parse_jsonl(raw, DEFAULT_PROMPTS)), DEFAULT_PROMPTS, sha256_of(raw))
    else:
        p = Path(path)
        if p.is_dir() or p.suffix.lower() == ".parquet":
            prompts = PromptSet(tuple(_parse_dataset(p)), str(p), _sha256_tree(p))
        else:
            try:
                raw = p.read_bytes()
            except OSError as exc:
                raise BadInputError(f"{p}: cannot read the prompt file ({exc.strerror})") from None
            parse = _parse_jsonl if p.suffix.lower() in _JSONL_SUFFIXES else _parse_text
            prompts = PromptSet(tuple(parse(raw, str(p))), str(p), sha256_of(raw))
        if not prompts.prompts:
            raise BadInputError(f"{p}: holds no prompts")
    return prompts if limit is None else prompts.head(limit)


def as_prompt_set(prompts: PromptSet | Sequence[str | Sequence[dict[str, str]]]) -> PromptSet:
    """A :class:`PromptSet` from an existing one or a list of strings / message lists."""
    if isinstance(prompts, PromptSet):
        return prompts
    items = tuple(
        _messages({"prompt": p} if isinstance(p, str) else {"messages": p}, f"prompt {i}")
        for i, p in enumerate(prompts)
    )
    if not items:
        raise BadInputError("no prompts given")
    canonical = json.dumps(items, sort_keys=True).encode()
    return PromptSet(items, "in-memory", sha256_of(canonical))


def encode_prompts(
    tokenizer: Any, prompts: PromptSet, *, max_length: int, chat_template: bool = True
) -> list[torch.Tensor]:
    """Token ids ``(1, length)`` of each prompt, templated as a chat and truncated to ``max_length``.

    With ``chat_template`` the tokenizer's chat template renders the
    conversation (no generation prompt: the loss covers exactly the prompt's
    turns) and the text is tokenized without adding special tokens again,
    since templates emit their own BOS.  Without it, a single user turn is
    tokenized as raw text with the tokenizer's special tokens.
    """
    if max_length < 2:
        raise BadInputError(
            f"max_length must be >= 2 (a next-token loss needs two tokens), got {max_length}", param="max_length"
        )
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise BadInputError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "pass chat_template=False to use the prompts as raw text",
            param="chat_template",
        )
    out = []
    for i, messages in enumerate(prompts.prompts):
        if chat_template:
            text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            if len(messages) != 1 or messages[0]["role"] != "user":
                raise BadInputError(
                    f"{prompts.source}: prompt {i} is a {len(messages)}-message conversation; "
                    "conversations need the chat template (do not pass chat_template=False)",
                    param="chat_template",
                )
            ids = tokenizer(messages[0]["content"])["input_ids"]
        ids = ids[:max_length]
        if len(ids) < 2:
            raise BadInputError(
                f"{prompts.source}: prompt {i} has {len(ids)} token(s); a next-token loss needs at least 2"
            )
        out.append(torch.tensor([ids], dtype=torch.long))
    return out


# -- parsing -----------------------------------------------------------------------------------


def _sha256_tree(path: Path) -> str:
    if not path.exists():
        raise BadInputError(f"{path}: no such prompt file or folder")
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(f.read_bytes())
    return sha256_tag(h)


def _lines(raw: bytes, where: str) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; a line that is not UTF-8 is an error."""
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise BadInputError(f"{where}:{number}: not UTF-8 text") from None
        if text.strip():
            yield number, text


def _parse_text(raw: bytes, where: str) -> Iterable[Messages]:
    return [({"role": "user", "content": text},) for _, text in _lines(raw, where)]


def _parse_jsonl(raw: bytes, where: str) -> Iterable[Messages]:
    out = []
    for number, text in _lines(raw, where):
        loc = f"{where}:{number}"
        try:
            obj = json.loads(text)
        except RecursionError:  # arrays nested some thousand deep
            raise BadInputError(f"{loc}: not valid JSON (nested too deeply)") from None
        except ValueError as exc:  # JSONDecodeError, or an integer of over 4300 digits
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else " ".join(str(exc).split())
            raise BadInputError(
                f"{loc}: not valid JSON ({reason}); JSON lines files hold one object per line"
            ) from None
        out.append(_messages(obj, loc))
    return out


def _parse_dataset(path: Path) -> Iterable[Messages]:
    try:
        import datasets
    except ImportError:
        raise BadInputError(
            f"{path}: reading parquet files and dataset folders needs the datasets package (pip install datasets)"
        ) from None
    if not path.exists():
        raise BadInputError(f"{path}: no such prompt file or folder")
    try:
        data = datasets.Dataset.from_parquet(str(path)) if path.is_file() else datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: cannot read it as a dataset ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        raise BadInputError(f"{path}: is a DatasetDict with splits {sorted(data)}; save one split and pass its folder")
    return [_messages(row, f"{path} row {i}") for i, row in enumerate(data)]


def _messages(obj: Any, loc: str) -> Messages:
    """The conversation of one entry: its ``prompt`` string or its ``messages`` list."""
    if not isinstance(obj, dict):
        raise BadInputError(f"{loc}: expected an object with a 'prompt' or 'messages' field, got {type(obj).__name__}")
    if obj.get("prompt") is not None:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadInputError(f"{loc}: 'prompt' must be a non-empty string, got {prompt!r:.60}")
        return ({"role": "user", "content": prompt},)
    messages = obj.get("messages")
    if messages is None:
        raise BadInputError(f"{loc}: no 'prompt' or 'messages' field (fields: {sorted(obj)})")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadInputError(f"{loc}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for j, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not m["role"]
            or not isinstance(m.get("content"), str)
        ):
            raise BadInputError(f"{loc}: message {j} must be an object with string 'role' and 'content', got {m!r:.60}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)
