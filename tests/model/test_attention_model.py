"""The model's attention choice: every implementation gives the same model outputs and gradients as `dense`,
the choice reaches the model from the jobs' config, and head sharding is whole heads or an error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from arcstream.model import (ModelConfig, attention_option, default_model_options, forward_jit, init_random,
                             make_mesh)

# Packed rows: a segment ending exactly on the 512-token block edge, one longer than a block, one-token
# segments, trailing padding; and an all-padding row.
_LENGTHS = ((512, 300, 1, 1, 200), ())
_T = 1100


def _packed_rows(vocab: int, seed: int = 0):
    rs = np.random.RandomState(seed)
    seg = np.zeros((len(_LENGTHS), _T), np.int32)
    pos = np.zeros((len(_LENGTHS), _T), np.int32)
    for b, lengths in enumerate(_LENGTHS):
        at = 0
        for i, n in enumerate(lengths):
            seg[b, at:at + n], pos[b, at:at + n] = i + 1, np.arange(n)
            at += n
    tok = rs.randint(0, vocab, seg.shape).astype(np.int32)
    return jnp.asarray(tok), jnp.asarray(seg), jnp.asarray(pos)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_blocked_and_auto_equal_dense_through_the_whole_model(family):
    cfg = ModelConfig.tiny(family)
    tok, seg, pos = _packed_rows(cfg.vocab_size)
    sites = ("blocks.0.hook_attn_out", "blocks.1.hook_resid_post")
    out = {}
    for impl in ("dense", "blocked", "auto"):
        model = init_random(cfg, seed=3, attention=impl)
        assert model.attention == impl
        r = forward_jit(model, tok, seg, pos, sites=sites, return_logits=True)
        out[impl] = [np.asarray(r.logits)] + [np.asarray(r.captures[s]) for s in sites]
    real = np.asarray(seg) > 0
    for impl in ("blocked", "auto"):
        for got, ref in zip(out[impl], out["dense"]):
            err = np.abs(got - ref)[real].max() / np.abs(ref[real]).max()
            assert err < 1e-5, (impl, err)
            assert np.isfinite(got).all()


def test_blocked_gradients_equal_dense_in_the_lm_loss():
    from arcstream.lm.heldout import token_nll

    cfg = ModelConfig.tiny("qwen2")
    tok, seg, pos = _packed_rows(cfg.vocab_size, seed=1)
    tgt = jnp.roll(tok, -1, axis=1)
    w = (seg > 0).astype(jnp.float32)
    grads = {}
    for impl in ("dense", "blocked"):
        graphdef, params = nnx.split(init_random(cfg, seed=5, attention=impl))

        def loss(p, graphdef=graphdef):
            nll = token_nll(graphdef, p, tok, seg, pos, tgt)
            return (nll * w).sum() / w.sum()

        grads[impl] = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
    for g_b, g_d in zip(grads["blocked"], grads["dense"]):
        g_b, g_d = np.asarray(g_b), np.asarray(g_d)
        assert np.abs(g_b - g_d).max() <= 1e-5 * max(np.abs(g_d).max(), 1e-6) + 1e-7


def test_attention_option_reads_the_config_and_refuses_unknown_names():
    c = ml_collections.ConfigDict()
    assert attention_option(c) == "auto"  # a config without the section
    c.model_options = default_model_options()
    c.model_options.attention = "blocked"
    assert attention_option(c) == "blocked"
    c.model_options.attention = "flash"
    with pytest.raises(ValueError, match=r"model_options.attention='flash'.*'blocked'"):
        attention_option(c)
    with pytest.raises(ValueError, match="attention='flash'"):
        init_random(ModelConfig.tiny("qwen2"), attention="flash")


def test_a_model_axis_that_splits_heads_is_refused():
    mesh = make_mesh(data=2, model=4)
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"size 4 does not split the model's 6 query heads.*\[1, 2, 6\]"):
            init_random(ModelConfig.tiny("qwen2", num_heads=6, num_kv_heads=2), mesh=mesh)
        # 4 query heads over 4 devices, 2 KV heads kept whole on each: allowed.
        model = init_random(ModelConfig.tiny("qwen2"), mesh=mesh)
    spec = model.layers[0].self_attn.q_proj.kernel[...].sharding.spec
    assert tuple(spec) == (None, "model")
