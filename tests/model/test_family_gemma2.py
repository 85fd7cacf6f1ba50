"""Gemma 2 (`Gemma2ForCausalLM`) equals HF transformers: sites, logits, packing, generation, meshes.

The tiny checkpoint exercises every Gemma 2 switch at magnitudes where it changes the result:
(1 + w) RMSNorm with random w, embeddings times sqrt(D), GeGLU, post-attention and post-MLP norms,
`query_pre_attn_scalar` (24) != head_dim (16), attention-logit soft-cap 1.0 and final soft-cap 2.0,
biases on q/k/v/o, tied embeddings, and HF's default layer pattern (layer 0 local with a 48-token
window, layer 1 global) on ~600-token prompts.  HF runs its eager attention (Gemma 2 has no SDPA).

Sites follow TransformerLens: hook_attn_out / hook_mlp_out are taken *after* the post-norms.
"""

from __future__ import annotations

import pytest

from arcstream.model import ModelConfig, load_model
from arcstream.model.config import FULL, SLIDING
from arcstream.model.testing import TINY_WINDOW, make_tiny_hf_checkpoint
from tests.model import family_checks as fc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("gemma2") / "m", "gemma2", seed=31)


def test_config_reads_every_gemma2_switch(ckpt):
    _, cfg = load_model(ckpt)
    assert cfg.layer_types == (SLIDING, FULL) and cfg.sliding_window == TINY_WINDOW
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.query_pre_attn_scalar) == (1.0, 2.0, 24.0)
    assert cfg.norm_plus_one and cfg.sandwich_norms and cfg.scale_embeddings and cfg.tie_word_embeddings
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.qkv_bias and cfg.o_bias and not cfg.qk_norm


def test_float32_sites_and_logits_match_hf(ckpt):
    fc.check_sites_and_logits_match_hf(ckpt)


def test_bfloat16_matches_hf_bf16(ckpt):
    fc.check_sites_and_logits_match_hf(ckpt, dtype="bfloat16", t=128)


def test_packed_rows_equal_prompts_alone(ckpt):
    fc.check_packed_rows_equal_prompts_alone(ckpt)


def test_greedy_generation_matches_hf(ckpt):
    fc.check_greedy_generation_matches_hf(ckpt)


def test_meshes_equal_one_device(ckpt):
    fc.check_meshes_equal_one_device(ckpt)


def test_edit_of_a_site_equals_an_hf_hook_on_the_post_norm(ckpt):
    fc.check_edit_equals_hf_hook(ckpt, "blocks.0.hook_attn_out")


def test_saved_checkpoint_loads_in_hf(tmp_path):
    fc.check_saved_checkpoint_loads_in_hf(ModelConfig.tiny("gemma2"), tmp_path / "m")
