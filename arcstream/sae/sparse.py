"""Row-sparse kernels for TopK-style SAEs: touch only the active latents of each token.

A TopK SAE with d_sae latents activates k << d_sae of them per token. Written
densely (as SAELens does), the decoder matmul and the encoder's weight gradient
each cost as much as the encoder's forward matmul. Here the decoder and both
weight gradients gather or scatter-add only the selected rows of the
[d_sae, d_in] weight matrices, so the encoder's forward matmul is the one dense
cost left (the TopK paper's sparse kernels, written with XLA gather/scatter).

Layout: per token b, `idx_bk[b, :]` holds latent ids in [0, d_sae) and
`coef_bk[b, :]` their coefficients; weights are row-major `w_sd [d_sae, d]` so a
latent is one contiguous row. Ragged selections (BatchTopK: each token keeps
its own number of latents) pass `lengths_b`: only entries `j < lengths_b[b]`
count, the rest are ignored whatever they hold, and their gradients are zero.
With lengths the tokens are processed longest first, so each chunk of tokens
loops only over the columns its longest token uses: the work is proportional to
the kept entries, not to the static width.

Performance (2-core CPUs, d 896, d_sae 14336, k 64, 4096 tokens, one call, with
glibc's huge-page tunable (arcstream/train_sae.py); gather_sum measured on AVX2,
gather_dot and scatter_outer on AVX-512; the einsum versions these replace were timed
without the tunable, CPU time on a loaded machine). XLA:CPU runs
gathers and scatters on one thread, and what costs is materialising
[chunk, k, d] blocks and row reductions. So
* `gather_sum` loops over columns `_UNROLL` at a time and adds `coef * w[idx]`
  straight into a [chunk, d] accumulator (one fused gather-multiply-add): ~45 ms,
  was 250-280 ms as an einsum over a gathered [chunk, k, d] block;
* `gather_dot` (the decoder's d_acts, the bf16 selection's f32 recompute) is one
  batched matrix-vector product per chunk of 64 tokens and 64 columns, the blocks
  unrolled: 55-80 ms on AVX-512 (a loop over 8-column blocks: ~120 ms; ~390 ms as an
  einsum on AVX2);
* `scatter_outer` (the weight gradients) sorts the selection latent-major and sums
  each latent's entries with `gather_sum`: ~95 ms on a 2-core AVX-512 CPU, where
  scatter-adding one column of outer products at a time took ~275 ms (XLA's
  scatter is single-threaded and scalar).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

_UNROLL = 8  # columns per loop iteration (unrolled); widths are padded up to a multiple of it
_CHUNK_SUM = 512  # tokens per chunk in gather_sum (accumulator [chunk, d] stays in cache)
_CHUNK_DOT = 64  # tokens per chunk in gather_dot
_DOT_BLOCK = 64  # columns per loop iteration in gather_dot (one batched mat-vec over [chunk, block, d] rows)


def _chunked(a, n: int):
    """[B, ...] -> [B/n, n, ...], padding B up with zeros (zero rows contribute nothing)."""
    b = a.shape[0]
    pad = (-b) % n
    if pad:
        a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0)
    return a.reshape((a.shape[0] // n, n) + a.shape[1:])


def _pad_cols(a_bk, width: int):
    pad = width - a_bk.shape[1]
    return jnp.pad(a_bk, ((0, 0), (0, pad))) if pad else a_bk


@jax.custom_batching.custom_vmap
def _shared_trips(trips_c: jax.Array) -> jax.Array:
    """The loop trip counts, the same for every member of a vmapped batch (their maximum).

    Under `jax.vmap` (the trainer's sweep axis) a while loop whose trip count differs per
    member becomes one loop that `select`s every carry on every iteration: for
    `scatter_outer` that is the whole [d_sae, d] accumulator per column block (measured 22 s
    instead of 4.8 s for a BatchTopK step). With one trip count for all members the loop
    stays a plain loop; entries past a member's lengths are masked anyway.
    """
    return trips_c


@_shared_trips.def_vmap
def _shared_trips_vmap(axis_size, in_batched, trips_mc):
    del axis_size
    return (trips_mc.max(axis=0) if in_batched[0] else trips_mc), False


class _Plan:
    """How a kernel walks a [B, k] selection: token order, chunks, and column blocks per chunk.

    `order` is None (tokens as given) or the permutation that sorts tokens by
    length, longest first; `trips[c]` is the number of `_UNROLL`-column blocks
    chunk c must visit; `mask_bk` (ragged only) marks the entries that count, in
    the sorted order.
    """

    def __init__(self, b: int, k: int, n: int, lengths_b, block: int = _UNROLL):
        self.b, self.k = b, k
        self.block = block = min(block, -(-k // _UNROLL) * _UNROLL)
        self.width = -(-k // block) * block
        self.n = max(1, min(n, b))
        if lengths_b is None:
            self.order = None
            self.mask_bk = None
            n_chunks = -(-b // self.n)
            self.trips = jnp.full((n_chunks,), self.width // block, jnp.int32)
        else:
            lengths = jnp.clip(lengths_b.astype(jnp.int32), 0, k)
            self.order = jnp.argsort(-lengths, stable=True)
            lengths = lengths[self.order]
            self.mask_bk = jnp.arange(k)[None, :] < lengths[:, None]
            self.trips = _shared_trips((_chunked(lengths, self.n).max(axis=1) + block - 1) // block)

    def cols(self, a_bk, masked: bool = False):
        """A [B, k] per-entry array in kernel order, zeroed where masked, padded, chunked."""
        if self.order is not None:
            a_bk = a_bk[self.order]
            if masked:
                a_bk = jnp.where(self.mask_bk, a_bk, jnp.zeros((), a_bk.dtype))
        return _chunked(_pad_cols(a_bk, self.width), self.n)

    def rows(self, a_bd):
        """A [B, d] per-token array in kernel order, chunked."""
        if self.order is not None:
            a_bd = a_bd[self.order]
        return _chunked(a_bd, self.n)

    def unsort(self, out_b):
        """Per-token results back in the caller's token order."""
        out_b = out_b[: self.b]
        if self.order is None:
            return out_b
        return out_b[jnp.argsort(self.order)]


def _block(a_nk, t, block: int = _UNROLL):
    return jax.lax.dynamic_slice_in_dim(a_nk, t * block, block, axis=1)


def gather_sum(coef_bk: jax.Array, idx_bk: jax.Array, w_sd: jax.Array, lengths_b: jax.Array | None = None
               ) -> jax.Array:
    """out[b] = sum_{j < lengths[b]} coef[b, j] * w[idx[b, j]]  -> [B, d]. Forward only (no VJP rule)."""
    coef_bk, idx_bk, w_sd = jnp.asarray(coef_bk), jnp.asarray(idx_bk), jnp.asarray(w_sd)
    b, k = coef_bk.shape
    d = w_sd.shape[1]
    plan = _Plan(b, k, _CHUNK_SUM, lengths_b)

    def chunk(args):
        c_nk, i_nk, trips = args

        def cols(t, acc_nd):
            c_nu, i_nu = _block(c_nk, t), _block(i_nk, t)
            for u in range(_UNROLL):
                acc_nd = acc_nd + c_nu[:, u, None] * w_sd[i_nu[:, u]]
            return acc_nd

        return jax.lax.fori_loop(0, trips, cols, jnp.zeros((plan.n, d), w_sd.dtype))

    out = jax.lax.map(chunk, (plan.cols(coef_bk, masked=True), plan.cols(idx_bk), plan.trips))
    return plan.unsort(out.reshape(-1, d))


def gather_dot(g_bd: jax.Array, idx_bk: jax.Array, w_sd: jax.Array, lengths_b: jax.Array | None = None
               ) -> jax.Array:
    """out[b, j] = g[b] . w[idx[b, j]] for j < lengths[b], else 0  -> [B, k]."""
    g_bd, idx_bk, w_sd = jnp.asarray(g_bd), jnp.asarray(idx_bk), jnp.asarray(w_sd)
    b, k = idx_bk.shape
    plan = _Plan(b, k, _CHUNK_DOT, lengths_b, block=_DOT_BLOCK)

    def chunk(args):
        g_nd, i_nk, trips = args

        def dots(t):  # a batched mat-vec over [n, block, d] gathered rows, not a row reduction
            return jnp.matmul(w_sd[_block(i_nk, t, plan.block)], g_nd[:, :, None])[..., 0]

        # Column blocks unrolled, each skipped (cond) past the chunk's longest token: a loop with a
        # traced trip count ran twice as long (134 vs 63 ms for k 64 in one block).
        skip = lambda: jnp.zeros((plan.n, plan.block), g_bd.dtype)  # noqa: E731
        return jnp.concatenate([dots(t) if lengths_b is None else jax.lax.cond(t < trips, partial(dots, t), skip)
                                for t in range(plan.width // plan.block)], axis=1)

    out = jax.lax.map(chunk, (plan.rows(g_bd), plan.cols(idx_bk), plan.trips))
    out = plan.unsort(out.reshape(-1, plan.width)[:, :k])
    if lengths_b is not None:
        out = jnp.where(jnp.arange(k)[None, :] < lengths_b[:, None], out, 0.0)
    return out


_PER_ROW = 64  # entries per row of scatter_outer's latent-major table (16-128 measured: 64 fastest)
_KEY_BITS = 32  # scatter_outer sorts uint32 keys: latent id in the high bits, entry id in the low ones
_MAX_GROUPS = 4  # entry groups (one sort each) before scatter_outer falls back to a two-operand sort


def _latent_major(idx_bk: jax.Array, d_sae: int, lengths_b: jax.Array | None):
    """A [B, k] token-major selection turned latent-major: which entries each latent has.

    Returns `entry_rc` [R, _PER_ROW] (flat entry ids b * k + j, or B * k where empty),
    `latent_r` [R] (the latent of each row; out of range for unused rows) and
    `length_r` [R] (entries used in each row). A latent with n entries owns
    ceil(n / _PER_ROW) consecutive rows. Entries past a token's length belong to no
    row. The order comes from sorting `latent << bits | entry` as one uint32 array,
    ~4x faster on XLA:CPU than sorting the latent ids with the entry ids as a second
    operand (15 vs 64 ms for 262,144 entries); when latent and entry ids do not fit
    in 32 bits together, the entries are split into up to `_MAX_GROUPS` groups sorted
    separately (a latent then owns rows in each group), and beyond that the
    two-operand sort is used.
    """
    b, k = idx_bk.shape
    e = b * k
    key = idx_bk.reshape(-1).astype(jnp.int32)
    if lengths_b is not None:
        valid = (jnp.arange(k)[None, :] < lengths_b[:, None]).reshape(-1)
        key = jnp.where(valid, key, d_sae)  # d_sae: no latent (sorts last, owns no row)
    latent_bits = d_sae.bit_length()  # ids 0..d_sae inclusive
    entry_bits = _KEY_BITS - latent_bits
    groups = -(-e // (1 << entry_bits)) if entry_bits > 0 else _MAX_GROUPS + 1
    if groups <= _MAX_GROUPS:
        n = -(-e // groups)
        key = jnp.pad(key, (0, groups * n - e), constant_values=d_sae).reshape(groups, n)
        local = jnp.arange(n, dtype=jnp.uint32)[None, :]
        packed = jnp.sort((key.astype(jnp.uint32) << entry_bits) | local, axis=1)
        entry = ((packed & ((1 << entry_bits) - 1)).astype(jnp.int32)
                 + n * jnp.arange(groups, dtype=jnp.int32)[:, None]).reshape(-1)
        # one id per (group, latent) pair; sorted over the flattened groups
        pair = ((packed >> entry_bits).astype(jnp.int32)
                + (d_sae + 1) * jnp.arange(groups, dtype=jnp.int32)[:, None]).reshape(-1)
    else:
        groups = 1
        pair, entry = jax.lax.sort((key, jnp.arange(e, dtype=jnp.int32)), num_keys=1)
    pairs = groups * (d_sae + 1)
    counts = jnp.zeros((pairs,), jnp.int32).at[pair].add(1, indices_are_sorted=True)
    start = jnp.cumsum(counts) - counts  # where each pair's entries begin in the sorted order
    counts = jnp.where(jnp.arange(pairs) % (d_sae + 1) == d_sae, 0, counts)  # padding owns no row
    rows = -(-counts // _PER_ROW)
    row_end = jnp.cumsum(rows)
    row_start = row_end - rows
    n_rows = e // _PER_ROW + groups * d_sae  # static bound on sum(rows)
    q = jnp.arange(entry.shape[0], dtype=jnp.int32) - start[pair]
    row = jnp.where(pair % (d_sae + 1) < d_sae, row_start[pair] + q // _PER_ROW, n_rows)
    entry_rc = jnp.full((n_rows, _PER_ROW), e, jnp.int32).at[row, q % _PER_ROW].set(entry, mode="drop")
    pair_r = jnp.minimum(jnp.searchsorted(row_end, jnp.arange(n_rows, dtype=jnp.int32), side="right"),
                         pairs - 1).astype(jnp.int32)
    used = jnp.arange(n_rows) < row_end[-1]
    length_r = jnp.where(used, jnp.clip(counts[pair_r] - (jnp.arange(n_rows) - row_start[pair_r]) * _PER_ROW,
                                        0, _PER_ROW), 0)
    latent_r = jnp.where(used, pair_r % (d_sae + 1), d_sae)
    return entry_rc, latent_r, length_r


def scatter_outer(coef_bk: jax.Array, idx_bk: jax.Array, v_bd: jax.Array, d_sae: int,
                  lengths_b: jax.Array | None = None) -> jax.Array:
    """out[s] = sum_{b, j < lengths[b]: idx[b,j]=s} coef[b, j] * v[b]  -> [d_sae, d] (a weight gradient).

    Written as gathers, not a scatter of [B, k, d] updates (XLA:CPU's scatter runs on one
    thread at ~1.3 ns per element; its gathers are vectorised): the selection is turned
    latent-major (`_latent_major`), `gather_sum` adds each row's entries coef * v[b]
    (rows of one latent hold its entries), and one scatter-add of the [R, d] row sums
    (R ~ B*k/64 + d_sae) puts them in place. 275 -> 95 ms for the benchmark's shape
    (4,096 tokens, k 64, d_sae 14,336, d 896). Two calls on the same selection jitted together
    share the layout: XLA's CSE keeps one sort (the compiled TopK train step holds a single u32
    sort of the 262,144 keys for both weight gradients).
    """
    coef_bk, idx_bk, v_bd = jnp.asarray(coef_bk), jnp.asarray(idx_bk), jnp.asarray(v_bd)
    b, k = idx_bk.shape
    entry_rc, latent_r, length_r = _latent_major(idx_bk, d_sae, lengths_b)
    coef_e = jnp.concatenate([coef_bk.reshape(-1), jnp.zeros((1,), coef_bk.dtype)])
    sums_rd = gather_sum(coef_e[entry_rc], jnp.minimum(entry_rc // k, b - 1), v_bd, length_r)
    return jnp.zeros((d_sae, v_bd.shape[1]), sums_rd.dtype).at[latent_r].add(sums_rd, mode="drop")


_WORD = 32  # compact packs a row's mask in uint32 words
_LINEAR_SEARCH_WORDS = 64  # up to this many words per row, compact finds a slot's word by one compare-sum


def compact(mask_rw: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """The positions of the first `c` True entries of each row, ascending, and each row's count.

    -> (pos [R, c] int32, count [R] int32). Slots q >= count hold some in-range position (mask them
    with `q < count`); rows with more than c entries are cut at c (count still says how many).
    Without a sort, a scatter or a top-k: each row's mask is packed in uint32 words, the words'
    popcounts are summed up the row, slot q finds its word (the first whose running count passes
    q: one compare-sum over the words, or a binary search on long rows) and then its bit in that
    word (a 5-step binary search on popcounts). Every step is a vectorised elementwise pass or a
    small gather, so it costs a few ms where XLA:CPU's one-threaded top-k took 100-140 ms
    (BatchTopK's selection, [4096, 896] blocks).
    """
    r, w = mask_rw.shape
    nw = -(-w // _WORD)
    if nw * _WORD != w:
        mask_rw = jnp.pad(mask_rw, ((0, 0), (0, nw * _WORD - w)))
    bits = jnp.left_shift(mask_rw.reshape(r, nw, _WORD).astype(jnp.uint32), jnp.arange(_WORD, dtype=jnp.uint32))
    words = jnp.sum(bits, axis=-1, dtype=jnp.uint32)  # distinct bits: the sum is the bitwise or
    pc = jax.lax.population_count(words).astype(jnp.int32)
    incl = jnp.cumsum(pc, axis=1)
    q = jnp.arange(c, dtype=jnp.int32)
    if nw <= _LINEAR_SEARCH_WORDS:
        word = jnp.sum((incl[:, None, :] <= q[None, :, None]).astype(jnp.int32), axis=-1)
    else:  # the first word whose running count exceeds q: binary search over the words
        lo, hi = jnp.zeros((r, c), jnp.int32), jnp.full((r, c), nw - 1, jnp.int32)
        for _ in range(max(1, (nw - 1).bit_length())):
            mid = (lo + hi) // 2
            past = jnp.take_along_axis(incl, mid, axis=1, mode="promise_in_bounds") > q[None]
            lo, hi = jnp.where(past, lo, mid + 1), jnp.where(past, mid, hi)
        word = lo
    word = jnp.minimum(word, nw - 1)
    rank = q[None] - jnp.take_along_axis(incl - pc, word, axis=1, mode="promise_in_bounds")
    bits_rc = jnp.take_along_axis(words, word, axis=1, mode="promise_in_bounds")
    pos = jnp.zeros((r, c), jnp.int32)
    for width in (16, 8, 4, 2, 1):  # the rank-th set bit: skip the low `width` bits when they hold <= rank
        low = jnp.right_shift(bits_rc, pos.astype(jnp.uint32)) & jnp.uint32((1 << width) - 1)
        n_low = jax.lax.population_count(low).astype(jnp.int32)
        skip = rank >= n_low
        pos, rank = pos + jnp.where(skip, width, 0), rank - jnp.where(skip, n_low, 0)
    return jnp.minimum(word * _WORD + pos, w - 1), incl[:, -1]


def segment_sum(coef_bk: jax.Array, idx_bk: jax.Array, d_sae: int, lengths_b: jax.Array | None = None
                ) -> jax.Array:
    """out[s] = sum_{b, j < lengths[b]: idx[b,j]=s} coef[b, j]  -> [d_sae] (a bias gradient, a firing count)."""
    coef_bk, idx_bk = jnp.asarray(coef_bk), jnp.asarray(idx_bk)
    if lengths_b is not None:
        coef_bk = jnp.where(jnp.arange(coef_bk.shape[1])[None, :] < lengths_b[:, None], coef_bk, 0)
    return jnp.zeros((d_sae,), coef_bk.dtype).at[idx_bk.reshape(-1)].add(coef_bk.reshape(-1))


@jax.custom_vjp
def sparse_decode(acts_bk: jax.Array, idx_bk: jax.Array, w_sd: jax.Array, lengths_b: jax.Array | None = None
                  ) -> jax.Array:
    """Decoder over the active latents only: sum_{j < lengths[b]} acts[b,j] * w_dec[idx[b,j]] -> [B, d_in].

    Differentiable in `acts_bk` and `w_sd`; the backward pass gathers the same
    rows for d_acts (`gather_dot`) and scatter-adds acts x grad into d_w.
    """
    return gather_sum(acts_bk, idx_bk, w_sd, lengths_b)


def _sparse_decode_fwd(acts_bk, idx_bk, w_sd, lengths_b):
    return gather_sum(acts_bk, idx_bk, w_sd, lengths_b), (acts_bk, idx_bk, w_sd, lengths_b)


def _sparse_decode_bwd(res, g_bd):
    acts_bk, idx_bk, w_sd, lengths_b = res
    d_acts_bk = gather_dot(g_bd, idx_bk, w_sd, lengths_b)
    d_w_sd = scatter_outer(acts_bk, idx_bk, g_bd, w_sd.shape[0], lengths_b)
    return d_acts_bk, None, d_w_sd, None


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def selected_preacts(
    x_bd: jax.Array,
    b_dec_d: jax.Array,
    w_enc_sd: jax.Array,
    b_enc_s: jax.Array,
    idx_bk: jax.Array,
    vals_bk: jax.Array,
    apply_b_dec: bool,
    lengths_b: jax.Array | None = None,
) -> jax.Array:
    """The pre-activations of the selected latents, with a sparse gradient.

    Forward: returns `vals_bk`, which the caller already computed with the dense
    encoder matmul (so the forward costs nothing extra). It must equal
    `(x - b_dec*apply_b_dec) @ w_enc[idx].T + b_enc[idx]` where it counts
    (j < lengths[b]; everywhere without lengths).
    Backward: d_w_enc by scatter-add of rows, d_b_enc by segment-sum, and d_b_dec
    as -(segment_sum(g) @ w_enc) (never a [B, d_in] gradient); entries past a
    token's length get no gradient. `x_bd` is data: its cotangent is zero.
    """
    del x_bd, b_dec_d, w_enc_sd, b_enc_s, idx_bk, apply_b_dec, lengths_b
    return vals_bk


def _selected_preacts_fwd(x_bd, b_dec_d, w_enc_sd, b_enc_s, idx_bk, vals_bk, apply_b_dec, lengths_b):
    return vals_bk, (x_bd, b_dec_d, w_enc_sd, idx_bk, lengths_b)


def _selected_preacts_bwd(apply_b_dec, res, g_bk):
    x_bd, b_dec_d, w_enc_sd, idx_bk, lengths_b = res
    d_sae = w_enc_sd.shape[0]
    xc_bd = x_bd - b_dec_d if apply_b_dec else x_bd
    d_w_enc = scatter_outer(g_bk, idx_bk, xc_bd, d_sae, lengths_b)
    d_b_enc = segment_sum(g_bk, idx_bk, d_sae, lengths_b)
    if apply_b_dec:
        d_b_dec = -(d_b_enc @ w_enc_sd)
    else:
        d_b_dec = jnp.zeros_like(b_dec_d)
    return jnp.zeros_like(x_bd), d_b_dec, d_w_enc, d_b_enc, None, jnp.zeros_like(g_bk), None


selected_preacts.defvjp(_selected_preacts_fwd, _selected_preacts_bwd)
