"""The frozen model configuration shared by the Qwen2, Qwen3, Llama, Mistral, Gemma 2 and Gemma 3 families.

Why one config for six families: they are the same pre-norm decoder (RMSNorm,
RoPE, GQA attention, gated MLP) and differ only in switches:

- which projections carry a bias (Qwen2 q/k/v; Llama/Gemma `attention_bias`),
- per-head RMS norm of queries and keys (Qwen3, Gemma 3),
- how RoPE frequencies are scaled (Llama 3.x `llama3`, Gemma 3 `linear`), and
  whether sliding-window layers use their own RoPE base (Gemma 3),
- sliding-window attention: on every layer (Mistral `sliding_window`) or on
  the layers `layer_types` names (Gemma 2/3 alternate local and global layers),
- Gemma's block: RMSNorm scale `(1 + weight)`, embeddings times sqrt(D),
  GeGLU (`gelu_pytorch_tanh`), extra norms *after* the attention and MLP
  outputs, attention scale `query_pre_attn_scalar ** -0.5`, and tanh
  soft-capping of attention logits and final logits (Gemma 2).

Everything else (names, shapes, sharding) is common, so the switches live here
and `model.py` reads them.

`ModelConfig.from_hf_config` is the only way a checkpoint's `config.json`
becomes a model; it refuses every option it does not implement (other RoPE
scalings, other activations, bidirectional attention, Qwen's sliding windows)
by name, so a checkpoint is never silently run as a different model.

Presets (`ModelConfig.from_preset(name)`, `PRESETS`) are named after real
checkpoints and carry their real shapes, so a benchmark can build a random
model of that shape (`init_random(ModelConfig.from_preset("gemma_2_2b"))`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, NoReturn

import numpy as np

# HF `model_type` -> the `architectures` entry that means a causal LM of it.
_SUPPORTED = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_GEMMA = ("gemma2", "gemma3_text")
# HF `layer_types` entries (transformers 5), one per layer.
FULL, SLIDING = "full_attention", "sliding_attention"
# MLP activations: HF `hidden_act` / `hidden_activation` names.
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x (`rope_type: llama3`) frequency scaling.

    Invariant: `high_freq_factor > low_freq_factor > 0` and `factor >= 1`;
    frequencies whose wavelength is longer than
    `original_max_position_embeddings / low_freq_factor` are divided by
    `factor`, those shorter than `.../high_freq_factor` are kept, and the band
    between is interpolated.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """`rope_type: linear` (position interpolation): every inverse frequency is divided by `factor`.

    Gemma 3 4B/12B/27B use it (factor 8) on their global layers only.
    """

    factor: float


Scaling = RopeScaling | LinearRopeScaling | None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of one decoder-only model.

    Invariants (checked in `__post_init__`): `num_heads % num_kv_heads == 0`
    (GQA groups), `head_dim` even (RoPE rotates pairs), all sizes positive;
    `layer_types`, when given, has one FULL or SLIDING entry per layer, and
    SLIDING layers need a `sliding_window`; `rope_local_scaling` needs
    `rope_local_theta`; soft-caps and `query_pre_attn_scalar` are > 0.
    """

    family: str  # one of _SUPPORTED: qwen2 | qwen3 | llama | mistral | gemma2 | gemma3_text
    vocab_size: int  # V, rows of the embedding and of the LM head
    hidden_size: int  # D, width of the residual stream
    num_layers: int  # L, decoder blocks
    num_heads: int  # N, query heads
    num_kv_heads: int  # K, key/value heads (GQA: N % K == 0)
    head_dim: int  # H, width of one head (Qwen3/Mistral/Gemma set it explicitly, others D // N)
    intermediate_size: int  # F, gated-MLP hidden width
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # RoPE base of full-attention layers (of every layer unless rope_local_theta)
    rope_scaling: Scaling = None  # RoPE frequency scaling of the layers rope_theta applies to
    tie_word_embeddings: bool = False  # LM head = embedding matrix (Qwen2.5-0.5B, Llama 3.2-1B, Gemma)
    qkv_bias: bool = False  # bias on q/k/v projections (always true for Qwen2)
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # bias on gate/up/down (Llama `mlp_bias`)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    max_position_embeddings: int = 32_768
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # --- attention pattern (Mistral, Gemma)
    sliding_window: int | None = None  # W: a sliding layer's query sees itself and the W-1 keys before it (HF)
    layer_types: tuple[str, ...] | None = None  # per layer FULL | SLIDING; None: every layer SLIDING if
    #   sliding_window is set (Mistral), else every layer FULL
    rope_local_theta: float | None = None  # RoPE base of SLIDING layers (Gemma 3 `rope_local_base_freq`);
    #   None: sliding layers use rope_theta and rope_scaling like the others
    rope_local_scaling: Scaling = None  # RoPE scaling of SLIDING layers (only with rope_local_theta)
    # --- Gemma block
    hidden_act: str = "silu"  # MLP gate activation: "silu" (SwiGLU) | "gelu_pytorch_tanh" (GeGLU, Gemma)
    norm_plus_one: bool = False  # RMSNorm scale is (1 + weight), multiplied in float32 before the cast (Gemma)
    sandwich_norms: bool = False  # RMSNorm also on the attention and MLP outputs, before the residual add (Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(D), the factor rounded to the activation dtype (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma); None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # attention scores -> c * tanh(scores / c) before the mask (Gemma 2: 50)
    final_logit_softcap: float | None = None  # logits -> c * tanh(logits / c) (Gemma 2: 30)

    def __post_init__(self) -> None:
        if self.family not in _SUPPORTED:
            raise ValueError(
                f"ModelConfig.family={self.family!r} is not supported; expected one of "
                f"{sorted(_SUPPORTED)}."
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: expected a positive int.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}: grouped-query attention needs whole groups."
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim}: RoPE needs an even head_dim.")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.hidden_act={self.hidden_act!r}: expected one of {list(ACTIVATIONS)}.")
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"ModelConfig.sliding_window={w!r}: expected None or an int >= 1.")
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            object.__setattr__(self, "layer_types", types)  # a list from JSON compares equal to the tuple
            if len(types) != self.num_layers or set(types) - {FULL, SLIDING}:
                raise ValueError(
                    f"ModelConfig.layer_types={list(types)!r}: expected {self.num_layers} entries (one per "
                    f"layer), each {FULL!r} or {SLIDING!r}.")
            if SLIDING in types and w is None:
                raise ValueError(f"ModelConfig.layer_types has {SLIDING!r} layers but sliding_window=None; "
                                 "give the window (e.g. sliding_window=4096).")
        if self.rope_local_scaling is not None and self.rope_local_theta is None:
            raise ValueError("ModelConfig.rope_local_scaling is set but rope_local_theta=None; local RoPE "
                             "parameters need their own base (rope_local_theta).")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"ModelConfig.{name}={value!r}: expected None or a number > 0.")
        for name in ("rope_scaling", "rope_local_scaling"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (RopeScaling, LinearRopeScaling)):
                raise ValueError(f"ModelConfig.{name}={value!r}: expected None, RopeScaling or LinearRopeScaling.")

    # ------------------------------------------------------------------ derived
    @property
    def q_size(self) -> int:
        """N * H, the width of the concatenated query heads."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """K * H, the width of the concatenated key (or value) heads."""
        return self.num_kv_heads * self.head_dim

    @property
    def attn_scale(self) -> float | None:
        """The attention scale when it is not 1/sqrt(H) (Gemma's `query_pre_attn_scalar ** -0.5`), else None."""
        return None if self.query_pre_attn_scalar is None else float(self.query_pre_attn_scalar) ** -0.5

    def layer_type(self, layer: int) -> str:
        """FULL or SLIDING for block `layer`."""
        if self.layer_types is not None:
            return self.layer_types[layer]
        return SLIDING if self.sliding_window is not None else FULL

    def layer_window(self, layer: int) -> int | None:
        """The attention window of block `layer` (None = full causal attention)."""
        return self.sliding_window if self.layer_type(layer) == SLIDING else None

    def layer_rope(self, layer: int) -> str:
        """Which RoPE table block `layer` uses: "local" (its own base, Gemma 3 sliding layers) or "global"."""
        return "local" if self.rope_local_theta is not None and self.layer_type(layer) == SLIDING else "global"

    @property
    def rope_kinds(self) -> tuple[str, ...]:
        """The RoPE tables the layers need ("global" and/or "local"), in a fixed order."""
        kinds = {self.layer_rope(i) for i in range(self.num_layers)}
        return tuple(k for k in ("global", "local") if k in kinds)

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, f = self.hidden_size, self.intermediate_size
        attn = d * self.q_size + 2 * d * self.kv_size + self.q_size * d
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        per_layer = attn + mlp + (4 if self.sandwich_norms else 2) * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def flops_per_token(self, seq_len: int, num_layers: int | None = None,
                        with_head: bool = True) -> float:
        """Forward FLOPs per token (2 per multiply-add) for MFU figures.

        Counts the matmuls of `num_layers` blocks (default all), the attention
        scores and values at the average causal context of a `seq_len` row
        (`seq_len / 2`, or less on sliding-window layers), and the LM head if
        `with_head`.
        """
        layers = self.num_layers if num_layers is None else num_layers
        d, f = self.hidden_size, self.intermediate_size
        proj = d * self.q_size + 2 * d * self.kv_size + self.q_size * d + 3 * d * f
        total = 0.0
        for i in range(layers):
            w = self.layer_window(i)
            if w is None or w >= seq_len:
                ctx = seq_len / 2
            else:  # mean over queries of min(i + 1, w): the ramp, then w
                ctx = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
            total += 2 * (proj + 2 * self.q_size * ctx)
        if with_head:
            total += 2 * d * self.vocab_size
        return float(total)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied (validated again).

        Changing `num_layers` alone keeps a `layer_types` pattern: the first
        layers' types when there are fewer, the pattern's period repeated when
        there are more (so `from_preset("gemma_2_2b").replace(num_layers=4)`
        still alternates local and global layers).
        """
        if "num_layers" in changes and "layer_types" not in changes and self.layer_types is not None:
            types, n = self.layer_types, int(changes["num_layers"])
            period = next(p for p in range(1, len(types) + 1)
                          if all(types[i] == types[i % p] for i in range(len(types))))
            changes["layer_types"] = tuple(types[i % period] if i >= len(types) else types[i] for i in range(n))
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    # Named after the checkpoints whose config.json they reproduce (shapes, RoPE, windows, caps), so a
    # benchmark can build a random model of that shape. Older short names remain as aliases (PRESET_ALIASES).
    @classmethod
    def qwen2_5_0_5b(cls) -> "ModelConfig":
        """Qwen/Qwen2.5-0.5B (and -Instruct; arc24's fine-tunes)."""
        return cls(family="qwen2", vocab_size=151_936, hidden_size=896, num_layers=24,
                   num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
                   qkv_bias=True, max_position_embeddings=32_768, eos_token_ids=(151_643,))

    @classmethod
    def qwen2_5_7b(cls) -> "ModelConfig":
        """Qwen/Qwen2.5-7B (SOAR's 7B)."""
        return cls(family="qwen2", vocab_size=152_064, hidden_size=3584, num_layers=28,
                   num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18_944,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False,
                   qkv_bias=True, max_position_embeddings=131_072, eos_token_ids=(151_643,))

    @classmethod
    def qwen2_5_14b(cls) -> "ModelConfig":
        """Qwen/Qwen2.5-14B (SOAR's 14B)."""
        return cls(family="qwen2", vocab_size=152_064, hidden_size=5120, num_layers=48,
                   num_heads=40, num_kv_heads=8, head_dim=128, intermediate_size=13_824,
                   rms_norm_eps=1e-5, rope_theta=1_000_000.0, tie_word_embeddings=False,
                   qkv_bias=True, max_position_embeddings=131_072, eos_token_ids=(151_643,))

    @classmethod
    def qwen3_0_6b(cls) -> "ModelConfig":
        """Qwen/Qwen3-0.6B (explicit head_dim 128 > hidden/heads)."""
        return cls(family="qwen3", vocab_size=151_936, hidden_size=1024, num_layers=28,
                   num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=3072,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
                   qk_norm=True, max_position_embeddings=40_960, eos_token_ids=(151_645,))

    @classmethod
    def qwen3_4b(cls) -> "ModelConfig":
        """Qwen/Qwen3-4B (NVARC's 4B)."""
        return cls(family="qwen3", vocab_size=151_936, hidden_size=2560, num_layers=36,
                   num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=9728,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
                   qk_norm=True, max_position_embeddings=40_960, eos_token_ids=(151_645,))

    @classmethod
    def llama_3_2_1b(cls) -> "ModelConfig":
        """meta-llama/Llama-3.2-1B (llama3 RoPE scaling, tied embeddings)."""
        return cls(family="llama", vocab_size=128_256, hidden_size=2048, num_layers=16,
                   num_heads=32, num_kv_heads=8, head_dim=64, intermediate_size=8192,
                   rms_norm_eps=1e-5, rope_theta=500_000.0,
                   rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
                   max_position_embeddings=131_072, eos_token_ids=(128_001,), bos_token_id=128_000)

    @classmethod
    def llama_3_2_3b(cls) -> "ModelConfig":
        """meta-llama/Llama-3.2-3B (the ARChitects' 3B; tied embeddings)."""
        return cls(family="llama", vocab_size=128_256, hidden_size=3072, num_layers=28,
                   num_heads=24, num_kv_heads=8, head_dim=128, intermediate_size=8192,
                   rms_norm_eps=1e-5, rope_theta=500_000.0,
                   rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
                   max_position_embeddings=131_072, eos_token_ids=(128_001,), bos_token_id=128_000)

    @classmethod
    def llama_3_1_8b(cls) -> "ModelConfig":
        """meta-llama/Llama-3.1-8B (BARC's and MIT-TTT's 8B; llama3 RoPE scaling, untied)."""
        return cls(family="llama", vocab_size=128_256, hidden_size=4096, num_layers=32,
                   num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14_336,
                   rms_norm_eps=1e-5, rope_theta=500_000.0,
                   rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), tie_word_embeddings=False,
                   max_position_embeddings=131_072, eos_token_ids=(128_001,), bos_token_id=128_000)

    @classmethod
    def mistral_7b_v0_1(cls) -> "ModelConfig":
        """mistralai/Mistral-7B-v0.1 (a 4096-token sliding window on every layer)."""
        return cls(family="mistral", vocab_size=32_000, hidden_size=4096, num_layers=32,
                   num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14_336,
                   rms_norm_eps=1e-5, rope_theta=10_000.0, tie_word_embeddings=False,
                   max_position_embeddings=32_768, eos_token_ids=(2,), bos_token_id=1, sliding_window=4096)

    @classmethod
    def mistral_nemo_minitron_8b(cls) -> "ModelConfig":
        """nvidia/Mistral-NeMo-Minitron-8B-Base (the ARChitects' ARC Prize 2024 model; no window)."""
        return cls(family="mistral", vocab_size=131_072, hidden_size=4096, num_layers=40,
                   num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=11_520,
                   rms_norm_eps=1e-5, rope_theta=1_000_000.0, tie_word_embeddings=False,
                   max_position_embeddings=8192, eos_token_ids=(2,), bos_token_id=1, sliding_window=None)

    @classmethod
    def _gemma(cls, family: str, **kw: Any) -> "ModelConfig":
        base = dict(family=family, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_ids=(1,),
                    bos_token_id=2, hidden_act="gelu_pytorch_tanh", norm_plus_one=True, sandwich_norms=True,
                    scale_embeddings=True, query_pre_attn_scalar=256)
        if family == "gemma3_text":
            base.update(qk_norm=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0)
        base.update(kw)
        return cls(**base)

    @classmethod
    def gemma_2_2b(cls) -> "ModelConfig":
        """google/gemma-2-2b (Gemma Scope's 2B): local/global layers alternating, soft-caps 50 and 30."""
        return cls._gemma("gemma2", vocab_size=256_000, hidden_size=2304, num_layers=26, num_heads=8,
                          num_kv_heads=4, head_dim=256, intermediate_size=9216, max_position_embeddings=8192,
                          sliding_window=4096, layer_types=_every(26, 2), attn_logit_softcap=50.0,
                          final_logit_softcap=30.0)

    @classmethod
    def gemma_2_9b(cls) -> "ModelConfig":
        """google/gemma-2-9b (Gemma Scope's 9B; the published ARC steering work's model)."""
        return cls._gemma("gemma2", vocab_size=256_000, hidden_size=3584, num_layers=42, num_heads=16,
                          num_kv_heads=8, head_dim=256, intermediate_size=14_336, max_position_embeddings=8192,
                          sliding_window=4096, layer_types=_every(42, 2), attn_logit_softcap=50.0,
                          final_logit_softcap=30.0)

    @classmethod
    def gemma_2_27b(cls) -> "ModelConfig":
        """google/gemma-2-27b (query_pre_attn_scalar 144 = hidden / heads, not head_dim)."""
        return cls._gemma("gemma2", vocab_size=256_000, hidden_size=4608, num_layers=46, num_heads=32,
                          num_kv_heads=16, head_dim=128, intermediate_size=36_864, max_position_embeddings=8192,
                          sliding_window=4096, layer_types=_every(46, 2), attn_logit_softcap=50.0,
                          final_logit_softcap=30.0, query_pre_attn_scalar=144)

    @classmethod
    def gemma_3_1b(cls) -> "ModelConfig":
        """google/gemma-3-1b-pt (text-only gemma3_text; 5 local layers per global one, window 512)."""
        return cls._gemma("gemma3_text", vocab_size=262_144, hidden_size=1152, num_layers=26, num_heads=4,
                          num_kv_heads=1, head_dim=256, intermediate_size=6912, max_position_embeddings=32_768,
                          sliding_window=512, layer_types=_every(26, 6))

    @classmethod
    def gemma_3_4b(cls) -> "ModelConfig":
        """The text tower of google/gemma-3-4b-pt (linear RoPE scaling x8 on global layers, window 1024).

        The hub checkpoint itself is multimodal (`gemma3`, refused); this preset gives its language
        model's shape for benchmarks and random models.
        """
        return cls._gemma("gemma3_text", vocab_size=262_208, hidden_size=2560, num_layers=34, num_heads=8,
                          num_kv_heads=4, head_dim=256, intermediate_size=10_240, max_position_embeddings=131_072,
                          sliding_window=1024, layer_types=_every(34, 6), rope_scaling=LinearRopeScaling(8.0))

    # Old names (kept: benchmarks and tests use them).
    qwen2_0p5b = qwen2_5_0_5b
    qwen2_7b = qwen2_5_7b
    qwen3_0p6b = qwen3_0_6b
    llama3p2_1b = llama_3_2_1b
    llama3_8b = llama_3_1_8b

    @classmethod
    def tiny(cls, family: str = "qwen2", **overrides: Any) -> "ModelConfig":
        """A few-thousand-parameter model of `family` for CPU tests and smoke runs.

        The switches match the family (Qwen2: qkv bias, tied; Qwen3: q/k norm,
        head_dim != hidden/heads; Llama: llama3 RoPE scaling that bites at
        short lengths, untied; Mistral: a 16-token window on every layer;
        Gemma 2: alternating 16-token local / global layers, soft-caps small
        enough to bite; Gemma 3: local layers with their own RoPE base, linear
        scaling on the global ones, q/k norm), so a tiny model exercises every
        code path.
        """
        base = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, intermediate_size=96, rms_norm_eps=1e-6,
                    max_position_embeddings=2048, eos_token_ids=(1,), bos_token_id=None)
        if family == "qwen2":
            base.update(rope_theta=10_000.0, tie_word_embeddings=True, qkv_bias=True)
        elif family == "qwen3":
            base.update(head_dim=24, rope_theta=1_000_000.0, qk_norm=True)
        elif family == "llama":
            base.update(rope_theta=500_000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
        elif family == "mistral":
            base.update(head_dim=24, rope_theta=1_000_000.0, sliding_window=16)
        elif family in _GEMMA:
            base.update(hidden_act="gelu_pytorch_tanh", norm_plus_one=True, sandwich_norms=True,
                        scale_embeddings=True, tie_word_embeddings=True, query_pre_attn_scalar=24,
                        sliding_window=16, layer_types=(SLIDING, FULL))
            if family == "gemma2":
                base.update(attn_logit_softcap=0.5, final_logit_softcap=3.0)
            else:
                base.update(qk_norm=True, rope_theta=1_000_000.0, rope_scaling=LinearRopeScaling(8.0),
                            rope_local_theta=10_000.0)
        else:
            raise ValueError(f"tiny(family={family!r}): expected one of {sorted(_SUPPORTED)}.")
        base.update(overrides)
        return cls(family=family, **base)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A preset by name (`PRESETS`, `PRESET_ALIASES` or "tiny"), e.g. `"gemma_2_2b"`, with field overrides.

        `from_preset("tiny", family="gemma2")` gives the tiny model of a family.
        """
        if name == "tiny":
            return cls.tiny(**overrides)
        name = PRESET_ALIASES.get(name, name)
        if name not in PRESETS:
            raise ValueError(f"model preset {name!r} is unknown; expected one of "
                             f"{sorted(PRESETS) + ['tiny']} (or the aliases {sorted(PRESET_ALIASES)}).")
        return getattr(cls, name)().replace(**overrides)

    # ------------------------------------------------------------- HF config I/O
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Translate an HF `config.json` dict, refusing options we do not implement.

        Accepts both the transformers 4 layout (`rope_theta`, `rope_scaling`;
        Gemma 3's `rope_local_base_freq`, `sliding_window_pattern`) and the
        transformers 5 layout (`rope_parameters`, per layer type for Gemma 3;
        `layer_types`).  A key the file leaves out takes transformers' default
        for that model type (e.g. Gemma 2's soft-caps 50 and 30, Mistral's
        4096-token window), because that is what HF would run.  `source`
        names the file in error messages.  Each concern has its `_read_*`
        helper below; they run in this order, so a file with several
        unsupported options names the same one first every time.
        """
        src = _HFFile(hf, source, _supported_model_type(hf, source))
        num_layers = int(hf["num_hidden_layers"])
        return cls(family=src.model_type, hidden_act=_read_activation(src),
                   **_read_attention_pattern(src, num_layers), **_read_rope(src), **_read_gemma(src),
                   **_read_sizes(src), **_read_switches(src))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read an HF `config.json`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_config(json.load(f), source=str(path))

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict (transformers 5 layout) that reads back as `self`.

        Raises if the switches cannot be expressed by the family's HF config
        (e.g. Qwen2 without qkv bias, a Gemma without its (1 + weight) norms).
        """
        self._refuse_inexpressible()
        f = self.family
        gemma = f in _GEMMA
        eos: Any = (None if not self.eos_token_ids else
                    self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids))
        if f == "gemma3_text":
            rope: dict[str, Any] = {FULL: _rope_dict(self.rope_theta, self.rope_scaling),
                                    SLIDING: _rope_dict(self.rope_local_theta, self.rope_local_scaling)}
        else:
            rope = _rope_dict(self.rope_theta, self.rope_scaling)
        out: dict[str, Any] = {
            "architectures": [_SUPPORTED[f]],
            "model_type": f,
            **{key: getattr(self, field) for key, field, _, _ in _PLAIN_KEYS},
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            _ACTIVATION[gemma][0]: self.hidden_act,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "eos_token_id": eos,
        }
        if f not in ("qwen2", "mistral"):
            out["attention_bias"] = self.qkv_bias
        if f == "llama":
            out["mlp_bias"] = self.mlp_bias
        elif f in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
        if f == "mistral" or gemma:
            out["sliding_window"] = self.sliding_window
        if gemma:
            out.update(layer_types=[self.layer_type(i) for i in range(self.num_layers)],
                       # transformers types it int and refuses 24.0 on load: an integral value goes back as int
                       query_pre_attn_scalar=(int(self.query_pre_attn_scalar)
                                              if float(self.query_pre_attn_scalar).is_integer()
                                              else self.query_pre_attn_scalar),
                       attn_logit_softcapping=self.attn_logit_softcap,
                       final_logit_softcapping=self.final_logit_softcap,
                       use_bidirectional_attention=False)
        return out

    def _refuse_inexpressible(self) -> None:
        """Raise if a switch has a value the family's config.json cannot say (`to_hf_config`'s refusals)."""
        f = self.family
        gemma = f in _GEMMA
        if f == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ValueError("a qwen2 config.json always means qkv_bias=True, o_bias=False; "
                             f"got qkv_bias={self.qkv_bias}, o_bias={self.o_bias}.")
        if f == "mistral" and (self.qkv_bias or self.o_bias):
            raise ValueError(f"a mistral config.json has no attention biases; got qkv_bias={self.qkv_bias}, "
                             f"o_bias={self.o_bias}.")
        if f not in ("qwen2", "mistral") and self.qkv_bias != self.o_bias:
            raise ValueError(f"a {f} config.json has one `attention_bias` for q/k/v/o; got "
                             f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}.")
        if self.qk_norm != (f in ("qwen3", "gemma3_text")):
            raise ValueError(f"qk_norm={self.qk_norm} is not expressible for family {f!r}.")
        if self.mlp_bias and f != "llama":
            raise ValueError(f"mlp_bias=True is not expressible for family {f!r}.")
        implied = _implied_by_family(f)
        wrong = {k: getattr(self, k) for k, v in implied.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(f"{wrong} is not expressible in a {f} config.json (it implies "
                             f"{ {k: implied[k] for k in wrong} }).")
        if gemma and self.query_pre_attn_scalar is None:
            raise ValueError(f"a {f} config.json always has query_pre_attn_scalar; got None.")
        if f == "gemma3_text" and self.rope_local_theta is None:
            raise ValueError("a gemma3_text config.json always has RoPE parameters of its own for the "
                             "sliding layers; got rope_local_theta=None.")


def _every(num_layers: int, every: int) -> tuple[str, ...]:
    """HF's layer pattern: layer i is global iff (i + 1) % every == 0, else sliding."""
    return tuple(SLIDING if (i + 1) % every else FULL for i in range(num_layers))


