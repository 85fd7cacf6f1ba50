"""Matryoshka BatchTopK: loss and gradients against NumPy and against SAELens's own training SAE,
clear config errors, the JumpReLU export in SAELens, and nested prefixes that learn the
frequent (coarse) atoms first."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcstream.sae import SAEConfig, TrainConfig, decode, encode, export_sae, get_architecture, init_train_state
from arcstream.sae import make_train_step, member_state, site_specs
from configs.train_sae import get_config

D, S, B, K = 8, 32, 16, 4
WIDTHS = (4, 12, 32)


def _params(seed=0, d_out=D):
    r = np.random.default_rng(seed)
    w_dec = r.standard_normal((S, d_out)).astype(np.float32)
    return {
        "w_enc_sd": r.standard_normal((S, D)).astype(np.float32) * 0.5,
        "b_enc_s": r.standard_normal(S).astype(np.float32) * 0.1,
        "w_dec_sd": (w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)).astype(np.float32),
        "b_dec_d": r.standard_normal(d_out).astype(np.float32) * 0.1,
    }


def _x(seed=1, d=D):
    return np.random.default_rng(seed).standard_normal((B, d)).astype(np.float32)


def _dead(seed=3):
    dead = np.random.default_rng(seed).random(S) < 0.4
    dead[[0, 5, 20]] = True  # every level has dead latents
    return dead


# ---------------------------------------------------------------- NumPy reference


def np_batchtopk(pre, k):
    acts = np.maximum(pre, 0)
    kth = np.sort(acts.ravel())[::-1][k * pre.shape[0] - 1]
    return np.where((acts >= kth) & (acts > 0), acts, 0.0)


def np_mse(a, b):
    return np.mean(np.sum((a - b) ** 2, -1))


def np_level_aux(p, pre, resid, dead, lo, hi, k_aux):
    dl = dead[lo:hi]
    nd = int(dl.sum())
    if nd == 0:
        return 0.0
    masked = np.where(dl[None], pre[:, lo:hi], -np.inf)
    acts = np.zeros_like(pre[:, lo:hi])
    for b in range(pre.shape[0]):
        idx = np.argsort(-masked[b])[:min(k_aux, nd)]
        acts[b, idx] = pre[b, lo + idx]  # raw pre-activations, no ReLU (SAELens)
    return min(nd / k_aux, 1.0) * np_mse(resid, acts @ p["w_dec_sd"][lo:hi])


def np_nested(p, x, y, widths, k, dead=None, coef=0.5, per_level=False, apply_b_dec=True, threshold=0.0, lr=0.01):
    """SAELens's Matryoshka BatchTopK loss terms (widths=(d_sae,) and y != x: the BatchTopK transcoder)."""
    xc = x - p["b_dec_d"] if apply_b_dec else x
    pre = xc @ p["w_enc_sd"].T + p["b_enc_s"]
    acts = np_batchtopk(pre, k)
    partials, prev, recon = [], 0, p["b_dec_d"][None, :] + 0 * y
    for w in widths:
        recon = recon + acts[:, prev:w] @ p["w_dec_sd"][prev:w]
        partials.append(recon)
        prev = w
    losses = {"mse_loss": np_mse(y, partials[-1])}
    for w, part in zip(widths[:-1], partials[:-1]):
        losses[f"inner_mse_loss_{w}"] = np_mse(y, part)
    k_aux = y.shape[1] // 2
    aux = 0.0
    if dead is not None:
        if per_level:
            lo = 0
            for w, part in zip(widths, partials):
                aux += np_level_aux(p, pre, y - part, dead, lo, w, k_aux)
                lo = w
        else:
            aux = np_level_aux(p, pre, y - partials[-1], dead, 0, widths[-1], k_aux)
    losses["auxiliary_reconstruction_loss"] = coef * aux
    new_t = (1 - lr) * threshold + lr * acts[acts > 0].min()
    return losses, acts, partials, pre, new_t


