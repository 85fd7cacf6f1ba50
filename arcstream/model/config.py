"""The frozen model configuration shared by the Qwen2, Qwen3 and Llama families.

Why one config for three families: the three architectures are the same
pre-norm decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP) and differ only in
a handful of switches: which projections carry a bias, whether queries and keys
are RMS-normalised per head (Qwen3), and how RoPE frequencies are scaled
(Llama 3.x).  Everything else (names, shapes, sharding) is common, so the
switches live here and `model.py` reads them.

`ModelConfig.from_hf_config` is the only way a checkpoint's `config.json`
becomes a model; it refuses every option it does not implement (sliding
windows, other RoPE scalings, other activations) by name, so a checkpoint is
never silently run as a different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np

# HF `model_type` -> the `architectures` entry that means a causal LM of it.
_SUPPORTED = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}


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
class ModelConfig:
    """Shapes and switches of one decoder-only model.

    Invariants (checked in `__post_init__`): `num_heads % num_kv_heads == 0`
    (GQA groups), `head_dim` even (RoPE rotates pairs), all sizes positive.
    """

    family: str  # "qwen2" | "qwen3" | "llama"
    vocab_size: int  # V, rows of the embedding and of the LM head
    hidden_size: int  # D, width of the residual stream
    num_layers: int  # L, decoder blocks
    num_heads: int  # N, query heads
    num_kv_heads: int  # K, key/value heads (GQA: N % K == 0)
    head_dim: int  # H, width of one head (Qwen3 sets it explicitly, others D // N)
    intermediate_size: int  # F, SwiGLU hidden width
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False  # LM head = embedding matrix (Qwen2.5-0.5B, Llama 3.2-1B)
    qkv_bias: bool = False  # bias on q/k/v projections (always true for Qwen2)
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # bias on gate/up/down (Llama `mlp_bias`)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    max_position_embeddings: int = 32_768
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

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

    # ------------------------------------------------------------------ derived
    @property
    def q_size(self) -> int:
        """N * H, the width of the concatenated query heads."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """K * H, the width of the concatenated key (or value) heads."""
        return self.num_kv_heads * self.head_dim

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
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def flops_per_token(self, seq_len: int, num_layers: int | None = None,
                        with_head: bool = True) -> float:
        """Forward FLOPs per token (2 per multiply-add) for MFU figures.

        Counts the matmuls of `num_layers` blocks (default all), the attention
        scores and values at average causal context `seq_len / 2`, and the LM
        head if `with_head`.
        """
        layers = self.num_layers if num_layers is None else num_layers
        d, f = self.hidden_size, self.intermediate_size
        proj = d * self.q_size + 2 * d * self.kv_size + self.q_size * d + 3 * d * f
        attn = 2 * self.q_size * (seq_len / 2)
        total = 2 * layers * (proj + attn)
        if with_head:
            total += 2 * d * self.vocab_size
        return float(total)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def qwen2_0p5b(cls) -> "ModelConfig":
        """Qwen2.5-0.5B (and Qwen2.5-0.5B-Instruct) shapes."""
        return cls(family="qwen2", vocab_size=151_936, hidden_size=896, num_layers=24,
                   num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
                   qkv_bias=True, max_position_embeddings=32_768, eos_token_ids=(151_643,))

    @classmethod
    def qwen2_7b(cls) -> "ModelConfig":
        """Qwen2.5-7B shapes."""
        return cls(family="qwen2", vocab_size=152_064, hidden_size=3584, num_layers=28,
                   num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18_944,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False,
                   qkv_bias=True, max_position_embeddings=131_072, eos_token_ids=(151_643,))

    @classmethod
    def qwen3_0p6b(cls) -> "ModelConfig":
        """Qwen3-0.6B shapes (explicit head_dim 128 > hidden/heads)."""
        return cls(family="qwen3", vocab_size=151_936, hidden_size=1024, num_layers=28,
                   num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=3072,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
                   qk_norm=True, max_position_embeddings=40_960, eos_token_ids=(151_645,))

    @classmethod
    def llama3p2_1b(cls) -> "ModelConfig":
        """Llama 3.2-1B shapes (llama3 RoPE scaling, tied embeddings)."""
        return cls(family="llama", vocab_size=128_256, hidden_size=2048, num_layers=16,
                   num_heads=32, num_kv_heads=8, head_dim=64, intermediate_size=8192,
                   rms_norm_eps=1e-5, rope_theta=500_000.0,
                   rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
                   max_position_embeddings=131_072, eos_token_ids=(128_001,), bos_token_id=128_000)

    @classmethod
    def llama3_8b(cls) -> "ModelConfig":
        """Llama 3.1-8B shapes (llama3 RoPE scaling, untied embeddings)."""
        return cls(family="llama", vocab_size=128_256, hidden_size=4096, num_layers=32,
                   num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14_336,
                   rms_norm_eps=1e-5, rope_theta=500_000.0,
                   rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), tie_word_embeddings=False,
                   max_position_embeddings=131_072, eos_token_ids=(128_001,), bos_token_id=128_000)

    @classmethod
    def tiny(cls, family: str = "qwen2", **overrides: Any) -> "ModelConfig":
        """A few-thousand-parameter model of `family` for CPU tests and smoke runs.

        The switches match the family (Qwen2: qkv bias, tied; Qwen3: q/k norm,
        head_dim != hidden/heads; Llama: llama3 RoPE scaling that bites at
        short lengths, untied), so a tiny model exercises every code path.
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
        else:
            raise ValueError(f"tiny(family={family!r}): expected one of {sorted(_SUPPORTED)}.")
        base.update(overrides)
        return cls(family=family, **base)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A preset by name, e.g. `"qwen2_0p5b"`, `"tiny"`, with field overrides."""
        presets = {"qwen2_0p5b", "qwen2_7b", "qwen3_0p6b", "llama3p2_1b", "llama3_8b", "tiny"}
        if name not in presets:
            raise ValueError(f"model preset {name!r} is unknown; expected one of {sorted(presets)}.")
        if name == "tiny":
            return cls.tiny(**overrides)
        return getattr(cls, name)().replace(**overrides)

    # ------------------------------------------------------------- HF config I/O
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Translate an HF `config.json` dict, refusing options we do not implement.

        Accepts both the transformers 4 layout (`rope_theta`, `rope_scaling`)
        and the transformers 5 layout (`rope_parameters`). `source` names the
        file in error messages.
        """
        model_type = hf.get("model_type")
        if model_type not in _SUPPORTED:
            raise ValueError(
                f"{source}: model_type={model_type!r} is not supported; arcstream implements "
                f"{sorted(_SUPPORTED)} (architectures {sorted(_SUPPORTED.values())})."
            )
        archs = hf.get("architectures") or [_SUPPORTED[model_type]]
        bad = [a for a in archs if a != _SUPPORTED[model_type]]
        if bad:
            raise ValueError(
                f"{source}: architectures={archs!r} is not supported for model_type "
                f"{model_type!r}; expected [{_SUPPORTED[model_type]!r}] (a causal LM)."
            )

        def refuse(field: str, value: Any, expected: str) -> None:
            raise ValueError(
                f"{source}: {field}={value!r} is not supported by arcstream's {model_type} "
                f"decoder (expected {expected}); running it would give a different model."
            )

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            refuse("hidden_act", act, "'silu'")
        if hf.get("use_sliding_window", False):
            refuse("use_sliding_window", True, "false")
        layer_types = hf.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            refuse("layer_types", sorted(set(layer_types)), "only 'full_attention'")
        if hf.get("pretraining_tp", 1) not in (1, None):
            # HF ignores it in eval (the sliced matmuls give the same result); say so by accepting.
            pass

        # RoPE: transformers 5 nests theta and scaling in `rope_parameters`.
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        if legacy and not rope.get("rope_type"):
            rope.update(legacy)
        theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if partial not in (1, 1.0, None):
            refuse("partial_rotary_factor", partial, "1.0")
        scaling = None
        if rope_type == "llama3":
            try:
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            except KeyError as e:
                raise ValueError(
                    f"{source}: rope_type 'llama3' needs {e.args[0]!r} in rope_scaling/"
                    f"rope_parameters; got {sorted(rope)}."
                ) from None
        elif rope_type != "default":
            refuse("rope_type", rope_type, "'default' or 'llama3'")

        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // heads
        attention_bias = bool(hf.get("attention_bias", False))
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = attention_bias
        mlp_bias = bool(hf.get("mlp_bias", False)) if model_type == "llama" else False
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            family=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            intermediate_size=int(hf["intermediate_size"]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 32_768)),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            bos_token_id=hf.get("bos_token_id"),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read an HF `config.json`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_config(json.load(f), source=str(path))

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict (transformers 5 layout) that reads back as `self`.

        Raises if the switches cannot be expressed by the family's HF config
        (e.g. Qwen2 without qkv bias).
        """
        f = self.family
        if f == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ValueError("a qwen2 config.json always means qkv_bias=True, o_bias=False; "
                             f"got qkv_bias={self.qkv_bias}, o_bias={self.o_bias}.")
        if f != "qwen2" and self.qkv_bias != self.o_bias:
            raise ValueError(f"a {f} config.json has one `attention_bias` for q/k/v/o; got "
                             f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}.")
        if self.qk_norm != (f == "qwen3"):
            raise ValueError(f"qk_norm={self.qk_norm} is not expressible for family {f!r}.")
        if self.mlp_bias and f != "llama":
            raise ValueError(f"mlp_bias=True is not expressible for family {f!r}.")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
        eos: Any = (None if not self.eos_token_ids else
                    self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids))
        out: dict[str, Any] = {
            "architectures": [_SUPPORTED[f]],
            "model_type": f,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "eos_token_id": eos,
            "bos_token_id": self.bos_token_id,
        }
        if f != "qwen2":
            out["attention_bias"] = self.qkv_bias
        if f == "llama":
            out["mlp_bias"] = self.mlp_bias
        else:
            out["use_sliding_window"] = False
        return out


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies [H/2], float32.

    Computed in float32 with the same operation order as HF, because at
    positions in the hundreds a float64 table already differs from HF's by
    more than the 1e-4 alignment tolerance allows for.
    Llama 3 scaling: long wavelengths are slowed by `factor`, short ones kept,
    the band between interpolated (the `llama3` rule of HF/Meta).
    """
    h = config.head_dim
    exponent = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    low_wavelen = np.float32(s.original_max_position_embeddings / s.low_freq_factor)
    high_wavelen = np.float32(s.original_max_position_embeddings / s.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(s.factor), inv).astype(np.float32)
    smooth = ((np.float32(s.original_max_position_embeddings) / wavelen - np.float32(s.low_freq_factor))
              / np.float32(s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
