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

Here only the encoding (the activations as one dense block per level, so the base's
decode reports every prefix's reconstruction) and the terms past `mse_loss`; the MSE,
the sum, the metrics and the firing counts are the base's (architectures/base.py).
The same architecture with a separate target and one level is the BatchTopK
transcoder (transcoder.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arcstream.sae.architectures.base import (Architecture, AuxTerms, Encoding, Latents, SAEConfig, check_k,
                                              init_params, mse, preacts, register_architecture, unit_norm_decoder)
from arcstream.sae.architectures.batchtopk import (batch_topk, ema_threshold, threshold_buffers, threshold_encode,
                                                   threshold_export)


def levels(cfg: SAEConfig) -> tuple[int, ...]:
    """The nested prefix widths, ending at d_sae; `(d_sae,)` (plain BatchTopK) when none are set."""
    return cfg.matryoshka_widths or (cfg.d_sae,)


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
    return scale * mse(residual_bd, recons_bd)


def nested_encode(params, buffers, x_bd, cfg, hp) -> Encoding:
    """BatchTopK over all d_sae latents (the prefixes do not re-select), one dense block per level:
    the base then decodes the prefixes with one dense decode in all, x_hat_j = x_hat_{j-1} + level j."""
    del buffers
    pre_bs = preacts(params, x_bd, cfg)
    acts_bs = batch_topk(pre_bs, cfg.k, hp["k"])
    widths = levels(cfg)
    blocks = tuple(Latents(acts_bs[:, lo:hi], start=lo) for lo, hi in zip((0,) + widths[:-1], widths))
    return Encoding(blocks, pre_bs, acts_bs)


def nested_aux_loss(params, buffers, enc, step, cfg) -> AuxTerms:
    """The inner levels' MSEs, AuxK (per level or on the full residual) and the threshold's EMA
    (module docstring). `step.partials` are the levels' reconstructions; `step.dead_s` None:
    nothing is dead, AuxK is skipped."""
    widths, y_bd, partials = levels(cfg), step.target_bd, step.partials
    losses = {f"inner_mse_loss_{w}": mse(y_bd, part_bd) for w, part_bd in zip(widths[:-1], partials[:-1])}
    k_aux = max(1, cfg.d_target // 2)  # SAELens: sae_in.shape[-1] // 2 (the reconstructed width)
    if step.dead_s is None:
        aux = jnp.zeros((), y_bd.dtype)
    elif cfg.use_matryoshka_aux_loss:
        aux, lo = jnp.zeros((), y_bd.dtype), 0
        for w, part_bd in zip(widths, partials):
            aux = aux + level_auxk(params["w_dec_sd"], jax.lax.stop_gradient(y_bd - part_bd), enc.pre_bs, step.dead_s,
                                   lo, w, k_aux)
            lo = w
        aux = step.hp["aux_coefficient"] * aux
    else:
        aux = step.hp["aux_coefficient"] * level_auxk(params["w_dec_sd"], jax.lax.stop_gradient(y_bd - step.recon_bd),
                                                      enc.pre_bs, step.dead_s, 0, cfg.d_sae, k_aux)
    losses["auxiliary_reconstruction_loss"] = aux
    min_pos = jnp.min(jnp.where(enc.acts_bs > 0, jax.lax.stop_gradient(enc.acts_bs), jnp.inf))
    threshold = ema_threshold(buffers["threshold"], min_pos, step.hp["topk_threshold_lr"])
    return AuxTerms(losses, metrics={"topk_threshold": threshold}, buffers={"threshold": threshold})


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


def _export(params, buffers, cfg, hp):
    del hp
    return "jumprelu", threshold_export(params, buffers, cfg), {}


MATRYOSHKA_BATCHTOPK = register_architecture(
    Architecture(name="matryoshka_batchtopk", init=init_params, init_buffers=threshold_buffers,
                 encode=threshold_encode, encode_with_hidden_pre=nested_encode, aux_loss=nested_aux_loss,
                 constrain=unit_norm_decoder, export=_export, validate=_validate, scale_free_selection=True)
)
