"""Batched greedy decoding with a KV cache, in one jitted `lax.while_loop`.

Layout: prompts are *left*-padded to a common length P, so every row writes
its t-th new token into the same cache slot P + t (one `dynamic_update_slice`
for the batch).  Positions restart at 0 at each prompt's first real token, so
a left-padded prompt computes exactly what it computes alone (HF does the same
with `attention_mask`).  The loop stops when every row has emitted an EOS or
after `max_new_tokens`.

Windowed caches: a sliding-window layer (Mistral, Gemma 2/3 local layers)
whose window w is shorter than P + max_new_tokens keeps only w slots, as a
ring (slot j at j mod w; `Attention`), with its own [B, w] validity mask, so
its cache and each decode step's attention are O(w), not O(P): Gemma 3's
five local layers of six hold 1,024 slots however long the ARC prompt.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcstream.model.model import Decoder, rope_tables
from arcstream.model.sharding import constrain

_CACHE = ("activation_batch", "cache_length", "activation_heads", "activation_head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Greedy continuations.

    tokens:        int32 [B, max_new_tokens]; after a row's EOS (which is kept) `pad_id`.
    logprobs:      float32 [B, max_new_tokens]; log p(token | prefix), 0 after the stop.
    num_generated: int32 [B]; tokens emitted per row, the EOS included.
    """

    tokens: jax.Array
    logprobs: jax.Array
    num_generated: jax.Array


def _left_pad(prompts: Sequence[np.ndarray] | np.ndarray, lengths: Sequence[int] | np.ndarray | None,
              pad_id: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P] left-padded, valid [B, P] bool) with P rounded up to `multiple`."""
    if lengths is not None:
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"generate: with `lengths`, prompts must be a padded [B, T] array; got shape {arr.shape}.")
        lengths = np.asarray(lengths)
        if lengths.shape != (arr.shape[0],) or (lengths < 1).any() or (lengths > arr.shape[1]).any():
            raise ValueError(f"generate: lengths {lengths.tolist()} must be [B] values in 1..{arr.shape[1]}.")
        rows = [arr[i, : int(n)] for i, n in enumerate(lengths)]
    else:
        arr = np.asarray(prompts) if not isinstance(prompts, (list, tuple)) else None
        rows = [np.asarray(r) for r in prompts] if arr is None or arr.ndim != 2 else list(arr)
    if not rows:
        raise ValueError("generate: no prompts given.")
    for i, r in enumerate(rows):
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"generate: prompt {i} has shape {r.shape}; expected a non-empty 1-D token array.")
    p = max(r.size for r in rows)
    p = -(-p // multiple) * multiple
    tokens = np.full((len(rows), p), pad_id, np.int32)
    valid = np.zeros((len(rows), p), bool)
    for i, r in enumerate(rows):
        tokens[i, p - r.size:] = r
        valid[i, p - r.size:] = True
    return tokens, valid


def generate(model: Decoder, prompts: Sequence[np.ndarray] | np.ndarray, *, max_new_tokens: int,
             eos_id: int | Sequence[int], pad_id: int, lengths: Sequence[int] | None = None,
             pad_to_multiple: int = 8, allowed: np.ndarray | None = None) -> GenerateOutput:
    """Greedy-decode up to `max_new_tokens` tokens after each prompt.

    prompts: a list of 1-D int token arrays, or a right-padded [B, T] array with
      `lengths` [B].  Prompt lengths are rounded up to `pad_to_multiple` to
      limit recompilation (the extra left padding is masked out).
    eos_id: one id or several (Llama 3 stops on any of a few).
    allowed: optional int32 [B, max_new_tokens, K]: the token ids row b may emit
      at step t (-1 = unused; a step whose K entries are all -1 is free). The
      greedy choice is the argmax over the allowed ids; the recorded log-prob is
      the model's own, over the whole vocabulary (`arcstream.predict.shape`
      builds these for shape-constrained answers).
    Equals HF `generate(do_sample=False)` token for token (tested) without `allowed`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens}; expected >= 1.")
    eos = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(int(e) for e in eos_id)
    if not eos:
        raise ValueError("generate: eos_id is empty; give at least one stop token id.")
    tokens_bp, valid_bp = _left_pad(prompts, lengths, pad_id, pad_to_multiple)
    graphdef, state = nnx.split(model)
    # Stop ids as a fixed-size traced array (-1 never matches) so that changing
    # them does not recompile.
    if len(eos) > _MAX_EOS:
        raise ValueError(f"generate: {len(eos)} eos ids given; at most {_MAX_EOS} are supported.")
    eos_e = np.full((_MAX_EOS,), -1, np.int32)
    eos_e[: len(eos)] = eos
    b = tokens_bp.shape[0]
    if allowed is None:
        allowed = np.full((b, max_new_tokens, 1), -1, np.int32)
    allowed = np.asarray(allowed, np.int32)
    if allowed.ndim != 3 or allowed.shape[:2] != (b, max_new_tokens):
        raise ValueError(f"generate: allowed has shape {allowed.shape}; expected [{b}, {max_new_tokens}, K]")
    out = _generate_jit(graphdef, state, jnp.asarray(tokens_bp), jnp.asarray(valid_bp),
                        jnp.asarray(eos_e), jnp.asarray(allowed), max_new_tokens, int(pad_id))
    return out


_MAX_EOS = 8