def _rope_dict(theta: float, scaling: Scaling) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if isinstance(scaling, RopeScaling):
        out.update(rope_type="llama3", **dataclasses.asdict(scaling))
    elif isinstance(scaling, LinearRopeScaling):
        out.update(rope_type="linear", factor=scaling.factor)
    return out


def _implied_by_family(family: str) -> dict[str, Any]:
    """The ModelConfig fields a `family` config.json fixes (it has no key for them): field -> value."""
    gemma = family in _GEMMA
    implied: dict[str, Any] = dict(hidden_act=_ACTIVATION[gemma][1], norm_plus_one=gemma,
                                   sandwich_norms=gemma, scale_embeddings=gemma)
    if not gemma:
        implied.update(query_pre_attn_scalar=None, attn_logit_softcap=None, final_logit_softcap=None)
    if family == "gemma3_text":
        implied.update(attn_logit_softcap=None)
    if family in ("qwen2", "qwen3", "llama"):
        implied.update(sliding_window=None, layer_types=None)
    if family == "mistral":
        implied.update(layer_types=None)
    if family != "gemma3_text":
        implied.update(rope_local_theta=None)
    return implied


# ---------------------------------------------------------------------------- reading an HF config.json
# Each `_read_*` helper reads one concern of a config.json and returns the ModelConfig fields it decides.
_REQUIRED = object()  # no default: a file without the key raises KeyError naming it
# config.json keys that are one ModelConfig field in every family: (HF key, field, type, default).
# `from_hf_config` reads them (`_read_sizes`), `to_hf_config` writes them.
_PLAIN_KEYS: tuple[tuple[str, str, Callable[[Any], Any], Any], ...] = (
    ("num_hidden_layers", "num_layers", int, _REQUIRED),
    ("num_attention_heads", "num_heads", int, _REQUIRED),
    ("hidden_size", "hidden_size", int, _REQUIRED),
    ("vocab_size", "vocab_size", int, _REQUIRED),
    ("intermediate_size", "intermediate_size", int, _REQUIRED),
    ("rms_norm_eps", "rms_norm_eps", float, 1e-6),
    ("max_position_embeddings", "max_position_embeddings", int, 32_768),
    ("bos_token_id", "bos_token_id", lambda token: token, None),
)
# The MLP activation's key and the one value arcstream runs, by "is Gemma": HF's Gemma modules read
# `hidden_activation` (and ignore `hidden_act`, which old Gemma 2 files also carry); the others `hidden_act`.
_ACTIVATION = {False: ("hidden_act", "silu"), True: ("hidden_activation", "gelu_pytorch_tanh")}


