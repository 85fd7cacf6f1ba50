"""Accelerator attention kernels for packed rows: TPU splash attention and NVIDIA GPU.

Both functions compute exactly what the reference does (`arcstream.model.attention`,
`jax.nn.dot_product_attention` with a `[B,1,T,T]` mask) without ever building a
`[T,T]` array:

    query i sees key j  iff  seg[i] == seg[j]  and  j <= i  (and i - j < window)

q `[B,T,N,H]`, k/v `[B,T,K,H]` with N % K == 0 (GQA: query head n reads KV head
n // (N/K), as HF's `repeat_kv`); `segment_ids_bt` int `[B,T]`, 0 = padding,
segments contiguous.  Padding attends to earlier padding only, so its output is
finite (never NaN) and equals the reference's; callers discard it.  Softmax in
float32, output in q's dtype, `scale` defaults to 1/sqrt(H).
`segment_ids_bt=None` means one segment per row and no padding.

Kernels (jax 0.10):

- `splash_attention` (TPU): `jax.experimental.pallas.ops.tpu.splash_attention`.
  `make_splash_mha` handles GQA itself (its K/V index map is `h // (N/K)`, the
  same grouping as above), so no repeat of K/V and no vmap over KV heads; the
  MQA maker would only cover K == 1.  The static mask is `CausalMask`, or for a
  window `LocalMask(window_size=(w-1, 0))`, which is causal and windowed in one
  mask that the kernel computes in-register (a `LogicalAnd` of the two would be
  materialised as mask blocks); `SegmentIds(q=, kv=)` is and-ed in.  The kernel
  works on one example `[N,T,H]` (vmapped over B) and does not scale q, so q is
  multiplied by `scale` first (in float32, cast back to q's dtype).  `softcap=c`
  (Gemma 2) is the kernel's own `attn_logits_soft_cap`: c * tanh(q.k / c) on the
  pre-scaled q, i.e. on the scaled scores, as HF does.
- `gpu_attention` (NVIDIA), two paths:
  * packed rows (segment ids given, the normal case): the Pallas Triton kernel
    `jax.experimental.pallas.ops.gpu.attention.mha` (`segment_ids`, `causal=True`,
    `sm_scale`).  It has no GQA (its K/V block index is the query head), so K/V
    heads are repeated to N, and it has no sliding window, so `window=` with
    segment ids raises ValueError pointing at `gpu_flash_attention`.
- `gpu_flash_attention` (NVIDIA): arcstream's own Pallas Triton kernel for
  what `mha` lacks, a sliding window and soft-capping (Gemma 2), with GQA
  through its K/V index map; forward only (`arcstream.model.attention` pairs
  it with the blocked kernel's backward).  Tested in interpret mode on CPU;
  not yet run on a GPU by this project (no device lent so far).
    Why not cuDNN here: `jax.nn.dot_product_attention(implementation="cudnn")`
    has no segment ids; a packed row would need the dense `[B,1,T,T]` mask
    (turned into a bias by cuDNN), the very array these kernels exist to avoid.
    (cuDNN's packed layout, `q_offsets/kv_offsets`, is only in the private
    `jax._src.cudnn` module, needs Hopper and a static segment count.)
  * `segment_ids_bt=None` (one causal sequence per row), bf16/f16, head dim a
    multiple of 8 and <= 128, not interpret: cuDNN flash attention through
    `jax.nn.dot_product_attention(is_causal=True, local_window_size=(w-1, 0),
    implementation="cudnn")`, which also covers the window and GQA natively.
    Otherwise the Pallas kernel as above.

Block sizes and padding: both kernels need T to be a multiple of their blocks
(splash: multiples of 128; Triton: powers of two).  T is padded up inside with
segment id 0 and zero q/k/v, and the output is sliced back.  The padding sits
after every real token, so causality alone keeps it invisible to them (and to
the row's own padding, which only looks back).  `block_size=` (keyword, an
extension of the shared signature) tunes the block; the default is 512 (splash)
/ 128 (GPU), shrunk for short rows.

Sharding: under a mesh with axes ('data', 'model') (`jax.set_mesh(mesh)`, jit
or not) the kernel runs inside `jax.shard_map`: batch over 'data', whole heads
over 'model' (N and K both split, which keeps each query head with its KV head
because the groups are contiguous).  K must divide by the 'model' axis size and
B by the 'data' size, else ValueError.  Without a mesh the kernel is called
directly.  Pallas calls cannot be partitioned by GSPMD, hence the shard_map.

Both Pallas paths are differentiable (backward block sizes are set: splash's
own dq/dkv kernels, the Triton kernel's custom VJP).

Interpret mode (`interpret=True`) runs both Pallas kernels on CPU (tests),
forward and backward; without it, `splash_attention` needs a TPU and
`gpu_attention` a GPU, else ValueError.  The cuDNN path has no CPU mode.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

# Largest head dim the cuDNN path is sent (cuDNN allows 256 on Hopper; 128 everywhere).
_CUDNN_MAX_HEAD_DIM = 128
_SPLASH_LANES = 128  # splash block sizes must be multiples of the TPU lane count


# ---------------------------------------------------------------------------- public API
def splash_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                     segment_ids_bt: jax.Array | None, *, scale: float | None = None,
                     window: int | None = None, interpret: bool = False,
                     block_size: int | None = None, softcap: float | None = None) -> jax.Array:
    """Causal, segment-masked (optionally sliding-window, soft-capped) attention with TPU splash attention.

    Shapes and semantics: see the module docstring.  `block_size` (a multiple of
    128) is the query and key block; default min(512, T rounded up to 128).
    """
    name = "splash_attention"
    _, t, _, h, _ = _check_shapes(name, q_btnh, k_btkh, v_btkh, segment_ids_bt)
    window = _check_window(name, window)
    _check_platform(name, "tpu", interpret)
    scale_f = _scale(name, scale, h)
    if block_size is None:
        block = min(512, _round_up(t, _SPLASH_LANES))
    else:
        block = int(block_size)
        if block <= 0 or block % _SPLASH_LANES:
            raise ValueError(f"{name}: block_size={block_size} must be a positive multiple of "
                             f"{_SPLASH_LANES} (the TPU lane count).")
    t_pad = _round_up(t, block)

    def per_shard(q, kk, v, seg):
        kernel = _splash_kernel(q.shape[2], t_pad, block, window, bool(interpret),
                                None if softcap is None else float(softcap))
        q = (q.astype(jnp.float32) * scale_f).astype(q.dtype)  # splash does not scale q
        q, kk, v, seg = _pad_time(t_pad, q, kk, v, seg)
        # [B,T,N,H] -> [B,N,T,H]: splash works on one example, heads first.
        q_bnth, k_bkth, v_bkth = (jnp.swapaxes(x, 1, 2) for x in (q, kk, v))
        if seg is None:
            o_bnth = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1))(q_bnth, k_bkth, v_bkth)
        else:
            from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
            seg = seg.astype(jnp.int32)
            o_bnth = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, SegmentIds(q=s1, kv=s1)))(
                q_bnth, k_bkth, v_bkth, seg)
        return jnp.swapaxes(o_bnth, 1, 2)[:, :t].astype(q_btnh.dtype)

    return _maybe_shard_map(name, per_shard, q_btnh, k_btkh, v_btkh, segment_ids_bt)


def gpu_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                  segment_ids_bt: jax.Array | None, *, scale: float | None = None,
                  window: int | None = None, interpret: bool = False,
                  block_size: int | None = None) -> jax.Array:
    """Causal, segment-masked attention on NVIDIA GPUs (Pallas Triton `mha`, or cuDNN).

    Which path runs when: see the module docstring.  `block_size` (a power of
    two >= 16) is the Pallas query and key block; default min(128, T rounded up
    to a power of two).
    """
    name = "gpu_attention"
    _, t, _, h, _ = _check_shapes(name, q_btnh, k_btkh, v_btkh, segment_ids_bt)
    window = _check_window(name, window)
    _check_platform(name, "gpu", interpret)
    scale_f = _scale(name, scale, h)

    if _use_cudnn(q_btnh.dtype, h, segment_ids_bt, interpret):
        def per_shard_cudnn(q, kk, v, seg):
            del seg
            return jax.nn.dot_product_attention(
                q, kk, v, scale=scale_f, is_causal=True,
                local_window_size=None if window is None else (window - 1, 0),
                implementation="cudnn")

        return _maybe_shard_map(name, per_shard_cudnn, q_btnh, k_btkh, v_btkh, None)

    if window is not None:
        raise ValueError(
            f"{name}: window={window} is not supported here: the Pallas GPU kernel "
            "(jax.experimental.pallas.ops.gpu.attention.mha) has no sliding-window mask, and the "
            "cuDNN path (which has one) takes no segment ids and only bf16/f16. Use "
            "gpu_flash_attention (what attention(implementation='gpu') runs for sliding-window layers).")
    block = _triton_block(name, t, block_size)
    t_pad = _round_up(t, block)
    # Backward blocks (the library's default 32), so the kernel is differentiable.
    bwd_block = min(32, block)
    bwd = dict(block_q_dkv=bwd_block, block_kv_dkv=bwd_block, block_q_dq=bwd_block,
               block_kv_dq=bwd_block)

    def per_shard(q, kk, v, seg):
        from jax.experimental.pallas.ops.gpu import attention as gpu_mha
        groups = q.shape[2] // kk.shape[2]
        if groups > 1:  # the kernel has no GQA: its K/V block index is the query head
            kk, v = jnp.repeat(kk, groups, axis=2), jnp.repeat(v, groups, axis=2)
        q, kk, v, seg = _pad_time(t_pad, q, kk, v, seg)
        o = gpu_mha.mha(q, kk, v, None if seg is None else seg.astype(jnp.int32),
                        sm_scale=scale_f, causal=True,
                        block_sizes=gpu_mha.BlockSizes(block_q=block, block_k=block, **bwd),
                        interpret=bool(interpret))
        return o[:, :t].astype(q_btnh.dtype)

    return _maybe_shard_map(name, per_shard, q_btnh, k_btkh, v_btkh, segment_ids_bt)


def gpu_flash_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                        segment_ids_bt: jax.Array | None, *, scale: float | None = None,
                        window: int | None = None, softcap: float | None = None,
                        interpret: bool = False, block_size: int | None = None) -> jax.Array:
    """Causal, segment-masked attention with a sliding window and/or soft-cap on NVIDIA GPUs (forward).

    arcstream's own Pallas Triton kernel (`_flash_kernel`), for what `mha` lacks:
    `window=w` (query i sees keys i-w+1..i) and `softcap=c` (scaled scores become
    c * tanh(s / c) before the mask, Gemma 2), with GQA through the K/V block index
    (query head n reads KV head n // (N/K); K/V are not repeated). Grid (query
    blocks, B, N); each program keeps its [block, H] queries and loops over the key
    blocks from the window's first (or 0) to its diagonal, with an online softmax in
    float32, so no [T, T] array exists. Head dims that are not a power of two are
    zero-padded (Triton block shapes). Forward only: `arcstream.model.attention`
    differentiates it through the blocked kernel's backward.
    """
    name = "gpu_flash_attention"
    _, t, _, h, _ = _check_shapes(name, q_btnh, k_btkh, v_btkh, segment_ids_bt)
    window = _check_window(name, window)
    _check_platform(name, "gpu", interpret)
    scale_f = _scale(name, scale, h)
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{name}: softcap={softcap!r} must be a finite number > 0 or None.")
    block = _triton_block(name, t, block_size)
    t_pad, h_pad = _round_up(t, block), 1 << (h - 1).bit_length()
    kernel = functools.partial(_flash_kernel, scale=scale_f, window=window, block=block,
                               softcap=None if softcap is None else float(softcap))

    def per_shard(q, kk, v, seg):
        b, _, n, _ = q.shape
        groups = n // kk.shape[2]
        if seg is None:
            seg = jnp.ones((b, t), jnp.int32)
        q, kk, v, seg = _pad_time(t_pad, q, kk, v, seg.astype(jnp.int32))
        if h_pad != h:
            q, kk, v = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, h_pad - h))) for x in (q, kk, v))
        o = pl.pallas_call(
            kernel,
            grid=(t_pad // block, b, n),
            in_specs=[
                pl.BlockSpec((None, block, None, h_pad), lambda i, r, m: (r, i, m, 0)),
                pl.BlockSpec((None, t_pad, None, h_pad), lambda i, r, m: (r, 0, m // groups, 0)),
                pl.BlockSpec((None, t_pad, None, h_pad), lambda i, r, m: (r, 0, m // groups, 0)),
                pl.BlockSpec((None, block), lambda i, r, m: (r, i)),
                pl.BlockSpec((None, t_pad), lambda i, r, m: (r, 0)),
            ],
            out_specs=pl.BlockSpec((None, block, None, h_pad), lambda i, r, m: (r, i, m, 0)),
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            compiler_params=plgpu.CompilerParams(num_warps=4 if h_pad <= 64 else 8, num_stages=2),
            interpret=bool(interpret),
            name="arcstream_flash_forward",
        )(q, kk, v, seg, seg)
        return o[:, :t, :, :h].astype(q_btnh.dtype)

    return _maybe_shard_map(name, per_shard, q_btnh, k_btkh, v_btkh, segment_ids_bt)


# Masked scores: finite, so a query row whose keys in a block are all hidden gives exp(0) terms that the
# next visible key's correction factor (exp(_MASKED - m) = 0) wipes out; every query sees itself.
_MASKED = -1e30


def _flash_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, o_ref, *, scale: float, window: int | None,
                  softcap: float | None, block: int):
    """One (query block, row, head) program: online softmax over the key blocks it may see."""
    i = pl.program_id(0)
    q = q_ref[...]
    seg_q = segq_ref[...]
    pos_q = i * block + jnp.arange(block)

    def body(j, carry):
        o, m, l = carry
        keys = pl.ds(j * block, block)
        s = plgpu.dot(q, k_ref[keys, :].T).astype(jnp.float32) * scale
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        pos_k = j * block + jnp.arange(block)
        seen = (seg_q[:, None] == segk_ref[keys][None, :]) & (pos_q[:, None] >= pos_k[None, :])
        if window is not None:
            seen &= pos_q[:, None] - pos_k[None, :] < window
        s = jnp.where(seen, s, _MASKED)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        v = v_ref[keys, :]
        o = o * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return o, m_new, l * alpha + p.sum(axis=1)

    # First key block the window reaches: a truncating division of a non-negative int (Triton lowers
    # lax.div directly; Python's floor division of a traced program id goes through a sign correction).
    lo = 0 if window is None else jax.lax.div(jnp.maximum(i * block - (window - 1), 0), block)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block,), _MASKED, jnp.float32),
            jnp.zeros((block,), jnp.float32))
    o, _, l = jax.lax.fori_loop(lo, i + 1, body, init)  # key blocks up to the diagonal (same block size)
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)


# ---------------------------------------------------------------------------- helpers
def _triton_block(name: str, t: int, block_size: int | None) -> int:
    """The Triton kernels' query/key block: a power of two >= 16; default min(128, T rounded up to one)."""
    if block_size is None:
        return min(128, max(16, 1 << (t - 1).bit_length()))
    block = int(block_size)
    if block < 16 or block & (block - 1):
        raise ValueError(f"{name}: block_size={block_size} must be a power of two >= 16 (Triton block shapes).")
    return block


