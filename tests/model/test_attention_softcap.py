"""Attention-logit soft-capping (Gemma 2) in the attention function: dense, blocked, splash and gpu.

The reference is HF's eager Gemma 2 attention written out in NumPy (float64): scores = q.k * scale,
then c * tanh(scores / c), then the mask, softmax, times v.  Caps of 1-3 on unit-normal q/k
(scores ~ N(0, 1)) change the result everywhere, so a missing or misplaced cap fails.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcstream.model.attention import attention, masked_attention, segment_mask

# The module, not the function `arcstream.model.attention` that the package re-exports under its name.
attention_mod = importlib.import_module("arcstream.model.attention")

H = 16


def _qkv(b, t, n, kh, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, t, heads, H)), jnp.float32) for heads in (n, kh, kh))


def _segments(t: int, rows: list[list[int]]) -> jnp.ndarray:
    seg = np.zeros((len(rows), t), np.int32)
    for r, lengths in enumerate(rows):
        at = 0
        for sid, n in enumerate(lengths, start=1):
            seg[r, at:at + n] = sid
            at += n
    return jnp.asarray(seg)


def _eager_reference(q, k, v, seg, *, scale, softcap, window=None) -> np.ndarray:
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # HF repeat_kv: head n reads KV head n // g
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    s = np.tanh(s / softcap) * softcap
    mask = np.asarray(segment_mask(seg, window))[:, None]
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# Row 0: segments crossing the 64-token blocks, one-token segments, padding; row 1: one long segment.
T = 300
ROWS = [[64, 100, 1, 1, 90], [290]]


@pytest.mark.parametrize("impl", ["dense", "blocked"])
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("n,kh", [(4, 2), (3, 1)])
def test_softcap_equals_hf_eager_reference(impl, window, n, kh):
    q, k, v = _qkv(2, T, n, kh)
    seg = _segments(T, ROWS)
    kw = dict(block_q=64, block_k=64) if impl == "blocked" else {}
    got = attention(q, k, v, seg, implementation=impl, scale=0.3, softcap=1.5, window=window, **kw)
    ref = _eager_reference(q, k, v, seg, scale=0.3, softcap=1.5, window=window)
    real = np.asarray(seg) > 0
    assert _rel(np.asarray(got)[real], ref[real]) < 1e-5
    assert np.isfinite(np.asarray(got)).all()
    uncapped = attention(q, k, v, seg, implementation=impl, scale=0.3, window=window, **kw)
    assert _rel(np.asarray(uncapped)[real], ref[real]) > 1e-2  # the cap matters at these magnitudes


def test_blocked_softcap_gradients_equal_dense():
    q, k, v = _qkv(2, 200, 4, 2, seed=1)
    seg = _segments(200, [[120, 80], [150]])
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def loss(impl):
        kw = dict(block_q=64, block_k=64) if impl == "blocked" else {}
        return lambda q, k, v: jnp.sum(w * attention(q, k, v, seg, implementation=impl, scale=0.25, softcap=2.0,
                                                     window=50, **kw))

    want = jax.grad(loss("dense"), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss("blocked"), argnums=(0, 1, 2)))(q, k, v)
    for g_, w_ in zip(got, want):
        assert _rel(g_, w_) < 1e-5


def test_masked_attention_with_softcap_equals_dense():
    """The KV-cache path (explicit [B, T, S] mask) computes what dense does on the same mask."""
    q, k, v = _qkv(2, 40, 4, 2, seed=3)
    seg = _segments(40, [[25, 15], [40]])
    mask = segment_mask(seg, 9)
    got = masked_attention(q, k, v, mask, scale=0.4, softcap=1.0)
    ref = _eager_reference(q, k, v, seg, scale=0.4, softcap=1.0, window=9)
    assert _rel(got, ref) < 1e-5


def test_splash_softcap_in_interpret_mode_equals_reference():
    q, k, v = _qkv(1, 256, 4, 2, seed=4)
    seg = _segments(256, [[130, 126]])
    got = attention_mod.attention(q, k, v, seg, implementation="splash", scale=0.3, softcap=1.5, window=70)
    ref = _eager_reference(q, k, v, seg, scale=0.3, softcap=1.5, window=70)
    assert _rel(got, ref) < 1e-5


def test_gpu_softcap_and_window_in_interpret_mode_equal_reference_with_gradients(monkeypatch):
    """implementation='gpu' with a soft-cap runs arcstream's Pallas GPU kernel (interpret mode here), values
    and gradients (its backward is blocked's); `auto` on a GPU keeps 'gpu' for capped and windowed layers."""
    q, k, v = _qkv(2, T, 4, 2, seed=6)
    seg = _segments(T, ROWS)
    got = attention(q, k, v, seg, implementation="gpu", scale=0.3, softcap=1.5, window=70)
    assert _rel(got, _eager_reference(q, k, v, seg, scale=0.3, softcap=1.5, window=70)) < 1e-5
    real = (np.asarray(seg) > 0)[:, :, None, None]

    def loss(impl):
        return lambda q, k, v: (jnp.where(real, attention(q, k, v, seg, implementation=impl, scale=0.3,
                                                          softcap=1.5), 0.0) ** 2).sum()

    got_g = jax.grad(loss("gpu"), argnums=(0, 1, 2))(q, k, v)
    ref_g = jax.grad(loss("dense"), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got_g, ref_g):
        assert _rel(g, r) < 1e-5
    monkeypatch.setattr(attention_mod.jax, "default_backend", lambda: "gpu")
    assert attention_mod._auto() == attention_mod._auto(softcap=2.0) == attention_mod._auto(window=8) == "gpu"


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf"), True])
def test_bad_softcap_values_raise(softcap):
    q, k, v = _qkv(1, 8, 2, 2)
    with pytest.raises(ValueError, match="softcap="):
        attention(q, k, v, jnp.ones((1, 8), jnp.int32), implementation="dense", softcap=softcap)
