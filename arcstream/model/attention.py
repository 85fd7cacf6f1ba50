"""Causal attention over packed rows, without a [T, T] array.

Why: real ARC prompts are 2k-9k tokens, packed into rows of 8k-16k tokens.  The
dense path (`jax.nn.dot_product_attention` with a `[B, 1, T, T]` mask)
materialises `[B, N, T, T]` float32 scores: 3.8 GB per layer for 14 heads at
T=8192.  `attention` is the one function the decoder calls; it dispatches to

- `dense`:   the reference (segment mask + `jax.nn.dot_product_attention`).
- `blocked`: pure JAX flash attention for every backend (the CPU default).
- `splash`:  TPU Pallas splash attention   } in `attention_pallas`, imported
- `gpu`:     Pallas GPU flash attention    } lazily, only for these names.
- `auto`:    TPU -> splash, GPU -> gpu, CPU -> blocked (at every length:
             blocked was measured faster than dense from T=64 up).  `gpu` is
             JAX's Pallas GPU kernel (or cuDNN for unpacked half-precision
             rows); with a sliding window or a soft-cap, which that kernel
             lacks, arcstream's own Pallas GPU kernel (`gpu_flash_attention`,
             forward; gradients through `blocked`'s backward).

Semantics (every implementation, pinned by tests/model/test_attention.py):
a query at i sees key j iff `segment_ids[i] == segment_ids[j]`, `j <= i` and,
with `window=w`, `i - j < w` (HF Mistral/Gemma sliding window: a query sees
itself and the w-1 keys before it).  Segment 0 is padding; padding sees
padding only, so its (discarded) outputs stay finite.  Softmax runs in
float32; the output has q's dtype; scale defaults to 1/sqrt(H).  GQA: q has N
heads, k/v K heads, N % K == 0; query head n reads KV head n // (N/K).
Keys and queries have the same length T (no KV cache: decoding uses
`masked_attention`, dense over the cache with an explicit mask).

Soft-capping (Gemma 2, `softcap=c`): the scaled scores s = scale * q.k become
c * tanh(s / c) before the mask and the softmax, as HF's eager Gemma 2
attention does.  `dense`, `blocked` and `splash` (the kernel's
`attn_logits_soft_cap`) and `gpu` (arcstream's kernel) implement it, forward
and backward.

`blocked` design and performance contract:
- Queries in blocks of `block_q`, keys in blocks of `block_k` (default 256 x
  256, measured); T is padded to a block multiple inside the function (the
  pad is segment 0 *after* every real token, so causality hides it); rows
  shorter than a block use one block pair of T rounded up to 8.
- Online softmax (running max and sum, float32) over the key blocks of each
  query block.  Per query block the key blocks visited are [lo, diagonal]:
  `lo` is the block of the smallest key any of its queries (in any batch
  row) can see -- the first occurrence of the query's segment id, or
  i - w + 1 with a window -- computed from `segment_ids` on device, so the
  loop bounds are dynamic (`lax.fori_loop` with traced bounds).  A row of
  four 2k prompts costs ~4x one 2k prompt, not the 16x of a dense 8k row.
- Inside [lo, diagonal], blocks where every query sees every key (one
  contiguous run of one id, below the diagonal, inside the window) skip the
  mask; the others are masked elementwise.  So the result is exact for *any*
  segment ids; the contiguity packing guarantees only buys the skipping.
- The block step is two einsums over [B, K, G, bq, H] x [B, K, bk, H]
  (G = N / K query heads per KV head; K/V are never repeated), which XLA CPU
  runs as batched matmuls (YNNPACK, ~110-135 GFLOP/s on the two cores here:
  ~60% of the forward's time).  Block shapes are static; only loop bounds
  are dynamic.  q and o stay in [B, T, K, G, H] (free reshapes of the
  caller's [B, T, N, H]); only K/V, which are N/K times smaller, are laid out
  in blocks.
- Memory is linear in T: no [T, T] (or [bq, T]) array exists; the largest
  temporaries are a few [B, N, bq, bk] float32 blocks and the O(T) inputs,
  outputs and residuals (tested with `memory_analysis`: 7 MB temp at
  T=8192 for N=2, H=16, where dense needs 1 GB).
- Differentiable: a loop with traced bounds is not reverse-differentiable,
  so the core has a `jax.custom_vjp` with the flash-attention backward: one
  pass over key blocks recomputes p = exp(s * scale - lse) from the saved
  log-sum-exp, accumulates dk/dv for the key block (summed over the G query
  heads of each KV head by the einsum), and adds each block's dq into a
  carried dq buffer; the same block skipping as the forward.

Measured on the 2-core AMD EPYC (AVX2) dev VM, jax 0.10.2, jitted, B=1, N=14,
K=2, H=64 (the Qwen2.5-0.5B attention shape), float32, median of 5-9 runs,
blocked and torch interleaved in one process; other workers' tests shared the
two cores, so figures move by +-20% between runs.  torch = torch 2.13
`scaled_dot_product_attention(is_causal=True, enable_gqa=True)` per segment
(2 threads), i.e. what HF SDPA does for one unpacked prompt:

                                   blocked    torch SDPA     dense
  T=2048, one segment               104 ms       92 ms      640 ms
  T=2048, four 512-token segments    46 ms       44 ms      665 ms
  T=8192, one segment              1310 ms     1113 ms    14160 ms (~8 GB temp)
  T=8192, four 2048-token segments  431 ms      393 ms    12850 ms
  T=2048 forward+backward           544 ms          -      1815 ms

  Blocks (T=8192, one segment, an earlier version of the kernel): 128x128
  1.74 s, 256x256 1.65 s, 256x512 1.69 s, 512x512 1.80 s; at T=2048
  128..256 tie and 512+ is slower.
  Short rows, forward, dense vs blocked (first version of the kernel): T=128
  2.5 vs 2.1 ms, 256 8.8 vs 5.5, 512 72 vs 26, 1024 292 vs 90; forward+
  backward at T=64 1.8 vs 1.6 ms.  So `auto` never picks dense on CPU.
  Reproduce: time `jax.jit(attention)` and torch SDPA round-robin in one
  process (run dense in its own process: its 8 GB of temporaries slow the
  others down by 2-4x when they share one).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IMPLEMENTATIONS = ("auto", "dense", "blocked", "splash", "gpu")

# Defaults for `blocked`, chosen by measurement (see the module docstring).
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256


# ---------------------------------------------------------------------------- masks
def segment_mask(segment_ids_bt: jax.Array, window: int | None = None) -> jax.Array:
    """[B, T, T] bool: query i sees key j iff same segment, j <= i (and i - j < window).

    Padding (segment 0) sees only padding, which keeps its (discarded) outputs
    finite.  Equal ids anywhere in the row count as one segment; packing keeps
    each segment contiguous, so index order is position order.
    """
    _check_window(window)
    t = segment_ids_bt.shape[1]
    i_t1 = jnp.arange(t)[:, None]
    j_1t = jnp.arange(t)[None, :]
    visible_tt = j_1t <= i_t1
    if window is not None:
        visible_tt = visible_tt & (i_t1 - j_1t < window)
    same_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return same_btt & visible_tt[None]


def _check_window(window: int | None) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"attention window={window!r}: expected None or an int >= 1 "
                         "(a query sees itself and the window-1 keys before it).")


# ---------------------------------------------------------------------------- dispatch
def attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, segment_ids_bt: jax.Array, *,
              implementation: str = "auto", scale: float | None = None, window: int | None = None,
              softcap: float | None = None, block_q: int | None = None,
              block_k: int | None = None) -> jax.Array:
    """Causal, segment-masked (optionally sliding-window, soft-capped) attention; returns o [B, T, N, H].

    q_btnh [B, T, N, H]; k_btkh, v_btkh [B, T, K, H] with N % K == 0;
    segment_ids_bt int [B, T] (0 = padding).  `implementation` is one of
    `IMPLEMENTATIONS`; `block_q`/`block_k` apply to `blocked` only (default
    256).  `softcap=c` caps the scaled scores at c * tanh(s / c) (Gemma 2).
    Static arguments: implementation, scale, window, softcap, block sizes.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation={implementation!r} is unknown; "
                         f"expected one of {list(IMPLEMENTATIONS)}.")
    _check_shapes(q_btnh, k_btkh, v_btkh, segment_ids_bt)
    _check_window(window)
    h = q_btnh.shape[-1]
    scale = float(1.0 / math.sqrt(h)) if scale is None else float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        # `blocked` folds the scale into exp() after the running max; a scale <= 0
        # would turn the max into a min and overflow.
        raise ValueError(f"attention scale={scale!r}: expected a finite float > 0 (default 1/sqrt(H)).")
    softcap = _check_softcap(softcap)
    if implementation == "auto":
        implementation = _auto(window, softcap)
    if implementation == "dense":
        return _dense(q_btnh, k_btkh, v_btkh, segment_ids_bt, scale=scale, window=window, softcap=softcap)
    if implementation == "blocked":
        return _blocked(q_btnh, k_btkh, v_btkh, segment_ids_bt, scale=scale, window=window, softcap=softcap,
                        block_q=DEFAULT_BLOCK_Q if block_q is None else block_q,
                        block_k=DEFAULT_BLOCK_K if block_k is None else block_k)
    # Lazy import: the Pallas kernels pull in TPU/GPU-only modules that plain
    # CPU runs (and CPU-only installs) must not need.
    from arcstream.model import attention_pallas  # noqa: PLC0415

    # Off their own backend the kernels only run in Pallas interpret mode (slow; for tests).
    interpret = jax.default_backend() != ("tpu" if implementation == "splash" else "gpu")
    if interpret:
        _warn_interpret(implementation, jax.default_backend())
    if implementation == "splash":
        # Only when set: the call without a cap stays the shared signature (tests fake the kernels).
        extra = {} if softcap is None else {"softcap": softcap}
        return attention_pallas.splash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, scale=scale,
                                                 window=window, interpret=interpret, **extra)
    if window is None and softcap is None:
        return attention_pallas.gpu_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, scale=scale,
                                              interpret=interpret)
    return _gpu_flash(attention_pallas.gpu_flash_attention, q_btnh, k_btkh, v_btkh, segment_ids_bt, scale, window,
                      softcap, interpret)


