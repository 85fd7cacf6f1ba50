"""Tiny random HF checkpoints for tests (any engineer's), built with `transformers`.

The checkpoints are written by `save_pretrained`, i.e. by the reference
implementation itself, so loading them tests our reading of the HF format and
not a copy of our own writer.  Biases and norm weights are randomised: HF
initialises them to 0 and 1 (Gemma's (1 + w) norms to 0), which would hide a
dropped bias or scale.

`FAMILIES` are the ones the shared fixtures in tests/model/conftest.py run
every test on; `ALL_FAMILIES` adds Mistral and Gemma 2/3, whose tiny configs
(`hf_config`) have a sliding window of 48 tokens (shorter than the tests'
~600-token prompts), Gemma 2 soft-caps small enough to change the result, and
Gemma 3 local layers with their own RoPE base next to linear-scaled global ones.

torch is imported lazily: it is a test dependency, not a runtime one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FAMILIES = ("qwen2", "qwen3", "llama")
ALL_FAMILIES = FAMILIES + ("mistral", "gemma2", "gemma3_text")
GEMMA = ("gemma2", "gemma3_text")
TINY_WINDOW = 48

_COMMON: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-6,
    max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    initializer_range=0.1,
)
_FAMILY: dict[str, dict[str, Any]] = {
    "qwen2": dict(rope_theta=10_000.0, tie_word_embeddings=True),
    "qwen3": dict(head_dim=24, rope_theta=1_000_000.0, tie_word_embeddings=False),
    "llama": dict(rope_theta=500_000.0, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Mistral: explicit head_dim != hidden/heads, a window on every layer.
    "mistral": dict(head_dim=24, rope_theta=1_000_000.0, tie_word_embeddings=False, sliding_window=TINY_WINDOW),
    # Gemma 2: local/global alternating (HF's default layer_types), scale from query_pre_attn_scalar
    # (!= head_dim), biases on q/k/v/o, soft-caps that bite at these magnitudes.
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=TINY_WINDOW, attention_bias=True,
                   attn_logit_softcapping=1.0, final_logit_softcapping=2.0, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    # Gemma 3: three layers local, local, global; own RoPE base on local layers, linear x8 on global;
    # q/k norm (always); a final soft-cap (null in Google's checkpoints, but HF implements it).
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=TINY_WINDOW, attention_bias=True,
                        num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        final_logit_softcapping=2.0, tie_word_embeddings=True,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                            "rope_theta": 1_000_000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
}


def hf_config(family: str, **overrides: Any) -> Any:
    """The transformers config object of a tiny `family` model (overrides are HF kwargs)."""
    import transformers

    if family not in ALL_FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {ALL_FAMILIES}.")
    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig}[family]
    kwargs = {**_COMMON, **_FAMILY[family], **overrides}
    return cls(**kwargs)


def make_tiny_hf_model(family: str, *, seed: int = 0, **overrides: Any) -> Any:
    """A float32 torch `*ForCausalLM` with random weights, biases and norm scales."""
    import torch
    import transformers

    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:  # Gemma's scale is (1 + w): keep it near 1 too
                p.copy_((0.0 if family in GEMMA else 1.0) + 0.3 * torch.randn_like(p))
    model.eval()
    return model


def make_tiny_hf_checkpoint(path: str | os.PathLike, family: str = "qwen2", *, seed: int = 0,
                            dtype: str = "float32", max_shard_size: str | None = None,
                            **overrides: Any) -> Path:
    """Write a tiny random `family` checkpoint (config.json + safetensors) to `path`.

    overrides: transformers config kwargs (e.g. `num_hidden_layers=3`,
    `attention_bias=True`).  dtype: the stored weight dtype ("float32" or
    "bfloat16").  max_shard_size (e.g. "20KB") writes a sharded checkpoint
    with an index.  Returns `path`.
    """
    import torch

    model = make_tiny_hf_model(family, seed=seed, **overrides)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    out = Path(path)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    return out
