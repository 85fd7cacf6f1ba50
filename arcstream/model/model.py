"""The Flax NNX decoder shared by Qwen2/Qwen2.5, Qwen3, Llama 2/3/3.x, Mistral, Gemma 2 and Gemma 3 (text).

Module paths mirror the HF parameter names (`layers.3.self_attn.q_proj.kernel`
for `model.layers.3.self_attn.q_proj.weight`) so that `params.py` is a short
regex table.  Kernels are stored `[in, out]` (HF stores `[out, in]`).

Numerics follow HF deliberately, because the captured activations must be the
ones the HF model computes: RMSNorm normalises in float32 and casts back before
the scale (Gemma: multiplies by (1 + weight) in float32, then casts); RoPE
tables are float32 cast to the activation dtype; attention softmax runs in
float32; Gemma's embedding factor sqrt(D) is rounded to the activation dtype
first (HF casts it to the embedding dtype: 55.5, not 55.4256, for D=3072 in
bf16).

Blocks (the config's switches, `arcstream.model.config`):

  Llama/Qwen/Mistral:  mid = x + attn(norm1(x));             out = mid + mlp(norm2(mid))
  Gemma 2/3:           mid = x + post1(attn(norm1(x)));      out = mid + post2(mlp(pre2(mid)))

with HF's names norm1 = `input_layernorm`; norm2 = `post_attention_layernorm`
(Llama: the norm *before* the MLP); Gemma: post1 = `post_attention_layernorm`
(after attention), pre2 = `pre_feedforward_layernorm`, post2 =
`post_feedforward_layernorm`.  Per-layer attention: a sliding window on the
layers `ModelConfig.layer_window` names (every layer for Mistral, alternating
for Gemma), the layer's own RoPE table (`ModelConfig.layer_rope`: Gemma 3's
local layers use `rope_local_theta`), Gemma's scale
`query_pre_attn_scalar ** -0.5` and Gemma 2's logit soft-cap, all passed to
the attention function.

Capture sites mean what TransformerLens's hooks of the same names mean
(checked against transformer_lens 3.9 `components/transformer_block.py`):

- `hook_resid_pre`: the block's input (layer 0: the embeddings, for Gemma
  already times sqrt(D), as TransformerLens folds that factor into W_E).
- `hook_attn_out`: what the attention branch adds to the residual stream;
  for Gemma that is *after* the post-attention norm (`post1` above), as
  TransformerLens applies `ln1_post` before `hook_attn_out`.
- `hook_resid_mid`: `resid_pre + attn_out`, what the MLP branch reads (before its
  norm): the input of an MLP transcoder (circuit-tracer's default feature_input_hook).
- `hook_mlp_out`: likewise the MLP branch's addition; for Gemma *after*
  `post_feedforward_layernorm` (TransformerLens's `ln2_post`).
- `hook_resid_post`: the block's output, `mid + mlp_out` (HF
  `hidden_states[L + 1]`; the last layer's is before the final norm).
So `resid_post == resid_pre + attn_out + mlp_out` holds for every family.

Packed rows: a `[B, T]` row may hold several prompts.  `segment_ids_bt` names
the prompt of each token (0 = padding) and `positions_bt` its position inside
that prompt.  A token attends to earlier-or-equal tokens *of its own segment
only*, and RoPE uses `positions_bt`, so a prompt's activations do not depend
on its neighbours (tested).

Attention over packed rows goes through `arcstream.model.attention.attention`,
whose implementation (`Decoder.attention`: auto | dense | blocked | splash |
gpu) is chosen when the model is built (`load_model(..., attention=...)`, the
jobs' `--config.model_options.attention`); no implementation but `dense`
builds a [T, T] array.  Generation's prefill goes through the same function
(the prompt's own keys, segment ids: memory linear in the prompt); a decode
step attends densely over the cache with an explicit [B, 1, S] mask, and a
sliding layer's cache is a ring of `window` slots (`generate`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcstream.model.attention import IMPLEMENTATIONS, attention, masked_attention
from arcstream.model.config import ModelConfig, rope_inv_freq
from arcstream.model.sharding import constrain

Rules = Sequence[tuple[str, str | None]] | None

HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
_SITE_RE = re.compile(r"^blocks\.(\d+|\*)\.(" + "|".join(HOOKS) + r")$")

_BTD = ("activation_batch", "activation_length", "activation_embed")
_BTNH = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_BTF = ("activation_batch", "activation_length", "activation_mlp")
_BTV = ("activation_batch", "activation_length", "activation_vocab")


# ---------------------------------------------------------------------------- sites
def parse_sites(spec: str | Sequence[str], num_layers: int) -> tuple[str, ...]:
    """Validate capture-site names and return them in canonical order.

    `spec` is a comma-separated string or a sequence of names such as
    `blocks.11.hook_resid_post`; `blocks.*.hook_X` expands to every layer.
    The result is sorted by (layer, hook order in the block) and de-duplicated,
    so equal site sets give equal jit cache keys.
    """
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    out: set[tuple[int, int]] = set()
    for name in names:
        m = _SITE_RE.match(name)
        if m is None:
            raise ValueError(
                f"capture site {name!r} is not a valid name; expected 'blocks.{{L}}.HOOK' with HOOK "
                f"one of {list(HOOKS)} and L in [0, {num_layers - 1}] (or '*'), "
                "e.g. 'blocks.11.hook_resid_post'."
            )
        hook = HOOKS.index(m.group(2))
        if m.group(1) == "*":
            out.update((layer, hook) for layer in range(num_layers))
            continue
        layer = int(m.group(1))
        if layer >= num_layers:
            raise ValueError(
                f"capture site {name!r}: layer {layer} does not exist; the model has "
                f"{num_layers} layers (0..{num_layers - 1})."
            )
        out.add((layer, hook))
    return tuple(f"blocks.{layer}.{HOOKS[hook]}" for layer, hook in sorted(out))


def _site_layer(site: str) -> int:
    return int(site.split(".")[1])


# ---------------------------------------------------------------------------- output
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """What `forward` returns.

    logits:   [B, T, V] in the activation dtype, or None when not requested.
    captures: site name -> [B, T, D] activation, in the activation dtype.
    """

    logits: jax.Array | None
    captures: dict[str, jax.Array]


# ---------------------------------------------------------------------------- layers
def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A Param tagged with logical axes (our own metadata key, read by the loader).

    Not flax's `out_sharding`: flax would place the value at creation and fail
    on dimensions that do not divide the mesh; the loader places each tensor.
    """
    return nnx.Param(value, logical_axes=axes)


