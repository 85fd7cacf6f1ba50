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

import dataclasses

import jax
import jax.numpy as jnp

from arcstream.sae.architectures.base import (Params, SAEConfig, check_k, register_architecture, saelens_weights,
                                              unit_norm_decoder)
from arcstream.sae.architectures.batchtopk import threshold_export
from arcstream.sae.architectures.jumprelu import JUMPRELU, init_log_threshold
from arcstream.sae.matryoshka import MATRYOSHKA_BATCHTOPK

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


def _extra(cfg: SAEConfig) -> dict:
    return {"d_out": cfg.d_target, "apply_b_dec_to_input": False}


def _batchtopk_export(params, buffers, cfg, hp):
    del hp
    return "jumprelu_transcoder", threshold_export(params, buffers, cfg), _extra(cfg)


# Matryoshka BatchTopK with one level (a cfg without matryoshka_widths) is BatchTopK; the base's loss
# reconstructs the target rows it is given (`loss(..., target_bd=y)`).
BATCHTOPK_TRANSCODER = register_architecture(dataclasses.replace(
    MATRYOSHKA_BATCHTOPK, name="batchtopk_transcoder", init=init_transcoder, export=_batchtopk_export,
    validate=_batchtopk_validate, transcoder=True,
))


def _jumprelu_init(key, cfg):
    return init_log_threshold(init_transcoder(key, cfg), cfg)


def _jumprelu_export(params, buffers, cfg, hp):
    del buffers, hp
    return "jumprelu_transcoder", saelens_weights(params, jnp.exp(params["log_threshold_s"])), _extra(cfg)


# JumpReLU's encoding and L0 term; unlike the SAE, unit-norm decoder rows (d_out may differ from d_in).
JUMPRELU_TRANSCODER = register_architecture(dataclasses.replace(
    JUMPRELU, name="jumprelu_transcoder", init=_jumprelu_init, constrain=unit_norm_decoder, export=_jumprelu_export,
    validate=_validate, transcoder=True,
))
