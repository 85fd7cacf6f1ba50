"""TopK SAEs (SAELens `topk`; Gao et al. 2024, arXiv:2406.04093) with the AuxK dead-latent loss.

Each token keeps its k largest pre-activations (ReLU'd). Training is row-sparse: the
dense encoder matmul picks the k ids per token (values only), and the kept entries'
pre-activations, the decoder and both weight gradients go through sparse.py's kernels,
so only the encoder's forward matmul costs O(B * d_sae * d_in). The decoder rows are
kept at unit norm after every update. `top_k` and `auxk_loss` are shared with batchtopk.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arcstream.sae.architectures.base import (Architecture, AuxTerms, Encoding, HParams, Latents, Params, SAEConfig,
                                              StepInput, check_k, init_params, kept_preacts, mse, no_buffers,
                                              preacts, register_architecture, saelens_weights, selection_preacts,
                                              unit_norm_decoder)

_TOPK_BLOCK = 16  # entries per block in the two-stage top-k


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis; on long rows in two stages, the same values.

    The row is cut in blocks of `_TOPK_BLOCK`; the k largest entries lie in the k blocks
    with the largest maxima (each has a block max >= itself >= the k-th largest entry >=
    the k-th largest block max), so a top-k of the block maxima, then of those k blocks'
    entries, gives the top-k values exactly (among equal values the index kept may
    differ). Measured: [4096, 14336], k 64: 190 ms instead of 280 ms (XLA:CPU's top-k is
    one thread; the block maxima are a vectorised pass).

    XLA:CPU runs top-k as its fast kernel only for a sort followed by a [0:k) slice: taking
    one column of the result (e.g. `vals[:, -1]`, the k-th value alone) folds into that slice
    and the whole sort runs instead (10 s instead of 0.3 s), so callers read the k-th value
    as `vals.min(axis=-1)`. (An optimization barrier on the outputs also works but aborts
    XLA's SPMD top-k decomposer on a mesh.)
    """
    s, g = x.shape[-1], _TOPK_BLOCK
    if s % g or 4 * k * g > s:
        return jax.lax.top_k(x, k)
    xb = x.reshape(x.shape[:-1] + (s // g, g))
    blk = jax.lax.top_k(xb.max(axis=-1), k)[1]  # the k blocks with the largest maxima
    # ids from top_k are in range: no out-of-bounds fill (its select over the gathered block showed as
    # 43 ms in a BatchTopK step's trace; top_k(128) alone 250 -> 236 ms on a 2-core CPU)
    cand = jnp.take_along_axis(xb, blk[..., None], axis=-2, mode="promise_in_bounds")
    cand = cand.reshape(x.shape[:-1] + (k * g,))
    vals, j = jax.lax.top_k(cand, k)
    return vals, jnp.take_along_axis(blk, j // g, axis=-1, mode="promise_in_bounds") * g + j % g


def _topk_select(pre_bs: jax.Array, cfg: SAEConfig, hp: HParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top cfg.k values and ids per token, with ranks >= hp['k'] masked (sweeps with smaller k)."""
    vals_bk, idx_bk = top_k(pre_bs, cfg.k)
    keep_k = (jnp.arange(cfg.k) < hp["k"]).astype(pre_bs.dtype)
    return vals_bk, idx_bk, keep_k


def _encode(params, buffers, x_bd, cfg, hp):
    del buffers
    pre_bs = preacts(params, x_bd, cfg)
    vals_bk, idx_bk, keep_k = _topk_select(pre_bs, cfg, hp)
    acts_bk = jax.nn.relu(vals_bk) * keep_k
    rows_b1 = jnp.arange(pre_bs.shape[0])[:, None]
    return jnp.zeros_like(pre_bs).at[rows_b1, idx_bk].set(acts_bk)


def _encode_with_hidden_pre(params, buffers, x_bd, cfg, hp) -> Encoding:
    """The k kept entries per token as one row-sparse block; their gradient flows through the
    sparse kernels (the dense pre-activations are values only)."""
    del buffers
    pre_bs = selection_preacts(params, x_bd, cfg)
    vals_bk, idx_bk, keep_k = _topk_select(pre_bs, cfg, hp)
    sel_bk = kept_preacts(params, x_bd, idx_bk, vals_bk, cfg)
    return Encoding((Latents(jax.nn.relu(sel_bk) * keep_k, idx_bk),), pre_bs)


# AuxK looks at no more than this many dead latents per step (the candidates): every dead latent
# while at most this many are dead (then AuxK is exact), else those with the largest pre-activation
# in the batch. Fewer dead latents take the small bucket (1/4 of the work).
AUXK_CANDIDATES = (512, 2048)


def auxk_loss(
    params: Params, x_bd: jax.Array, x_hat_bd: jax.Array, pre_bs: jax.Array, dead_s: jax.Array | None,
    cfg: SAEConfig, hp: HParams, sparse: bool = True,
) -> jax.Array:
    """AuxK: the top k_aux *dead* latents reconstruct the residual x - x_hat (TopK paper, A.2).

    As SAELens: the residual is a constant, the aux reconstruction has no b_dec, the
    selected pre-activations are used as they are (no ReLU), k_aux = min(d_in/2, n_dead)
    and the term is scaled by min(n_dead / (d_in/2), 1) * aux_coefficient. Zero when
    nothing is dead, and skipped (`dead_s` None) when the trainer knows that.

    Work only over the dead latents: their ids are gathered (`AUXK_CANDIDATES`), their
    pre-activations recomputed densely for those columns only ([B, n_candidates], with
    their gradient), and the per-token top-k_aux taken among them (no top-k at all when
    at most k_aux are dead). Exact while n_dead <= the largest bucket; beyond it the
    candidates are the dead latents with the largest pre-activation anywhere in the
    batch. `pre_bs`: the batch's pre-activations (values only, no gradient needed).
    `sparse` is accepted for older callers and ignored.
    """
    del sparse
    if dead_s is None:  # the trainer knows that no latent of any member is dead: skip the work
        return jnp.zeros((), x_bd.dtype)
    n_dead = dead_s.sum()
    buckets = sorted({min(c, cfg.d_sae) for c in AUXK_CANDIDATES})
    branches = [lambda c=c: _auxk_over(params, x_bd, x_hat_bd, pre_bs, dead_s, n_dead, cfg, c) for c in buckets]
    if len(branches) == 1:
        recon_mse = branches[0]()
    else:  # the smallest bucket that holds every dead latent (else the largest)
        which = jnp.searchsorted(jnp.asarray(buckets[:-1]), n_dead, side="left")
        recon_mse = jax.lax.switch(which, branches)
    scale = jnp.minimum(n_dead / max(cfg.d_in // 2, 1), 1.0)
    return hp["aux_coefficient"] * scale * recon_mse


def _auxk_over(params, x_bd, x_hat_bd, pre_bs, dead_s, n_dead, cfg: SAEConfig, n_cand: int) -> jax.Array:
    """AuxK's reconstruction MSE over at most `n_cand` dead latents (see auxk_loss)."""
    d_sae = cfg.d_sae
    if n_cand >= d_sae:
        cand_c = jnp.arange(d_sae)
    else:  # dead latents first, the closest to firing first (all of them when n_dead <= n_cand)
        score_s = jnp.where(dead_s, jax.lax.stop_gradient(pre_bs).max(axis=0), -jnp.inf)
        cand_c = top_k(score_s, n_cand)[1]
    live_c = dead_s[cand_c]  # False for fill-ins when fewer are dead
    w_enc_cd = params["w_enc_sd"][cand_c]
    # (x - b_dec) @ W^T as x @ W^T - b_dec @ W^T: b_dec's gradient is then a mat-vec, not a [B, d] matmul
    pre_bc = x_bd @ w_enc_cd.T + params["b_enc_s"][cand_c]
    if cfg.apply_b_dec_to_input:
        pre_bc = pre_bc - params["b_dec_d"] @ w_enc_cd.T
    masked_bc = jnp.where(live_c[None, :], jax.lax.stop_gradient(pre_bc), -jnp.inf)
    k_aux = min(cfg.k_aux, n_cand)
    if k_aux < n_cand:
        def top(m_bc):  # the k_aux largest dead pre-activations of each token
            kth_b1 = top_k(m_bc, k_aux)[0].min(axis=1, keepdims=True)
            return m_bc >= kth_b1

        def every(m_bc):  # at most k_aux dead: all of them
            return jnp.broadcast_to(live_c[None, :], m_bc.shape)

        sel_bc = jax.lax.cond(n_dead > k_aux, top, every, masked_bc) & live_c[None, :]
    else:
        sel_bc = jnp.broadcast_to(live_c[None, :], masked_bc.shape)
    recons_bd = jnp.where(sel_bc, pre_bc, 0.0) @ params["w_dec_sd"][cand_c]
    return mse(jax.lax.stop_gradient(x_bd - x_hat_bd), recons_bd)


def auxk_terms(params: Params, enc: Encoding, step: StepInput, cfg: SAEConfig) -> dict[str, jax.Array]:
    """The TopK family's one extra loss term, AuxK on the reconstruction's residual."""
    return {"auxiliary_reconstruction_loss": auxk_loss(params, step.target_bd, step.recon_bd, enc.pre_bs,
                                                       step.dead_s, cfg, step.hp)}


def _aux_loss(params, buffers, enc, step, cfg) -> AuxTerms:
    del buffers
    return AuxTerms(auxk_terms(params, enc, step, cfg))


def _export(params, buffers, cfg, hp):
    del buffers
    return "topk", saelens_weights(params), {"k": int(hp["k"]), "rescale_acts_by_decoder_norm": False}


TOPK = register_architecture(
    Architecture(name="topk", init=init_params, init_buffers=no_buffers, encode=_encode,
                 encode_with_hidden_pre=_encode_with_hidden_pre, aux_loss=_aux_loss, constrain=unit_norm_decoder,
                 export=_export, validate=check_k, sparse_selection=True,
                 scale_free_selection=True)
)
