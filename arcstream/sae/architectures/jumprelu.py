"""JumpReLU SAEs (SAELens `jumprelu`; Gemma Scope, Rajamanoharan et al. 2024, arXiv:2407.14435).

A latent fires when its pre-activation passes its own learned threshold
(`log_threshold_s`, so thresholds stay positive). The loss adds an L0 penalty,
`l0_coefficient` times the mean number of firing latents per token; both the gate and
the L0 count are step functions, trained through straight-through estimators with a
rectangle kernel of width `jumprelu_bandwidth` (`jumprelu`, `step_fn`). transcoder.py's
`jumprelu_transcoder` is this architecture with a separate target.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from arcstream.sae.architectures.base import (Architecture, AuxTerms, Encoding, Params, init_params, no_buffers,
                                              preacts, register_architecture, saelens_weights, unconstrained)


def _rectangle(u: jax.Array) -> jax.Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@jax.custom_vjp
def jumprelu(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """z * H(z - threshold). Pseudo-gradient (Gemma Scope): d/dz = H(z - t);
    d/dt = -(t / eps) * rect((z - t) / eps)."""
    return z * (z > threshold)


def _jumprelu_fwd(z, threshold, bandwidth):
    return z * (z > threshold), (z, threshold, bandwidth)


def _jumprelu_bwd(res, g):
    z, t, eps = res
    d_t = -(t / eps) * _rectangle((z - t) / eps) * g
    d_t = jnp.sum(d_t.reshape(-1, t.shape[-1]), axis=0)
    return (z > t) * g, d_t, None


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step_fn(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """H(z - threshold). Pseudo-gradient: d/dz = 0; d/dt = -(1 / eps) * rect((z - t) / eps)."""
    return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
    return (z > threshold).astype(z.dtype), (z, threshold, bandwidth)


def _step_bwd(res, g):
    z, t, eps = res
    d_t = -(1.0 / eps) * _rectangle((z - t) / eps) * g
    return jnp.zeros_like(z), jnp.sum(d_t.reshape(-1, t.shape[-1]), axis=0), None


step_fn.defvjp(_step_fwd, _step_bwd)


# SAELens's JumpReLU: decoder rows of norm 0.1 at init (its decoder_init_norm, Anthropic's April 2024
# heuristic; encoder = decoder transpose) and no norm constraint after. With unit-norm rows and the
# 0.01 initial threshold about half the latents fire on every token at init, each adding a unit
# vector, and 40 steps (163,840 tokens) ended at FVU 23.8, L0 6,572 where SAELens reached 0.45
# (benchmarks/bench_sae.py --whole).
JUMPRELU_DECODER_INIT_NORM = 0.1


def init_log_threshold(params: Params, cfg) -> Params:
    """`params` plus `log_threshold_s`, every latent at `cfg.jumprelu_init_threshold`."""
    return {**params,
            "log_threshold_s": jnp.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold), jnp.float32)}


def _init(key, cfg):
    params = init_params(key, cfg)
    params["w_dec_sd"] = params["w_dec_sd"] * JUMPRELU_DECODER_INIT_NORM
    params["w_enc_sd"] = params["w_enc_sd"] * JUMPRELU_DECODER_INIT_NORM
    return init_log_threshold(params, cfg)


def _encode(params, buffers, x_bd, cfg, hp):
    del buffers, hp
    pre_bs = preacts(params, x_bd, cfg)
    t_s = jnp.exp(params["log_threshold_s"])
    # ReLU then gate, as SAELens's inference JumpReLUSAE (equal to z*H(z-t) for t >= 0).
    return jax.nn.relu(pre_bs) * (pre_bs > t_s)


def _encode_with_hidden_pre(params, buffers, x_bd, cfg, hp) -> Encoding:
    """z * H(z - t) with the pseudo-gradient that trains t (`jumprelu`)."""
    del buffers, hp
    pre_bs = preacts(params, x_bd, cfg)
    t_s = jnp.exp(params["log_threshold_s"])
    return Encoding.dense(jumprelu(pre_bs, t_s, cfg.jumprelu_bandwidth), pre_bs, threshold_s=t_s)


def _aux_loss(params, buffers, enc, step, cfg) -> AuxTerms:
    """The L0 penalty, counted with `step_fn` so that the thresholds get its pseudo-gradient."""
    del params, buffers
    l0_b = jnp.sum(step_fn(enc.pre_bs, enc.info["threshold_s"], cfg.jumprelu_bandwidth), axis=-1)
    return AuxTerms({"l0_loss": step.hp["l0_coefficient"] * jnp.mean(l0_b)})


def _export(params, buffers, cfg, hp):
    del buffers, cfg, hp
    return "jumprelu", saelens_weights(params, jnp.exp(params["log_threshold_s"])), {}


JUMPRELU = register_architecture(
    Architecture(name="jumprelu", init=_init, init_buffers=no_buffers, encode=_encode,
                 encode_with_hidden_pre=_encode_with_hidden_pre, aux_loss=_aux_loss, constrain=unconstrained,
                 export=_export)
)
