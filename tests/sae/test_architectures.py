"""Each architecture's encode, decode and loss against NumPy; the JumpReLU pseudo-gradient
and AuxK against their closed forms; the sparse TopK gradient against dense autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcstream.analysis.stats import EvalAccumulator
from arcstream.sae import SAEConfig, get_architecture
from arcstream.sae.architectures import jumprelu, reconstruction_metrics, step_fn

D, S, B = 8, 32, 16


def _params(arch: str, seed: int = 0):
    r = np.random.default_rng(seed)
    p = {
        "w_enc_sd": r.standard_normal((S, D)).astype(np.float32) * 0.5,
        "b_enc_s": r.standard_normal(S).astype(np.float32) * 0.1,
        "w_dec_sd": r.standard_normal((S, D)).astype(np.float32) * 0.5,
        "b_dec_d": r.standard_normal(D).astype(np.float32) * 0.1,
    }
    if arch == "jumprelu":
        p["log_threshold_s"] = np.log(r.uniform(0.05, 0.5, S)).astype(np.float32)
    return p


def _x(seed: int = 1):
    return np.random.default_rng(seed).standard_normal((B, D)).astype(np.float32)


def _np_pre(p, x):
    return (x - p["b_dec_d"]) @ p["w_enc_sd"].T + p["b_enc_s"]


def _np_mse(x, xh):
    return np.mean(np.sum((xh - x) ** 2, -1))


def _np_topk_acts(pre, k):
    acts = np.zeros_like(pre)
    for b in range(pre.shape[0]):
        idx = np.argsort(-pre[b])[:k]
        acts[b, idx] = np.maximum(pre[b, idx], 0)
    return acts


def _np_auxk(p, x, xh, pre, dead, coef):
    n_dead = dead.sum()
    if n_dead == 0:
        return 0.0
    k_aux = min(D // 2, n_dead)
    acts = np.zeros_like(pre)
    masked = np.where(dead[None], pre, -np.inf)
    for b in range(pre.shape[0]):
        idx = np.argsort(-masked[b])[:k_aux]
        acts[b, idx] = pre[b, idx]  # no ReLU (SAELens)
    recons = acts @ p["w_dec_sd"]
    return coef * min(n_dead / (D // 2), 1.0) * _np_mse(x - xh, recons)


def _run(arch, cfg, p, x, dead=None, buffers=None):
    a = get_architecture(arch)
    jp = jax.tree.map(jnp.asarray, p)
    loss = jax.jit(a.loss, static_argnums=(3,))
    return loss(jp, buffers or {}, jnp.asarray(x), cfg, cfg.hparams(), None if dead is None else jnp.asarray(dead))


def test_standard_encode_decode_loss_match_numpy():
    cfg = SAEConfig("standard", D, S, l1_coefficient=0.7)
    p, x = _params("standard"), _x()
    acts = np.maximum(_np_pre(p, x), 0)
    xh = acts @ p["w_dec_sd"] + p["b_dec_d"]
    l1 = 0.7 * np.mean(np.sum(acts * np.linalg.norm(p["w_dec_sd"], axis=1), -1))
    loss, out = _run("standard", cfg, p, x)
    arch = get_architecture("standard")
    np.testing.assert_allclose(arch.encode(p, {}, x, cfg, cfg.hparams()), acts, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.losses["mse_loss"], _np_mse(x, xh), rtol=1e-5)
    np.testing.assert_allclose(out.losses["l1_loss"], l1, rtol=1e-5)
    np.testing.assert_allclose(loss, _np_mse(x, xh) + l1, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["l0"], (acts > 0).sum(-1).mean(), rtol=1e-6)
    np.testing.assert_array_equal(out.fired_s, (acts > 0).sum(0))
    resid = x - xh
    np.testing.assert_allclose(out.metrics["fvu"], (resid ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rtol=1e-5)


@pytest.mark.parametrize("with_dead", [False, True])
def test_topk_loss_and_auxk_match_numpy(with_dead):
    k = 5
    cfg = SAEConfig("topk", D, S, k=k, aux_coefficient=0.5)
    p, x = _params("topk"), _x()
    pre = _np_pre(p, x)
    acts = _np_topk_acts(pre, k)
    xh = acts @ p["w_dec_sd"] + p["b_dec_d"]
    dead = np.zeros(S, bool)
    if with_dead:
        dead[[1, 4, 9]] = True  # 3 dead < d_in/2 = 4: k_aux = 3, scale 3/4
    aux = _np_auxk(p, x, xh, pre, dead, 0.5)
    loss, out = _run("topk", cfg, p, x, dead if with_dead else None)
    arch = get_architecture("topk")
    np.testing.assert_allclose(arch.encode(p, {}, x, cfg, cfg.hparams()), acts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.losses["mse_loss"], _np_mse(x, xh), rtol=1e-5)
    np.testing.assert_allclose(out.losses["auxiliary_reconstruction_loss"], aux, rtol=1e-5, atol=1e-7)
    assert (aux > 0) == with_dead
    np.testing.assert_allclose(loss, _np_mse(x, xh) + aux, rtol=1e-5)
    np.testing.assert_array_equal(out.fired_s, (acts > 0).sum(0))


def test_auxk_closed_form_many_dead():
    """More dead latents than d_in/2: k_aux = d_in/2 and scale 1; a hand-computed case."""
    cfg = SAEConfig("topk", D, S, k=3, aux_coefficient=1.0)
    p, x = _params("topk", 3), _x(4)
    dead = np.zeros(S, bool)
    dead[::2] = True  # 16 dead > 4
    pre = _np_pre(p, x)
    xh = _np_topk_acts(pre, 3) @ p["w_dec_sd"] + p["b_dec_d"]
    _, out = _run("topk", cfg, p, x, dead)
    # closed form: for each token, the 4 largest dead pre-activations (unrectified) decode the residual
    total = 0.0
    for b in range(B):
        ids = [i for i in np.argsort(-pre[b]) if dead[i]][: D // 2]
        recon = sum(pre[b, i] * p["w_dec_sd"][i] for i in ids)
        total += np.sum((recon - (x[b] - xh[b])) ** 2)
    np.testing.assert_allclose(out.losses["auxiliary_reconstruction_loss"], total / B, rtol=1e-5)


def test_topk_sparse_gradient_equals_dense_autodiff():
    """The sparse kernels' custom VJPs give the gradient of the dense TopK formulation."""
    cfg = SAEConfig("topk", D, S, k=4, aux_coefficient=0.3)
    p, x = jax.tree.map(jnp.asarray, _params("topk")), jnp.asarray(_x())
    dead = jnp.zeros(S, bool).at[jnp.array([2, 5, 7, 11, 13, 17])].set(True)

    def dense_loss(p):
        pre = (x - p["b_dec_d"]) @ p["w_enc_sd"].T + p["b_enc_s"]
        _, idx = jax.lax.top_k(jax.lax.stop_gradient(pre), 4)
        mask = jnp.zeros_like(pre).at[jnp.arange(B)[:, None], idx].set(1.0)
        acts = jax.nn.relu(pre) * mask
        xh = acts @ p["w_dec_sd"] + p["b_dec_d"]
        mse = jnp.mean(jnp.sum((xh - x) ** 2, -1))
        _, aidx = jax.lax.top_k(jnp.where(dead, jax.lax.stop_gradient(pre), -jnp.inf), D // 2)
        amask = jnp.zeros_like(pre).at[jnp.arange(B)[:, None], aidx].set(1.0)
        recon = (pre * amask) @ p["w_dec_sd"]
        aux = 0.3 * jnp.minimum(6 / (D // 2), 1.0) * jnp.mean(
            jnp.sum((recon - jax.lax.stop_gradient(x - xh)) ** 2, -1))
        return mse + aux

    arch = get_architecture("topk")
    g_sparse = jax.jit(jax.grad(lambda p: arch.loss(p, {}, x, cfg, cfg.hparams(), dead)[0]))(p)
    g_dense = jax.jit(jax.grad(dense_loss))(p)
    for name in p:
        np.testing.assert_allclose(g_sparse[name], g_dense[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_batchtopk_train_acts_threshold_update_and_inference():
    k = 3
    cfg = SAEConfig("batchtopk", D, S, k=k, topk_threshold_lr=0.25)
    p, x = _params("batchtopk"), _x()
    relu = np.maximum(_np_pre(p, x), 0)
    kth = np.sort(relu.reshape(-1))[::-1][k * B - 1]
    acts = np.where(relu >= kth, relu, 0)
    xh = acts @ p["w_dec_sd"] + p["b_dec_d"]
    thr0 = np.float32(0.2)
    loss, out = _run("batchtopk", cfg, p, x, buffers={"threshold": jnp.asarray(thr0)})
    np.testing.assert_allclose(out.losses["mse_loss"], _np_mse(x, xh), rtol=1e-5)
    assert (acts > 0).sum() == k * B
    np.testing.assert_allclose(out.buffers["threshold"], 0.75 * thr0 + 0.25 * acts[acts > 0].min(), rtol=1e-6)
    arch = get_architecture("batchtopk")
    inf = arch.encode(p, {"threshold": jnp.asarray(0.3)}, x, cfg, cfg.hparams())
    np.testing.assert_allclose(inf, np.where(_np_pre(p, x) > 0.3, relu, 0), rtol=1e-5, atol=1e-6)


def test_jumprelu_encode_and_loss_match_numpy():
    cfg = SAEConfig("jumprelu", D, S, l0_coefficient=0.01)
    p, x = _params("jumprelu"), _x()
    pre = _np_pre(p, x)
    t = np.exp(p["log_threshold_s"])
    acts = np.where(pre > t, pre, 0)
    xh = acts @ p["w_dec_sd"] + p["b_dec_d"]
    loss, out = _run("jumprelu", cfg, p, x)
    arch = get_architecture("jumprelu")
    np.testing.assert_allclose(arch.encode(p, {}, x, cfg, cfg.hparams()), acts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.losses["l0_loss"], 0.01 * (pre > t).sum(-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(loss, _np_mse(x, xh) + 0.01 * (pre > t).sum(-1).mean(), rtol=1e-5)


def test_jumprelu_pseudo_gradients_match_closed_form():
    r = np.random.default_rng(5)
    z = r.uniform(-0.2, 1.0, (64, 6)).astype(np.float32)
    t = r.uniform(0.1, 0.6, 6).astype(np.float32)
    g = r.standard_normal((64, 6)).astype(np.float32)
    eps = 0.1
    rect = (np.abs((z - t) / eps) < 0.5).astype(np.float32)
    assert rect.sum() > 0  # the kernel window is hit, so the check is not vacuous
    dz, dt = jax.grad(lambda z, t: jnp.sum(jumprelu(z, t, eps) * g), argnums=(0, 1))(z, t)
    np.testing.assert_allclose(dz, (z > t) * g, rtol=1e-6)
    np.testing.assert_allclose(dt, np.sum(-(t / eps) * rect * g, 0), rtol=1e-5, atol=1e-6)
    dz, dt = jax.grad(lambda z, t: jnp.sum(step_fn(z, t, eps) * g), argnums=(0, 1))(z, t)
    np.testing.assert_array_equal(dz, 0)
    np.testing.assert_allclose(dt, np.sum(-(1 / eps) * rect * g, 0), rtol=1e-5, atol=1e-6)


def test_bad_config_errors_name_the_field():
    with pytest.raises(ValueError, match="architecture='gated'"):
        SAEConfig("gated", D, S)
    with pytest.raises(ValueError, match="k=0"):
        SAEConfig("topk", D, S, k=0)
    from arcstream.sae import sweep_config
    with pytest.raises(ValueError, match="d_sae=64"):
        sweep_config([SAEConfig("topk", D, S, k=4), SAEConfig("topk", D, 64, k=4)])


def test_explained_variance_is_one_minus_fvu_so_a_constant_offset_costs():
    """The trainer's explained_variance is SAELens's, 1 - FVU with the batch mean in the total: a
    reconstruction off by a constant vector explains less (the old per-dimension Var(x - x_hat) ignored it),
    and it equals the held-out evaluation's number on the same rows."""
    x = _x()
    x_hat = x * 0.9 + 0.5  # a constant offset on top of a scaled copy
    m = reconstruction_metrics(jnp.asarray(x), jnp.asarray(x_hat), jnp.float32(0))
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    np.testing.assert_allclose(m["fvu"], fvu, rtol=1e-5)
    np.testing.assert_allclose(m["explained_variance"], 1 - fvu, rtol=1e-5)
    assert float(m["explained_variance"]) < 1 - ((x - x_hat).var(0).sum() / x.var(0).sum())  # the offset counts
    acc = EvalAccumulator(D)
    acc.update(x, x_hat, np.zeros((B, S)))
    np.testing.assert_allclose(acc.result()["explained_variance"], m["explained_variance"], rtol=1e-5)
