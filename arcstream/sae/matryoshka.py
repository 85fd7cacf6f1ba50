"""Matryoshka BatchTopK SAEs (SAELens `matryoshka_batchtopk`; Bussmann et al. 2025, arXiv:2503.17547).

A BatchTopK SAE whose latents are ordered into nested prefixes
`matryoshka_widths = (w_1 < w_2 < ... < w_n = d_sae)`. Each prefix must
reconstruct the input on its own, so the first w_1 latents learn the most
general (frequent, coarse) features and later levels add detail; this is what
keeps a wide dictionary from absorbing a coarse feature into many fine ones.

The loss, as SAELens 6.54 defines it (`MatryoshkaBatchTopKTrainingSAE`):

  pre     = (x - b_dec) @ W_enc + b_enc          (apply_b_dec_to_input, SAELens default)
  acts    = BatchTopK(ReLU(pre)): the k*B largest values of the whole batch, chosen
            once over *all* d_sae latents (the prefixes do not re-select)
  x_hat_j = b_dec + acts[:, :w_j] @ W_dec[:w_j]   (every prefix includes b_dec)
  loss    = mse(x, x_hat_n)                        ("mse_loss": the full SAE)
          + sum_{j<n} mse(x, x_hat_j)              ("inner_mse_loss_{w_j}", weight 1 each)
          + AuxK                                   ("auxiliary_reconstruction_loss")
  mse(a, b) = sum over d, mean over tokens.

AuxK: by default (`use_matryoshka_aux_loss=False`) the TopK paper's term on the
full residual x - x_hat_n; with `use_matryoshka_aux_loss=True` one term per
level, whose dead latents (those in [w_{j-1}, w_j)) reconstruct that level's
residual x - x_hat_j, summed. Each term: the top min(k_aux, n_dead) dead
pre-activations (no ReLU, no b_dec), k_aux = d/2, scaled by min(n_dead / k_aux, 1),
times aux_coefficient.

Threshold: as BatchTopK, an EMA (rate `topk_threshold_lr`) of the smallest
positive kept activation; inference (and the export) is JumpReLU with that one
threshold for every latent, which is how SAELens saves these SAEs.

Difference from SAELens: its TopK-family configs default to
`rescale_acts_by_decoder_norm=True`; arcstream keeps decoder rows at unit norm
after every step (as for topk/batchtopk), where that rescaling is the identity.

The same loss with a separate target (`target_bd`) and one level is the
BatchTopK transcoder (transcoder.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arcstream.sae.architectures import (
    Architecture,
    HParams,
    Params,
    SAEConfig,
    StepOutput,
    _init_common,
    _mse,
    preacts,
    reconstruction_metrics,
    register_architecture,
    unit_norm_decoder,
)


def batch_topk(pre_bs: jax.Array, k_max: int, k: jax.Array) -> jax.Array:
    """ReLU, then keep the k*B largest activations of the whole batch (k per token on average).

    `k_max` is static (the sweep's largest k); `k` may be traced (a sweep member's k <= k_max).
    Exact: one top-k over the flattened batch, the same selection as SAELens's `BatchTopK`.
    """
    acts_bs = jax.nn.relu(pre_bs)
    b = pre_bs.shape[0]
    top_n = jax.lax.top_k(jax.lax.stop_gradient(acts_bs).reshape(-1), k_max * b)[0]
    kth = top_n[k * b - 1]
    return jnp.where((acts_bs >= kth) & (acts_bs > 0), acts_bs, 0.0)


def prefix_decodes(params: Params, acts_bs: jax.Array, widths: tuple[int, ...]) -> list[jax.Array]:
    """[b_dec + acts[:, :w] @ W_dec[:w] for w in widths]: each level adds its slice to the previous sum,
    so all n reconstructions cost one dense decode."""
    out, prev = [], 0
    recon_bd = jnp.broadcast_to(params["b_dec_d"], (acts_bs.shape[0], params["b_dec_d"].shape[0]))
    for w in widths:
        recon_bd = recon_bd + acts_bs[:, prev:w] @ params["w_dec_sd"][prev:w]
        out.append(recon_bd)
        prev = w
    return out


def level_auxk(
    w_dec_sd: jax.Array, residual_bd: jax.Array, pre_bs: jax.Array, dead_s: jax.Array, lo: int, hi: int, k_aux: int
) -> jax.Array:
    """One AuxK term (without aux_coefficient): the top min(k_aux, n_dead) dead latents of [lo, hi)
    reconstruct `residual_bd` (a constant) from their raw pre-activations, through W_dec only.

    Scaled by min(n_dead / k_aux, 1), so it is 0 when no latent of the slice is dead.
    The pre-activations keep their gradient (encoder and b_dec get one); the
    selection does not.
    """
    dead_l = dead_s[lo:hi]
    pre_bl = pre_bs[:, lo:hi]
    k = min(k_aux, hi - lo)  # static; fewer dead latents than k: the extra picks are masked below
    masked_bl = jnp.where(dead_l[None, :], jax.lax.stop_gradient(pre_bl), -jnp.inf)
    _, idx_bk = jax.lax.top_k(masked_bl, k)
    valid_bk = dead_l[idx_bk]
    vals_bk = jnp.where(valid_bk, jnp.take_along_axis(pre_bl, idx_bk, axis=1), 0.0)
    rows_b1 = jnp.arange(pre_bs.shape[0])[:, None]
    acts_bl = jnp.zeros_like(pre_bl).at[rows_b1, idx_bk].set(vals_bk)
    recons_bd = acts_bl @ w_dec_sd[lo:hi]
    scale = jnp.minimum(dead_l.sum() / k_aux, 1.0)
    return scale * _mse(residual_bd, recons_bd)


def nested_batchtopk_loss(
    params: Params,
    buffers: dict[str, jax.Array],
    x_bd: jax.Array,
    y_bd: jax.Array,
    cfg: SAEConfig,
    hp: HParams,
    dead_s: jax.Array | None,
    widths: tuple[int, ...],
    per_level_aux: bool,
) -> tuple[jax.Array, StepOutput]:
    """The Matryoshka BatchTopK loss (module docstring) of reconstructing `y_bd` from `x_bd`'s latents.

    `y_bd is x_bd` for an SAE; a transcoder passes its target. `widths` ends at d_sae;
    `(d_sae,)` is plain BatchTopK. `dead_s` None: nothing is dead, AuxK is skipped.
    """
    pre_bs = preacts(params, x_bd, cfg)
    acts_bs = batch_topk(pre_bs, cfg.k, hp["k"])
    partials = prefix_decodes(params, acts_bs, widths)
    y_hat_bd = partials[-1]
    mse = _mse(y_bd, y_hat_bd)
    losses = {"mse_loss": mse}
    for w, part_bd in zip(widths[:-1], partials[:-1]):
        losses[f"inner_mse_loss_{w}"] = _mse(y_bd, part_bd)
    k_aux = max(1, cfg.d_target // 2)  # SAELens: sae_in.shape[-1] // 2 (the reconstructed width)
    if dead_s is None:
        aux = jnp.zeros((), y_bd.dtype)
    elif per_level_aux:
        aux, lo = jnp.zeros((), y_bd.dtype), 0
        for w, part_bd in zip(widths, partials):
            aux = aux + level_auxk(params["w_dec_sd"], jax.lax.stop_gradient(y_bd - part_bd), pre_bs, dead_s, lo, w,
                                   k_aux)
            lo = w
        aux = hp["aux_coefficient"] * aux
    else:
        aux = hp["aux_coefficient"] * level_auxk(params["w_dec_sd"], jax.lax.stop_gradient(y_bd - y_hat_bd), pre_bs,
                                                 dead_s, 0, cfg.d_sae, k_aux)
    losses["auxiliary_reconstruction_loss"] = aux
    fired_bs = acts_bs > 0
    # SAELens: threshold <- (1 - lr) threshold + lr * (smallest positive kept activation), if any fired.
    min_pos = jnp.min(jnp.where(fired_bs, jax.lax.stop_gradient(acts_bs), jnp.inf))
    lr = hp["topk_threshold_lr"]
    threshold = jnp.where(jnp.isfinite(min_pos), (1 - lr) * buffers["threshold"] + lr * min_pos,
                          buffers["threshold"])
    metrics = {**reconstruction_metrics(y_bd, y_hat_bd, fired_bs.sum(-1).mean()), "topk_threshold": threshold}
    out = StepOutput(loss=sum(losses.values()), losses=losses, metrics=metrics, fired_s=fired_bs.sum(0),
                     buffers={"threshold": threshold})
    return out.loss, out


def threshold_encode(params: Params, buffers, x_bd: jax.Array, cfg: SAEConfig, hp: HParams) -> jax.Array:
    """Inference: JumpReLU with the learned global threshold (ReLU, then gate; SAELens's JumpReLU)."""
    del hp
    pre_bs = preacts(params, x_bd, cfg)
    return jax.nn.relu(pre_bs) * (pre_bs > buffers["threshold"])


def threshold_buffers(cfg: SAEConfig) -> dict[str, jax.Array]:
    del cfg
    return {"threshold": jnp.zeros((), jnp.float32)}


def check_k(cfg: SAEConfig) -> None:
    if not 0 < cfg.k <= cfg.d_sae:
        raise ValueError(f"SAEConfig.k={cfg.k} must be in [1, d_sae={cfg.d_sae}] for {cfg.architecture}")


def _validate(cfg: SAEConfig) -> None:
    check_k(cfg)
    w = cfg.matryoshka_widths
    fix = f"e.g. matryoshka_widths=({cfg.d_sae // 16}, {cfg.d_sae // 4}, {cfg.d_sae}) (sae.matryoshka_widths)"
    if not w:
        raise ValueError(f"matryoshka_batchtopk needs SAEConfig.matryoshka_widths (the nested prefix widths); {fix}")
    if any(b <= a for a, b in zip(w, w[1:])) or w[0] <= 0:
        raise ValueError(f"SAEConfig.matryoshka_widths={w} must be positive and strictly increasing; {fix}")
    if w[-1] != cfg.d_sae:
        raise ValueError(f"SAEConfig.matryoshka_widths={w} must end at d_sae={cfg.d_sae} (the whole SAE is the "
                         f"last level); {fix}")


def _loss(params, buffers, x_bd, cfg, hp, dead_s):
    return nested_batchtopk_loss(params, buffers, x_bd, x_bd, cfg, hp, dead_s, cfg.matryoshka_widths,
                                 cfg.use_matryoshka_aux_loss)


def threshold_weights(params: Params, buffers, cfg: SAEConfig) -> dict[str, jax.Array]:
    """SAELens names, scaled space: the global threshold repeated per latent (JumpReLU)."""
    return {
        "W_enc": params["w_enc_sd"].T,
        "b_enc": params["b_enc_s"],
        "W_dec": params["w_dec_sd"],
        "b_dec": params["b_dec_d"],
        "threshold": jnp.full((cfg.d_sae,), buffers["threshold"], jnp.float32),
    }


def _export(params, buffers, cfg, hp):
    del hp
    return "jumprelu", threshold_weights(params, buffers, cfg), {}


MATRYOSHKA_BATCHTOPK = register_architecture(
    Architecture("matryoshka_batchtopk", lambda key, cfg: _init_common(key, cfg), threshold_buffers,
                 threshold_encode, _loss, unit_norm_decoder, _export, validate=_validate)
)
