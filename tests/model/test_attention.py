"""`arcstream.model.attention`: every implementation equals the dense reference.

Values, not shapes: float32 relative error < 1e-5 on packed rows that hit the
edge cases of the blocked kernel (segment boundary on a block edge, segments
longer than several blocks, one-token segments, padding rows, T not a block
multiple, GQA ratios 1/2/7, sliding windows smaller and larger than a block),
gradients against `jax.grad` of the dense path, and memory linear in T.
Shapes are small (blocks of 16) so the file runs in well under a minute.
"""

from __future__ import annotations

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arcstream.model as model_pkg
from arcstream.model.attention import IMPLEMENTATIONS, attention, segment_mask

# The module itself: `arcstream.model.attention` the attribute is the function
# (re-exported by the package), so `from arcstream.model import attention` would not do.
att = sys.modules["arcstream.model.attention"]

TOL_F32 = 1e-5


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| (scale-free; every element must meet it)."""
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got).all(), "non-finite values in the output"
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def qkv(b: int, t: int, n: int, k: int, h: int = 8, *, seed: int = 0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    # Scores of a few units: a softmax far from uniform, so masking mistakes show.
    q = jnp.asarray(2.0 * rng.normal(size=(b, t, n, h)), dtype)
    kk = jnp.asarray(2.0 * rng.normal(size=(b, t, k, h)), dtype)
    v = jnp.asarray(rng.normal(size=(b, t, k, h)), dtype)
    return q, kk, v


def row(*lengths_ids: tuple[int, int]) -> np.ndarray:
    """A packed row from (segment id, length) runs; id 0 is padding."""
    return np.concatenate([np.full(n, s, np.int32) for s, n in lengths_ids])


@functools.lru_cache(maxsize=None)
def _jitted(implementation: str, window, block_q, block_k, scale=None):
    return jax.jit(functools.partial(attention, implementation=implementation, window=window,
                                     block_q=block_q, block_k=block_k, scale=scale))


def run(q, k, v, seg, implementation, *, window=None, block_q=16, block_k=16, scale=None):
    if implementation == "dense":
        block_q = block_k = None
    return _jitted(implementation, window, block_q, block_k, scale)(q, k, v, jnp.asarray(seg, jnp.int32))


# Named packed rows, all T=83 (not a multiple of the 16-token blocks) so that
# one compiled function serves them all; each row hits one edge case.
T_COMMON = 83
LAYOUTS = {
    "boundary_on_block_edge": row((1, 16), (2, 32), (3, 16), (4, 19)),
    "segment_over_several_blocks": row((1, 3), (2, 70), (0, 10)),
    "one_token_segments": row(*[(i, 1) for i in range(1, 10)], (10, 30), (11, 1), (12, 1), (13, 35), (0, 7)),
    "all_padding_row": row((0, 83)),
    "trailing_padding": row((1, 21), (2, 9), (0, 53)),
    "one_segment": row((1, 83)),
    # Not produced by packing, but the result must still be exact: an id that
    # reappears later (padding between prompts) only costs skipping, not correctness.
    "reappearing_ids": row((1, 10), (0, 10), (2, 20), (0, 5), (1, 38)),
}
assert all(len(r) == T_COMMON for r in LAYOUTS.values())


def check_layouts(n: int, k: int, names=tuple(LAYOUTS), **kw) -> None:
    q, kk, v = qkv(1, T_COMMON, n, k, seed=n * 10 + k)
    for name in names:
        seg = LAYOUTS[name][None]
        ref = run(q, kk, v, seg, "dense", window=kw.get("window"), scale=kw.get("scale"))
        err = rel_err(run(q, kk, v, seg, "blocked", **kw), ref)
        assert err < TOL_F32, (name, err)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_blocked_equals_dense_on_packed_layouts(layout):
    check_layouts(4, 2, names=(layout,))


def test_blocked_equals_dense_when_t_is_a_block_multiple_and_rows_differ():
    # B=2 rows with different layouts share the block bounds (the smaller wins).
    seg = np.stack([row((1, 16), (2, 48)), row((3, 40), (0, 24))])
    q, k, v = qkv(2, 64, 4, 2, seed=1)
    assert rel_err(run(q, k, v, seg, "blocked"), run(q, k, v, seg, "dense")) < TOL_F32


@pytest.mark.parametrize("n,k", [(2, 2), (4, 2), (7, 1), (14, 2)], ids=["gqa1", "gqa2", "gqa7", "qwen_14_2"])
def test_blocked_equals_dense_for_gqa_ratios(n, k):
    check_layouts(n, k, names=("boundary_on_block_edge", "one_token_segments", "trailing_padding"))


@pytest.mark.parametrize("window", [1, 5, 16, 40], ids=["w1", "w5_lt_block", "w16_eq_block", "w40_gt_block"])
def test_blocked_equals_dense_with_sliding_window(window):
    check_layouts(4, 2, window=window)
    # The window really changes the result (the long segment is wider than it).
    q, k, v = qkv(1, T_COMMON, 4, 2, seed=42)
    seg = LAYOUTS["segment_over_several_blocks"][None]
    assert rel_err(run(q, k, v, seg, "dense"), run(q, k, v, seg, "dense", window=window)) > 1e-3


@pytest.mark.parametrize("block_q,block_k", [(16, 32), (32, 16), (8, 24), (128, 128)])
def test_blocked_with_unequal_or_oversized_blocks(block_q, block_k):
    check_layouts(4, 2, names=("boundary_on_block_edge", "one_token_segments", "reappearing_ids"),
                  window=9, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize("seed", range(2))
def test_blocked_equals_dense_on_random_packed_rows(seed):
    rng = np.random.default_rng(100 + seed)
    b, t = int(rng.integers(2, 4)), int(rng.integers(60, 120))
    n_k = int(rng.choice([1, 2]))
    q, k, v = qkv(b, t, n_k * int(rng.choice([2, 7])), n_k, seed=seed)
    window = [None, int(rng.integers(2, 40))][seed % 2]
    block_q, block_k = (int(rng.choice([8, 16, 32])) for _ in range(2))
    for _ in range(3):  # same shapes: one compile, three layouts
        seg = np.zeros((b, t), np.int32)
        for r in range(b):
            pos, sid = 0, 1
            while pos < t and rng.random() > 0.1:  # else: trailing padding
                n = int(rng.choice([1, 2, int(rng.integers(3, 50))]))
                seg[r, pos:pos + n] = sid
                pos, sid = pos + n, sid + 1
        got = run(q, k, v, seg, "blocked", window=window, block_q=block_q, block_k=block_k)
        assert rel_err(got, run(q, k, v, seg, "dense", window=window)) < TOL_F32


def test_padding_attends_to_padding_only_and_stays_finite():
    seg = LAYOUTS["trailing_padding"][None]
    q, k, v = qkv(1, T_COMMON, 4, 2, seed=5)
    v = v.at[:, 30:].set(7.0)  # the padding's values: a padding query must average only these
    got = np.asarray(run(q, k, v, seg, "blocked"))
    np.testing.assert_allclose(got[0, 30:], 7.0, rtol=1e-6)
    assert np.isfinite(got).all()


def test_bfloat16_inputs_match_dense_loosely_and_keep_dtype():
    seg = np.stack([LAYOUTS["segment_over_several_blocks"], LAYOUTS["one_token_segments"]])
    q, k, v = qkv(2, T_COMMON, 4, 2, seed=6, dtype=jnp.bfloat16)
    got = run(q, k, v, seg, "blocked", window=20)
    ref = run(q, k, v, seg, "dense", window=20)
    assert got.dtype == ref.dtype == jnp.bfloat16
    assert rel_err(got, ref) < 2e-2
    # And close to the float32 answer on the same (rounded) inputs.
    ref32 = run(*(x.astype(jnp.float32) for x in (q, k, v)), seg, "dense", window=20)
    assert rel_err(got, ref32) < 2e-2


def test_scale_default_and_explicit():
    seg = LAYOUTS["boundary_on_block_edge"][None]
    q, k, v = qkv(1, T_COMMON, 4, 2, seed=7)
    # The default is 1/sqrt(H) (H=8), for the reference too.
    default = run(q, k, v, seg, "dense")
    assert rel_err(default, run(q, k, v, seg, "dense", scale=1 / np.sqrt(8))) < 1e-6
    got = run(q, k, v, seg, "blocked", scale=0.05)
    assert rel_err(got, run(q, k, v, seg, "dense", scale=0.05)) < TOL_F32
    assert rel_err(got, default) > 1e-3


def test_auto_is_blocked_on_cpu_and_exact():
    assert jax.default_backend() == "cpu"
    assert att._auto() == "blocked"
    seg = LAYOUTS["one_token_segments"][None]
    q, k, v = qkv(1, T_COMMON, 4, 2, seed=8)
    got = jax.jit(functools.partial(attention, implementation="auto"))(q, k, v, jnp.asarray(seg))
    assert rel_err(got, run(q, k, v, seg, "dense")) < TOL_F32


def test_segment_mask_semantics():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0]])
    m = np.asarray(segment_mask(seg))[0]
    assert m.shape == (7, 7)
    assert m[2, 0] and m[2, 2] and not m[0, 2]  # causal within a segment
    assert not m[3, 2] and m[4, 3]  # segments do not see each other
    assert m[6, 5] and not m[6, 4]  # padding sees (earlier) padding only
    mw = np.asarray(segment_mask(seg, window=2))[0]
    assert mw[2, 1] and not mw[2, 0] and mw[2, 2]  # HF sliding window: i - j < w


# ---------------------------------------------------------------------------- block skipping
_bounds = jax.jit(att._block_bounds, static_argnums=(1, 2, 3))


def test_block_bounds_skip_other_segments_and_window():
    # Four segments of 64 tokens, blocks of 16: query block qi only visits the
    # key blocks of its own segment (4 per segment), not everything before it.
    seg = jnp.asarray(np.repeat([1, 2, 3, 4], 64)[None].astype(np.int32))
    kb_lo, qb_hi = _bounds(seg, None, 16, 16)
    np.testing.assert_array_equal(kb_lo, np.repeat([0, 4, 8, 12], 4))
    np.testing.assert_array_equal(qb_hi, np.repeat([3, 7, 11, 15], 4))
    visited = sum(qi - int(lo) + 1 for qi, lo in enumerate(np.asarray(kb_lo)))
    assert visited == 4 * 10  # 4 segments x (4*5/2) block pairs, vs 136 for one 256-token segment
    # A window of 20 in one long segment: at most 3 key blocks per query block.
    seg1 = jnp.ones((1, 256), jnp.int32)
    kb_lo_w, _ = _bounds(seg1, 20, 16, 16)
    assert all(qi - int(lo) + 1 <= 3 for qi, lo in enumerate(np.asarray(kb_lo_w)))
    # Batch rows share bounds: the smallest lower bound wins.
    seg2 = jnp.asarray(np.stack([np.repeat([1, 2], 32), np.ones(64)]).astype(np.int32))
    kb_lo_b, _ = _bounds(seg2, None, 16, 16)
    np.testing.assert_array_equal(kb_lo_b, [0, 0, 0, 0])


# ---------------------------------------------------------------------------- gradients
GRAD_CASES = {  # rows, N, K, window, block_q, block_k
    "packed_gqa2": (["boundary_on_block_edge", "reappearing_ids"], 4, 2, None, 16, 16),
    "gqa7_window_unequal_blocks": (["one_token_segments", "segment_over_several_blocks"], 7, 1, 10, 16, 32),
    "padding_rows_window_gt_block": (["all_padding_row", "trailing_padding"], 2, 2, 40, 32, 16),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_blocked_gradients_equal_dense(case):
    rows, n, nk, window, block_q, block_k = GRAD_CASES[case]
    seg = np.stack([LAYOUTS[r] for r in rows])
    b, t = seg.shape
    q, k, v = qkv(b, t, n, nk, seed=9)
    w = jnp.asarray(np.random.default_rng(10).normal(size=(b, t, n, 8)), jnp.float32)
    seg_j = jnp.asarray(seg)

    def loss(impl, q, k, v):
        kw = dict(block_q=block_q, block_k=block_k) if impl == "blocked" else {}
        return jnp.sum(w * attention(q, k, v, seg_j, implementation=impl, window=window, **kw))

    grads = {impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2)))(q, k, v)
             for impl in ("dense", "blocked")}
    for name, got, ref in zip("qkv", grads["blocked"], grads["dense"]):
        assert rel_err(got, ref) < TOL_F32, name


def test_blocked_gradient_under_jit_of_value_and_grad_bf16_is_finite():
    seg = np.stack([LAYOUTS["all_padding_row"], LAYOUTS["trailing_padding"]])
    q, k, v = qkv(2, T_COMMON, 4, 2, seed=11, dtype=jnp.bfloat16)
    f = jax.jit(jax.value_and_grad(
        lambda q, k, v: attention(q, k, v, jnp.asarray(seg), implementation="blocked",
                                  block_q=16, block_k=16).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    val, grads = f(q, k, v)
    assert np.isfinite(float(val))
    for g, x in zip(grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape and np.isfinite(np.asarray(g, np.float32)).all()


# ---------------------------------------------------------------------------- memory
def _temp_bytes(fn, t: int, n: int = 2, k: int = 1, h: int = 16) -> int:
    shapes = (jax.ShapeDtypeStruct((1, t, n, h), jnp.float32), jax.ShapeDtypeStruct((1, t, k, h), jnp.float32),
              jax.ShapeDtypeStruct((1, t, k, h), jnp.float32), jax.ShapeDtypeStruct((1, t), jnp.int32))
    stats = jax.jit(fn).lower(*shapes).compile().memory_analysis()
    assert stats is not None, "memory_analysis() returned None on this backend"
    return int(stats.temp_size_in_bytes)


def test_blocked_memory_is_linear_in_t():
    """XLA's own buffer assignment: no [T, T]-sized temporary at T=8192.

    memory_analysis() on CPU reports real temp sizes: the dense path's is at
    least one [B, N, T, T] float32 array (checked, so the assertion on the
    blocked path is not vacuous), the blocked path's stays a few MB and
    grows at most linearly from T=4096 to T=8192 (quadratic would be 4x).
    """
    t, n = 8192, 2
    bntt_f32 = 1 * n * t * t * 4  # 512 MiB
    fwd = {impl: functools.partial(lambda q, k, v, s, impl: attention(q, k, v, s, implementation=impl), impl=impl)
           for impl in ("dense", "blocked")}

    def grad_of(impl):
        return jax.grad(lambda q, k, v, s: fwd[impl](q, k, v, s).sum(), argnums=(0, 1, 2))

    assert _temp_bytes(fwd["dense"], t) >= bntt_f32
    blocked = _temp_bytes(fwd["blocked"], t)
    assert blocked < bntt_f32 / 32, blocked
    assert blocked <= 2 * _temp_bytes(fwd["blocked"], t // 2)
    blocked_grad = _temp_bytes(grad_of("blocked"), t)  # the custom VJP's backward too
    assert blocked_grad < bntt_f32 / 16, blocked_grad


# ---------------------------------------------------------------------------- sharding
def test_blocked_under_a_data_sharded_batch():
    """The model shards the batch over the mesh; the shared block bounds then
    need a cross-device minimum, which jit must insert (not a per-shard value)."""
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    b = len(jax.devices())
    rng = np.random.default_rng(12)
    seg = np.stack([row((1, int(c)), (2, 40 - int(c))) for c in rng.integers(1, 40, size=b)])
    q, k, v = qkv(b, 40, 4, 2, seed=12)
    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    got = run(put(q), put(k), put(v), put(jnp.asarray(seg)), "blocked")
    assert rel_err(got, run(q, k, v, seg, "dense")) < TOL_F32


# ---------------------------------------------------------------------------- dispatch and errors
def test_unknown_implementation_names_value_and_choices():
    q, k, v = qkv(1, 8, 2, 1)
    with pytest.raises(ValueError, match=r"'flash'.*'auto', 'dense', 'blocked', 'splash', 'gpu'"):
        attention(q, k, v, jnp.ones((1, 8), jnp.int32), implementation="flash")
    assert IMPLEMENTATIONS == ("auto", "dense", "blocked", "splash", "gpu")


def test_shape_errors_show_both_shapes():
    q, k, v = qkv(1, 8, 3, 2)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"N=3.*K=2.*\(1, 8, 3, 8\).*\(1, 8, 2, 8\)"):
        attention(q, k, v, seg)
    q, k, v = qkv(1, 8, 4, 2)
    with pytest.raises(ValueError, match=r"\(1, 8, 4, 8\).*\(1, 6, 2, 8\)"):
        attention(q, k[:, :6], v[:, :6], seg)
    with pytest.raises(ValueError, match=r"\(2, 8, 2, 8\)"):
        attention(q, jnp.concatenate([k, k]), jnp.concatenate([v, v]), seg)
    with pytest.raises(ValueError, match=r"segment_ids_bt.*\(1, 7\)"):
        attention(q, k, v, seg[:, :7])
    with pytest.raises(ValueError, match="integer"):
        attention(q, k, v, seg.astype(jnp.float32))


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=0), "window=0"), (dict(window=2.5), "window=2.5"), (dict(scale=-1.0), "scale=-1.0"),
    (dict(implementation="blocked", block_q=0), "block_q=0"),
])
def test_bad_arguments_raise(kwargs, match):
    q, k, v = qkv(1, 8, 2, 1)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, jnp.ones((1, 8), jnp.int32), **kwargs)


@pytest.mark.parametrize("name,fn_name,window", [("splash", "splash_attention", 4), ("gpu", "gpu_attention", None),
                                                  ("gpu", "gpu_flash_attention", 4)])
def test_pallas_names_dispatch_lazily_to_attention_pallas(monkeypatch, name, fn_name, window):
    calls = []

    def fake(q, k, v, seg, *, scale, window=None, softcap=None, interpret=False):
        calls.append(dict(scale=scale, window=window, interpret=interpret))
        return q

    mod = types.ModuleType("arcstream.model.attention_pallas")
    setattr(mod, fn_name, fake)
    # Both: `from arcstream.model import attention_pallas` reads the package attribute first.
    monkeypatch.setitem(sys.modules, "arcstream.model.attention_pallas", mod)
    monkeypatch.setattr(model_pkg, "attention_pallas", mod, raising=False)
    q, k, v = qkv(1, 8, 2, 1, h=16)
    # A windowed layer on 'gpu' goes to arcstream's kernel, an unwindowed one to JAX's.
    out = attention(q, k, v, jnp.ones((1, 8), jnp.int32), implementation=name, window=window)
    assert out is q
    # Off TPU/GPU the kernels can only run interpreted.
    assert calls == [dict(scale=0.25, window=window, interpret=True)]