class Linear(nnx.Module):
    """y = x @ kernel[in, out] (+ bias[out])."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kernel = _param(0.02 * jax.random.normal(rngs.params(), (d_in, d_out), dtype), axes)
        self.bias = _param(jnp.zeros((d_out,), dtype), (axes[1],)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """HF RMSNorm, in either of HF's two orders.

    Llama/Qwen/Mistral: normalise in float32, cast back, then multiply by `weight`.
    Gemma (`plus_one`): normalise in float32, multiply by (1 + weight) in
    float32, then cast (HF `Gemma2RMSNorm`; the orders differ in bf16).  The
    stored weight is then 0-centred (a fresh model holds zeros, i.e. scale 1).
    """

    def __init__(self, dim: int, eps: float, axis: str, *, dtype: jnp.dtype, plus_one: bool = False):
        self.weight = _param((jnp.zeros if plus_one else jnp.ones)((dim,), dtype), (axis,))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * x32.astype(x.dtype)


def _rotate(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """HF's rotate-half RoPE (halves, not interleaved pairs)."""
    half = x_btnh.shape[-1] // 2
    rot = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos_bth[:, :, None, :] + rot * sin_bth[:, :, None, :]


def rope_tables(config: ModelConfig, positions_bt: jax.Array, dtype: jnp.dtype,
                kind: str = "global") -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H] for `positions_bt`, float32 math cast to `dtype` (as HF).

    `kind`: "global", or "local" for the sliding layers of a model with a RoPE
    base of their own (Gemma 3); `ModelConfig.layer_rope(i)` says which a layer uses.
    """
    inv_h2 = jnp.asarray(rope_inv_freq(config, kind))
    ang_bth2 = positions_bt.astype(jnp.float32)[..., None] * inv_h2
    ang_bth = jnp.concatenate([ang_bth2, ang_bth2], axis=-1)
    return jnp.cos(ang_bth).astype(dtype), jnp.sin(ang_bth).astype(dtype)


KVCache = tuple[jax.Array, jax.Array]  # k_bskh, v_bskh


class Attention(nnx.Module):
    """GQA self-attention of block `layer`: its window, scale and soft-cap come from the config (static)."""

    def __init__(self, c: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, rules: Rules, layer: int = 0):
        d = c.hidden_size
        self.q_proj = Linear(d, c.q_size, ("embed", "q_heads"), bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, c.kv_size, ("embed", "kv_heads"), bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, c.kv_size, ("embed", "kv_heads"), bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(c.q_size, d, ("q_heads", "embed"), bias=c.o_bias, dtype=dtype, rngs=rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, "head_dim", dtype=dtype, plus_one=c.norm_plus_one)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, "head_dim", dtype=dtype, plus_one=c.norm_plus_one)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.window = c.layer_window(layer)  # None = full causal attention
        self.scale = c.attn_scale  # None = 1/sqrt(head_dim)
        self.softcap = c.attn_logit_softcap
        self.rules = tuple(rules) if rules is not None else None

    def __call__(self, x_btd: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array,
                 segment_ids_bt: jax.Array | None = None, *, mask_bts: jax.Array | None = None,
                 cache: KVCache | None = None, cache_index: jax.Array | None = None,
                 implementation: str = "auto") -> tuple[jax.Array, KVCache | None]:
        """Attention output [B, T, D] (after o_proj) and the updated KV cache.

        Without `mask_bts`, keys are this call's tokens (S = T), seen through
        `segment_ids_bt` (causal within a segment) by `implementation`; with a
        cache too (generation's prefill, `cache_index` 0), this call's
        keys/values are also written into it.  With `mask_bts` [B, T, S], the
        queries attend densely over the slots it allows: of the whole cache
        (S = cache length; a decode step) after this call's keys/values are
        written at `cache_index`.  A sliding layer also hides slots `window`
        or more before the query's slot (query t sits at slot cache_index + t):
        generation keeps each row's tokens in consecutive slots, so slot
        distance is position distance.

        Windowed cache: a sliding layer's cache may hold only L <= window
        slots, as a ring (slot j at j mod L; `generate` does this when the
        window is shorter than prompt + new tokens).  A prefill longer than L
        keeps its last L keys/values; a decode step writes at cache_index mod
        L, and `mask_bts` [B, T, L] then names the valid ring entries (the
        ring holds exactly the slots the window lets a query see, so no
        window mask is added).
        """
        b, t, _ = x_btd.shape
        q_btnh = self.q_proj(x_btd).reshape(b, t, self.num_heads, self.head_dim)
        k_btkh = self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        v_btkh = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        q_btnh = constrain(_rotate(q_btnh, cos_bth, sin_bth), _BTNH, self.rules)
        k_btkh = constrain(_rotate(k_btkh, cos_bth, sin_bth), _BTNH, self.rules)
        v_btkh = constrain(v_btkh, _BTNH, self.rules)
        new_cache = None
        ring = cache is not None and self.window is not None and cache[0].shape[1] <= self.window
        if cache is not None:
            new_cache = tuple(_cache_write(c_bskh, x_btkh, cache_index, ring)
                              for c_bskh, x_btkh in zip(cache, (k_btkh, v_btkh)))
        if mask_bts is not None:
            k_bskh, v_bskh = new_cache if new_cache is not None else (k_btkh, v_btkh)
            if self.window is not None and not ring:
                q_slot_t = jnp.arange(t) + (0 if cache_index is None else jnp.asarray(cache_index, jnp.int32))
                k_slot_s = jnp.arange(k_bskh.shape[1])
                mask_bts = mask_bts & (q_slot_t[:, None] - k_slot_s[None, :] < self.window)[None]
            o_btnh = masked_attention(q_btnh, k_bskh, v_bskh, mask_bts, scale=self.scale, softcap=self.softcap)
        else:
            if cache is not None and segment_ids_bt is None:
                raise ValueError("Attention with a KV cache needs mask_bts [B, T, S] (a decode step) or "
                                 "segment_ids_bt [B, T] (the prefill, cache_index 0)")
            o_btnh = attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, implementation=implementation,
                               scale=self.scale, window=self.window, softcap=self.softcap)
        o_btnh = constrain(o_btnh, _BTNH, self.rules)
        return self.o_proj(o_btnh.reshape(b, t, self.num_heads * self.head_dim)), new_cache


def _cache_write(cache_bskh: jax.Array, x_btkh: jax.Array, cache_index, ring: bool) -> jax.Array:
    """`x_btkh` written into the cache at slot `cache_index` (slots [i, i + T)); a ring of L slots keeps
    slot j at j mod L, so a write longer than L (a prefill at index 0) keeps only its last L slots."""
    length, t = cache_bskh.shape[1], x_btkh.shape[1]
    x_btkh = x_btkh.astype(cache_bskh.dtype)
    index = jnp.asarray(cache_index, jnp.int32)
    if ring and t > length:  # the prefill of a prompt longer than the ring: slot T - L + i goes to (T - L + i) mod L
        return jnp.roll(x_btkh[:, t - length:], (t - length) % length, axis=1)
    if ring:
        index = index % length  # a decode step (T = 1), or a prefill that fits (index 0)
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(cache_bskh, x_btkh, (zero, index, zero, zero))


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); act = silu (SwiGLU) or tanh-approximated GELU (GeGLU, Gemma)."""

    def __init__(self, c: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, rules: Rules):
        d, f = c.hidden_size, c.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.hidden_act = c.hidden_act
        self.rules = tuple(rules) if rules is not None else None

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        gate_btf = self.gate_proj(x_btd)
        if self.hidden_act == "gelu_pytorch_tanh":  # torch gelu(approximate="tanh")
            act_btf = jax.nn.gelu(gate_btf, approximate=True)
        else:
            act_btf = jax.nn.silu(gate_btf)
        h_btf = act_btf * self.up_proj(x_btd)
        return self.down_proj(constrain(h_btf, _BTF, self.rules))


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn_out(x), then + mlp_out(.) (Gemma: with post-norms; module docstring)."""

    def __init__(self, c: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, rules: Rules, layer: int = 0):
        def norm() -> RMSNorm:
            return RMSNorm(c.hidden_size, c.rms_norm_eps, "norm", dtype=dtype, plus_one=c.norm_plus_one)

        self.input_layernorm = norm()
        self.self_attn = Attention(c, dtype=dtype, rngs=rngs, rules=rules, layer=layer)
        # Llama/Qwen/Mistral: the norm before the MLP. Gemma: the norm after attention (HF's names).
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm() if c.sandwich_norms else None
        self.post_feedforward_layernorm = norm() if c.sandwich_norms else None
        self.mlp = MLP(c, dtype=dtype, rngs=rngs, rules=rules)
        self.sandwich_norms = c.sandwich_norms
        self.rules = tuple(rules) if rules is not None else None

    def attn_out(self, x_btd, cos_bth, sin_bth, segment_ids_bt=None, *, mask_bts=None, cache=None,
                 cache_index=None, implementation: str = "auto"):
        """(what attention adds to the residual stream [B, T, D], new KV cache): site `hook_attn_out`."""
        attn_btd, new_cache = self.self_attn(self.input_layernorm(x_btd), cos_bth, sin_bth, segment_ids_bt,
                                             mask_bts=mask_bts, cache=cache, cache_index=cache_index,
                                             implementation=implementation)
        if self.sandwich_norms:
            attn_btd = self.post_attention_layernorm(attn_btd)
        return attn_btd, new_cache

    def mlp_out(self, mid_btd: jax.Array) -> jax.Array:
        """What the MLP adds to the residual stream `mid_btd` [B, T, D]: site `hook_mlp_out`."""
        if self.sandwich_norms:
            return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(mid_btd)))
        return self.mlp(self.post_attention_layernorm(mid_btd))

    def __call__(self, x_btd, cos_bth, sin_bth, segment_ids_bt=None, *, mask_bts=None, cache=None,
                 cache_index=None, implementation: str = "auto"):
        """Returns (resid_post, attn_out, mlp_out, new_cache), all [B, T, D]."""
        attn_btd, new_cache = self.attn_out(x_btd, cos_bth, sin_bth, segment_ids_bt, mask_bts=mask_bts,
                                            cache=cache, cache_index=cache_index, implementation=implementation)
        mid_btd = constrain(x_btd + attn_btd, _BTD, self.rules)
        mlp_btd = self.mlp_out(mid_btd)
        out_btd = constrain(mid_btd + mlp_btd, _BTD, self.rules)
        return out_btd, attn_btd, mlp_btd, new_cache


class Embedding(nnx.Module):
    """Token embedding [V, D] (also the LM head when embeddings are tied)."""

    def __init__(self, vocab: int, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.embedding = _param(0.02 * jax.random.normal(rngs.params(), (vocab, dim), dtype),
                                ("vocab", "embed"))


class Decoder(nnx.Module):
    """Embedding, `num_layers` blocks, final norm, LM head (tied or not).

    Attributes mirror HF names: `embed_tokens.embedding`, `layers[i]`, `norm`,
    `lm_head` (None when tied).  `config`, `dtype`, `rules` and `attention`
    (the attention implementation, see arcstream.model.attention) are static.
    """

    def __init__(self, config: ModelConfig, *, dtype: str | jnp.dtype = "float32",
                 rngs: nnx.Rngs, rules: Rules = None, attention: str = "auto"):
        dt = jnp.dtype(dtype)
        if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'bfloat16'.")
        if attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention={attention!r}: expected one of {list(IMPLEMENTATIONS)} "
                             "(--config.model_options.attention)")
        c = config
        self.config = c
        self.attention = attention
        self.dtype = dt
        self.rules = tuple(rules) if rules is not None else None
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=dt, rngs=rngs)
        self.layers = nnx.List([Block(c, dtype=dt, rngs=rngs, rules=rules, layer=i) for i in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, "norm", dtype=dt, plus_one=c.norm_plus_one)
        self.lm_head = (None if c.tie_word_embeddings else
                        Linear(c.hidden_size, c.vocab_size, ("embed", "vocab"), bias=False, dtype=dt, rngs=rngs))

    def embed(self, tokens_bt: jax.Array) -> jax.Array:
        """[B, T, D] layer-0 input: the embedding rows (Gemma: times sqrt(D) rounded to the dtype, as HF)."""
        x_btd = jnp.take(self.embed_tokens.embedding[...], tokens_bt, axis=0)
        if self.config.scale_embeddings:
            # HF: torch.tensor(D ** 0.5) (float32) .to(embedding dtype), then the product in that dtype.
            x_btd = x_btd * jnp.asarray(np.float32(self.config.hidden_size ** 0.5), x_btd.dtype)
        return constrain(x_btd, _BTD, self.rules)

    def logits(self, x_btd: jax.Array) -> jax.Array:
        """[B, T, V] logits from the last block's output (final norm, head, Gemma's final soft-cap)."""
        h_btd = self.norm(x_btd)
        if self.lm_head is None:
            out = jnp.einsum("btd,vd->btv", h_btd, self.embed_tokens.embedding[...])
        else:
            out = self.lm_head(h_btd)
        cap = self.config.final_logit_softcap
        if cap is not None:
            out = jnp.tanh(out / cap) * cap  # HF's order: divide, tanh, multiply
        return constrain(out, _BTV, self.rules)


# ---------------------------------------------------------------------------- forward
def forward(model: Decoder, tokens_bt: jax.Array, segment_ids_bt: jax.Array,
            positions_bt: jax.Array, *, sites: Sequence[str] = (),
            return_logits: bool = True,
            edits: Mapping[str, Callable[[jax.Array], jax.Array]] | None = None) -> ModelOutput:
    """Run the decoder on packed rows and return logits and/or captured sites.

    tokens_bt, segment_ids_bt, positions_bt: int [B, T]; segment 0 = padding.
    sites: names from `parse_sites` (static under jit); each is returned as
    [B, T, D].  If `return_logits` is False the blocks after the deepest
    captured layer are not run at all (most of a capture run's speed).
    edits: site -> fn; the site's activation [B, T, D] is replaced by
    fn(activation) and the model runs on from the replacement (which is also
    what a capture of that site returns): splices, ablations, steering.  The
    functions are Python callables, so jit `forward` with them closed over
    (not through `forward_jit`).

    Jit it with `nnx.jit(forward, static_argnames=("sites", "return_logits"))`
    or, faster per call, `jax.jit` over `nnx.split(model)` state.
    """
    c = model.config
    sites = tuple(sites)
    edits = dict(edits or {})
    for s in sites + tuple(edits):
        if not _SITE_RE.match(s) or "*" in s or _site_layer(s) >= c.num_layers:
            parse_sites([s], c.num_layers)  # raises with the explanation
    if not sites and not return_logits:
        raise ValueError("forward(sites=(), return_logits=False) would compute nothing; "
                         "name at least one site or ask for logits.")
    last = c.num_layers - 1 if return_logits else max(_site_layer(s) for s in sites)
    wanted = set(sites)
    captures: dict[str, jax.Array] = {}

    def site(name: str, value: jax.Array) -> jax.Array:
        if name in edits:
            value = edits[name](value)
        if name in wanted:
            captures[name] = value
        return value

    x_btd = model.embed(tokens_bt)
    tables = {kind: rope_tables(c, positions_bt, model.dtype, kind) for kind in c.rope_kinds}
    for i in range(last + 1):
        blk = model.layers[i]
        cos_bth, sin_bth = tables[c.layer_rope(i)]
        x_btd = site(f"blocks.{i}.hook_resid_pre", x_btd)
        attn_btd, _ = blk.attn_out(x_btd, cos_bth, sin_bth, segment_ids_bt, implementation=model.attention)
        attn_btd = site(f"blocks.{i}.hook_attn_out", attn_btd)
        mid_btd = site(f"blocks.{i}.hook_resid_mid", constrain(x_btd + attn_btd, _BTD, model.rules))
        mlp_btd = site(f"blocks.{i}.hook_mlp_out", blk.mlp_out(mid_btd))
        x_btd = site(f"blocks.{i}.hook_resid_post", constrain(mid_btd + mlp_btd, _BTD, model.rules))
    logits = model.logits(x_btd) if return_logits else None
    return ModelOutput(logits=logits, captures={s: captures[s] for s in sites})


# ---------------------------------------------------------------------------- job options
def default_model_options() -> "ml_collections.ConfigDict":
    """The `model_options` section of every job config that runs a model (one definition for all)."""
    import ml_collections

    o = ml_collections.ConfigDict()
    o.attention = "auto"  # auto | dense | blocked | splash | gpu (arcstream/model/attention.py says which is which)
    return o


def attention_option(config: "ml_collections.ConfigDict") -> str:
    """`config.model_options.attention`, checked; "auto" for configs built without the section. `config` is
    a ConfigDict or a job's frozen options (whose `model_options` is a section)."""
    opts = config.get("model_options") if hasattr(config, "get") else getattr(config, "model_options", None)
    value = str(opts.get("attention", "auto")) if opts is not None else "auto"
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"--config.model_options.attention={value!r}: expected one of {list(IMPLEMENTATIONS)}")
    return value


# `forward` under `nnx.jit` (sites and return_logits static).  One compile per
# (shapes, sites); prefer it to calling `forward` eagerly, which dispatches and
# compiles every operation separately.
forward_jit = nnx.jit(forward, static_argnames=("sites", "return_logits"))