def _use_cudnn(dtype, head_dim: int, segment_ids_bt, interpret: bool) -> bool:
    """cuDNN only without segment ids (it has none), in half precision, for head dims it takes."""
    return (segment_ids_bt is None and not interpret
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= _CUDNN_MAX_HEAD_DIM)


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, t_pad: int, block: int, window: int | None, interpret: bool,
                   softcap: float | None = None):
    """One splash kernel per static configuration.

    Cached because building it runs the mask-block analysis in NumPy; built under
    `ensure_compile_time_eval` because it stores its mask tables with `jnp.array`,
    which inside a jit trace would make tracers (leaked into the cache otherwise).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (t_pad, t_pad)
    if window is None:
        mask = sa.CausalMask(shape)
    else:  # causal and windowed in one computable mask: keys j with i - (w-1) <= j <= i
        mask = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    # Backward blocks too, so the kernel is differentiable (training arcstream's own model).
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(sa.MultiHeadMask([mask] * num_heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret,
                                  attn_logits_soft_cap=softcap)


def _maybe_shard_map(name: str, fn: Callable, q, k, v, seg):
    """Run `fn(q, k, v, seg)` per device under the current mesh, or directly without one.

    Batch goes over 'data' and heads over 'model' when those axes exist (and are
    not already manual, i.e. we are not inside a shard_map over them).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, seg)
    free = [a for a in mesh.axis_names if a not in mesh.manual_axes]
    data = "data" if "data" in free else None
    model = "model" if "model" in free else None
    if data is None and model is None:
        return fn(q, k, v, seg)
    b, n, kh = q.shape[0], q.shape[2], k.shape[2]
    if model is not None:
        size = mesh.shape[model]
        if kh % size:
            raise ValueError(
                f"{name}: the {kh} KV heads (and {n} query heads) do not divide the 'model' mesh "
                f"axis of size {size}; whole heads are sharded over 'model'. Use a 'model' axis "
                f"size that divides {kh}, or implementation='blocked'.")
    if data is not None:
        size = mesh.shape[data]
        if b % size:
            raise ValueError(f"{name}: batch size {b} does not divide the 'data' mesh axis of "
                             f"size {size}; pad the batch to a multiple of {size}.")
    spec = P(data, None, model, None)
    if seg is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), in_specs=(spec, spec, spec),
                             out_specs=spec, check_vma=False)(q, k, v)
    return jax.shard_map(fn, in_specs=(spec, spec, spec, P(data, None)), out_specs=spec,
                         check_vma=False)(q, k, v, seg)


