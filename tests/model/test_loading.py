"""Checkpoint loading errors are clear; saved checkpoints load in HF; configs round-trip."""

from __future__ import annotations

import json
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.flax import load_file, save_file

from arcstream.model import (ModelConfig, forward_jit, init_random, load_model, make_mesh,
                             save_hf_checkpoint)
from tests.model.conftest import hf_reference, load_hf, rel_err


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="gpt2"), r"model_type='gpt2' is not supported"),
    (dict(architectures=["Qwen2ForSequenceClassification"]), r"Qwen2ForSequenceClassification.*causal LM"),
    (dict(use_sliding_window=True), r"use_sliding_window=True is not supported"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     r"rope_type='yarn' is not supported"),
    (dict(intermediate_size=80), r"'model.layers.0.mlp.down_proj.weight' has shape \(64, 96\); "
                                  r"the config.json implies \(64, 80\)"),
])
def test_unsupported_or_inconsistent_config_is_named(tiny_ckpts, tmp_path, changes, match):
    path = _copy(tiny_ckpts["qwen2"], tmp_path / "ckpt")
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=match):
        load_model(path)


def test_missing_and_unexpected_tensors_are_named(tiny_ckpts, tmp_path):
    path = _copy(tiny_ckpts["llama"], tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.post_attention_layernorm.weight'\]"):
        load_model(path)
    tensors["model.layers.1.post_attention_layernorm.weight"] = jnp.ones((64,))
    tensors["model.layers.0.self_attn.q_proj.bias"] = jnp.ones((64,))  # config says no attention bias
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.q_proj.bias' "
                                         r"is not a parameter"):
        load_model(path)


def test_missing_paths_and_offline_hub_names_fail_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model(tmp_path / "nope")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"'arcstream-test/not-a-model'.*HF_HUB_OFFLINE=1"):
        load_model("arcstream-test/not-a-model")
    assert time.monotonic() - start < 10
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(ModelConfig.tiny().to_hf_config()))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="never pickle"):
        load_model(tmp_path / "bin")
    with pytest.raises(ValueError, match="dtype='float16'"):
        load_model(tmp_path / "bin", dtype="float16")


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_saved_checkpoint_loads_in_hf_with_same_logits(tmp_path, family):
    """Our writer, checked by the reference reader: HF loads it and computes our logits."""
    cfg = ModelConfig.tiny(family)
    model = init_random(cfg, seed=1)
    # Non-trivial norms and biases so the check sees them.
    for layer in model.layers:
        w = layer.input_layernorm.weight
        w[...] = w[...] * 1.5
        if layer.self_attn.q_proj.bias is not None:
            layer.self_attn.q_proj.bias[...] = jnp.linspace(-0.5, 0.5, cfg.q_size)
    path = save_hf_checkpoint(model, cfg, tmp_path / family)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 70)).astype(np.int32)
    ref = hf_reference(load_hf(path), tokens)
    out = forward_jit(model, jnp.asarray(tokens), jnp.ones((1, 70), jnp.int32),
                      jnp.arange(70, dtype=jnp.int32)[None], sites=(), return_logits=True)
    assert rel_err(out.logits, ref["logits"]) < 1e-4
    again, cfg2 = load_model(path)
    assert cfg2 == cfg
    np.testing.assert_array_equal(np.asarray(again.layers[1].mlp.down_proj.kernel[...]),
                                  np.asarray(model.layers[1].mlp.down_proj.kernel[...]))


def test_sharded_save_and_bf16_mesh_load_round_trip(tmp_path):
    cfg = ModelConfig.tiny("qwen2")
    mesh = make_mesh(data=4, model=2)
    model = init_random(cfg, seed=2, dtype="bfloat16", mesh=mesh)
    path = save_hf_checkpoint(model, cfg, tmp_path / "q", max_shard_bytes=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]  # tied
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    again, _ = load_model(path, dtype="bfloat16", mesh=mesh)
    a = again.layers[0].self_attn.k_proj.kernel[...]
    assert a.dtype == jnp.bfloat16 and a.sharding.spec[1] == "model"
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(model.layers[0].self_attn.k_proj.kernel[...], np.float32))


@pytest.mark.parametrize("preset", ["qwen2_0p5b", "qwen2_7b", "qwen3_0p6b", "llama3p2_1b", "llama3_8b",
                                    "tiny"])
def test_presets_round_trip_through_hf_config(preset):
    cfg = ModelConfig.from_preset(preset)
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_parameter_count_of_presets():
    # Published sizes: Qwen2.5-0.5B 0.49B, Qwen3-0.6B 0.60B, Llama 3.2-1B 1.24B, Llama 3.1-8B 8.03B.
    assert ModelConfig.qwen2_0p5b().num_params() == pytest.approx(0.494e9, rel=0.01)
    assert ModelConfig.qwen3_0p6b().num_params() == pytest.approx(0.596e9, rel=0.01)
    assert ModelConfig.llama3p2_1b().num_params() == pytest.approx(1.236e9, rel=0.01)
    assert ModelConfig.llama3_8b().num_params() == pytest.approx(8.03e9, rel=0.01)
    for cfg in (ModelConfig.tiny("llama", mlp_bias=True, qkv_bias=True, o_bias=True),
                ModelConfig.tiny("qwen3")):
        m = init_random(cfg, 0)
        assert sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))) == cfg.num_params()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        ModelConfig.tiny("qwen2", num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="model preset 'gpt5'"):
        ModelConfig.from_preset("gpt5")


def test_hub_name_resolves_from_the_hf_cache_offline(tiny_ckpts, tmp_path, monkeypatch):
    """A cached hub model loads by name with HF_HUB_OFFLINE=1 (the cache layout made by hand)."""
    import huggingface_hub.constants

    snap = tmp_path / "hub" / "models--arcstream-test--tiny-qwen2" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_ckpts["qwen2"], snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model, cfg = load_model("arcstream-test/tiny-qwen2")
    ref, _ = load_model(tiny_ckpts["qwen2"])
    assert cfg.family == "qwen2"
    np.testing.assert_array_equal(np.asarray(model.norm.weight[...]), np.asarray(ref.norm.weight[...]))
