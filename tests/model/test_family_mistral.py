"""Mistral (`MistralForCausalLM`) equals HF transformers: sites, logits, packing, generation, meshes.

The tiny checkpoint has an explicit head_dim (24, not hidden/heads) and a 48-token sliding window on
every layer (Mistral-7B-v0.1 has 4096); prompts are ~600 tokens.  A checkpoint without a window
(Mistral-NeMo-Minitron-8B) is the Llama path plus explicit head_dim, checked too.
"""

from __future__ import annotations

import pytest

from arcstream.model import ModelConfig, load_model
from arcstream.model.testing import TINY_WINDOW, make_tiny_hf_checkpoint
from tests.model import family_checks as fc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("mistral") / "m", "mistral", seed=21)


def test_config_reads_the_window_and_head_dim(ckpt):
    _, cfg = load_model(ckpt)
    assert cfg.family == "mistral" and cfg.head_dim == 24 and cfg.sliding_window == TINY_WINDOW
    assert [cfg.layer_window(i) for i in range(cfg.num_layers)] == [TINY_WINDOW] * cfg.num_layers


def test_float32_sites_and_logits_match_hf(ckpt):
    fc.check_sites_and_logits_match_hf(ckpt)


def test_without_a_window_matches_hf(tmp_path):
    path = make_tiny_hf_checkpoint(tmp_path / "m", "mistral", seed=22, sliding_window=None)
    assert load_model(path)[1].sliding_window is None
    fc.check_sites_and_logits_match_hf(path, t=200)


def test_bfloat16_matches_hf_bf16(ckpt):
    fc.check_sites_and_logits_match_hf(ckpt, dtype="bfloat16", t=128)


def test_packed_rows_equal_prompts_alone(ckpt):
    fc.check_packed_rows_equal_prompts_alone(ckpt)


def test_greedy_generation_matches_hf(ckpt):
    fc.check_greedy_generation_matches_hf(ckpt)


def test_meshes_equal_one_device(ckpt):
    fc.check_meshes_equal_one_device(ckpt)


def test_saved_checkpoint_loads_in_hf(tmp_path):
    fc.check_saved_checkpoint_loads_in_hf(ModelConfig.tiny("mistral"), tmp_path / "m")