def _gpu_flash(kernel, q_btnh, k_btkh, v_btkh, segment_ids_bt, scale: float, window: int | None,
               softcap: float | None, interpret: bool) -> jax.Array:
    """arcstream's Pallas GPU kernel (window, soft-cap; `kernel` = `attention_pallas.gpu_flash_attention`)
    forward, differentiated through `blocked`'s backward (same function, exact gradients, memory linear in T)."""

    def reference(q, k, v, seg):
        return _blocked(q, k, v, seg, scale=scale, window=window, softcap=softcap,
                        block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K)

    @jax.custom_vjp
    def flash(q, k, v, seg):
        return kernel(q, k, v, seg, scale=scale, window=window, softcap=softcap, interpret=interpret)

    def flash_fwd(q, k, v, seg):
        return flash(q, k, v, seg), (q, k, v, seg)

    def flash_bwd(res, g):
        q, k, v, seg = res
        dq, dk, dv = jax.vjp(lambda q, k, v: reference(q, k, v, seg), q, k, v)[1](g)
        return dq, dk, dv, np.zeros(seg.shape, jax.dtypes.float0)

    flash.defvjp(flash_fwd, flash_bwd)
    return flash(q_btnh, k_btkh, v_btkh, segment_ids_bt)


def masked_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array, *,
                     scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """Dense attention of T queries over S keys with an explicit [B, T, S] bool mask (the KV-cache path).

    Same numerics as `dense`: float32 scores and softmax, scale (default
    1/sqrt(H)) then soft-cap then mask.  Every query must see at least one key.
    """
    softcap = _check_softcap(softcap)
    if softcap is None:
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None], scale=scale)
    h = q_btnh.shape[-1]
    scale = float(1.0 / math.sqrt(h)) if scale is None else float(scale)
    return _capped_softmax_attention(q_btnh, k_bskh, v_bskh, mask_bts[:, None], scale, softcap)