def np_nested_grads(p, x, y, widths, acts, partials, apply_b_dec=True):
    """Hand-derived gradients of sum_j mse(y, x_hat_j) for a fixed BatchTopK selection."""
    n = x.shape[0]
    r = [2 * (part - y) / n for part in partials]  # d loss / d x_hat_j
    w_dec = p["w_dec_sd"]
    # R[b, s] = sum of r_j over the levels j whose prefix contains latent s
    r_sum = np.zeros((n, S, y.shape[1]))
    prev = 0
    for w, rj in zip(widths, r):
        r_sum[:, :w] += rj[:, None, :]
        prev = w
    g = {"w_dec_sd": np.einsum("bs,bsd->sd", acts, r_sum), "b_dec_d": sum(rj.sum(0) for rj in r)}
    d_acts = np.einsum("bsd,sd->bs", r_sum, w_dec)
    d_pre = d_acts * (acts > 0)
    xc = x - p["b_dec_d"] if apply_b_dec else x
    g["w_enc_sd"] = d_pre.T @ xc
    g["b_enc_s"] = d_pre.sum(0)
    if apply_b_dec:
        g["b_dec_d"] = g["b_dec_d"] - d_pre.sum(0) @ p["w_enc_sd"]
    return g


def _loss(cfg, p, x, dead=None, threshold=0.0):
    arch = get_architecture(cfg.architecture)
    fn = jax.jit(arch.loss, static_argnums=(3,))
    return fn(jax.tree.map(jnp.asarray, p), {"threshold": jnp.float32(threshold)}, jnp.asarray(x), cfg,
              cfg.hparams(), None if dead is None else jnp.asarray(dead))


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("per_level", [False, True])
def test_matryoshka_loss_terms_match_numpy(per_level):
    cfg = SAEConfig("matryoshka_batchtopk", D, S, k=K, matryoshka_widths=WIDTHS, aux_coefficient=0.5,
                    use_matryoshka_aux_loss=per_level)
    p, x, dead = _params(), _x(), _dead()
    want, acts, _, _, new_t = np_nested(p, x, x, WIDTHS, K, dead, coef=0.5, per_level=per_level, threshold=0.2)
    loss, out = _loss(cfg, p, x, dead, threshold=0.2)
    assert set(out.losses) == set(want) == {"mse_loss", "inner_mse_loss_4", "inner_mse_loss_12",
                                            "auxiliary_reconstruction_loss"}
    for name, v in want.items():
        np.testing.assert_allclose(out.losses[name], v, rtol=1e-5, atol=1e-6, err_msg=name)
    assert want["auxiliary_reconstruction_loss"] > 0
    np.testing.assert_allclose(loss, sum(want.values()), rtol=1e-5)
    np.testing.assert_allclose(out.buffers["threshold"], new_t, rtol=1e-5)
    np.testing.assert_array_equal(out.fired_s, (acts > 0).sum(0))
    np.testing.assert_allclose(out.metrics["l0"], (acts > 0).sum(1).mean(), rtol=1e-6)
    # inference: JumpReLU with the global threshold
    acts_inf = get_architecture("matryoshka_batchtopk").encode(p, {"threshold": jnp.float32(0.3)}, x, cfg,
                                                              cfg.hparams())
    pre = (x - p["b_dec_d"]) @ p["w_enc_sd"].T + p["b_enc_s"]
    np.testing.assert_allclose(acts_inf, np.where(pre > 0.3, pre, 0.0), rtol=1e-5, atol=1e-6)


def test_matryoshka_gradients_match_numpy():
    """No dead latent (AuxK off): the gradient of the summed nested MSEs, derived by hand."""
    cfg = SAEConfig("matryoshka_batchtopk", D, S, k=K, matryoshka_widths=WIDTHS)
    p, x = _params(seed=4), _x(seed=5)
    _, acts, partials, _, _ = np_nested(p, x, x, WIDTHS, K)
    want = np_nested_grads(p, x, x, WIDTHS, acts, partials)
    arch = get_architecture("matryoshka_batchtopk")
    grads = jax.grad(lambda q: arch.loss(q, {"threshold": jnp.float32(0)}, jnp.asarray(x), cfg, cfg.hparams(),
                                         None)[0])(jax.tree.map(jnp.asarray, p))
    for name, g in want.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("per_level", [False, True])