def _pad_time(t_pad: int, q, k, v, seg):
    """Pad T up to `t_pad`: zeros for q/k/v, segment id 0 (after every real token: invisible)."""
    extra = t_pad - q.shape[1]
    if extra == 0:
        return q, k, v, seg
    widths = ((0, 0), (0, extra), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    if seg is not None:
        seg = jnp.pad(seg, ((0, 0), (0, extra)))
    return q, k, v, seg


def _check_shapes(name, q, k, v, seg):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{name}: q, k, v must be [B,T,N,H], [B,T,K,H], [B,T,K,H]; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}.")
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h:
        raise ValueError(f"{name}: k and v must be [B,T,K,H] = [{b},{t},K,{h}] like q; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}.")
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"{name}: the {n} query heads must be a multiple of the {kh} KV heads "
                         f"(q {q.shape}, k {k.shape}).")
    if seg is not None and tuple(seg.shape) != (b, t):
        raise ValueError(f"{name}: segment_ids_bt must be [B,T] = {(b, t)}; got {tuple(seg.shape)}.")
    return b, t, n, h, kh


def _check_window(name, window):
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{name}: window={window!r} must be a positive int (query i sees keys "
                         "j with i - j < window) or None.")
    return window


def _check_platform(name, platform, interpret):
    if interpret:
        return
    have = jax.devices()[0].platform
    if have != platform:
        raise ValueError(f"{name} needs a {platform.upper()} (this process has {have} devices); "
                         "pass interpret=True to run the kernel on the CPU (slow, for tests), or "
                         "use implementation='blocked'.")


def _scale(name, scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        return float(scale)  # both kernels take the scale as a static Python float
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"{name}: scale must be a Python float (static), got {scale!r}.") from e


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
