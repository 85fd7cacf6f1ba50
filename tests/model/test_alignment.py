"""Every capture site and the logits match HF transformers (PyTorch), per family.

float32: relative error (max |diff| / max |ref|) < 1e-4 on a 512-token prompt
(long enough that RoPE, and Llama 3's frequency scaling, are far from the
identity).  bfloat16: both implementations round at different points (HF's
SDPA and matmul accumulation orders are not ours), so errors compound through
the layers; the documented tolerance is BF16_TOL of the reference's largest
magnitude, against HF run in bfloat16 too.  Measured (2 x 128 tokens, all
sites): qwen2 1.4e-2, qwen3 1.9e-2, llama 1.4e-2; for scale, HF bf16 against
HF f32 on the same inputs differs by up to 3.4e-2.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from arcstream.model import forward_jit, load_model, parse_sites
from arcstream.model.testing import make_tiny_hf_checkpoint
from tests.model.conftest import hf_reference, load_hf, rel_err

F32_TOL = 1e-4
BF16_TOL = 3e-2
T = 512


def _tokens(b: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, 128, (b, t)).astype(np.int32)


def _run(model, cfg, tokens_bt):
    b, t = tokens_bt.shape
    sites = parse_sites("blocks.*.hook_resid_pre,blocks.*.hook_resid_post,"
                        "blocks.*.hook_attn_out,blocks.*.hook_mlp_out", cfg.num_layers)
    out = forward_jit(model, jnp.asarray(tokens_bt), jnp.ones((b, t), jnp.int32),
                  jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)), sites=sites, return_logits=True)
    return sites, out


def test_float32_sites_and_logits_match_hf(family, tiny_ckpts):
    path = tiny_ckpts[family]
    model, cfg = load_model(path, dtype="float32")
    tokens = _tokens(2, T)
    ref = hf_reference(load_hf(path), tokens)
    sites, out = _run(model, cfg, tokens)
    assert len(sites) == 4 * cfg.num_layers
    errors = {s: rel_err(out.captures[s], ref[s]) for s in sites}
    errors["logits"] = rel_err(out.logits, ref["logits"])
    assert max(errors.values()) < F32_TOL, errors


def test_bfloat16_sites_and_logits_match_hf_bf16(family, tiny_ckpts):
    path = tiny_ckpts[family]
    model, cfg = load_model(path, dtype="bfloat16")
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    tokens = _tokens(2, 128, seed=1)
    ref = hf_reference(load_hf(path, "bfloat16"), tokens)
    sites, out = _run(model, cfg, tokens)
    assert out.logits.dtype == jnp.bfloat16
    errors = {s: rel_err(out.captures[s], ref[s]) for s in sites}
    errors["logits"] = rel_err(out.logits, ref["logits"])
    assert max(errors.values()) < BF16_TOL, errors


@pytest.mark.parametrize("overrides", [
    dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),  # every Llama bias
    dict(rope_scaling=None, num_key_value_heads=4),  # Llama 2: plain RoPE, no GQA
])
def test_llama_variants_match_hf(tmp_path, overrides):
    path = make_tiny_hf_checkpoint(tmp_path / "llama", "llama", seed=5, **overrides)
    model, cfg = load_model(path)
    assert cfg.o_bias == overrides.get("attention_bias", False)
    tokens = _tokens(1, 200, seed=2)
    ref = hf_reference(load_hf(path), tokens)
    sites, out = _run(model, cfg, tokens)
    assert max(rel_err(out.captures[s], ref[s]) for s in sites) < F32_TOL
    assert rel_err(out.logits, ref["logits"]) < F32_TOL


def test_sharded_bf16_checkpoint_loads_like_hf(tmp_path):
    """An index.json + several shard files, weights stored in bf16, loaded as f32."""
    path = make_tiny_hf_checkpoint(tmp_path / "q", "qwen3", seed=3, dtype="bfloat16",
                                   max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 1
    model, cfg = load_model(path, dtype="float32")
    tokens = _tokens(1, 64, seed=4)
    hf = load_hf(path, "float32")  # upcasts the stored bf16 weights exactly, as we do
    ref = hf_reference(hf, tokens)
    _, out = _run(model, cfg, tokens)
    assert rel_err(out.logits, ref["logits"]) < F32_TOL