@dataclasses.dataclass(frozen=True)
class _HFFile:
    """A config.json being read: its dict, its name in messages, and its (supported) model_type."""

    hf: Mapping[str, Any]
    source: str
    model_type: str

    @property
    def gemma(self) -> bool:
        return self.model_type in _GEMMA

    def refuse(self, field: str, value: Any, expected: str) -> NoReturn:
        raise ValueError(
            f"{self.source}: {field}={value!r} is not supported by arcstream's {self.model_type} "
            f"decoder (expected {expected}); running it would give a different model."
        )


def _supported_model_type(hf: Mapping[str, Any], source: str) -> str:
    """The file's model_type; refuses other model types and architectures that are not the causal LM."""
    model_type = hf.get("model_type")
    if model_type not in _SUPPORTED:
        hint = ""
        if model_type == "gemma3":
            hint = (" 'gemma3' is the multimodal Gemma3ForConditionalGeneration (gemma-3-4b and larger); "
                    "arcstream runs text-only 'gemma3_text' checkpoints (Gemma3ForCausalLM, e.g. "
                    "google/gemma-3-1b-pt).")
        raise ValueError(
            f"{source}: model_type={model_type!r} is not supported; arcstream implements "
            f"{sorted(_SUPPORTED)} (architectures {sorted(_SUPPORTED.values())}).{hint}"
        )
    archs = hf.get("architectures") or [_SUPPORTED[model_type]]
    bad = [a for a in archs if a != _SUPPORTED[model_type]]
    if bad:
        raise ValueError(
            f"{source}: architectures={archs!r} is not supported for model_type "
            f"{model_type!r}; expected [{_SUPPORTED[model_type]!r}] (a causal LM)."
        )
    return model_type


