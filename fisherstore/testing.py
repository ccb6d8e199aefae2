"""Fixtures shared by the test-suite, the benchmarks and ``--model tiny-gemma4``.

The tiny Gemma-4 config mirrors what matters in gemma-4-31B-it: k and v are
shared in full-attention layers (``attention_k_eq_v=True``, so those layers
have no ``v_proj``) and full-attention layers have a larger head dim, so
tensor shapes differ from layer to layer.
"""

from __future__ import annotations

import math

import torch

from .naming import DEFAULT_TARGETS, parse_name

__all__ = ["tiny_gemma4_config", "tiny_gemma4_model", "fisher_like_tensors", "fisher_like"]


def tiny_gemma4_config(num_layers: int = 4, hidden: int = 64, vocab: int = 256):
    """A random-init Gemma-4 text config, sliding and full attention alternating."""
    from transformers import Gemma4TextConfig

    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    return Gemma4TextConfig(
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


def tiny_gemma4_model(seed: int = 0, **config_kwargs):
    """A tiny random Gemma-4 causal LM (fp32, eval mode), deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_gemma4_config(**config_kwargs))
    return model.eval()


def fisher_like(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Non-negative, heavy-tailed, nearly rank-1 values like a real diagonal Fisher.

    Real Fisher tensors span ~20 decades and their top singular value holds
    most of the energy: an outer product of log-normal row and column scales
    times log-normal noise reproduces both.
    """
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    r = torch.exp(torch.randn(rows, 1, generator=generator) * 2.0 - 8.0)
    c = torch.exp(torch.randn(1, cols, generator=generator) * 2.0)
    noise = torch.exp(torch.randn(rows, cols, generator=generator) * 1.5)
    return (r * c * noise).reshape(shape).to(dtype)


def fisher_like_tensors(config=None, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
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
