"""Standard (ReLU) SAEs (SAELens `standard`; Anthropic's April 2024 update).

ReLU activations and an L1 penalty on the activations weighted by their decoder
rows' norms (so shrinking the decoder cannot buy sparsity), `l1_coefficient` times
the per-token sum, averaged. No norm constraint on the decoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arcstream.sae.architectures.base import (Architecture, AuxTerms, Encoding, init_params, no_buffers, preacts,
                                              register_architecture, saelens_weights, unconstrained)


def _encode(params, buffers, x_bd, cfg, hp):
    del buffers, hp
    return jax.nn.relu(preacts(params, x_bd, cfg))


def _encode_with_hidden_pre(params, buffers, x_bd, cfg, hp) -> Encoding:
    del buffers, hp
    pre_bs = preacts(params, x_bd, cfg)
    return Encoding.dense(jax.nn.relu(pre_bs), pre_bs)


def _aux_loss(params, buffers, enc, step, cfg) -> AuxTerms:
    del buffers, cfg
    dec_norm_s = jnp.linalg.norm(params["w_dec_sd"], axis=1)
    l1 = step.hp["l1_coefficient"] * jnp.mean(jnp.sum(jnp.abs(enc.acts_bs * dec_norm_s), axis=-1))
    return AuxTerms({"l1_loss": l1})


def _export(params, buffers, cfg, hp):
    del buffers, cfg, hp
    return "standard", saelens_weights(params), {}


STANDARD = register_architecture(
    Architecture(name="standard", init=init_params, init_buffers=no_buffers, encode=_encode,
                 encode_with_hidden_pre=_encode_with_hidden_pre, aux_loss=_aux_loss, constrain=unconstrained,
                 export=_export)
)