def _check_softcap(softcap: float | None) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (
            math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"attention softcap={softcap!r}: expected None or a finite number > 0 "
                         "(scores become softcap * tanh(scores / softcap)).")
    return float(softcap)


def _capped_softmax_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, scale: float, softcap: float) -> jax.Array:
    """jax.nn.dot_product_attention's XLA path with c * tanh(s / c) between the scale and the mask."""
    b, t, n, h = q_btnh.shape
    kh = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kh, n // kh, h)
    s_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32) * scale
    s_bkgts = jnp.tanh(s_bkgts / softcap) * softcap
    mask_bk1ts = mask_b1ts[:, :, None]  # [B, 1, 1, T, S]
    s_bkgts = jnp.where(mask_bk1ts, s_bkgts, jnp.finfo(jnp.float32).min)
    p_bkgts = jax.nn.softmax(s_bkgts, axis=-1).astype(v_bskh.dtype)
    o_btkgh = jnp.einsum("bkgts,bskh->btkgh", p_bkgts, v_bskh)
    return o_btkgh.reshape(b, t, n, h).astype(q_btnh.dtype)


@functools.cache
def _warn_interpret(implementation: str, backend: str) -> None:
    """Once per (implementation, backend): a user who picked a kernel for another device should know."""
    logging.getLogger(__name__).warning(
        "attention implementation=%r on backend %r runs in Pallas interpret mode (correct but very slow); "
        "use implementation='blocked' or 'auto' on this device", implementation, backend)


