"""`blocks.L.hook_resid_mid` (what an MLP transcoder reads) is resid_pre + attn_out, and it feeds the MLP."""

import jax.numpy as jnp
import numpy as np
import pytest

from arcstream.model import ModelConfig, forward, init_random, parse_sites


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_hook_resid_mid_is_resid_pre_plus_attn_out(family):
    cfg = ModelConfig.tiny(family)
    model = init_random(cfg, seed=0)
    hooks = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
    sites = parse_sites(",".join(f"blocks.*.{h}" for h in hooks), cfg.num_layers)
    tok = jnp.arange(3, 13, dtype=jnp.int32)[None]
    out = forward(model, tok, jnp.ones_like(tok), jnp.arange(10, dtype=jnp.int32)[None], sites=sites,
                  return_logits=False)
    c = {k: np.asarray(v) for k, v in out.captures.items()}
    for layer in range(cfg.num_layers):
        b = f"blocks.{layer}."
        np.testing.assert_allclose(c[b + "hook_resid_mid"], c[b + "hook_resid_pre"] + c[b + "hook_attn_out"],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c[b + "hook_resid_post"], c[b + "hook_resid_mid"] + c[b + "hook_mlp_out"],
                                   rtol=1e-5, atol=1e-5)