def _pick(logits_bv: jax.Array, allowed_bk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy token among the allowed ids (all where a row's ids are all -1), and its unmasked log-prob."""
    b = logits_bv.shape[0]
    free_b = jnp.all(allowed_bk < 0, axis=-1)
    ok_bv = jnp.zeros(logits_bv.shape, jnp.int32).at[jnp.arange(b)[:, None], jnp.maximum(allowed_bk, 0)].max(
        (allowed_bk >= 0).astype(jnp.int32))
    masked_bv = jnp.where((ok_bv > 0) | free_b[:, None], logits_bv, -jnp.inf)
    tok_b = jnp.argmax(masked_bv, axis=-1).astype(jnp.int32)
    lp_b = jnp.take_along_axis(jax.nn.log_softmax(logits_bv), tok_b[:, None], axis=1)[:, 0]
    return tok_b, lp_b


def cache_lengths(config, slots: int, windowed: bool = True) -> list[int]:
    """Cache slots per layer for `slots` = P + max_new_tokens: a sliding layer whose window is shorter
    keeps a ring of `window` slots (with `windowed`), every other layer all of them."""
    return [w if windowed and w is not None and w < slots else slots
            for w in (config.layer_window(i) for i in range(config.num_layers))]


def _ring(valid_bp: jax.Array, length: int) -> jax.Array:
    """[B, length] validity of a ring after the prefill of slots [0, P): entry j mod length holds the
    newest slot j (the prompt's last `length` slots; entries past a shorter prompt are not yet written)."""
    p = valid_bp.shape[1]
    if p <= length:
        return jnp.pad(valid_bp, ((0, 0), (0, length - p)))
    return jnp.roll(valid_bp[:, p - length:], (p - length) % length, axis=1)


@partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _generate_jit(graphdef, state, tokens_bp, valid_bp, eos_e, allowed_bnk, max_new: int,
                  pad_id: int, windowed: bool = True) -> GenerateOutput:
    model = nnx.merge(graphdef, state)
    c = model.config
    b, p = tokens_bp.shape
    s = p + max_new
    rules = model.rules
    lengths_b = valid_bp.sum(axis=1).astype(jnp.int32)
    positions_bp = jnp.maximum(jnp.cumsum(valid_bp, axis=1) - 1, 0).astype(jnp.int32)
    lengths = cache_lengths(c, s, windowed)
    caches = [tuple(constrain(jnp.zeros((b, n, c.num_kv_heads, c.head_dim), model.dtype), _CACHE, rules)
                    for _ in range(2)) for n in lengths]
    # Slot validity per cache length (the whole cache's [B, S]; a ring's [B, w], its entry j mod w
    # naming the newest slot j written there).
    key_valid = {n: _ring(valid_bp, n) for n in set(lengths)}  # n = s: the whole cache, [valid_bp, 0...]

    def run(x_btd, positions_bt, key_valid, caches, index, step, segment_ids_bt=None):
        # One RoPE table per kind the layers use (Gemma 3: local and global); a sliding layer with a
        # whole cache adds its window to the mask itself (Attention), from the slot of each query.
        tables = {kind: rope_tables(c, positions_bt, model.dtype, kind) for kind in c.rope_kinds}
        new = []
        for i, (layer, cache) in enumerate(zip(model.layers, caches)):
            cos, sin = tables[c.layer_rope(i)]
            mask_bts = None if key_valid is None else key_valid[lengths[i]][:, None, :]
            x_btd, _, _, cache = layer(x_btd, cos, sin, segment_ids_bt, mask_bts=mask_bts, cache=cache,
                                       cache_index=index, implementation=model.attention)
            new.append(cache)
        logits_bv = model.logits(x_btd[:, -1:])[:, 0].astype(jnp.float32)
        allowed_bk = jax.lax.dynamic_index_in_dim(allowed_bnk, jnp.minimum(step, max_new - 1), axis=1,
                                                  keepdims=False)
        tok_b, lp_b = _pick(logits_bv, allowed_bk)
        return tok_b, lp_b, new

    # Prefill, through the model's attention implementation (no [P, P] mask: `blocked` on a CPU keeps
    # memory linear in P): the prompt is segment 1 (causal), its left padding segment 0 (it sees only
    # padding, so its discarded outputs stay finite); the keys/values go into cache slots [0, P).
    segments_bp = valid_bp.astype(jnp.int32)
    tok_b, lp_b, caches = run(model.embed(tokens_bp), positions_bp, None, caches, 0, 0, segments_bp)

    def cond(carry):
        t, _, _, done_b, *_ = carry
        return (t < max_new) & ~jnp.all(done_b)

    def body(carry):
        t, tok_b, lp_b, done_b, n_b, caches, key_valid, out_tok, out_lp = carry
        emit_b = ~done_b
        out_tok = out_tok.at[:, t].set(jnp.where(emit_b, tok_b, pad_id))
        out_lp = out_lp.at[:, t].set(jnp.where(emit_b, lp_b, 0.0))
        n_b = n_b + emit_b.astype(jnp.int32)
        done_b = done_b | jnp.isin(tok_b, eos_e)
        slot = p + t
        key_valid = {n: jax.lax.dynamic_update_slice(v, jnp.ones((b, 1), bool), (0, slot % n))
                     for n, v in key_valid.items()}
        nxt_b, nlp_b, caches = run(model.embed(tok_b[:, None]), (lengths_b + t)[:, None],
                                   key_valid, caches, slot, t + 1)
        return t + 1, nxt_b, nlp_b, done_b, n_b, caches, key_valid, out_tok, out_lp

    init = (jnp.int32(0), tok_b, lp_b, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), caches,
            key_valid, jnp.full((b, max_new), pad_id, jnp.int32), jnp.zeros((b, max_new), jnp.float32))
    _, _, _, _, n_b, _, _, out_tok, out_lp = jax.lax.while_loop(cond, body, init)
    return GenerateOutput(tokens=out_tok, logprobs=out_lp, num_generated=n_b)
