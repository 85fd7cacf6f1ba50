"""Row-sparse kernels for TopK SAEs: touch only the k active latents per token.

A TopK SAE with d_sae latents activates k << d_sae of them per token. Written
densely (as SAELens does), the decoder matmul and the encoder's weight gradient
each cost as much as the encoder's forward matmul. Here the decoder and both
weight gradients gather or scatter-add only the selected rows of the
[d_sae, d_in] weight matrices, so the encoder's forward matmul is the one dense
cost left (the TopK paper's sparse kernels, written with XLA gather/scatter).

Invariants: weights are stored row-major as [d_sae, d_in] (`w_sd`) so a latent
is one contiguous row; index arrays `idx_bk` hold latent ids in [0, d_sae);
entries whose coefficient is zero contribute nothing (used for masking).
Work is chunked over tokens (`_CHUNK` at a time) so that the gathered
[chunk, k, d_in] block stays small instead of materialising [B, k, d_in].
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

_CHUNK = 64  # tokens per gather/scatter chunk; measured flat between 32 and 128 on CPU


def _chunked(a, n: int):
    """[B, ...] -> [B/n, n, ...], padding B up with zeros (zero rows contribute nothing)."""
    b = a.shape[0]
    pad = (-b) % n
    if pad:
        a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0)
    return a.reshape((a.shape[0] // n, n) + a.shape[1:])


def _chunk_size(b: int) -> int:
    return min(_CHUNK, b)


def gather_sum(coef_bk: jax.Array, idx_bk: jax.Array, w_sd: jax.Array) -> jax.Array:
    """out[b] = sum_j coef[b, j] * w[idx[b, j]]  -> [B, d]. Forward only (no VJP rule)."""
    b = coef_bk.shape[0]
    n = _chunk_size(b)

    def body(args):
        c_nk, i_nk = args
        return jnp.einsum("nk,nkd->nd", c_nk, w_sd[i_nk])

    out = jax.lax.map(body, (_chunked(coef_bk, n), _chunked(idx_bk, n)))
    return out.reshape(-1, w_sd.shape[1])[:b]


def scatter_outer(coef_bk: jax.Array, idx_bk: jax.Array, v_bd: jax.Array, d_sae: int) -> jax.Array:
    """out[s] = sum_{b,j: idx[b,j]=s} coef[b, j] * v[b]  -> [d_sae, d] (a weight gradient)."""
    n = _chunk_size(coef_bk.shape[0])

    def body(acc_sd, args):
        c_nk, i_nk, v_nd = args
        return acc_sd.at[i_nk].add(c_nk[..., None] * v_nd[:, None, :]), None

    acc_sd = jnp.zeros((d_sae, v_bd.shape[1]), v_bd.dtype)
    acc_sd, _ = jax.lax.scan(body, acc_sd, (_chunked(coef_bk, n), _chunked(idx_bk, n), _chunked(v_bd, n)))
    return acc_sd


@jax.custom_vjp
def sparse_decode(acts_bk: jax.Array, idx_bk: jax.Array, w_sd: jax.Array) -> jax.Array:
    """Decoder over the active latents only: sum_j acts[b,j] * w_dec[idx[b,j]] -> [B, d_in].

    Differentiable in `acts_bk` and `w_sd`; the backward pass gathers the same
    rows once per chunk to get d_acts and scatter-adds acts x grad into d_w.
    """
    return gather_sum(acts_bk, idx_bk, w_sd)


def _sparse_decode_fwd(acts_bk, idx_bk, w_sd):
    return gather_sum(acts_bk, idx_bk, w_sd), (acts_bk, idx_bk, w_sd)


def _sparse_decode_bwd(res, g_bd):
    acts_bk, idx_bk, w_sd = res
    b = acts_bk.shape[0]
    n = _chunk_size(b)

    def body(acc_sd, args):
        a_nk, i_nk, g_nd = args
        rows_nkd = w_sd[i_nk]
        d_acts_nk = jnp.einsum("nd,nkd->nk", g_nd, rows_nkd)
        return acc_sd.at[i_nk].add(a_nk[..., None] * g_nd[:, None, :]), d_acts_nk

    acc_sd = jnp.zeros_like(w_sd)
    acc_sd, d_acts = jax.lax.scan(body, acc_sd, (_chunked(acts_bk, n), _chunked(idx_bk, n), _chunked(g_bd, n)))
    d_acts_bk = d_acts.reshape(-1, acts_bk.shape[1])[:b]
    return d_acts_bk, None, acc_sd


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def selected_preacts(
    x_bd: jax.Array,
    b_dec_d: jax.Array,
    w_enc_sd: jax.Array,
    b_enc_s: jax.Array,
    idx_bk: jax.Array,
    vals_bk: jax.Array,
    apply_b_dec: bool,
) -> jax.Array:
    """The pre-activations of the selected latents, with a sparse gradient.

    Forward: returns `vals_bk`, which the caller already computed with the dense
    encoder matmul (so the forward costs nothing extra). It must equal
    `(x - b_dec*apply_b_dec) @ w_enc[idx].T + b_enc[idx]`.
    Backward: d_w_enc by scatter-add of rows, d_b_enc by segment-sum, and d_b_dec
    as -(segment_sum(g) @ w_enc) (never a [B, d_in] gradient). `x_bd` is data:
    its cotangent is zero.
    """
    del x_bd, b_dec_d, w_enc_sd, b_enc_s, idx_bk, apply_b_dec
    return vals_bk


def _selected_preacts_fwd(x_bd, b_dec_d, w_enc_sd, b_enc_s, idx_bk, vals_bk, apply_b_dec):
    return vals_bk, (x_bd, b_dec_d, w_enc_sd, idx_bk)


def _selected_preacts_bwd(apply_b_dec, res, g_bk):
    x_bd, b_dec_d, w_enc_sd, idx_bk = res
    d_sae = w_enc_sd.shape[0]
    xc_bd = x_bd - b_dec_d if apply_b_dec else x_bd
    d_w_enc = scatter_outer(g_bk, idx_bk, xc_bd, d_sae)
    d_b_enc = jnp.zeros((d_sae,), g_bk.dtype).at[idx_bk.reshape(-1)].add(g_bk.reshape(-1))
    if apply_b_dec:
        d_b_dec = -(d_b_enc @ w_enc_sd)
    else:
        d_b_dec = jnp.zeros_like(b_dec_d)
    return jnp.zeros_like(x_bd), d_b_dec, d_w_enc, d_b_enc, None, jnp.zeros_like(g_bk)


selected_preacts.defvjp(_selected_preacts_fwd, _selected_preacts_bwd)
