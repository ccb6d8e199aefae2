"""A tiny random Gemma-4 and Fisher-like tensors, for the test-suite, the benchmarks and ``--model tiny-gemma4``.

The tiny Gemma-4 config mirrors what matters in gemma-4-31B-it: k and v are
shared in full-attention layers (``attention_k_eq_v=True``, so those layers
have no ``v_proj``) and full-attention layers have a larger head dim, so
tensor shapes differ from layer to layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..naming import DEFAULT_TARGETS, parse_name

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["fisher_like", "fisher_like_tensors", "tiny_gemma4_config", "tiny_gemma4_model"]


def tiny_gemma4_config(num_layers: int = 4, hidden: int = 64, vocab: int = 256) -> PretrainedConfig:
    """A random-init Gemma-4 text config, sliding and full attention alternating."""
    from transformers import Gemma4TextConfig

    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    # transformers' typed signature of Gemma4TextConfig omits global_head_dim, which the config takes
    return Gemma4TextConfig(  # type: ignore[call-arg]
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        attention_k_eq_v=True,
        layer_types=layer_types,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=vocab,
        max_position_embeddings=512,
        sliding_window=16,
    )


def tiny_gemma4_model(seed: int = 0, **config_kwargs: Any) -> torch.nn.Module:
    """A tiny random Gemma-4 causal LM (fp32, eval mode), deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_gemma4_config(**config_kwargs))
    return model.eval()


def fisher_like(
    shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Positive, heavy-tailed, nearly rank-1 values like a real diagonal Fisher.

    ``r_i * c_j * n_ij`` with log-normal row scales ``r`` (ln-sigma 0.6, ln-mean
    -14.85), column scales ``c`` (ln-sigma 1.45) and noise ``n`` (ln-sigma 0.35).

    Calibrated against the real sample in ``shared/data``
    (``smollm2_fisher_layers_0_15.safetensors``, 14 bf16 tensors), every figure
    size-weighted over tensors; synthetic figures for one gemma-like layer
    (q, o 5120x5120; k, v 1280x5120; gate, up 10240x5120; down 5120x10240; seed 0):

    ====================================  ========  =========
    bf16 property                           real    synthetic
    ====================================  ========  =========
    mean of log2 value                     -21.43     -21.44
    std of log2 value                        2.41       2.33
    entropy of the 8-bit exponent (bits)     3.24       3.28
    rank-1 energy (s1^2 / sum s^2)           0.89       0.89
    blosc-zstd-bitshuffle ratio (zarr)      1.457      1.458
    ====================================  ========  =========

    The last is a zarr store written by fisherstore with default chunking.
    Real per-tensor ranges: log2 std 2.0-2.35 for the mlp tensors (most of the
    bytes) and up to 4.7 for layer-0 q/k, rank-1 energy 0.56-0.999.

    Why these sigmas: in the real Fisher the ANOVA of log values gives row,
    column and residual ln-sigmas of about 0.9, 0.95 and 1.0, yet it is near
    rank 1 because one or two massive-activation input columns hold 90-98% of
    the energy.  Log-normal scales have no such outliers, so here the rank-1
    energy comes from low noise instead (it is about ``exp(-sigma_n**2)`` on
    large matrices) and the spread moves into the column scales.  Rows and
    columns are not interchangeable: compression depends on how the spread is
    split, because a row chunk whose values vary little within a row compresses
    better (swapping the row and column sigmas gives 1.55x, not 1.46x).  The
    old parameters (2.0, 2.0, 1.5, mean -8) gave log2 std 4.6, exponent entropy
    4.3 bits and 1.34x.  Values stay in about 2^-36..2^-6 even for 1e9
    elements: finite and > 0 in bf16 and fp32 (in fp16, as for real Fisher,
    many are subnormal or flush to zero).
    """
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    r = torch.exp(torch.randn(rows, 1, generator=generator) * 0.6 - 14.85)
    c = torch.exp(torch.randn(1, cols, generator=generator) * 1.45)
    noise = torch.exp(torch.randn(rows, cols, generator=generator) * 0.35)
    return (r * c * noise).reshape(shape).to(dtype)


def fisher_like_tensors(
    config: PretrainedConfig | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Fisher-like tensors for every default target weight of a (tiny Gemma-4) model, in model order."""
    import re

    from transformers import AutoModelForCausalLM

    config = config or tiny_gemma4_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    pattern = re.compile(DEFAULT_TARGETS)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if pattern.search(name) and parse_name(name)[0] is not None:
            out[name] = fisher_like(tuple(p.shape), g, dtype)
    return out
