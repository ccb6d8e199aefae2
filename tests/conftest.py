"""Shared fixtures: Fisher-like tensors shaped like a tiny Gemma-4, stores built from them, the CLI."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fisherstore.cli.main import main as cli_main
from fisherstore.testing import assert_same_tensors, fisher_like_tensors, tiny_gemma4_config, write_store

__all__ = ["SHARED_SAMPLE", "assert_same_tensors", "tree_digest", "write_store"]

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "smollm2_fisher_layers_0_15.safetensors"


@pytest.fixture(scope="session")
def gemma_config():
    return tiny_gemma4_config()


@pytest.fixture(scope="session", params=["bfloat16", "float32"])
def gemma_tensors(request, gemma_config) -> dict[str, torch.Tensor]:
    """Fisher-like tensors for every target of the tiny Gemma-4 (layers 1 and 3 have no v_proj)."""
    return fisher_like_tensors(gemma_config, dtype=getattr(torch, request.param))


@pytest.fixture(scope="session")
def gemma_bf16(gemma_config) -> dict[str, torch.Tensor]:
    return fisher_like_tensors(gemma_config, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    The tiny model's kernels are small: one thread is faster and immune to a busy machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Gemma-4 (model, tokenizer, provenance), loaded once per module."""
    from fisherstore.models import TINY_GEMMA4, load_model

    return load_model(TINY_GEMMA4)


@pytest.fixture(scope="module")
def prompts():
    """The first three bundled prompts."""
    from fisherstore.prompts import load_prompts

    return load_prompts(limit=3)


@pytest.fixture
def make_store(tmp_path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(tensors, backend="safetensors", group_size=2, **options):
        return write_store(
            tmp_path / f"store{next(counter)}", tensors, backend=backend, group_size=group_size, **options
        )

    return make


@pytest.fixture
def cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """Run the CLI in-process: ``code, out, err = cli("info", path)``, argparse's exits (``--help``, usage) included."""

    def run(*args) -> tuple[int, str, str]:
        try:
            code = cli_main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's --help and usage errors: keep what it printed
            code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def tree_digest(path: Path) -> str:
    """A digest of every file name and byte under ``path`` (to prove a source is unchanged)."""
    h = hashlib.sha256()
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in paths:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def s3():
    """A real S3 server (moto on loopback behind a request-counting proxy), one per test module."""
    from fisherstore.testing.s3 import S3Server

    with S3Server() as server:
        yield server
