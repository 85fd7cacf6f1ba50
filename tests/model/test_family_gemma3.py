"""Gemma 3 text (`Gemma3ForCausalLM`, `gemma3_text`) equals HF transformers: sites, logits, packing, generation.

The tiny checkpoint has three layers (local, local, global), local layers with their own RoPE base
(10k) and a 48-token window, the global layer with base 1M and linear RoPE scaling x8 (as Gemma 3
4B), q/k RMSNorm with (1 + w), post-norms, `query_pre_attn_scalar` != head_dim, biases, and a final
soft-cap (Google's checkpoints have none, HF implements it), on ~600-token prompts.
"""

from __future__ import annotations

import pytest

from arcstream.model import LinearRopeScaling, ModelConfig, load_model
from arcstream.model.config import FULL, SLIDING
from arcstream.model.testing import TINY_WINDOW, make_tiny_hf_checkpoint
from tests.model import family_checks as fc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("gemma3") / "m", "gemma3_text", seed=41)


def test_config_reads_local_and_global_rope(ckpt):
    _, cfg = load_model(ckpt)
    assert cfg.layer_types == (SLIDING, SLIDING, FULL) and cfg.sliding_window == TINY_WINDOW
    assert (cfg.rope_theta, cfg.rope_scaling) == (1_000_000.0, LinearRopeScaling(8.0))
    assert (cfg.rope_local_theta, cfg.rope_local_scaling) == (10_000.0, None)
    assert [cfg.layer_rope(i) for i in range(3)] == ["local", "local", "global"]
    assert cfg.qk_norm and cfg.norm_plus_one and cfg.attn_logit_softcap is None and cfg.final_logit_softcap == 2.0


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
    fc.check_edit_equals_hf_hook(ckpt, "blocks.1.hook_mlp_out")


def test_saved_checkpoint_loads_in_hf(tmp_path):
    fc.check_saved_checkpoint_loads_in_hf(ModelConfig.tiny("gemma3_text"), tmp_path / "m")