def test_matryoshka_equals_saelens_training_sae(per_level):
    """Loss terms, gradients (AuxK included) and the threshold update against SAELens 6's
    MatryoshkaBatchTopKTrainingSAE on the same weights (unit-norm decoder rows, so its
    rescale_acts_by_decoder_norm would change nothing; it is switched off)."""
    torch = pytest.importorskip("torch")
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput

    p, x, dead = _params(seed=6), _x(seed=7), _dead(seed=8)
    tcfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D, d_sae=S, k=K, matryoshka_widths=list(WIDTHS), aux_loss_coefficient=0.5,
        use_matryoshka_aux_loss=per_level, rescale_acts_by_decoder_norm=False, apply_b_dec_to_input=True,
        dtype="float32", device="cpu")
    sae = MatryoshkaBatchTopKTrainingSAE(tcfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(p["w_enc_sd"].T.copy()))
        sae.b_enc.copy_(torch.from_numpy(p["b_enc_s"]))
        sae.W_dec.copy_(torch.from_numpy(p["w_dec_sd"]))
        sae.b_dec.copy_(torch.from_numpy(p["b_dec_d"]))
    step_in = TrainStepInput(sae_in=torch.from_numpy(x), coefficients={}, dead_neuron_mask=torch.from_numpy(dead),
                             n_training_steps=0, is_logging_step=False)
    theirs = sae.training_forward_pass(step_in)
    theirs.loss.backward()

    cfg = SAEConfig("matryoshka_batchtopk", D, S, k=K, matryoshka_widths=WIDTHS, aux_coefficient=0.5,
                    use_matryoshka_aux_loss=per_level)
    arch = get_architecture("matryoshka_batchtopk")
    fn = lambda q: arch.loss(q, {"threshold": jnp.float32(0)}, jnp.asarray(x), cfg, cfg.hparams(),  # noqa: E731
                             jnp.asarray(dead))
    (loss, out), grads = jax.value_and_grad(fn, has_aux=True)(jax.tree.map(jnp.asarray, p))
    assert set(out.losses) == set(theirs.losses)
    for name, v in theirs.losses.items():
        np.testing.assert_allclose(out.losses[name], float(v.detach()), rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(loss, float(theirs.loss.detach()), rtol=1e-5)
    np.testing.assert_allclose(out.buffers["threshold"], float(sae.topk_threshold), rtol=1e-5)
    for ours, name, t in (("w_enc_sd", "W_enc", True), ("b_enc_s", "b_enc", False), ("w_dec_sd", "W_dec", False),
                          ("b_dec_d", "b_dec", False)):
        g = getattr(sae, name).grad.numpy()
        np.testing.assert_allclose(grads[ours], g.T if t else g, rtol=1e-4, atol=1e-5, err_msg=name)


def test_matryoshka_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="strictly increasing"):
        SAEConfig("matryoshka_batchtopk", D, S, k=K, matryoshka_widths=(8, 8, 32))
    with pytest.raises(ValueError, match="strictly increasing"):
        SAEConfig("matryoshka_batchtopk", D, S, k=K, matryoshka_widths=(16, 8, 32))
    with pytest.raises(ValueError, match="end at d_sae=32"):
        SAEConfig("matryoshka_batchtopk", D, S, k=K, matryoshka_widths=(8, 16))
    with pytest.raises(ValueError, match="needs SAEConfig.matryoshka_widths"):
        SAEConfig("matryoshka_batchtopk", D, S, k=K)
    with pytest.raises(ValueError, match="only matryoshka_batchtopk"):
        SAEConfig("batchtopk", D, S, k=K, matryoshka_widths=(8, 32))
    with pytest.raises(ValueError, match="k=40"):
        SAEConfig("matryoshka_batchtopk", D, S, k=40, matryoshka_widths=(8, 32))
    cfg = SAEConfig("matryoshka_batchtopk", D, S, k=K, matryoshka_widths=[4, 32])  # a list is stored as a tuple
    assert cfg.matryoshka_widths == (4, 32) and hash(cfg)
    # the sae.* keys: parsed from a string, and the error names the site
    c = get_config().sae
    c.architecture, c.d_sae, c.k = "matryoshka_batchtopk", 64, 4
    c.matryoshka_widths = "16, 64"
    specs = site_specs(c, {"blocks.0.hook_resid_post": 16})
    assert specs["blocks.0.hook_resid_post"][0].matryoshka_widths == (16, 64)
    c.matryoshka_widths = "16,32"
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post.*end at d_sae=64"):
        site_specs(c, {"blocks.0.hook_resid_post": 16})
    c.matryoshka_widths = "16,x"
    with pytest.raises(ValueError, match="comma-separated integers"):
        site_specs(c, {"blocks.0.hook_resid_post": 16})


