"""The row-sparse kernels against dense NumPy, their custom VJPs against dense jax.grad, AuxK over the
dead latents against the all-latents AuxK it replaced, and the sparse BatchTopK against its dense
definition (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcstream.sae import SAEConfig, get_architecture
from arcstream.sae import architectures as A
from arcstream.sae.architectures import batchtopk as batchtopk_module
from arcstream.sae.architectures import topk as topk_module
from arcstream.sae import sparse

B, S, D, K = 70, 40, 12, 11  # B not a multiple of any chunk, K not a multiple of the unroll


def _selection(seed=0, ragged=True):
    r = np.random.default_rng(seed)
    idx = r.integers(0, S, (B, K))
    coef = r.standard_normal((B, K)).astype(np.float32)
    lengths = np.full(B, K)
    if ragged:
        lengths = r.integers(0, K + 1, B)
        lengths[:3] = [0, K, 1]
    return idx, coef, lengths


def _dense(idx, coef, lengths):
    """The [B, S] matrix the selection stands for (entries past a token's length dropped)."""
    out = np.zeros((B, S), np.float64)
    for b in range(B):
        for j in range(lengths[b]):
            out[b, idx[b, j]] += coef[b, j]
    return out


@pytest.mark.parametrize("ragged", [False, True])
def test_kernels_equal_dense_numpy(ragged):
    idx, coef, lengths = _selection(ragged=ragged)
    r = np.random.default_rng(1)
    w = r.standard_normal((S, D)).astype(np.float32)
    g = r.standard_normal((B, D)).astype(np.float32)
    a = _dense(idx, coef, lengths)
    ln = jnp.asarray(lengths) if ragged else None
    np.testing.assert_allclose(sparse.gather_sum(coef, idx, w, ln), a @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sparse.scatter_outer(coef, idx, g, S, ln), a.T @ g, rtol=1e-5, atol=1e-5)
    mask = np.arange(K)[None, :] < lengths[:, None]
    np.testing.assert_allclose(sparse.gather_dot(g, idx, w, ln), np.einsum("bd,bkd->bk", g, w[idx]) * mask,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sparse.segment_sum(coef, idx, S, ln), a.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key_bits", [14, 13])  # 4 entry groups / the two-operand sort (770 entries)
@pytest.mark.parametrize("ragged", [False, True])
def test_scatter_outer_equals_dense_numpy_whichever_sort_it_uses(ragged, key_bits, monkeypatch):
    """The latent-major layout with the entries split into groups (a latent owns rows in several), and
    with the fallback sort, on duplicate ids within a token and latents with more entries than a row."""
    monkeypatch.setattr(sparse, "_KEY_BITS", key_bits)
    monkeypatch.setattr(sparse, "_PER_ROW", 8)
    idx, coef, lengths = _selection(seed=4, ragged=ragged)
    idx[:, 0] = 3  # latent 3 in every token: 70 entries, several rows
    g = np.random.default_rng(5).standard_normal((B, D)).astype(np.float32)
    ln = jnp.asarray(lengths) if ragged else None
    np.testing.assert_allclose(sparse.scatter_outer(coef, idx, g, S, ln), _dense(idx, coef, lengths).T @ g,
                               rtol=1e-5, atol=1e-5)


def test_sparse_decode_and_selected_preacts_gradients_equal_dense_grad():
    idx, vals, lengths = _selection(seed=2)
    r = np.random.default_rng(3)
    p = {"w_enc": jnp.asarray(r.standard_normal((S, D)), jnp.float32),
         "b_enc": jnp.asarray(r.standard_normal(S), jnp.float32),
         "w_dec": jnp.asarray(r.standard_normal((S, D)), jnp.float32),
         "b_dec": jnp.asarray(r.standard_normal(D), jnp.float32)}
    x = jnp.asarray(r.standard_normal((B, D)), jnp.float32)
    target = jnp.asarray(r.standard_normal((B, D)), jnp.float32)
    mask = jnp.arange(K)[None, :] < jnp.asarray(lengths)[:, None]
    rows = jnp.arange(B)[:, None]

    def sparse_loss(p):
        pre = (x - p["b_dec"]) @ p["w_enc"].T + p["b_enc"]
        v = jnp.take_along_axis(jax.lax.stop_gradient(pre), jnp.asarray(idx), axis=1)
        sel = sparse.selected_preacts(x, p["b_dec"], p["w_enc"], p["b_enc"], jnp.asarray(idx), v, True,
                                      jnp.asarray(lengths))
        out = sparse.sparse_decode(jax.nn.relu(sel), jnp.asarray(idx), p["w_dec"], jnp.asarray(lengths))
        return jnp.sum((out - target) ** 2)

    def dense_loss(p):
        pre = (x - p["b_dec"]) @ p["w_enc"].T + p["b_enc"]
        sel = jnp.where(mask, jnp.take_along_axis(pre, jnp.asarray(idx), axis=1), 0.0)
        acts = jnp.zeros((B, S)).at[rows, jnp.asarray(idx)].add(jax.nn.relu(sel))
        return jnp.sum((acts @ p["w_dec"] - target) ** 2)

    np.testing.assert_allclose(sparse_loss(p), dense_loss(p), rtol=1e-5)
    gs, gd = jax.grad(sparse_loss)(p), jax.grad(dense_loss)(p)
    for name in p:
        np.testing.assert_allclose(gs[name], gd[name], rtol=1e-4, atol=1e-4, err_msg=name)


def _old_auxk(params, x_bd, x_hat_bd, dead_s, cfg, coef):
    """The AuxK the trainer used before: a top-k_aux over all latents (dead ones unmasked), dense."""
    pre = (x_bd - params["b_dec_d"]) @ params["w_enc_sd"].T + params["b_enc_s"]
    masked = jnp.where(dead_s[None, :], jax.lax.stop_gradient(pre), -jnp.inf)
    _, idx = jax.lax.top_k(masked, cfg.k_aux)
    valid = dead_s[idx]
    acts = jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None], idx].set(
        jnp.where(valid, jnp.take_along_axis(pre, idx, axis=1), 0.0))
    recons = acts @ params["w_dec_sd"]
    resid = jax.lax.stop_gradient(x_bd - x_hat_bd)
    scale = jnp.minimum(dead_s.sum() / max(cfg.d_in // 2, 1), 1.0)
    return coef * scale * jnp.mean(jnp.sum((recons - resid) ** 2, -1))


@pytest.mark.parametrize("n_dead, buckets", [(3, (512, 2048)), (9, (512, 2048)), (30, (512, 2048)),
                                             (9, (8, 16)), (14, (8, 16))])
def test_auxk_over_dead_equals_old_auxk_value_and_gradient(n_dead, buckets, monkeypatch):
    """Few dead (< k_aux: no top-k), more than k_aux, every latent dead; and small candidate buckets
    (8, 16) that hold the dead latents in the small or only in the large bucket."""
    monkeypatch.setattr(topk_module, "AUXK_CANDIDATES", buckets)  # read where auxk_loss lives
    d, s, b = 12, 32, 24  # k_aux = 6
    cfg = SAEConfig("topk", d, s, k=3, aux_coefficient=0.7)
    r = np.random.default_rng(n_dead)
    p = {"w_enc_sd": jnp.asarray(r.standard_normal((s, d)) * 0.5, jnp.float32),
         "b_enc_s": jnp.asarray(r.standard_normal(s) * 0.1, jnp.float32),
         "w_dec_sd": jnp.asarray(r.standard_normal((s, d)) * 0.5, jnp.float32),
         "b_dec_d": jnp.asarray(r.standard_normal(d) * 0.1, jnp.float32)}
    x = jnp.asarray(r.standard_normal((b, d)), jnp.float32)
    x_hat = x * 0.3
    dead = jnp.zeros(s, bool).at[jnp.asarray(r.permutation(s)[:n_dead])].set(True)

    def new(p):
        pre = jax.lax.stop_gradient((x - p["b_dec_d"]) @ p["w_enc_sd"].T + p["b_enc_s"])
        return A.auxk_loss(p, x, x_hat, pre, dead, cfg, cfg.hparams())

    old = lambda p: _old_auxk(p, x, x_hat, dead, cfg, 0.7)  # noqa: E731
    np.testing.assert_allclose(jax.jit(new)(p), old(p), rtol=1e-5)
    g_new, g_old = jax.jit(jax.grad(new))(p), jax.grad(old)(p)
    for name in p:
        np.testing.assert_allclose(g_new[name], g_old[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_kth_largest_is_exact():
    r = np.random.default_rng(5)
    a = np.maximum(r.standard_normal((50, 7)), 0).astype(np.float32)
    b = np.maximum(r.standard_normal((3, 20)), 0).astype(np.float32)
    b[0, :4] = a.max()  # ties at the top
    both = np.concatenate([a.ravel(), b.ravel()])
    for n in (1, 5, 37, 100, both.size):
        want = np.sort(both)[::-1][n - 1]
        assert float(A.kth_largest([jnp.asarray(a), jnp.asarray(b)], jnp.asarray(n))) == want, n
    neg = np.where(a > 0, a, -1.0)  # negative entries never count
    n = int((a > 0).sum())
    assert float(A.kth_largest([jnp.asarray(neg)], jnp.asarray(n))) == np.sort(a[a > 0])[0]


@pytest.mark.parametrize("width, c", [(100, 7), (896, 128), (4100, 300)])  # 4 words, 28 (compare-sum), 129 (search)
def test_compact_lists_the_first_set_positions_of_each_row(width, c):
    """compact against NumPy's nonzero: ascending positions, counts, rows cut at c, empty and full rows."""
    r = np.random.default_rng(width)
    mask = r.random((23, width)) < r.uniform(0.0, 3.0 * c / width, (23, 1))
    mask[0], mask[1], mask[2] = False, True, False
    mask[2, [0, width - 1]] = True  # the first and last position
    pos, count = jax.jit(sparse.compact, static_argnums=1)(jnp.asarray(mask), c)
    pos, count = np.asarray(pos), np.asarray(count)
    assert ((0 <= pos) & (pos < width)).all()
    for row in range(mask.shape[0]):
        want = np.flatnonzero(mask[row])
        assert count[row] == want.size, row
        n = min(c, want.size)
        np.testing.assert_array_equal(pos[row, :n], want[:n], err_msg=str(row))
    assert count[1] == width and count[0] == 0 and list(pos[2, :2]) == [0, width - 1]


def test_kth_largest_from_a_lower_bound_and_with_slack():
    """`lower` (a value <= the answer) gives the same exact answer, a wrong `lower` is ignored, and with
    slack the result is a lower bound within 2**slack_bits of the answer's bit pattern."""
    r = np.random.default_rng(6)
    a = np.maximum(r.standard_normal((64, 50)), 0).astype(np.float32)
    bits = lambda v: np.asarray(v, np.float32).view(np.int32)  # noqa: E731
    for n in (1, 40, 700, int((a > 0).sum())):
        want = np.sort(a.ravel())[::-1][n - 1]
        for lower in (0.0, want * 0.5, want, want * 2.0):  # the last is above the answer: ignored
            got = A.kth_largest([jnp.asarray(a)], jnp.asarray(n), lower=jnp.asarray(lower, jnp.float32))
            assert float(got) == want, (n, lower)
        bound = float(A.kth_largest([jnp.asarray(a)], jnp.asarray(n), slack_bits=16))
        assert bound <= want and bits(want) - bits(bound) < 1 << 16, n
        assert (a >= bound).sum() >= n


@pytest.mark.parametrize("s, k", [(512, 2), (96, 4), (1000, 3)])  # blocks of 16, of 3, a padded last block
def test_batchtopk_select_keeps_the_dense_set(s, k, monkeypatch):
    """The sparse selection's kept (token, latent) pairs, gathered from its tiers, are exactly the dense
    definition's, with heavy tokens in every tier; ids within the kept lengths are distinct."""
    monkeypatch.setattr(batchtopk_module, "BATCHTOPK_DENSE_UP_TO", 0)
    b = 256
    r = np.random.default_rng(s)
    pre = r.standard_normal((b, s)).astype(np.float32) * np.exp(0.3 * r.standard_normal((b, 1))).astype(np.float32)
    pre[[3, 100]] *= 20.0  # heavy tokens: each keeps about all its positive entries
    pre = jnp.asarray(pre)
    sel = jax.jit(lambda p: batchtopk_module.batchtopk_select(p, k, jnp.asarray(k)))(pre)
    want = np.asarray(A.batch_topk(pre, k, jnp.asarray(k))) > 0
    got = np.zeros((b, s), bool)
    for tier in sel["tiers"]:
        rows = np.arange(b) if tier["rows"] is None else np.asarray(tier["rows"])
        for row, ids, n in zip(rows, np.asarray(tier["idx"]), np.asarray(tier["lengths"])):
            assert len(set(ids[:n])) == n
            got[row, ids[:n]] = True
    got[np.asarray(sel["rows3"])] |= np.asarray(sel["mask3"])
    assert float(sel["capped_fraction"]) == 0.0
    assert want.sum() == k * b and (want.sum(1) > 8 * k).any()  # some token keeps more than tier 2 holds
    np.testing.assert_array_equal(got, want)


def _bt_params(seed, d, s):
    r = np.random.default_rng(seed)
    return {"w_enc_sd": jnp.asarray(r.standard_normal((s, d)) * 0.5, jnp.float32),
            "b_enc_s": jnp.asarray(r.standard_normal(s) * 0.1, jnp.float32),
            "w_dec_sd": jnp.asarray(r.standard_normal((s, d)) * 0.5, jnp.float32),
            "b_dec_d": jnp.asarray(r.standard_normal(d) * 0.1, jnp.float32)}


@pytest.mark.parametrize("heavy_rows", [False, True])
def test_sparse_batchtopk_equals_dense_definition(heavy_rows, monkeypatch):
    """Loss, metrics, firing counts, threshold update and gradient equal the dense BatchTopK
    (one top-k over the flattened batch); `heavy_rows` plants tokens that keep far more than the
    per-token candidates (they go through the dense heavy path)."""
    monkeypatch.setattr(batchtopk_module, "BATCHTOPK_DENSE_UP_TO", 0)  # the tiers, not the small-batch dense path
    d, s, b, k = 12, 96, 128, 4  # tiers: 8 candidates per token; 16 tokens offer 32; 2 tokens whole rows
    cfg = SAEConfig("batchtopk", d, s, k=k, aux_coefficient=0.5)
    p = _bt_params(7, d, s)
    r = np.random.default_rng(8)
    x = r.standard_normal((b, d)).astype(np.float32)
    if heavy_rows:
        x[[5, 77]] *= 6.0
    x = jnp.asarray(x)
    dead = jnp.zeros(s, bool).at[jnp.arange(0, s, 5)].set(True)
    buffers = {"threshold": jnp.asarray(0.2, jnp.float32)}

    def dense(p):
        pre = (x - p["b_dec_d"]) @ p["w_enc_sd"].T + p["b_enc_s"]
        acts = A.batch_topk(pre, cfg.k, cfg.hparams()["k"])
        xh = acts @ p["w_dec_sd"] + p["b_dec_d"]
        mse = jnp.mean(jnp.sum((xh - x) ** 2, -1))
        return mse + _old_auxk(p, x, xh, dead, cfg, 0.5), (acts, xh)

    arch = get_architecture("batchtopk")
    loss = jax.jit(lambda p: arch.loss(p, buffers, x, cfg, cfg.hparams(), dead)[0])
    out = jax.jit(lambda p: arch.loss(p, buffers, x, cfg, cfg.hparams(), dead)[1])(p)
    (ref_loss, (acts, xh)) = dense(p)
    if heavy_rows:
        assert (acts[5] > 0).sum() > 2 * k and (acts[77] > 0).sum() > 2 * k
    assert float(out.metrics["batchtopk_capped_fraction"]) == 0.0
    np.testing.assert_allclose(loss(p), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["l0"], (acts > 0).sum() / b, rtol=1e-6)
    np.testing.assert_array_equal(out.fired_s, (acts > 0).sum(0))
    np.testing.assert_allclose(out.buffers["threshold"], 0.99 * 0.2 + 0.01 * acts[acts > 0].min(), rtol=1e-6)
    g_sparse = jax.jit(jax.grad(lambda p: arch.loss(p, buffers, x, cfg, cfg.hparams(), dead)[0]))(p)
    g_dense = jax.grad(lambda p: dense(p)[0])(p)
    for name in p:
        np.testing.assert_allclose(g_sparse[name], g_dense[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_batchtopk_reports_capped_tokens(monkeypatch):
    """More heavy tokens than the tiers hold: the extra ones are capped at their candidates and
    the metric says so (the rest of the selection still keeps the k*B largest of what it saw)."""
    monkeypatch.setattr(batchtopk_module, "BATCHTOPK_DENSE_UP_TO", 0)
    d, s, b, k = 12, 96, 64, 2  # tiers: 4 candidates per token; 8 tokens offer 16; 1 token its whole row
    cfg = SAEConfig("batchtopk", d, s, k=k)
    p = _bt_params(9, d, s)
    x = np.random.default_rng(10).standard_normal((b, d)).astype(np.float32)
    x[:6] *= 8.0
    out = get_architecture("batchtopk").loss(p, {"threshold": jnp.zeros(())}, jnp.asarray(x), cfg, cfg.hparams(),
                                            None)[1]
    assert float(out.metrics["batchtopk_capped_fraction"]) > 0


@pytest.mark.parametrize("shape, k", [((40, 2048), 8), ((3, 5, 1024), 4), ((7, 100), 5)])
def test_two_stage_top_k_equals_lax_top_k(shape, k):
    """Blocked top-k (long rows) and the plain fallback (short or ragged rows) give lax.top_k's values
    and, without ties, its indices."""
    x = jnp.asarray(np.random.default_rng(11).standard_normal(shape), jnp.float32)
    v, i = A.top_k(x, k)
    rv, ri = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(v, rv)
    np.testing.assert_array_equal(i, ri)


def test_batchtopk_sweep_members_under_vmap_equal_separate_losses(monkeypatch):
    """Members with different k vmapped together (the trainer's sweep axis: ragged kernels whose loop
    trip counts differ per member) give each member's own loss and gradient."""
    monkeypatch.setattr(batchtopk_module, "BATCHTOPK_DENSE_UP_TO", 0)
    d, s, b = 12, 96, 128
    members = [SAEConfig("batchtopk", d, s, k=2), SAEConfig("batchtopk", d, s, k=5)]
    static, hps = A.sweep_config(members)
    arch = get_architecture("batchtopk")
    ps = [_bt_params(20 + i, d, s) for i in range(2)]
    x = jnp.asarray(np.random.default_rng(21).standard_normal((b, d)), jnp.float32)
    buf = {"threshold": jnp.zeros(())}

    def loss(p, hp):
        return arch.loss(p, buf, x, static, hp, None)[0]

    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ps)
    vl, vg = jax.jit(jax.vmap(jax.value_and_grad(loss)))(stacked, hps)
    for i in range(2):
        hp_i = jax.tree.map(lambda a: a[i], hps)
        l_i, g_i = jax.jit(jax.value_and_grad(loss))(ps[i], hp_i)
        np.testing.assert_allclose(vl[i], l_i, rtol=1e-5)
        for name in g_i:
            np.testing.assert_allclose(vg[name][i], g_i[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_two_weight_gradients_of_one_selection_share_one_sort():
    """scatter_outer's docstring: the decoder's and the encoder's weight gradients of the same selection,
    jitted together, sort the selection once (XLA's CSE of the identical latent-major layout)."""
    rng = np.random.default_rng(0)
    b, k, d, s = 64, 8, 16, 512
    idx = jnp.asarray(rng.integers(0, s, (b, k)), jnp.int32)
    c1, c2 = (jnp.asarray(rng.normal(size=(b, k)), jnp.float32) for _ in range(2))
    v1, v2 = (jnp.asarray(rng.normal(size=(b, d)), jnp.float32) for _ in range(2))

    def sorts(fn):
        return jax.jit(fn).lower(c1, c2, idx, v1, v2).compile().as_text().count(" sort(")

    one = sorts(lambda c1, c2, i, v1, v2: sparse.scatter_outer(c1, i, v1, s))
    two = sorts(lambda c1, c2, i, v1, v2: (sparse.scatter_outer(c1, i, v1, s), sparse.scatter_outer(c2, i, v2, s)))
    other = sorts(lambda c1, c2, i, v1, v2: (sparse.scatter_outer(c1, i, v1, s),
                                              sparse.scatter_outer(c2, (i + 1) % s, v2, s)))
    assert one >= 1 and two == one and other == 2 * one