def _auto(window: int | None = None, softcap: float | None = None) -> str:
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend in ("gpu", "cuda", "rocm"):
        # JAX's Pallas GPU kernel (or cuDNN) without a window or soft-cap, arcstream's own with them.
        del window, softcap
        return "gpu"
    # CPU: blocked, at every length -- it was measured faster than dense even at
    # T=64..128 (one block pair), forward and backward (module docstring).
    return "blocked"


def _check_shapes(q_btnh, k_btkh, v_btkh, segment_ids_bt) -> None:
    shapes = (f"q_btnh {tuple(q_btnh.shape)}, k_btkh {tuple(k_btkh.shape)}, "
              f"v_btkh {tuple(v_btkh.shape)}, segment_ids_bt {tuple(segment_ids_bt.shape)}")
    if q_btnh.ndim != 4 or k_btkh.ndim != 4 or v_btkh.ndim != 4 or segment_ids_bt.ndim != 2:
        raise ValueError(f"attention expects q [B,T,N,H], k/v [B,T,K,H], segment_ids [B,T]; got {shapes}.")
    b, t, n, h = q_btnh.shape
    if k_btkh.shape != v_btkh.shape:
        raise ValueError(f"attention: k and v shapes differ: {shapes}.")
    if k_btkh.shape[0] != b or k_btkh.shape[1] != t or k_btkh.shape[3] != h:
        raise ValueError(f"attention: q and k/v disagree on B, T or H: {shapes}.")
    if tuple(segment_ids_bt.shape) != (b, t):
        raise ValueError(f"attention: segment_ids_bt must be [B, T] = {(b, t)}: {shapes}.")
    kh = k_btkh.shape[2]
    if kh == 0 or n % kh != 0:
        raise ValueError(f"attention: query heads N={n} must be a multiple of KV heads K={kh} (GQA): {shapes}.")
    if not jnp.issubdtype(segment_ids_bt.dtype, jnp.integer):
        raise ValueError(f"attention: segment_ids_bt must be integer, got {segment_ids_bt.dtype}.")


# ---------------------------------------------------------------------------- dense
def _dense(q_btnh, k_btkh, v_btkh, segment_ids_bt, *, scale: float, window: int | None,
           softcap: float | None = None) -> jax.Array:
    """The reference: materialises [B, N, T, T]; use for short rows and tests only."""
    mask_b1tt = segment_mask(segment_ids_bt, window)[:, None]
    if softcap is not None:
        return _capped_softmax_attention(q_btnh, k_btkh, v_btkh, mask_b1tt, scale, softcap)
    o_btnh = jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask_b1tt, scale=scale)
    return o_btnh.astype(q_btnh.dtype)


