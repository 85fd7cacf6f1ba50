"""Packed rows equal prompts run alone; a sharded forward equals the single-device one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from arcstream.model import (ModelConfig, forward, forward_jit, init_random, load_model, logical_to_spec,
                             make_mesh, parse_sites)
from tests.model.conftest import rel_err

ALL_HOOKS = "blocks.*.hook_resid_pre,blocks.*.hook_attn_out,blocks.*.hook_mlp_out,blocks.*.hook_resid_post"


def _alone(model, cfg, tokens: np.ndarray, sites):
    t = tokens.size
    return forward_jit(model, jnp.asarray(tokens[None]), jnp.ones((1, t), jnp.int32),
                   jnp.arange(t, dtype=jnp.int32)[None], sites=sites, return_logits=True)


def test_packed_row_equals_prompts_alone(family, tiny_ckpts):
    model, cfg = load_model(tiny_ckpts[family])
    sites = parse_sites(ALL_HOOKS, cfg.num_layers)
    rng = np.random.RandomState(7)
    prompts = [rng.randint(3, 128, n).astype(np.int32) for n in (11, 17, 5, 30)]
    # Row 0: prompts 0, 1, 2 back to back, then padding. Row 1: prompt 3, then padding.
    t = 40
    tokens = np.zeros((2, t), np.int32)
    seg = np.zeros((2, t), np.int32)
    pos = np.zeros((2, t), np.int32)
    placement = [(0, 0), (0, 11), (0, 28), (1, 0)]
    for k, (p, (row, start)) in enumerate(zip(prompts, placement)):
        tokens[row, start:start + p.size] = p
        seg[row, start:start + p.size] = k + 1
        pos[row, start:start + p.size] = np.arange(p.size)
    packed = forward_jit(model, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos),
                     sites=sites, return_logits=True)
    for p, (row, start) in zip(prompts, placement):
        alone = _alone(model, cfg, p, sites)
        sl = slice(start, start + p.size)
        for s in sites:
            assert rel_err(packed.captures[s][row, sl], alone.captures[s][0]) < 1e-5, s
        assert rel_err(packed.logits[row, sl], alone.logits[0]) < 1e-5
    assert np.isfinite(np.asarray(packed.logits)).all()  # padding stays finite


def test_forward_stops_after_deepest_captured_layer(tiny_ckpts):
    """Poison the last layer with NaN: a capture of layer 0 without logits never touches it."""
    model, cfg = load_model(tiny_ckpts["qwen2"])
    last = model.layers[cfg.num_layers - 1]
    last.mlp.down_proj.kernel[...] = jnp.full_like(last.mlp.down_proj.kernel[...], jnp.nan)
    tok = jnp.arange(3, 13, dtype=jnp.int32)[None]
    ones, pos = jnp.ones_like(tok), jnp.arange(10, dtype=jnp.int32)[None]
    out = forward_jit(model, tok, ones, pos, sites=("blocks.0.hook_resid_post",), return_logits=False)
    assert out.logits is None and set(out.captures) == {"blocks.0.hook_resid_post"}
    assert np.isfinite(np.asarray(out.captures["blocks.0.hook_resid_post"])).all()
    full = forward_jit(model, tok, ones, pos, sites=("blocks.0.hook_resid_post",), return_logits=True)
    assert np.isnan(np.asarray(full.logits)).all()


def test_parse_sites_canonical_order_and_errors():
    assert parse_sites("blocks.1.hook_resid_post, blocks.0.hook_mlp_out,blocks.1.hook_resid_post", 2) == (
        "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post")
    assert len(parse_sites(["blocks.*.hook_attn_out"], 3)) == 3
    with pytest.raises(ValueError, match=r"layer 5 does not exist.*2 layers"):
        parse_sites("blocks.5.hook_resid_post", 2)
    with pytest.raises(ValueError, match=r"'blocks.0.resid_post' is not a valid name"):
        parse_sites("blocks.0.resid_post", 2)
    with pytest.raises(ValueError, match="compute nothing"):
        model = init_random(ModelConfig.tiny("qwen2"), 0)
        forward_jit(model, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32),
                jnp.zeros((1, 4), jnp.int32), sites=(), return_logits=False)


def test_make_mesh_has_auto_axes_and_checks_sizes():
    mesh = make_mesh(data=2, model=4)
    assert mesh.shape == {"data": 2, "model": 4}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert make_mesh(model=2).shape == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(data=4, model=4)


def test_logical_rules_replicate_dimensions_that_do_not_divide():
    mesh = make_mesh(data=2, model=4)
    assert logical_to_spec(("embed", "q_heads"), (64, 64), mesh) == PartitionSpec(None, "model")
    assert logical_to_spec(("embed", "kv_heads"), (64, 6), mesh) == PartitionSpec(None, None)
    assert logical_to_spec(("activation_batch", "activation_length", "activation_embed"),
                           (4, 9, 64), mesh) == PartitionSpec("data", None, None)
    with pytest.raises(ValueError, match="'nonsense' has no rule"):
        logical_to_spec(("nonsense",), (4,), mesh)


@pytest.mark.parametrize("data,model_par", [(2, 4), (4, 2)])
def test_sharded_forward_equals_single_device(tiny_ckpts, data, model_par):
    path = tiny_ckpts["qwen3"]
    single, cfg = load_model(path)
    sites = parse_sites("blocks.0.hook_resid_post,blocks.1.hook_attn_out,blocks.1.hook_mlp_out",
                        cfg.num_layers)
    rng = np.random.RandomState(3)
    tokens = jnp.asarray(rng.randint(3, 128, (4, 24)).astype(np.int32))
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 10 + [0] * 4], 4, axis=0).astype(np.int32))
    pos = jnp.asarray(np.repeat([list(range(10)) * 2 + [0] * 4], 4, axis=0).astype(np.int32))
    ref = forward_jit(single, tokens, seg, pos, sites=sites, return_logits=True)

    mesh = make_mesh(data=data, model=model_par)
    sharded, _ = load_model(path, mesh=mesh)
    q = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == PartitionSpec(None, "model")  # tensor parallel over heads
    assert len(q.sharding.device_set) == 8
    fwd = nnx.jit(forward, static_argnames=("sites", "return_logits"))
    with jax.set_mesh(mesh):
        out = fwd(sharded, tokens, seg, pos, sites=sites, return_logits=True)
    assert out.logits.sharding.spec[0] == "data"  # data parallel over the batch
    for s in sites:
        assert rel_err(out.captures[s], ref.captures[s]) < 1e-5, s
    assert rel_err(out.logits, ref.logits) < 1e-5


def test_init_random_on_mesh_matches_unsharded():
    cfg = ModelConfig.tiny("llama")
    mesh = make_mesh(data=2, model=4)
    a = init_random(cfg, seed=3)
    b = init_random(cfg, seed=3, mesh=mesh)
    ka, kb = a.layers[1].mlp.up_proj.kernel[...], b.layers[1].mlp.up_proj.kernel[...]
    assert kb.sharding.spec == PartitionSpec(None, "model")
    np.testing.assert_array_equal(np.asarray(ka), np.asarray(kb))
    assert float(jnp.std(ka)) == pytest.approx(0.02, rel=0.2)