def test_matryoshka_export_loads_in_saelens_with_equal_numbers(tmp_path):
    torch = pytest.importorskip("torch")
    from sae_lens import SAE

    x = np.random.default_rng(0).standard_normal((64, D)).astype(np.float32) * 3 + 1
    cfg = SAEConfig("matryoshka_batchtopk", D, S, k=K, matryoshka_widths=WIDTHS)
    state = init_train_state({"s": [cfg]}, TrainConfig(total_steps=5), {"s": x})
    params, buffers = member_state(state, "s", 0)
    r = np.random.default_rng(2)
    params = {k: (v + 0.05 * r.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
    buffers["threshold"] = np.float32(0.3)
    assert abs(float(buffers["scale"]) - 1) > 0.05
    folder = export_sae(params, cfg, tmp_path / "m", hook_name="blocks.1.hook_resid_post", buffers=buffers)
    cfg_json = json.loads((folder / "cfg.json").read_text())
    assert cfg_json["architecture"] == "jumprelu"  # as SAELens saves Matryoshka BatchTopK
    assert cfg_json["metadata"]["matryoshka_widths"] == list(WIDTHS)
    sae = SAE.load_from_disk(str(folder))
    ours = np.array(encode(params, cfg, x, buffers))
    theirs = sae.encode(torch.from_numpy(x)).detach().numpy()
    assert (ours > 0).sum() > 0
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sae.decode(torch.from_numpy(ours)).detach().numpy(),
                               np.asarray(decode(params, ours, buffers)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # ~15-25 s on the shared 2-core machine
def test_nested_prefixes_learn_the_frequent_coarse_atoms_first():
    """8 coarse atoms fire on 30% of tokens each, 48 fine atoms on 2%. With widths (16, 96) the first
    16 latents must reconstruct on their own, so every coarse atom gets one of them; the fine atoms
    land in the second level. (A plain BatchTopK SAE orders its latents arbitrarily: the chance that
    all 8 coarse atoms sit in a given 16 of 96 latents is below 1e-6.)"""
    r = np.random.default_rng(0)
    d, n_coarse, n_fine, prefix = 32, 8, 48, 16
    atoms = r.standard_normal((n_coarse + n_fine, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    probs = np.r_[np.full(n_coarse, 0.3), np.full(n_fine, 0.02)]

    def sample(n):
        on = r.random((n, probs.size)) < probs
        return ((on * r.uniform(0.5, 1.5, on.shape)) @ atoms).astype(np.float32)

    k = int(round(probs.sum()))  # ~3.4 active atoms per token
    cfg = SAEConfig("matryoshka_batchtopk", d, 96, k=k, matryoshka_widths=(prefix, 96), lr=1e-2,
                    dead_steps=50, b_dec_init="zeros")
    steps = 600
    tc = TrainConfig(total_steps=steps, warmup_steps=20, decay_steps=150)
    state = init_train_state({"s": [cfg]}, tc, {"s": sample(512)})
    step = make_train_step({"s": [cfg]}, tc)
    data = sample(steps * 256).reshape(steps, 256, d)
    for i in range(steps):
        state, m = step(state, {"s": data[i]})
    w = np.array(state.sites["s"].params["w_dec_sd"][0])
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    cos = atoms @ w.T  # [atom, latent]
    coarse_in_prefix = cos[:n_coarse, :prefix].max(1)
    fine_anywhere = cos[n_coarse:].max(1)
    print(f"coarse atoms in the first prefix: {np.round(coarse_in_prefix, 3)}; fine atoms found "
          f"{(fine_anywhere > 0.9).mean():.2f}; fvu {float(m['s']['fvu'][0]):.3f}")
    assert (coarse_in_prefix > 0.95).all()
    assert (cos[:n_coarse].argmax(1) < prefix).all()  # their best latent is in the prefix
    assert (fine_anywhere > 0.9).mean() >= 0.5
    assert float(m["s"]["fvu"][0]) < 0.15


def _run(specs, batches, steps, mesh=None, dead_every=0):
    """`steps` steps; with `dead_every`, every dead_every-th latent starts dead (so AuxK runs from step 1).
    Returns the state and each step's metrics."""
    from arcstream.sae import batch_sharding, state_shardings
    from arcstream.sae.train import SiteState, TrainState

    tc = TrainConfig(total_steps=10, warmup_steps=1, decay_steps=2)
    if mesh is not None:
        batches = {s: jax.device_put(jnp.asarray(b), batch_sharding(mesh)) for s, b in batches.items()}
    state = init_train_state(specs, tc, batches, mesh=mesh)
    if dead_every:
        sites = {k: SiteState(v.params, v.opt_state, {**v.buffers, "steps_since_fired_s":
                                                       v.buffers["steps_since_fired_s"].at[:, ::dead_every].set(10**6)})
                 for k, v in state.sites.items()}
        state = TrainState(sites=sites, step=state.step)
        if mesh is not None:
            state = jax.device_put(state, state_shardings(state, mesh))
    step = make_train_step(specs, tc, mesh=mesh)
    metrics = []
    for _ in range(steps):
        state, m = step(state, batches)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def assert_sharded_step_equals_unsharded(specs, batches):
    """3 steps, half the latents dead at the start (AuxK runs), on a 2x4 ('data', 'model') mesh of fake
    devices equal the unsharded run, and the latents really are laid out over 'model'."""
    from jax.sharding import AxisType

    assert len(jax.devices()) == 8  # tests/conftest.py
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    ref, ref_m = _run(specs, batches, 3, dead_every=2)
    sh, sh_m = _run(specs, batches, 3, mesh=mesh, dead_every=2)
    for key in specs:
        for name in ref.sites[key].params:
            np.testing.assert_allclose(sh.sites[key].params[name], ref.sites[key].params[name], rtol=2e-5,
                                       atol=2e-6, err_msg=f"{key} {name}")
        for r_m, s_m in zip(ref_m, sh_m):
            for name in r_m[key]:
                np.testing.assert_allclose(s_m[key][name], r_m[key][name], rtol=1e-4, atol=1e-6, err_msg=name)
        if "auxiliary_reconstruction_loss" in ref_m[0][key]:  # the dead-latent branch ran, sharded too
            assert ref_m[0][key]["auxiliary_reconstruction_loss"].max() > 0, key
    state = init_train_state(specs, TrainConfig(total_steps=2), batches, mesh=mesh)
    key = next(iter(specs))
    assert tuple(state.sites[key].params["w_dec_sd"].sharding.spec)[:2] == (None, "model")


def test_matryoshka_sharded_step_equals_unsharded():
    cfg = SAEConfig("matryoshka_batchtopk", 16, 64, k=4, matryoshka_widths=(8, 24, 64), dead_steps=1,
                    use_matryoshka_aux_loss=True)
    x = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32) * 2 + 0.5
    assert_sharded_step_equals_unsharded({"blocks.0.hook_resid_post": [cfg]}, {"blocks.0.hook_resid_post": x})


@pytest.mark.slow  # ~15-25 s on the shared 2-core machine
def test_matryoshka_sweep_member_equals_its_single_run():
    """A vmapped sweep over k (and lr): member 1 equals a run of that member alone from the same init."""
    x = np.random.default_rng(1).standard_normal((256, 16)).astype(np.float32)
    members = [SAEConfig("matryoshka_batchtopk", 16, 64, k=2, lr=1e-3, matryoshka_widths=(16, 64), dead_steps=1),
               SAEConfig("matryoshka_batchtopk", 16, 64, k=6, lr=3e-4, matryoshka_widths=(16, 64), dead_steps=1)]
    sweep, sweep_m = _run({"s": members}, {"s": x}, 3)
    np.testing.assert_allclose(sweep_m[-1]["s"]["l0"], [2, 6], rtol=0.05)  # BatchTopK: k per token on average
    tc = TrainConfig(total_steps=10, warmup_steps=1, decay_steps=2)
    init = init_train_state({"s": members}, tc, {"s": x})
    single = jax.tree.map(lambda a: a[1:2] if a.ndim else a, init)
    single = type(init)(sites=single.sites, step=init.step)
    step = make_train_step({"s": [members[1]]}, tc)
    for _ in range(3):
        single, _ = step(single, {"s": x})
    for name, a in single.sites["s"].params.items():
        np.testing.assert_allclose(sweep.sites["s"].params[name][1], a[0], rtol=1e-5, atol=1e-6, err_msg=name)
