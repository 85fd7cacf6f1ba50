"""Mistral/Gemma config.json reading, presets with the real shapes, and refusals by name.

The hub files below are the published `config.json`s (transformers 4 layout) of the checkpoints the
presets are named after; each must read as its preset, both directly and after transformers 5 has
rewritten it (its own config class, `to_dict()`), so our reading of the legacy keys
(`rope_local_base_freq`, `sliding_window_pattern`, Gemma 3's `rope_scaling` on global layers only)
is transformers' reading.
"""

from __future__ import annotations

import pytest

from arcstream.model import PRESETS, LinearRopeScaling, ModelConfig
from arcstream.model.config import FULL, SLIDING

transformers = pytest.importorskip("transformers")

GEMMA_2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
    "transformers_version": "4.42.4", "use_cache": True, "vocab_size": 256000}
GEMMA_2_9B = {**GEMMA_2_2B, "hidden_size": 3584, "intermediate_size": 14336, "num_attention_heads": 16,
              "num_hidden_layers": 42, "num_key_value_heads": 8}
GEMMA_3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144}
# gemma-3-4b-pt's `text_config` (its other keys are Gemma3TextConfig's defaults), with those defaults spelt out.
GEMMA_3_4B_TEXT = {**GEMMA_3_1B, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 262208,
                   "max_position_embeddings": 131072, "sliding_window": 1024,
                   "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}
MISTRAL_7B_V0_1 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}
MISTRAL_NEMO_MINITRON_8B = {
    **MISTRAL_7B_V0_1, "head_dim": 128, "intermediate_size": 11520, "max_position_embeddings": 8192,
    "num_hidden_layers": 40, "rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 131072}

HUB = [(GEMMA_2_2B, "gemma_2_2b", transformers.Gemma2Config), (GEMMA_2_9B, "gemma_2_9b", transformers.Gemma2Config),
       (GEMMA_3_1B, "gemma_3_1b", transformers.Gemma3TextConfig),
       (GEMMA_3_4B_TEXT, "gemma_3_4b", transformers.Gemma3TextConfig),
       (MISTRAL_7B_V0_1, "mistral_7b_v0_1", transformers.MistralConfig),
       (MISTRAL_NEMO_MINITRON_8B, "mistral_nemo_minitron_8b", transformers.MistralConfig)]


@pytest.mark.parametrize("hub,preset,hf_cls", HUB, ids=[p for _, p, _ in HUB])
def test_hub_config_reads_as_its_preset_directly_and_through_transformers(hub, preset, hf_cls):
    want = ModelConfig.from_preset(preset)
    assert ModelConfig.from_hf_config(hub) == want
    rewritten = hf_cls(**{k: v for k, v in hub.items() if k != "architectures"}).to_dict()
    assert ModelConfig.from_hf_config(rewritten) == want


def test_gemma3_layer_pattern_and_rope_tables():
    cfg = ModelConfig.gemma_3_4b()
    assert [i for i in range(cfg.num_layers) if cfg.layer_type(i) == FULL] == [5, 11, 17, 23, 29]
    assert cfg.layer_window(0) == 1024 and cfg.layer_window(5) is None
    assert cfg.layer_rope(0) == "local" and cfg.layer_rope(5) == "global" and cfg.rope_kinds == ("global", "local")
    assert cfg.rope_scaling == LinearRopeScaling(8.0) and cfg.rope_local_scaling is None
    g2 = ModelConfig.gemma_2_2b()
    assert g2.layer_types[:3] == (SLIDING, FULL, SLIDING) and g2.rope_kinds == ("global",)
    assert ModelConfig.mistral_7b_v0_1().layer_window(31) == 4096
    assert ModelConfig.mistral_nemo_minitron_8b().layer_window(0) is None


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_round_trips_through_its_hf_config(name):
    cfg = ModelConfig.from_preset(name)
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_preset_parameter_counts_are_the_published_ones():
    published = {"gemma_2_2b": 2_614_341_888, "gemma_2_9b": 9_241_705_984, "gemma_2_27b": 27_227_128_320,
                 "gemma_3_1b": 999_885_952, "mistral_7b_v0_1": 7_241_732_096, "qwen2_5_0_5b": 494_032_768,
                 "qwen2_5_7b": 7_615_616_512, "qwen2_5_14b": 14_770_033_664, "llama_3_2_3b": 3_212_749_824,
                 "llama_3_1_8b": 8_030_261_248}
    for name, n in published.items():
        assert ModelConfig.from_preset(name).num_params() == n, name
    # Minitron: 8.41B on its model card; Gemma 3 4B: 3.88B of its 4.3B are the language model.
    assert ModelConfig.mistral_nemo_minitron_8b().num_params() == pytest.approx(8.41e9, rel=0.005)
    assert ModelConfig.gemma_3_4b().num_params() == pytest.approx(3.88e9, rel=0.005)


def test_old_preset_names_are_aliases_and_layer_cuts_keep_the_pattern():
    assert ModelConfig.from_preset("qwen2_0p5b") == ModelConfig.qwen2_5_0_5b() == ModelConfig.qwen2_0p5b()
    assert ModelConfig.from_preset("llama3_8b") == ModelConfig.llama_3_1_8b()
    cut = ModelConfig.from_preset("gemma_3_4b", num_layers=8)
    assert cut.layer_types == (SLIDING,) * 5 + (FULL,) + (SLIDING,) * 2
    grown = ModelConfig.gemma_2_2b().replace(num_layers=30)
    assert grown.layer_types == (SLIDING, FULL) * 15
    assert ModelConfig.from_preset("tiny", family="gemma2").family == "gemma2"


def test_sliding_layers_cost_fewer_attention_flops():
    full = ModelConfig.mistral_nemo_minitron_8b()
    windowed = full.replace(sliding_window=1024)
    assert windowed.flops_per_token(8192) < full.flops_per_token(8192)
    assert windowed.flops_per_token(512) == full.flops_per_token(512)  # the window never bites


def _refused(hf, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)


def test_unsupported_options_are_refused_by_name():
    _refused({**GEMMA_3_1B, "model_type": "gemma3"}, r"model_type='gemma3'.*multimodal.*gemma3_text")
    _refused({**GEMMA_2_2B, "use_bidirectional_attention": True}, r"use_bidirectional_attention=True")
    _refused({**GEMMA_3_1B, "attn_logit_softcapping": 50.0}, r"attn_logit_softcapping=50.0.*ignores it")
    _refused({**GEMMA_2_2B, "hidden_activation": "gelu"}, r"hidden_activation='gelu'.*'gelu_pytorch_tanh'")
    _refused({**GEMMA_2_2B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type='yarn'")
    _refused({**GEMMA_3_1B, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_type='dynamic'")
    _refused({**GEMMA_2_2B, "layer_types": ["sliding_attention", "chunked_attention"] * 13},
             r"layer_types=\['chunked_attention'")
    _refused({**GEMMA_2_2B, "layer_types": ["sliding_attention"] * 25}, r"layer_types='25 entries'")
    _refused({**GEMMA_2_2B, "sliding_window": None}, r"sliding_window=None.*sliding_attention")
    _refused({**GEMMA_2_2B, "partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5")
    _refused({**MISTRAL_7B_V0_1, "layer_types": ["sliding_attention", "full_attention"] * 16},
             r"layer_types=.*MistralForCausalLM ignores it")
    _refused({**MISTRAL_7B_V0_1, "hidden_act": "gelu"}, r"hidden_act='gelu'")
    _refused({**MISTRAL_7B_V0_1, "sliding_window": 0}, r"sliding_window=0")


def test_inexpressible_configs_are_refused_on_write():
    with pytest.raises(ValueError, match=r"sliding_window.*not expressible in a llama"):
        ModelConfig.tiny("llama", sliding_window=8).to_hf_config()
    with pytest.raises(ValueError, match=r"norm_plus_one.*not expressible in a gemma2"):
        ModelConfig.tiny("gemma2", norm_plus_one=False).to_hf_config()
    with pytest.raises(ValueError, match="attention biases"):
        ModelConfig.tiny("mistral", qkv_bias=True, o_bias=True).to_hf_config()
    with pytest.raises(ValueError, match=r"layer_types has 'sliding_attention' layers but sliding_window=None"):
        ModelConfig.tiny("gemma2", sliding_window=None)
    with pytest.raises(ValueError, match=r"layer_types=.*expected 2 entries"):
        ModelConfig.tiny("gemma2", layer_types=(SLIDING,))
