import json
import os
import subprocess
import sys

import pytest
import torch

from fisherstore import open_store

from .conftest import SHARED_SAMPLE, assert_same_tensors, write_store


def test_console_script_runs_and_teaches():
    out = subprocess.run(
        [sys.executable, "-m", "fisherstore.cli.main", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("info", "convert", "verify", "importance"):
        assert cmd in out
    assert "typical session" in out


def test_info_text_and_json(cli, make_store, gemma_bf16):
    path = make_store(gemma_bf16)
    code, out, _ = cli("info", path)
    assert code == 0 and "26" in out and "complete" in out and "(0..3)" in out
    code, out, _ = cli("info", path, "--json", "--tensors")
    doc = json.loads(out)
    assert doc["tensors"] == 26 and doc["complete"] is True and doc["dtypes"] == {"bfloat16": 26}
    assert doc["kinds"]["v"] == 2  # layers 1 and 3 are full attention: no v_proj
    assert len(doc["tensor_list"]) == 26


def test_verify_ok_then_corrupt_names_the_tensor(cli, make_store, gemma_bf16):
    path = make_store(gemma_bf16)
    code, out, _ = cli("verify", path)
    assert code == 0 and "OK" in out
    info = open_store(path).info("model.layers.2.mlp.gate_proj.weight")
    shard = path / info.location["file"]
    data = bytearray(shard.read_bytes())
    data[info.location["offsets"][0] + 7] ^= 0x40
    shard.write_bytes(data)
    code, _, err = cli("verify", path)
    assert code == 1
    assert "model.layers.2.mlp.gate_proj.weight: checksum mismatch" in err
    assert err.count("BAD ") == 1


def test_verify_reports_incomplete(cli, tmp_path, gemma_bf16):
    write_store(tmp_path / "s", gemma_bf16, groups=[0])  # group 1 never written
    code, _, err = cli("verify", tmp_path / "s")
    assert code == 1 and "incomplete: groups [1]" in err
    code, out, _ = cli("info", tmp_path / "s")
    assert "INCOMPLETE (1 of 2 groups written)" in out


def test_importance_writes_document(cli, tmp_path):
    out_file = tmp_path / "imp.json"
    code, out, _ = cli("importance", SHARED_SAMPLE, "-o", out_file)
    assert code == 0 and "wrote" in out
    doc = json.loads(out_file.read_text())
    assert list(doc["layers"]) == ["0", "15"] and doc["vector"][0] > doc["vector"][1]
    assert set(doc["by_kind"]["0"]) == {"q", "k", "v", "o", "gate", "up", "down"}


def test_bad_input_is_one_line_exit_2(cli, tmp_path):
    code, out, err = cli("info", tmp_path / "nope")
    assert code == 2 and err.startswith("fisherstore: error:") and err.count("\n") == 1
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(100))
    code, _, err = cli("info", junk)
    assert code == 2 and "not a fisherstore store" in err


def test_convert_refuses_existing_destination(cli, make_store, gemma_bf16, tmp_path):
    src = make_store(gemma_bf16)
    (tmp_path / "taken").mkdir()
    code, _, err = cli("convert", src, tmp_path / "taken")
    assert code == 2 and "already exists" in err
    code, _, err = cli("convert", src, tmp_path / "x", "--compression", "zstd")
    assert code == 2 and "zarr targets only" in err


def test_usage_error_exit_2(cli):
    code, _, err = cli("convert")
    assert code == 2 and "usage:" in err


def test_info_on_a_mask_store_prints_the_energy_table(cli, tmp_path):
    from fisherstore.masks import write_masks

    g = torch.Generator().manual_seed(0)
    masks = {}
    for name, (m, n) in {
        "model.layers.0.self_attn.q_proj.weight": (8, 6),
        "model.layers.1.mlp.up_proj.weight": (10, 4),
    }.items():
        u, _ = torch.linalg.qr(torch.randn(m, 3, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, 3, generator=g))
        masks[name] = (u, torch.tensor([3.0, 2.0, 1.0]), v)
    write_masks(tmp_path / "m", masks)
    code, out, _ = cli("info", tmp_path / "m")
    assert code == 0 and "masks safetensors, complete" in out
    assert "model.layers.1.mlp.up_proj.weight" in out and "10x4" in out
    code, out, _ = cli("info", tmp_path / "m", "--json")
    rows = json.loads(out)["masks"]
    assert [r["shape"] for r in rows] == [[8, 6], [10, 4]] and all(r["rank"] == 3 for r in rows)


def test_public_functions_are_not_shadowed_by_submodules():
    """``fisherstore.convert`` etc. stay the functions even after the CLI imported their modules."""
    import importlib

    import fisherstore

    for module in ("conversion", "verification", "extraction", "store", "svd", "masks", "training", "summary"):
        importlib.import_module(f"fisherstore.{module}")
    for name in ("convert", "verify", "extract", "open_store", "svd_store", "open_masks", "attach_training", "info"):
        assert callable(getattr(fisherstore, name)) and not isinstance(getattr(fisherstore, name), type(fisherstore)), (
            name
        )


def test_convert_takes_out_and_still_the_positional_destination(cli, make_store, gemma_bf16, tmp_path):
    src = make_store(gemma_bf16)
    code, out, _ = cli("convert", src, "-o", tmp_path / "a.zarr")
    assert (code, out) == (0, f"wrote {tmp_path / 'a.zarr'} (zarr)\n")
    code, out, _ = cli("convert", src, tmp_path / "b", "--to", "zarr")  # the old spelling
    assert (code, out) == (0, f"wrote {tmp_path / 'b'} (zarr)\n")
    for path in (tmp_path / "a.zarr", tmp_path / "b"):
        with open_store(path) as store:
            assert_same_tensors(store, gemma_bf16)
    code, _, err = cli("convert", src, tmp_path / "c", "-o", tmp_path / "d")
    assert code == 2 and err.count("\n") == 1 and "give the destination once: -o/--out DST" in err
    code, _, err = cli("convert", src)
    assert code == 2 and err == "fisherstore: error: no destination: give -o/--out DST\n"
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("option", [("--buffer-size", "1KiB"), ("--buffer-size", "1000"), ("--buffer-mb", "1")])
def test_convert_buffer_size_and_its_old_spelling(cli, make_store, gemma_bf16, tmp_path, option):
    src = make_store(gemma_bf16)
    code, _, _ = cli("convert", src, "-o", tmp_path / "z.zarr", *option)
    assert code == 0
    with open_store(tmp_path / "z.zarr") as store:
        assert_same_tensors(store, gemma_bf16)


def test_api_error_names_the_parameter_and_the_cli_the_flag(cli, make_store, gemma_bf16, tmp_path):
    from fisherstore import convert
    from fisherstore.errors import BadInputError

    src = make_store(gemma_bf16)
    (tmp_path / "taken").mkdir()
    with pytest.raises(BadInputError, match=r"already exists; choose a new path or pass overwrite=True$") as exc:
        convert(src, tmp_path / "taken")
    assert exc.value.param == "overwrite"
    code, _, err = cli("convert", src, "-o", tmp_path / "taken")
    assert code == 2
    assert err == f"fisherstore: error: {tmp_path / 'taken'} already exists; choose a new path or pass --overwrite\n"
    with pytest.raises(BadInputError, match=r"^buffer_bytes must be a positive integer, got 0$") as exc:
        convert(src, tmp_path / "new", buffer_bytes=0)
    assert exc.value.param == "buffer_bytes"
    code, _, err = cli("convert", src, "-o", tmp_path / "new", "--buffer-mb", "0")  # the alias: named by its new flag
    assert (code, err) == (2, "fisherstore: error: --buffer-size must be a positive integer, got 0\n")


HELP_OUT = [  # (command, the metavar of -o/--out, the old spellings hidden from --help)
    ("convert", "DST", ("--buffer-mb",)),
    ("importance", "FILE", ("--output",)),
    ("svd", "MASKS", ()),
    ("plot", "FILE", ()),
    ("blend", "DIR", ()),
]


@pytest.mark.parametrize("command,metavar,hidden", HELP_OUT, ids=[c for c, _, _ in HELP_OUT])
def test_help_documents_out_and_hides_old_spellings(cli, command, metavar, hidden):
    code, text, _ = cli(command, "--help")
    assert code == 0
    assert f"-o {metavar}, --out {metavar}" in " ".join(text.split())
    examples = text.split("examples:")[1]
    lines = [line for line in examples.splitlines() if line.strip().startswith("fisherstore " + command)]
    assert lines and all("--out" not in line for line in lines)
    assert any(" -o " in line for line in lines)
    for flag in hidden:
        assert flag not in text


def test_svd_writes_a_compressed_zarr_mask_store(cli, make_store, gemma_bf16, tmp_path):
    src = make_store(gemma_bf16)
    args = ("svd", src, "--rank", 2, "--tensors", "layers.0.")
    code, out, _ = cli(*args, "-o", tmp_path / "m.zarr", "--backend", "zarr", "--compression", "zstd", "--level", 5)
    assert code == 0 and f"wrote {tmp_path / 'm.zarr'}: masks of" in out
    assert cli(*args, "-o", tmp_path / "m")[0] == 0
    code, out, _ = cli("info", tmp_path / "m.zarr", "--json")
    doc = json.loads(out)
    assert (doc["kind"], doc["format"]) == ("masks", "zarr")
    assert (doc["backend_options"]["compression"], doc["backend_options"]["level"]) == ("zstd", 5)
    code, out, _ = cli("info", tmp_path / "m.zarr")
    assert code == 0 and "'compression': 'zstd'" in out
    from fisherstore import open_masks

    with open_masks(tmp_path / "m.zarr") as z, open_masks(tmp_path / "m") as st:
        assert z.names == st.names and len(z.names) == 7
        for name in st.names:
            for a, b in zip(z.get(name), st.get(name)):
                assert torch.equal(a, b)
    code, _, err = cli(*args, "-o", tmp_path / "m2", "--compression", "zstd")
    assert code == 2 and "--compression applies to zarr targets only (target is safetensors)" in err


@pytest.mark.parametrize(
    ("command", "message", "param", "expected"),
    [
        ("svd", "rank must be an integer >= 1, got 0", "rank", "--rank must be an integer >= 1, got 0"),
        ("svd", "max_memory=5 is below one row", "max_memory", "--max-memory 5 is below one row"),
        ("svd", "out/ exists: pass overwrite=True to replace it", None, "out/ exists: pass --overwrite to replace it"),
        ("extract", "chat_template=False: pass it", None, "--no-chat-template: pass it"),
        ("extract", "targets='(' is no regex", "targets", "--targets '(' is no regex"),
        # a parameter the command has no flag for, and a word that only contains the parameter's name
        ("svd", "workers_total must be 1", "workers_total", "workers_total must be 1"),
        ("svd", "the ranks differ", "rank", "the ranks differ"),
        # a path holding the parameter's name stays the path
        ("svd", "out/out exists: pass overwrite=True", "out", "out/out exists: pass --overwrite"),
        (
            "convert",
            "dst=runs/dst/x must not lie inside the source",
            "dst",
            "--out runs/dst/x must not lie inside the source",
        ),
        # convert's hidden alias --buffer-mb is never named; the visible flag is
        ("convert", "buffer_bytes must be positive", "buffer_bytes", "--buffer-size must be positive"),
    ],
)
def test_library_words_become_the_commands_flags(command, message, param, expected):
    from fisherstore.cli.main import build_parser, command_parser, in_cli_words

    parser = command_parser(build_parser(command), command)
    assert in_cli_words(message, param, parser) == expected