# ---------------------------------------------------------------------------- blocked
def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _blocked(q_btnh, k_btkh, v_btkh, segment_ids_bt, *, scale: float, window: int | None,
             block_q: int, block_k: int, softcap: float | None = None) -> jax.Array:
    """Pad T, lay K/V blocks out on a leading axis, run the custom-vjp core."""
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(blk, bool) or not isinstance(blk, int) or blk < 1:
            raise ValueError(f"attention {name}={blk!r}: expected an int >= 1 (e.g. 256).")
    b, t, n, h = q_btnh.shape
    kh = k_btkh.shape[2]
    g = n // kh
    if max(block_q, block_k) >= t:
        # One block pair covers the row; a multiple of 8 keeps vector loops whole.
        block_q = block_k = _round_up(t, 8)
    tp = _round_up(t, math.lcm(block_q, block_k))
    nq, nk = tp // block_q, tp // block_k
    pad = tp - t
    seg_bt = segment_ids_bt.astype(jnp.int32)
    if pad:
        # Padded tail = segment 0 at positions >= T: no real query (i < T) can see
        # it causally, and the padded queries are sliced off below.
        q_btnh = jnp.pad(q_btnh, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_btkh = jnp.pad(k_btkh, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v_btkh = jnp.pad(v_btkh, ((0, 0), (0, pad), (0, 0), (0, 0)))
        seg_bt = jnp.pad(seg_bt, ((0, 0), (0, pad)))
    # q stays [B, T, K, G, H] (a free reshape; query head n = k * G + g, as jax.nn
    # and HF group them): each query block is sliced and transposed in cache.
    q_btkgh = q_btnh.reshape(b, tp, kh, g, h)
    k_x = k_btkh.reshape(b, nk, block_k, kh, h).transpose(1, 0, 3, 2, 4)
    v_x = v_btkh.reshape(b, nk, block_k, kh, h).transpose(1, 0, 3, 2, 4)
    segq_x = seg_bt.reshape(b, nq, block_q).transpose(1, 0, 2)
    segk_x = seg_bt.reshape(b, nk, block_k).transpose(1, 0, 2)
    kb_lo_q, qb_hi_k = _block_bounds(seg_bt, window, block_q, block_k)
    o_btkgh = _flash(q_btkgh, k_x, v_x, segq_x, segk_x, kb_lo_q, qb_hi_k, scale, window, block_q, softcap)
    return o_btkgh.reshape(b, tp, n, h)[:, :t]


def _block_bounds(seg_bt: jax.Array, window: int | None, block_q: int, block_k: int):
    """(kb_lo_q [nq], qb_hi_k [nk]) int32: the block ranges worth computing.

    Query block qi visits key blocks kb_lo_q[qi] .. diagonal(qi); key block kj
    is visited by query blocks diagonal(kj) .. qb_hi_k[kj].  kb_lo_q is made
    non-decreasing (a suffix minimum: only ever widens the range) so that the
    query blocks visiting one key block are a contiguous range, which the
    backward pass needs.
    """
    b, tp = seg_bt.shape
    nq, nk = tp // block_q, tp // block_k
    idx_t = jnp.arange(tp, dtype=jnp.int32)
    # First occurrence of each token's segment id in its row, for *any* ids
    # (stable sort groups equal ids with the smallest index first).  A cummax of
    # segment starts would be cheaper but silently wrong if an id reappeared
    # later in the row (e.g. padding between prompts).
    order_bt = jnp.argsort(seg_bt, axis=1, stable=True).astype(jnp.int32)
    sorted_bt = jnp.take_along_axis(seg_bt, order_bt, axis=1)
    is_new_bt = jnp.concatenate([jnp.ones((b, 1), bool), sorted_bt[:, 1:] != sorted_bt[:, :-1]], axis=1)
    group_start_bt = lax.cummax(jnp.where(is_new_bt, idx_t[None], 0), axis=1)
    first_sorted_bt = jnp.take_along_axis(order_bt, group_start_bt, axis=1)
    inverse_bt = jnp.argsort(order_bt, axis=1)
    first_bt = jnp.take_along_axis(first_sorted_bt, inverse_bt, axis=1)
    if window is not None:
        first_bt = jnp.maximum(first_bt, idx_t[None] - (window - 1))
    lo_q = first_bt.reshape(b, nq, block_q).min(axis=(0, 2))  # smallest key any query of the block sees
    kb_lo_q = lax.cummin(lo_q // block_k, axis=0, reverse=True).astype(jnp.int32)
    # Query blocks with kb_lo_q <= kj form a prefix (kb_lo_q is non-decreasing).
    kj_k = jnp.arange(nk, dtype=jnp.int32)
    qb_hi_k = (jnp.searchsorted(kb_lo_q, kj_k, side="right") - 1).astype(jnp.int32)
    return kb_lo_q, qb_hi_k


def _block_mask(segq_bq, segk_bk, qi, kj, block_q: int, block_k: int, window: int | None):
    """[B, 1, 1, bq, bk] bool visibility of one block pair."""
    pos_q = qi * block_q + jnp.arange(block_q, dtype=jnp.int32)
    pos_k = kj * block_k + jnp.arange(block_k, dtype=jnp.int32)
    vis_qk = pos_k[None, :] <= pos_q[:, None]
    if window is not None:
        vis_qk = vis_qk & (pos_q[:, None] - pos_k[None, :] < window)
    mask_bqk = (segq_bq[:, :, None] == segk_bk[:, None, :]) & vis_qk[None]
    return mask_bqk[:, None, None]


def _unmasked_lo(segq_x, qi_q, block_q: int, block_k: int, window: int | None):
    """[nq] int32: first key block from which, up to the diagonal, no mask is needed.

    Needs all queries of the block (in each row) in one contiguous run of one id,
    so that every key from the run start to the first query has the query's id.
    Runs, not first occurrences (`_block_bounds`): an id that reappears later in
    the row has other ids in between, which must stay masked.  2**30 (an empty
    range) when a block straddles runs.
    """
    nq, b, bq = segq_x.shape
    seg_bt = segq_x.transpose(1, 0, 2).reshape(b, nq * bq)
    idx_t = jnp.arange(nq * bq, dtype=jnp.int32)
    change_bt = jnp.concatenate([jnp.ones((b, 1), bool), seg_bt[:, 1:] != seg_bt[:, :-1]], axis=1)
    run_start_bt = lax.cummax(jnp.where(change_bt, idx_t[None], 0), axis=1)
    rs_bq = run_start_bt.reshape(b, nq, bq)
    one_run_q = jnp.all(rs_bq[:, :, 0] == rs_bq[:, :, -1], axis=0)
    lo_q = -(-rs_bq[:, :, 0].max(axis=0) // block_k)  # ceil: whole key blocks inside the run
    if window is not None:
        # every query of the block must see every key: last query - first key < window
        lo_q = jnp.maximum(lo_q, (qi_q * block_q + block_q - 1 - window) // block_k + 1)
    big = jnp.int32(2**30)
    return jnp.where(one_run_q, lo_q, big).astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q_btkgh, k_x, v_x, segq_x, segk_x, kb_lo_q, qb_hi_k, scale, window, block_q, softcap):
    """o_btkgh [B, T, K, G, H] in q's dtype (see `_flash_fwd_impl`)."""
    return _flash_fwd_impl(q_btkgh, k_x, v_x, segq_x, segk_x, kb_lo_q, scale, window, block_q, softcap)[0]


def _cap(s_raw, scale: float, softcap: float | None):
    """Scores as the softmax sees them, and the factor exp() still has to apply.

    Without a cap the scale is folded into exp() (one pass fewer over the
    block); with one, the logits are c * tanh(scale * s_raw / c) and exp()
    applies no further factor.
    """
    if softcap is None:
        return s_raw, scale
    return jnp.tanh(s_raw * (scale / softcap)) * softcap, 1.0


def _flash_fwd_impl(q_btkgh, k_x, v_x, segq_x, segk_x, kb_lo_q, scale: float, window: int | None,
                    block_q: int, softcap: float | None = None):
    """Flash-attention forward: (o_btkgh [B, T, K, G, H] in q's dtype, lse_x [nq, B, K, G, bq] float32).

    For each query block, an online softmax over the key blocks it sees, in
    three runs (masked edge, unmasked interior, masked diagonal; see
    `_unmasked_lo`); lse = m * exp_scale + log(l) is saved for the backward.
    It stays one function on purpose: the query-block and key-block bodies are
    loop closures over a dozen traced arrays and static sizes, and splitting
    them out would only thread those through long argument lists and separate
    the online-softmax update from the loop bounds that decide where it masks.
    """
    b, tp, kh, g, h = q_btkgh.shape
    nq = tp // block_q
    block_k = k_x.shape[3]
    f32 = jnp.float32
    qi_q = jnp.arange(nq, dtype=jnp.int32)
    full_lo_q = _unmasked_lo(segq_x, qi_q, block_q, block_k, window)

    def one_query_block(qi, carry):
        o_btkgh, lse_x = carry
        segq_bq = lax.dynamic_index_in_dim(segq_x, qi, 0, keepdims=False)
        kb_lo = lax.dynamic_index_in_dim(kb_lo_q, qi, 0, keepdims=False)
        full_lo = lax.dynamic_index_in_dim(full_lo_q, qi, 0, keepdims=False)
        q_bkgqh = lax.dynamic_slice_in_dim(q_btkgh, qi * block_q, block_q, axis=1).transpose(0, 2, 3, 1, 4)
        kb_hi = (qi * block_q + block_q - 1) // block_k  # causal: the diagonal block
        # Key blocks [a, c) need no mask (see `_unmasked_lo`); those before and after do.
        full_hi = (qi * block_q + 1) // block_k  # exclusive: blocks whose last key <= the first query
        a = jnp.clip(full_lo, kb_lo, kb_hi + 1)
        c = jnp.clip(full_hi, a, kb_hi + 1)

        def make_step(masked: bool):
            # Two bodies, three loops (masked edge, unmasked interior, masked
            # diagonal) rather than a `lax.cond` per block: on XLA CPU a cond
            # copies the [.., bq, bk] score block out of its branch (measured ~3%).
            def step(kj, carry):
                m_bkgq, l_bkgq, acc_bkgqh = carry
                k_bksh = lax.dynamic_index_in_dim(k_x, kj, 0, keepdims=False)
                v_bksh = lax.dynamic_index_in_dim(v_x, kj, 0, keepdims=False)
                # Unscaled scores: the scale is folded into the exp below, which
                # saves XLA CPU one elementwise pass over the block (measured).
                s_bkgqs = jnp.einsum("bkgqh,bksh->bkgqs", q_bkgqh, k_bksh, preferred_element_type=f32)
                s_bkgqs, exp_scale = _cap(s_bkgqs, scale, softcap)
                if masked:
                    segk_bk = lax.dynamic_index_in_dim(segk_x, kj, 0, keepdims=False)
                    mask = _block_mask(segq_bq, segk_bk, qi, kj, block_q, block_k, window)
                    s_bkgqs = jnp.where(mask, s_bkgqs, -jnp.inf)
                m_new = jnp.maximum(m_bkgq, s_bkgqs.max(axis=-1))
                # A query with no visible key yet keeps m = -inf; subtract 0 instead so
                # exp() gives 0 rather than NaN (exp(-inf - -inf)).
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p_bkgqs = jnp.exp((s_bkgqs - m_safe[..., None]) * exp_scale)  # > 0: the max stays the max
                corr_bkgq = jnp.exp((m_bkgq - m_safe) * exp_scale)
                l_new = l_bkgq * corr_bkgq + p_bkgqs.sum(axis=-1)
                pv_bkgqh = jnp.einsum("bkgqs,bksh->bkgqh", p_bkgqs.astype(v_bksh.dtype), v_bksh,
                                      preferred_element_type=f32)
                return m_new, l_new, acc_bkgqh * corr_bkgq[..., None] + pv_bkgqh
            return step

        init = (jnp.full((b, kh, g, block_q), -jnp.inf, f32), jnp.zeros((b, kh, g, block_q), f32),
                jnp.zeros((b, kh, g, block_q, h), f32))
        carry = lax.fori_loop(kb_lo, a, make_step(True), init)
        carry = lax.fori_loop(a, c, make_step(False), carry)
        m_bkgq, l_bkgq, acc_bkgqh = lax.fori_loop(c, kb_hi + 1, make_step(True), carry)
        # Every query sees at least itself (padding sees padding), so l > 0.  The
        # output goes straight into the [B, T, K, G, H] buffer (in place): a
        # stacked [nq, ...] output plus a transpose back cost ~15% at T=2048.
        o_bqkgh = (acc_bkgqh / l_bkgq[..., None]).astype(q_btkgh.dtype).transpose(0, 3, 1, 2, 4)
        o_btkgh = lax.dynamic_update_slice_in_dim(o_btkgh, o_bqkgh, qi * block_q, axis=1)
        exp_scale = scale if softcap is None else 1.0
        lse_x = lax.dynamic_update_index_in_dim(lse_x, m_bkgq * exp_scale + jnp.log(l_bkgq), qi, 0)
        return o_btkgh, lse_x

    init = (jnp.zeros_like(q_btkgh), jnp.zeros((nq, b, kh, g, block_q), f32))
    return lax.fori_loop(0, nq, one_query_block, init)


def _flash_fwd(q_btkgh, k_x, v_x, segq_x, segk_x, kb_lo_q, qb_hi_k, scale, window, block_q, softcap):
    o_btkgh, lse_x = _flash_fwd_impl(q_btkgh, k_x, v_x, segq_x, segk_x, kb_lo_q, scale, window, block_q,
                                     softcap)
    return o_btkgh, (q_btkgh, k_x, v_x, segq_x, segk_x, kb_lo_q, qb_hi_k, o_btkgh, lse_x)


def _to_blocks(x_btkgh, block_q: int):
    """[B, T, K, G, H] -> [nq, B, K, G, bq, H] (the backward's layout)."""
    b, tp, kh, g, h = x_btkgh.shape
    return x_btkgh.reshape(b, tp // block_q, block_q, kh, g, h).transpose(1, 0, 3, 4, 2, 5)


def _flash_bwd(scale, window, block_q, softcap, res, do_btkgh):
    """Flash-attention backward, one pass over key blocks.

    For key block kj and each query block qi that sees it:
      p = exp(s - lse), dv += p^T do, dp = do v^T, ds = p (dp - delta),
      dk += ds^T q, dq[qi] += ds k;   delta = rowsum(do * o).
    The scale is applied once to dk and dq at the end (both are linear in it).
    With a soft-cap the logits are c * tanh(scale * s_raw / c), whose
    derivative in s_raw is scale * (1 - tanh^2): ds gains the (1 - tanh^2)
    factor and the scale is applied at the end as before.
    """
    q_btkgh, k_x, v_x, segq_x, segk_x, kb_lo_q, qb_hi_k, o_btkgh, lse_x = res
    q_x, o_x, do_x = (_to_blocks(x, block_q) for x in (q_btkgh, o_btkgh, do_btkgh))
    nq, b, kh, g, _, h = q_x.shape
    nk, block_k = k_x.shape[0], k_x.shape[3]
    f32 = jnp.float32
    delta_x = jnp.sum(do_x.astype(f32) * o_x.astype(f32), axis=-1)  # [nq, B, K, G, bq]
    do_x = do_x.astype(q_x.dtype)

    def one_key_block(dq_x, xs):
        k_bksh, v_bksh, segk_bk, qb_hi, kj = xs
        qb_lo = (kj * block_k) // block_q  # causal: the first query block at or after the key block

        def step(qi, carry):
            dk_bksh, dv_bksh, dq_x = carry
            q_bkgqh = lax.dynamic_index_in_dim(q_x, qi, 0, keepdims=False)
            do_bkgqh = lax.dynamic_index_in_dim(do_x, qi, 0, keepdims=False)
            lse_bkgq = lax.dynamic_index_in_dim(lse_x, qi, 0, keepdims=False)
            delta_bkgq = lax.dynamic_index_in_dim(delta_x, qi, 0, keepdims=False)
            segq_bq = lax.dynamic_index_in_dim(segq_x, qi, 0, keepdims=False)
            s_bkgqs = jnp.einsum("bkgqh,bksh->bkgqs", q_bkgqh, k_bksh, preferred_element_type=f32)
            mask = _block_mask(segq_bq, segk_bk, qi, kj, block_q, block_k, window)
            logits_bkgqs, exp_scale = _cap(s_bkgqs, scale, softcap)
            # lse is finite for every query (each sees itself), so masked p is exactly 0.
            p_bkgqs = jnp.exp(jnp.where(mask, logits_bkgqs, -jnp.inf) * exp_scale - lse_bkgq[..., None])
            dv_bksh = dv_bksh + jnp.einsum("bkgqs,bkgqh->bksh", p_bkgqs.astype(do_bkgqh.dtype), do_bkgqh,
                                           preferred_element_type=f32)
            dp_bkgqs = jnp.einsum("bkgqh,bksh->bkgqs", do_bkgqh, v_bksh, preferred_element_type=f32)
            ds_bkgqs = p_bkgqs * (dp_bkgqs - delta_bkgq[..., None])
            if softcap is not None:
                ds_bkgqs = ds_bkgqs * (1.0 - jnp.square(logits_bkgqs / softcap))
            ds_bkgqs = ds_bkgqs.astype(q_x.dtype)
            dk_bksh = dk_bksh + jnp.einsum("bkgqs,bkgqh->bksh", ds_bkgqs, q_bkgqh, preferred_element_type=f32)
            dq_bkgqh = jnp.einsum("bkgqs,bksh->bkgqh", ds_bkgqs, k_bksh, preferred_element_type=f32)
            dq_x = lax.dynamic_update_index_in_dim(
                dq_x, lax.dynamic_index_in_dim(dq_x, qi, 0, keepdims=False) + dq_bkgqh, qi, 0)
            return dk_bksh, dv_bksh, dq_x

        zeros = jnp.zeros((b, kh, block_k, h), f32)
        dk_bksh, dv_bksh, dq_x = lax.fori_loop(qb_lo, qb_hi + 1, step, (zeros, zeros, dq_x))
        return dq_x, ((dk_bksh * scale).astype(k_x.dtype), dv_bksh.astype(v_x.dtype))

    kj_k = jnp.arange(nk, dtype=jnp.int32)
    dq_x, (dk_x, dv_x) = lax.scan(one_key_block, jnp.zeros(q_x.shape, f32),
                                  (k_x, v_x, segk_x, qb_hi_k, kj_k))
    dq_x = (dq_x * scale).astype(q_x.dtype)
    dq_btkgh = dq_x.transpose(1, 0, 4, 2, 3, 5).reshape(q_btkgh.shape)
    # Integer inputs (segment ids, block bounds) take no cotangent.
    return dq_btkgh, dk_x, dv_x, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
