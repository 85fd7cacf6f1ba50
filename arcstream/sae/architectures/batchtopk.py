"""BatchTopK SAEs (SAELens `batchtopk`; Bussmann et al. 2024, arXiv:2412.06410).

The batch keeps its k*B largest ReLU'd pre-activations (k per token on average), so
tokens that need more latents get them. Training selects sparsely and exactly
(`batchtopk_select`) and reconstructs through the row-sparse kernels; AuxK as topk.
Inference is JumpReLU with one learned global threshold, an EMA of the smallest kept
activation (`ema_threshold`), which is also how SAELens exports it. matryoshka.py
reuses the dense selection, the threshold and the inference encoding.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from arcstream.sae.architectures.base import (Architecture, AuxTerms, Buffers, Encoding, HParams, Latents, Params,
                                              SAEConfig, check_k, init_params, kept_preacts, preacts,
                                              register_architecture, saelens_weights, selection_preacts,
                                              unit_norm_decoder)
from arcstream.sae.architectures.topk import auxk_terms, top_k
from arcstream.sae.sparse import compact

# Sparse BatchTopK's tiers (batchtopk_select), in kept entries per token: every token up to 2k,
# the 1/4 of the batch's tokens that need it most up to 8k, the 1/64 their whole row.
# Batches of at most BATCHTOPK_DENSE_UP_TO activations (B * S) offer every row whole (small SAEs).
BATCHTOPK_TIERS = (2, 4, 8, 64)
BATCHTOPK_DENSE_UP_TO = 1 << 16
_SELECT_BLOCK = 16  # entries per block whose maxima bound the batch's threshold from below (at most)
_SELECT_BLOCKS_PER_K = 8  # and at least this many blocks per kept entry of a token (k), so the bound is tight


def batch_topk(pre_bs: jax.Array, k_max: int, k: jax.Array) -> jax.Array:
    """ReLU, then keep the k*B largest activations of the whole batch (k per token on average).

    The dense definition: one top-k over the flattened batch, SAELens's `BatchTopK`. `k_max`
    is static (the sweep's largest k); `k` may be traced (a sweep member's k <= k_max).
    Matryoshka trains with it; batchtopk trains with the sparse `batchtopk_select`, which
    equals it (tests).
    """
    acts_bs = jax.nn.relu(pre_bs)
    b = pre_bs.shape[0]
    top_n = jax.lax.top_k(jax.lax.stop_gradient(acts_bs).reshape(-1), k_max * b)[0]
    kth = top_n[k * b - 1]
    return jnp.where((acts_bs >= kth) & (acts_bs > 0), acts_bs, 0.0)


def _bits(v: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(v, jnp.int32)


def _row_counts(mask: jax.Array) -> jax.Array:
    """True entries per row (last axis), int32: summed as floats (exact below 2**24 a row), which XLA:CPU
    vectorises, unlike an int32 sum."""
    return jnp.sum(jnp.where(mask, 1.0, 0.0), axis=-1).astype(jnp.int32)


def kth_largest(parts: list[jax.Array], n: jax.Array, lower: jax.Array | None = None, slack_bits: int = 0
                ) -> jax.Array:
    """The n-th largest value among the non-negative entries of `parts` (negative entries never count).

    Exact, without sorting: bisection on the float's bits (for x >= 0 the int32 bit pattern
    orders as the value), one counting pass over the parts per bit, from `lower` (a value known
    to be <= the answer, e.g. a bound from block maxima) when given. With `slack_bits` > 0 it
    stops early and returns a lower bound whose bit pattern is less than 2**slack_bits below the
    answer's (16: within 1/128 of it). With fewer than n non-negative entries the result is 0.
    """
    hi0 = _bits(jnp.max(jnp.stack([jnp.max(p) for p in parts]))) + 1

    def count(t):
        return sum(jnp.sum(_row_counts(p >= t)) for p in parts)

    lo = jnp.zeros((), jnp.int32)
    if lower is not None:
        lower = jnp.maximum(lower, 0.0)
        lo = jnp.where(count(lower) >= n, _bits(lower), 0)

    def body(lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = count(jax.lax.bitcast_convert_type(mid, jnp.float32)) >= n
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.while_loop(lambda lohi: lohi[1] - lohi[0] > (1 << slack_bits), body,
                               (lo, jnp.maximum(hi0, lo + 1)))
    # Below the smallest normal float the comparisons flush to zero (XLA:CPU): such a result means 0.
    return jnp.where(lo < 0x00800000, 0.0, jax.lax.bitcast_convert_type(lo, jnp.float32))


def _candidates(pre_rs: jax.Array, max_rn: jax.Array, lo: jax.Array, n_blocks: int, width: int):
    """Each row's entries >= lo and > 0, ids ascending, at most `width` of them, read from its blocks
    whose maximum reaches lo (at most `n_blocks`) -> (vals [R, width] (-1 past the count), ids, need [R]).
    A row with more such blocks or entries than that loses the later ones (by id); `need` ranks rows
    by how many they may keep (entries >= lo; past every such uncut row when cut, by its block count)."""
    r, nb = max_rn.shape
    g = pre_rs.shape[1] // nb
    blk, n_blk = compact((max_rn >= lo) & (max_rn > 0), n_blocks)
    vals = jnp.take_along_axis(pre_rs.reshape(r, nb, g), blk[:, :, None], axis=1,
                               mode="promise_in_bounds").reshape(r, n_blocks * g)
    ok = (vals >= lo) & (vals > 0) & ((jnp.arange(n_blocks * g) // g)[None, :] < n_blk[:, None])
    pos, n = compact(ok, width)
    ids = jnp.take_along_axis(blk, pos // g, axis=1, mode="promise_in_bounds") * g + pos % g
    vals = jnp.where(jnp.arange(width)[None, :] < n[:, None],
                     jnp.take_along_axis(vals, pos, axis=1, mode="promise_in_bounds"), -1.0)
    need = jnp.where(n_blk > n_blocks, n_blocks * g + n_blk, n)
    return vals, ids, need


def batchtopk_select(pre_bs: jax.Array, k_max: int, k: jax.Array) -> dict[str, Any]:
    """BatchTopK's selection (the k*B largest ReLU'd pre-activations of the batch), sparsely and exactly.

    `pre_bs` [B, S]: values (no gradient). The kept set is every entry >= kth (and > 0),
    kth the (k*B)-th largest of the batch. How many a token keeps varies a lot (a trained
    d_sae 14,336 SAE at k 64: median 20, p99 ~620, max ~1,900), so tokens are split in tiers
    by how many they may keep (`BATCHTOPK_TIERS`): up to 2k, 8k for the B/4 tokens with the
    most candidates, the whole row for the B/64 with the most. Threshold first, then lists:
    * the rows' maxima over blocks of `_SELECT_BLOCK` give a lower bound lo of kth (at least
      k*B blocks reach it, `kth_largest` with slack), and only blocks reaching lo can hold
      kept entries;
    * each token's entries >= lo are listed (`_candidates`: `sparse.compact` of its blocks, then
      of their entries; no top-k, no sort), kth is found among them by bisection from lo, and
      each tier's list is compacted once more to the entries >= kth (`_select_from`).
    When the kept entries crowd into few tokens, lo is far below kth and a token may have more
    candidates than its tier lists; then kth, found without them, is low but still a lower bound,
    and the selection runs once more from it (only such batches pay for the second pass; under a
    sweep's vmap, when any member needs it; a token that keeps more than its tier's width is capped
    either way, and counted).
    Exact unless a token still keeps more than its tier holds (`capped_fraction`, else 0).
    Returns per tier the token rows, ids (ascending), values and how many are kept.
    """
    b, s = pre_bs.shape
    g = max(1, min(_SELECT_BLOCK, s // (_SELECT_BLOCKS_PER_K * k_max)))
    nb = -(-s // g)
    pre_pad = jnp.pad(pre_bs, ((0, 0), (0, nb * g - s)), constant_values=-jnp.inf) if nb * g != s else pre_bs
    max_bn = pre_pad.reshape(b, nb, g).max(axis=-1)
    lo = kth_largest([jax.nn.relu(max_bn)], k * b, slack_bits=16)  # k*B blocks reach lo, so kth >= lo
    select = functools.partial(_select_from, pre_bs, pre_pad, max_bn, k_max, k)

    # At most two passes, as a loop so the selection is compiled once (a cond holds two copies:
    # ~3.5 s more compilation per step program on a 2-core CPU).
    def again(carry):
        passes, sel = carry
        return (passes == 0) | ((passes < 2) & (sel["missed"] > 0))

    def one_pass(carry):
        passes, sel = carry
        return passes + 1, select(jnp.where(passes == 0, lo, sel["kth"]))

    empty = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(select, lo))
    return jax.lax.while_loop(again, one_pass, (jnp.zeros((), jnp.int32), empty))[1]


def _select_from(pre_bs, pre_pad, max_bn, k_max: int, k: jax.Array, lo: jax.Array) -> dict[str, Any]:
    """batchtopk_select from a lower bound `lo` of its kth (block maxima in `max_bn`, rows padded
    to whole blocks in `pre_pad`)."""
    b, s = pre_bs.shape
    nb, g = max_bn.shape[1], pre_pad.shape[1] // max_bn.shape[1]
    (f1, every2, f2, every3) = BATCHTOPK_TIERS
    c1, c2 = min(s, f1 * k_max), min(s, f2 * k_max)
    h2 = min(b, max(1, b // every2))
    h3 = min(h2, max(1, b // every3))
    if b * s <= BATCHTOPK_DENSE_UP_TO:
        h2 = h3 = b
    nb1, nb2 = min(nb, c1), min(nb, c2)  # a token keeps at least one entry of each block it lists
    vals1, ids1, need_b = _candidates(pre_pad, max_bn, lo, nb1, min(nb1 * g, 2 * c1))
    rows2_h = top_k(need_b.astype(jnp.float32), h2)[1]  # the tokens with the most candidates, most first
    rows3_h = rows2_h[:h3]
    vals2, ids2, _ = _candidates(pre_pad[rows2_h], max_bn[rows2_h], lo, nb2, min(nb2 * g, 2 * c2))
    acts3_hs = jax.nn.relu(pre_bs[rows3_h])
    in2_b = jnp.zeros((b,), bool).at[rows2_h].set(True)
    in3_h = jnp.arange(h2) < h3
    offer1 = jnp.where(in2_b[:, None], -1.0, vals1)  # a token offers in one tier only
    offer2 = jnp.where(in3_h[:, None], -1.0, vals2)
    kth = kth_largest([offer1, offer2, acts3_hs], k * b, lower=lo)
    keep = lambda v: (v >= kth) & (v > 0)  # noqa: E731
    tiers, listed = [], []
    for rows, offer, ids, width in ((None, offer1, ids1, c1), (rows2_h, offer2, ids2, c2)):
        pos, n_kept = compact(keep(offer), width)
        tiers.append({"rows": rows, "idx": jnp.take_along_axis(ids, pos, axis=1, mode="promise_in_bounds"),
                      "vals": jnp.take_along_axis(offer, pos, axis=1, mode="promise_in_bounds"),
                      "lengths": jnp.minimum(n_kept, width)})
        listed.append(n_kept)
    # A token is capped when it keeps fewer entries than it has >= kth: some were past its candidate
    # list (more blocks or entries reaching lo than `_candidates` takes: `missed`, which a higher lo
    # mends) or past its tier's width. One counting pass over the batch says which, exactly (a cut
    # row may lose only entries < kth). A token's offers are -1 outside its own tier, so the three
    # counts add up to what it lists.
    has_b = _row_counts(keep(pre_bs))
    kept3_h = _row_counts(keep(acts3_hs))
    listed_b = listed[0].at[rows2_h].add(listed[1]).at[rows3_h].add(kept3_h)
    kept_b = tiers[0]["lengths"].at[rows2_h].add(tiers[1]["lengths"]).at[rows3_h].add(kept3_h)
    return {"tiers": tiers, "rows3": rows3_h, "mask3": keep(acts3_hs), "kth": kth,
            "capped_fraction": jnp.sum(kept_b < has_b) / b, "missed": jnp.sum(listed_b < has_b)}


def threshold_encode(params: Params, buffers: Buffers, x_bd: jax.Array, cfg: SAEConfig, hp: HParams) -> jax.Array:
    """Inference: JumpReLU with the learned global threshold (what SAELens exports)."""
    del hp
    pre_bs = preacts(params, x_bd, cfg)
    return jnp.where(pre_bs > buffers["threshold"], jax.nn.relu(pre_bs), 0.0)


def threshold_buffers(cfg: SAEConfig) -> Buffers:
    """The one buffer of the BatchTopK family: the global inference threshold, 0 at init."""
    del cfg
    return {"threshold": jnp.zeros((), jnp.float32)}


def ema_threshold(threshold: jax.Array, min_pos: jax.Array, lr: jax.Array) -> jax.Array:
    """SAELens: threshold <- (1 - lr) threshold + lr * (smallest positive kept activation), if any was kept
    (`min_pos` is inf when none was)."""
    return jnp.where(jnp.isfinite(min_pos), (1 - lr) * threshold + lr * min_pos, threshold)


def threshold_export(params: Params, buffers: Buffers, cfg: SAEConfig) -> dict[str, jax.Array]:
    """SAELens names, scaled space: the global threshold repeated per latent (a JumpReLU export)."""
    return saelens_weights(params, jnp.full((cfg.d_sae,), buffers["threshold"], jnp.float32))


def _encode_with_hidden_pre(params, buffers, x_bd, cfg, hp) -> Encoding:
    """SAELens's BatchTopK activations, sparsely: `batchtopk_select` picks the kept entries from
    the dense pre-activations (values only); the first two tiers are row-sparse blocks with
    per-token lengths (gradients through the sparse kernels), the few whole-row tokens one
    dense [B/64, S] block with its gradient."""
    del buffers
    pre_bs = selection_preacts(params, x_bd, cfg)
    sel = batchtopk_select(pre_bs, cfg.k, hp["k"])
    blocks, min_pos = [], jnp.asarray(jnp.inf, x_bd.dtype)
    for tier in sel["tiers"]:
        rows, idx, lengths = tier["rows"], tier["idx"], tier["lengths"]
        x_t = x_bd if rows is None else x_bd[rows]
        pre = kept_preacts(params, x_t, idx, tier["vals"], cfg, lengths)
        blocks.append(Latents(jax.nn.relu(pre), idx, rows=rows, lengths=lengths))
        keep = jnp.arange(idx.shape[1])[None, :] < lengths[:, None]
        min_pos = jnp.minimum(min_pos, jnp.min(jnp.where(keep, jax.lax.stop_gradient(pre), jnp.inf)))
    rows3, mask3 = sel["rows3"], sel["mask3"]
    acts3 = jnp.where(mask3, preacts(params, x_bd[rows3], cfg), 0.0)  # dense, with its gradient
    # Fired = the selection (mask3), not a sign test of the recomputed pre-activations.
    blocks.append(Latents(acts3, rows=rows3, fired=mask3))
    min_pos = jnp.minimum(min_pos, jnp.min(jnp.where(mask3, jax.nn.relu(jax.lax.stop_gradient(acts3)), jnp.inf)))
    return Encoding(tuple(blocks), pre_bs, info={"min_pos": min_pos, "capped_fraction": sel["capped_fraction"]})


def _aux_loss(params, buffers, enc, step, cfg) -> AuxTerms:
    threshold = ema_threshold(buffers["threshold"], enc.info["min_pos"], step.hp["topk_threshold_lr"])
    return AuxTerms(auxk_terms(params, enc, step, cfg),
                    metrics={"topk_threshold": threshold, "batchtopk_capped_fraction": enc.info["capped_fraction"]},
                    buffers={"threshold": threshold})


def _export(params, buffers, cfg, hp):
    del hp
    return "jumprelu", threshold_export(params, buffers, cfg), {}


BATCHTOPK = register_architecture(
    Architecture(name="batchtopk", init=init_params, init_buffers=threshold_buffers, encode=threshold_encode,
                 encode_with_hidden_pre=_encode_with_hidden_pre, aux_loss=_aux_loss, constrain=unit_norm_decoder,
                 export=_export, validate=check_k, sparse_selection=True,
                 scale_free_selection=True)
)
