"""The Pallas attention kernels equal the dense reference on packed rows (interpret mode, CPU).

Each kernel (TPU splash, GPU Pallas `mha`) runs with `interpret=True` and small
blocks (128; the GPU kernel also at 64) so that rows of 256-400 tokens cross
several blocks: a segment boundary exactly on a block edge, a segment longer
than several blocks, one-token segments, an all-padding row, T not a multiple
of the block, GQA ratios 1, 2 and 7, a sliding window, and a ('data', 'model')
mesh of 8 fake CPU devices (shard_map) with its head-divisibility refusal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcstream.model.attention_pallas import _use_cudnn, gpu_attention, gpu_flash_attention, splash_attention
from arcstream.model.sharding import make_mesh

KERNELS = {"splash": splash_attention, "gpu": gpu_attention, "gpu_flash": gpu_flash_attention}
H = 64
BLOCK = 128


def reference(q, k, v, seg, *, scale=None, window=None):
    """The semantics, densely: same segment & causal (& i - j < window)."""
    t = q.shape[1]
    seg = jnp.ones(q.shape[:2], jnp.int32) if seg is None else jnp.asarray(seg)
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    mask = (seg[:, :, None] == seg[:, None, :]) & (j <= i)
    if window is not None:
        mask &= i - j < window
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def packed_rows(t: int, rows: list[list[int]]) -> np.ndarray:
    """Segment ids [B, T]: row r holds segments of the given lengths (ids 1, 2, ...), then padding 0."""
    seg = np.zeros((len(rows), t), np.int32)
    for r, lengths in enumerate(rows):
        assert sum(lengths) <= t, lengths
        start = 0
        for sid, n in enumerate(lengths, start=1):
            seg[r, start:start + n] = sid
            start += n
    return seg


# T = 400 is not a multiple of 128 (padded to 512 inside). Row 0: boundaries exactly on the
# block edges 128 and 256, three one-token segments, then padding. Row 1: one segment of 390
# tokens (four blocks) and padding. Row 2: all padding.
T_PACKED = 400
ROWS = [[128, 128, 1, 1, 1, 60], [390], []]


def qkv(b, t, n, kh, *, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, H)), dtype) for heads in (n, kh, kh))
    return q, k, v


def check(kernel, q, k, v, seg, **kw):
    got = kernel(q, k, v, None if seg is None else jnp.asarray(seg), interpret=True, **kw)
    ref = reference(q, k, v, seg, scale=kw.get("scale"), window=kw.get("window"))
    assert got.shape == q.shape and got.dtype == q.dtype
    assert np.isfinite(np.asarray(got)).all(), "NaN/inf (padding rows must stay finite)"
    err = rel_err(got, ref)
    assert err < 1e-5, err
    return got


@pytest.mark.parametrize("impl", ["splash", "gpu"])
@pytest.mark.parametrize("n,kh", [(4, 4), (4, 2), (7, 1)], ids=["gqa1", "gqa2", "gqa7"])
def test_packed_rows_equal_reference(impl, n, kh):
    q, k, v = qkv(len(ROWS), T_PACKED, n, kh)
    check(KERNELS[impl], q, k, v, packed_rows(T_PACKED, ROWS), block_size=BLOCK)


def test_gpu_kernel_with_64_blocks_and_explicit_scale():
    q, k, v = qkv(len(ROWS), T_PACKED, 4, 2, seed=1)
    check(gpu_attention, q, k, v, packed_rows(T_PACKED, ROWS), block_size=64, scale=0.3)


def test_splash_sliding_window_equals_reference():
    # window 50 crosses block edges inside the 390-token segment; 200 > the 128-token segments.
    q, k, v = qkv(len(ROWS), T_PACKED, 4, 2, seed=2)
    for window in (50, 200):
        check(splash_attention, q, k, v, packed_rows(T_PACKED, ROWS), block_size=BLOCK,
              window=window, scale=0.2)


def test_splash_default_block_and_explicit_scale():
    # Default block: T=400 -> one 512 block; scale is applied to q before the kernel.
    q, k, v = qkv(len(ROWS), T_PACKED, 4, 2, seed=3)
    check(splash_attention, q, k, v, packed_rows(T_PACKED, ROWS), scale=0.3)


@pytest.mark.parametrize("impl", ["splash", "gpu"])
def test_no_segment_ids_is_one_causal_sequence(impl):
    q, k, v = qkv(2, 200, 4, 2, seed=4)
    check(KERNELS[impl], q, k, v, None, block_size=BLOCK)


@pytest.mark.parametrize("impl", ["splash", "gpu"])
def test_bfloat16_output_dtype_and_values(impl):
    q, k, v = qkv(2, 256, 4, 2, seed=5, dtype=jnp.bfloat16)
    seg = packed_rows(256, [[128, 100], [5, 251]])
    got = KERNELS[impl](q, k, v, jnp.asarray(seg), interpret=True, block_size=BLOCK)
    assert got.dtype == jnp.bfloat16
    ref = reference(*(x.astype(jnp.float32) for x in (q, k, v)), seg)
    assert rel_err(got, ref) < 2e-2


@pytest.mark.parametrize("impl", ["splash", "gpu"])
def test_sharded_over_data_and_model_equals_reference(impl):
    # B=2 over 'data'=2, N=8 / K=4 over 'model'=4 (one KV head and its two query heads per device).
    q, k, v = qkv(2, 256, 8, 4, seed=6)
    seg = packed_rows(256, [[128, 1, 1, 90], [200]])
    ref = reference(q, k, v, seg)
    mesh = make_mesh(2, 4)
    fn = jax.jit(lambda q, k, v, s: KERNELS[impl](q, k, v, s, interpret=True, block_size=BLOCK))
    with jax.set_mesh(mesh):
        got = fn(q, k, v, jnp.asarray(seg))
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v, jnp.asarray(seg)))
    assert "shard_map" in jaxpr
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("impl", ["splash", "gpu"])
def test_heads_that_do_not_divide_the_model_axis_are_refused(impl):
    q, k, v = qkv(2, 128, 4, 2)
    seg = jnp.ones((2, 128), jnp.int32)
    with jax.set_mesh(make_mesh(2, 4)):
        with pytest.raises(ValueError, match=r"2 KV heads \(and 4 query heads\).*'model' mesh axis of size 4"):
            jax.jit(lambda *a: KERNELS[impl](*a, interpret=True))(q, k, v, seg)


def test_gpu_window_with_segment_ids_is_refused_with_the_alternative():
    q, k, v = qkv(1, 128, 2, 2)
    with pytest.raises(ValueError, match=r"window=16.*gpu_flash_attention"):
        gpu_attention(q, k, v, jnp.ones((1, 128), jnp.int32), window=16, interpret=True)


@pytest.mark.parametrize("impl,device", [("splash", "TPU"), ("gpu", "GPU"), ("gpu_flash", "GPU")])
def test_without_interpret_on_cpu_names_the_device_and_the_fix(impl, device):
    q, k, v = qkv(1, 128, 2, 2)
    with pytest.raises(ValueError, match=rf"needs a {device}.*interpret=True.*implementation='blocked'"):
        KERNELS[impl](q, k, v, jnp.ones((1, 128), jnp.int32))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_window_is_refused(bad):
    q, k, v = qkv(1, 128, 2, 2)
    with pytest.raises(ValueError, match="window"):
        splash_attention(q, k, v, jnp.ones((1, 128), jnp.int32), window=bad, interpret=True)


def test_cudnn_path_only_without_segment_ids_in_half_precision():
    # cuDNN (public jax.nn API) has no segment ids: packed rows always take the Pallas kernel.
    seg = jnp.ones((1, 8), jnp.int32)
    assert _use_cudnn(jnp.bfloat16, 64, None, interpret=False)
    assert _use_cudnn(jnp.float16, 128, None, interpret=False)
    assert not _use_cudnn(jnp.bfloat16, 64, seg, interpret=False)
    assert not _use_cudnn(jnp.float32, 64, None, interpret=False)
    assert not _use_cudnn(jnp.bfloat16, 60, None, interpret=False)
    assert not _use_cudnn(jnp.bfloat16, 256, None, interpret=False)
    assert not _use_cudnn(jnp.bfloat16, 64, None, interpret=True)


@pytest.mark.parametrize("impl", ["splash", "gpu"])
def test_gradients_equal_reference(impl):
    q, k, v = qkv(2, 256, 4, 2, seed=7)
    seg = jnp.asarray(packed_rows(256, [[128, 1, 1, 90], [200]]))
    weights = jnp.linspace(0.0, 1.0, H)

    def loss(attn):
        return lambda q, k, v: (attn(q, k, v) ** 2 * weights).sum()

    ref = jax.grad(loss(lambda q, k, v: reference(q, k, v, seg)), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(lambda q, k, v: KERNELS[impl](q, k, v, seg, interpret=True, block_size=BLOCK)),
                   argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", got, ref):
        assert rel_err(g, r) < 1e-5, name


@pytest.mark.parametrize("n,kh", [(4, 4), (4, 2), (7, 1)], ids=["gqa1", "gqa2", "gqa7"])
@pytest.mark.parametrize("window", [None, 37, 200])
def test_gpu_flash_kernel_packed_rows_equal_reference(n, kh, window):
    """arcstream's GPU kernel: block edges on segment boundaries, one-token segments, an all-padding row,
    T padded to the block, windows shorter than a block and spanning blocks."""
    q, k, v = qkv(len(ROWS), T_PACKED, n, kh, seed=n + kh)
    check(gpu_flash_attention, q, k, v, packed_rows(T_PACKED, ROWS), block_size=64, window=window)


def test_gpu_flash_kernel_pads_a_head_dim_that_is_not_a_power_of_two():
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 150, heads, 40)), jnp.float32) for heads in (4, 2, 2))
    seg = packed_rows(150, [[70, 80]])
    got = gpu_flash_attention(q, k, v, jnp.asarray(seg), window=33, interpret=True, block_size=32)
    assert rel_err(got, reference(q, k, v, seg, window=33)) < 1e-5


def test_gpu_flash_kernel_sharded_over_data_and_model_equals_reference():
    q, k, v = qkv(2, 256, 4, 2, seed=3)
    seg = packed_rows(256, [[128, 1, 1, 90], [200]])
    with jax.set_mesh(make_mesh(data=2, model=2)):
        got = jax.jit(lambda *a: gpu_flash_attention(*a, window=50, interpret=True, block_size=64))(
            q, k, v, jnp.asarray(seg))
    assert rel_err(got, reference(q, k, v, seg, window=50)) < 1e-5