def _read_activation(src: _HFFile) -> str:
    key, only = _ACTIVATION[src.gemma]
    act = src.hf.get(key, only)
    if act != only:
        src.refuse(key, act, repr(only))
    return act


def _read_attention_pattern(src: _HFFile, num_layers: int) -> dict[str, Any]:
    """`sliding_window` and `layer_types`: none (Qwen, Llama), one window on every layer (Mistral), or per layer
    (Gemma)."""
    hf, refuse, model_type = src.hf, src.refuse, src.model_type
    window: int | None = None
    layer_types: tuple[str, ...] | None = None
    hf_types = hf.get("layer_types")
    if model_type in ("qwen2", "qwen3", "llama"):
        if hf.get("use_sliding_window", False):
            refuse("use_sliding_window", True, "false")
        if hf_types and any(t != FULL for t in hf_types):
            refuse("layer_types", sorted(set(hf_types)), f"only {FULL!r}")
    elif model_type == "mistral":
        # HF's MistralModel puts `sliding_window` (when not null) on every layer and ignores
        # `layer_types` (it warns: such files are meant for Ministral), so only a uniform list agrees.
        window = hf.get("sliding_window", 4096)
        if hf_types and set(hf_types) != {SLIDING if window is not None else FULL}:
            refuse("layer_types", sorted(set(hf_types)),
                   f"absent (MistralForCausalLM ignores it; sliding_window={window!r} applies to every layer)")
    else:
        if hf.get("use_bidirectional_attention"):
            refuse("use_bidirectional_attention", True, "false or absent (causal attention)")
        window = hf.get("sliding_window", 4096)
        if hf_types is None:
            # transformers' defaults: Gemma 2 alternates (layer 0 local); Gemma 3 makes every
            # `sliding_window_pattern`-th layer global (default 6).
            every = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern", 6))
            hf_types = _every(num_layers, every)
        layer_types = tuple(hf_types)
        if set(layer_types) - {FULL, SLIDING}:
            refuse("layer_types", sorted(set(layer_types)), f"{FULL!r} and {SLIDING!r} entries")
        if len(layer_types) != num_layers:
            refuse("layer_types", f"{len(layer_types)} entries", f"{num_layers}, one per layer")
        if SLIDING in layer_types and window is None:
            refuse("sliding_window", None, f"an int: layer_types has {SLIDING!r} layers")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        refuse("sliding_window", window, "null or an int >= 1")
    return dict(sliding_window=window, layer_types=layer_types)


