"""Transcoders: latents read one site and reconstruct another (Dunefsky et al. 2024, arXiv:2406.11944).

A transcoder encodes the input site x (e.g. `blocks.L.hook_resid_mid`, what the
MLP reads) and decodes the target site y of the same tokens (e.g.
`blocks.L.hook_mlp_out`, what the MLP writes): a sparse, wide replacement for
the MLP that circuit-tracing tools (circuit-tracer's per-layer transcoders)
splice into the model. d_in (x) may differ from d_out (y).

  pre   = x @ W_enc + b_enc              (no b_dec subtraction: b_dec lives in y's space;
                                          SAELens's TranscoderConfig refuses apply_b_dec_to_input)
  y_hat = acts @ W_dec + b_dec           W_dec [d_sae, d_out], b_dec [d_out]
  loss  = mse(y, y_hat) + sparsity/AuxK terms, mse = sum over d_out, mean over tokens.

Two activations, both exported as SAELens's `jumprelu_transcoder` (the
transcoder class SAELens loads with a learned threshold; it has no TopK
transcoder) and as circuit-tracer's JumpReLU per-layer transcoder:

* `batchtopk_transcoder`: BatchTopK (k per token on average over the batch),
  AuxK on y's residual (k_aux = d_out/2), the EMA threshold of BatchTopK. This is
  matryoshka.py's loss with one level and a separate target. No L0 coefficient to tune.
* `jumprelu_transcoder`: JumpReLU with per-latent thresholds and the L0 penalty
  (Gemma Scope's, the parameterisation of arcstream's `jumprelu`).

Scales: the trainer multiplies x by `scale` (E||x|| = sqrt(d_in)) and y by
`target_scale` (E||y|| = sqrt(d_out)); the export folds the first into W_enc and
the second into W_dec and b_dec, so the exported transcoder maps raw x to raw y.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from arcstream.sae.architectures import (
    Architecture,
    Params,
    SAEConfig,
    _jumprelu_encode,
    _jumprelu_loss,  # with target_bd: the same loss, reconstructing the target site
    register_architecture,
    unit_norm_decoder,
)
from arcstream.sae.matryoshka import check_k, nested_batchtopk_loss, threshold_buffers, threshold_encode

TRANSCODERS = ("batchtopk_transcoder", "jumprelu_transcoder")


def transcoder_key(input_site: str, target_site: str) -> str:
    """The name of a transcoder's spec: its metrics' `site` field and its folder under saes/.
    Not a site name, so jobs that look for SAEs under `saes/<site>/` never take it for one."""
    return f"{input_site}-to-{target_site}"


# Norm of the initial encoder rows. An SAE starts with W_enc = W_dec^T, so its first reconstructions
# point the right way; a transcoder's random decoder rows do not, and with unit-norm encoder rows
# (pre-activations ~ ||x|| = sqrt(d_in)) its first outputs are noise several times larger than the
# target (measured: FVU ~7 after 7 online steps). Small rows start it at y_hat ~ b_dec (FVU ~1).
_ENC_INIT_NORM = 0.1


def init_transcoder(key: jax.Array, cfg: SAEConfig) -> Params:
    """Random encoder rows of norm 0.1 and unit-norm decoder rows (independent: x and y are different
    spaces), zero biases."""
    k_enc, k_dec = jax.random.split(key)
    w_enc_sd = jax.random.normal(k_enc, (cfg.d_sae, cfg.d_in), jnp.float32)
    w_dec_sd = jax.random.normal(k_dec, (cfg.d_sae, cfg.d_target), jnp.float32)
    return {
        "w_enc_sd": _ENC_INIT_NORM * w_enc_sd / jnp.linalg.norm(w_enc_sd, axis=1, keepdims=True),
        "b_enc_s": jnp.zeros((cfg.d_sae,), jnp.float32),
        "w_dec_sd": w_dec_sd / jnp.linalg.norm(w_dec_sd, axis=1, keepdims=True),
        "b_dec_d": jnp.zeros((cfg.d_target,), jnp.float32),
    }


def _validate(cfg: SAEConfig) -> None:
    if cfg.apply_b_dec_to_input:
        raise ValueError(
            f"SAEConfig.apply_b_dec_to_input=True with architecture={cfg.architecture!r}: a transcoder's b_dec "
            "is in the target's space and is never subtracted from the input (SAELens's TranscoderConfig refuses "
            "it too); pass apply_b_dec_to_input=False (site_specs does)"
        )
    if cfg.d_out < 0:
        raise ValueError(f"SAEConfig.d_out={cfg.d_out} must be positive (or 0 for d_out = d_in)")


def _batchtopk_validate(cfg: SAEConfig) -> None:
    _validate(cfg)
    check_k(cfg)


def _batchtopk_loss(params, buffers, x_bd, cfg, hp, dead_s, *, target_bd):
    return nested_batchtopk_loss(params, buffers, x_bd, target_bd, cfg, hp, dead_s, (cfg.d_sae,), False)


def _weights(params: Params, threshold_s: jax.Array) -> dict[str, jax.Array]:
    return {"W_enc": params["w_enc_sd"].T, "b_enc": params["b_enc_s"], "W_dec": params["w_dec_sd"],
            "b_dec": params["b_dec_d"], "threshold": threshold_s}


def _extra(cfg: SAEConfig) -> dict:
    return {"d_out": cfg.d_target, "apply_b_dec_to_input": False}


def _batchtopk_export(params, buffers, cfg, hp):
    del hp
    return "jumprelu_transcoder", _weights(params, jnp.full((cfg.d_sae,), buffers["threshold"], jnp.float32)), \
        _extra(cfg)


BATCHTOPK_TRANSCODER = register_architecture(
    Architecture("batchtopk_transcoder", init_transcoder, threshold_buffers, threshold_encode, _batchtopk_loss,
                 unit_norm_decoder, _batchtopk_export, validate=_batchtopk_validate, transcoder=True)
)


def _jumprelu_init(key, cfg):
    params = init_transcoder(key, cfg)
    params["log_threshold_s"] = jnp.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold), jnp.float32)
    return params


def _jumprelu_export(params, buffers, cfg, hp):
    del buffers, hp
    return "jumprelu_transcoder", _weights(params, jnp.exp(params["log_threshold_s"])), _extra(cfg)


JUMPRELU_TRANSCODER = register_architecture(
    Architecture("jumprelu_transcoder", _jumprelu_init, lambda cfg: {}, _jumprelu_encode, _jumprelu_loss,
                 unit_norm_decoder, _jumprelu_export, validate=_validate, transcoder=True)
)
