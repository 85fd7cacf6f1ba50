"""BatchTopK SAEs (SAELens `batchtopk`; Bussmann et al. 2024, arXiv:2412.06410).

The batch keeps its k*B largest ReLU'd pre-activations (k per token on average), so
tokens that need more latents get them. Training selects sparsely and exactly
(`batchtopk_select`) and reconstructs through the row-sparse kernels; AuxK as topk.
Inference is JumpReLU with one learned global threshold, an EMA of the smallest kept
activation (`ema_threshold`), which is also how SAELens exports it. matryoshka.py
reuses the dense selection, the threshold and the inference encoding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from arcstream.sae.architectures.base import (Architecture, AuxTerms, Buffers, Encoding, HParams, Latents, Params,
                                              SAEConfig, check_k, init_params, kept_preacts, preacts,
                                              register_architecture, saelens_weights, selection_preacts,
                                              unit_norm_decoder)
from arcstream.sae.architectures.topk import auxk_terms, top_k

# Sparse BatchTopK's tiers (batchtopk_select): every token offers its top 2k activations, the
# 1/8 of the batch's tokens that need it most their top 8k, the 1/64 their whole row.
# Batches of at most BATCHTOPK_DENSE_UP_TO activations (B * S) offer every row whole (small SAEs).
BATCHTOPK_TIERS = (2, 8, 8, 64)
BATCHTOPK_DENSE_UP_TO = 1 << 16


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


def kth_largest(parts: list[jax.Array], n: jax.Array) -> jax.Array:
    """The n-th largest value among the non-negative entries of `parts` (negative entries never count).

    Exact, without sorting: bisection on the float's bits (for x >= 0 the int32 bit
    pattern orders as the value), 31 counting passes over the parts. The parts must
    hold at least n non-negative entries.
    """
    hi0 = jax.lax.bitcast_convert_type(jnp.max(jnp.stack([jnp.max(p) for p in parts])), jnp.int32) + 1

    def count(t):
        return sum(jnp.sum(p >= t, dtype=jnp.int32) for p in parts)

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = count(jax.lax.bitcast_convert_type(mid, jnp.float32)) >= n
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, body, (jnp.zeros((), jnp.int32), jnp.maximum(hi0, 1)))
    # Below the smallest normal float the comparisons flush to zero (XLA:CPU): such a result means 0.
    return jnp.where(lo < 0x00800000, 0.0, jax.lax.bitcast_convert_type(lo, jnp.float32))


def batchtopk_select(pre_bs: jax.Array, k_max: int, k: jax.Array) -> dict[str, Any]:
    """BatchTopK's selection (the k*B largest ReLU'd pre-activations of the batch), sparsely and exactly.

    `pre_bs` [B, S]: values (no gradient). The kept set is every entry >= kth (and > 0),
    kth the (k*B)-th largest of the batch. A token's kept entries are its largest ones,
    and how many varies a lot (planted data at init: median 14, p99 ~650, max ~3,900
    for k = 64), so the tokens are split in three tiers by how far down their
    candidates reach (`BATCHTOPK_TIERS`): every token offers its top 2k; the B/8 tokens
    whose 2k-th is largest offer their top 8k instead; the B/64 largest of those offer
    their whole row. kth is found among the offers by bisection (`kth_largest`), which
    is exact unless more tokens than a tier holds need more than it offers
    (`capped_fraction`, else 0). Returns per tier the token rows, candidate ids and
    values (largest first) and how many of them are kept.
    """
    b, s = pre_bs.shape
    (f1, every2, f2, every3) = BATCHTOPK_TIERS
    c1, c2 = min(s, f1 * k_max), min(s, f2 * k_max)
    h2 = min(b, max(1, b // every2))
    h3 = min(h2, max(1, b // every3))
    if b * s <= BATCHTOPK_DENSE_UP_TO:
        h2 = h3 = b
    # ReLU is monotone: the top of relu(pre) is relu of the top of pre (no [B, S] ReLU pass).
    vals1_bc, idx1_bc = top_k(pre_bs, c1)
    vals1_bc = jax.nn.relu(vals1_bc)
    last1_b = vals1_bc.min(axis=1)  # = vals1_bc[:, -1] (see top_k)
    rows2_h = top_k(last1_b, h2)[1]  # the tokens whose offer reaches deepest, deepest first
    rows3_h = rows2_h[:h3]
    vals2_hc, idx2_hc = top_k(pre_bs[rows2_h], c2)
    vals2_hc = jax.nn.relu(vals2_hc)
    acts3_hs = jax.nn.relu(pre_bs[rows3_h])
    in2_b = jnp.zeros((b,), bool).at[rows2_h].set(True)
    in3_h = jnp.arange(h2) < h3
    offer1 = jnp.where(in2_b[:, None], -1.0, vals1_bc)  # a token offers in one tier only
    offer2 = jnp.where(in3_h[:, None], -1.0, vals2_hc)
    kth = kth_largest([offer1, offer2, acts3_hs], k * b)
    keep = lambda v: (v >= kth) & (v > 0)  # noqa: E731
    capped = (jnp.sum(~in2_b & keep(last1_b) & (c1 < s))
              + jnp.sum(~in3_h & keep(vals2_hc.min(axis=1)) & (c2 < s)))
    return {
        "tiers": [
            {"rows": None, "idx": idx1_bc, "vals": vals1_bc, "lengths": keep(offer1).sum(axis=1)},
            {"rows": rows2_h, "idx": idx2_hc, "vals": vals2_hc, "lengths": keep(offer2).sum(axis=1)},
        ],
        "rows3": rows3_h, "mask3": keep(acts3_hs), "kth": kth, "capped_fraction": capped / b,
    }


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