def _read_rope(src: _HFFile) -> dict[str, Any]:
    """RoPE bases and scalings: transformers 5 nests theta and scaling in `rope_parameters` (Gemma 3: one
    dict per layer type); transformers 4 has flat `rope_theta` + `rope_scaling`."""
    hf = src.hf
    rope_params = hf.get("rope_parameters") or {}
    if src.model_type != "gemma3_text":
        rope = dict(rope_params)
        legacy = hf.get("rope_scaling") or {}
        if legacy and not rope.get("rope_type"):
            rope.update(legacy)
        theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
        scaling = _read_scaling(src, rope, "rope_scaling/rope_parameters")
        return dict(rope_theta=float(theta), rope_scaling=scaling, rope_local_theta=None, rope_local_scaling=None)
    if rope_params and not ({FULL, SLIDING} & set(rope_params)):
        src.refuse("rope_parameters", rope_params, f"one dict per layer type ({FULL!r}, {SLIDING!r})")
    if rope_params:
        glob = dict(rope_params.get(FULL) or {})
        loc = dict(rope_params.get(SLIDING) or {})
    else:  # transformers 4: `rope_scaling` applies to the global layers only
        glob = dict(hf.get("rope_scaling") or {})
        glob.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        loc = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    glob.setdefault("rope_theta", 1_000_000.0)
    loc.setdefault("rope_theta", 10_000.0)
    scaling = _read_scaling(src, glob, f"rope_parameters[{FULL!r}]")
    local_theta = float(loc["rope_theta"])
    local_scaling = _read_scaling(src, loc, f"rope_parameters[{SLIDING!r}]")
    return dict(rope_theta=float(glob["rope_theta"]), rope_scaling=scaling, rope_local_theta=local_theta,
                rope_local_scaling=local_scaling)


def _read_scaling(src: _HFFile, params: Mapping[str, Any], where: str) -> Scaling:
    """The RoPE scaling of one `rope_parameters` dict (`where` names it in messages)."""
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    partial = params.get("partial_rotary_factor", src.hf.get("partial_rotary_factor", 1.0))
    if partial not in (1, 1.0, None):
        src.refuse(f"{where}.partial_rotary_factor", partial, "1.0")
    try:
        if rope_type == "default":
            return None
        if rope_type == "linear":
            return LinearRopeScaling(factor=float(params["factor"]))
        if rope_type == "llama3":
            return RopeScaling(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
    except KeyError as e:
        raise ValueError(f"{src.source}: rope_type {rope_type!r} needs {e.args[0]!r} in {where}; "
                         f"got {sorted(params)}.") from None
    src.refuse(f"{where}.rope_type", rope_type, "'default', 'linear' or 'llama3'")


def _read_gemma(src: _HFFile) -> dict[str, Any]:
    """Gemma's block switches and its attention scale and soft-caps, at transformers' per-family defaults."""
    gemma = src.gemma
    out: dict[str, Any] = dict(norm_plus_one=gemma, sandwich_norms=gemma, scale_embeddings=gemma,
                               query_pre_attn_scalar=None, attn_logit_softcap=None, final_logit_softcap=None)
    if not gemma:
        return out
    caps = (50.0, 30.0) if src.model_type == "gemma2" else (None, None)
    qpas = src.hf.get("query_pre_attn_scalar", 256)
    attn_cap = src.hf.get("attn_logit_softcapping", caps[0])
    final_cap = src.hf.get("final_logit_softcapping", caps[1])
    if src.model_type == "gemma3_text" and attn_cap is not None:
        # HF's Gemma3Attention stores it but never passes it to the attention function.
        src.refuse("attn_logit_softcapping", attn_cap,
                   "null: transformers' Gemma 3 ignores it, so what it means for this checkpoint is unclear")
    out.update(query_pre_attn_scalar=None if qpas is None else float(qpas),
               attn_logit_softcap=None if attn_cap is None else float(attn_cap),
               final_logit_softcap=None if final_cap is None else float(final_cap))
    return out


def _read_sizes(src: _HFFile) -> dict[str, Any]:
    """The shapes, the tied LM head and the special tokens (`_PLAIN_KEYS` and the keys with family defaults)."""
    hf = src.hf
    out = {field: cast(hf[key] if default is _REQUIRED else hf.get(key, default))
           for key, field, cast, default in _PLAIN_KEYS}
    heads, hidden = out["num_heads"], out["hidden_size"]
    head_dim = hf.get("head_dim", 256) if src.gemma else (hf.get("head_dim") or hidden // heads)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    out.update(num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(head_dim),
               tie_word_embeddings=bool(hf.get("tie_word_embeddings", src.gemma)),
               eos_token_ids=tuple(int(e) for e in eos_ids))
    return out


def _read_switches(src: _HFFile) -> dict[str, Any]:
    """Which projections carry biases, and q/k norm (fixed per family where HF fixes them)."""
    model_type = src.model_type
    attention_bias = bool(src.hf.get("attention_bias", False))
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type == "mistral":  # MistralAttention has no biases whatever the file says
        qkv_bias = o_bias = False
    else:
        qkv_bias = o_bias = attention_bias
    mlp_bias = bool(src.hf.get("mlp_bias", False)) if model_type == "llama" else False
    return dict(qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, qk_norm=model_type in ("qwen3", "gemma3_text"))


# Preset name -> the ModelConfig classmethod of that name (the checkpoint each reproduces is in its docstring).
PRESETS = ("qwen2_5_0_5b", "qwen2_5_7b", "qwen2_5_14b", "qwen3_0_6b", "qwen3_4b", "llama_3_2_1b", "llama_3_2_3b",
           "llama_3_1_8b", "mistral_7b_v0_1", "mistral_nemo_minitron_8b", "gemma_2_2b", "gemma_2_9b",
           "gemma_2_27b", "gemma_3_1b", "gemma_3_4b")
PRESET_ALIASES = {"qwen2_0p5b": "qwen2_5_0_5b", "qwen2_7b": "qwen2_5_7b", "qwen3_0p6b": "qwen3_0_6b",
                  "llama3p2_1b": "llama_3_2_1b", "llama3_8b": "llama_3_1_8b"}


def rope_inv_freq(config: ModelConfig, kind: str = "global") -> np.ndarray:
    """RoPE inverse frequencies [H/2], float32, of the "global" or the "local" (sliding-layer) table.

    Computed in float32 with the same operation order as HF, because at
    positions in the hundreds a float64 table already differs from HF's by
    more than the 1e-4 alignment tolerance allows for.
    Llama 3 scaling: long wavelengths are slowed by `factor`, short ones kept,
    the band between interpolated (the `llama3` rule of HF/Meta).  Linear
    scaling: every frequency divided by `factor` (HF `linear`).
    """
    if kind not in ("global", "local"):
        raise ValueError(f"rope_inv_freq(kind={kind!r}): expected 'global' or 'local'.")
    theta, s = config.rope_theta, config.rope_scaling
    if kind == "local" and config.rope_local_theta is not None:
        theta, s = config.rope_local_theta, config.rope_local_scaling
    h = config.head_dim
    exponent = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if s is None:
        return inv
    if isinstance(s, LinearRopeScaling):
        return (inv / np.float32(s.factor)).astype(np.float32)
    low_wavelen = np.float32(s.original_max_position_embeddings / s.low_freq_factor)
    high_wavelen = np.float32(s.original_max_position_embeddings / s.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(s.factor), inv).astype(np.float32)
    smooth = ((np.float32(s.original_max_position_embeddings) / wavelen - np.float32(s.low_freq_factor))
              / np.float32(s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)

