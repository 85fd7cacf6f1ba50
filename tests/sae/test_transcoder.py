"""Transcoders: losses and gradients against NumPy, a planted sparse map between two sites
recovered (step and offline trainer), exports that SAELens loads as jumprelu_transcoder with
equal numbers (both scales folded in), circuit-tracer's layout, and clear config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcstream.sae import (InMemorySource, SAEConfig, TrainConfig, batch_sites, decode, encode,
                           export_circuit_tracer, export_sae, get_architecture, init_train_state, load_sae,
                           make_train_step, member_state, site_specs, transcoder_key, train_offline)
from configs.train_sae import get_config
from tests.sae.test_matryoshka import np_mse, np_nested, np_nested_grads

D_IN, D_OUT, S, B, K = 8, 6, 32, 16, 4
X_SITE, Y_SITE = "blocks.2.hook_resid_mid", "blocks.2.hook_mlp_out"


def _cfg(arch="batchtopk_transcoder", **kw):
    return SAEConfig(arch, D_IN, S, k=K, d_out=D_OUT, apply_b_dec_to_input=False, input_site=X_SITE,
                     target_site=Y_SITE, **kw)


def _params(arch="batchtopk_transcoder", seed=0):
    r = np.random.default_rng(seed)
    w_dec = r.standard_normal((S, D_OUT))
    p = {
        "w_enc_sd": (r.standard_normal((S, D_IN)) * 0.5).astype(np.float32),
        "b_enc_s": (r.standard_normal(S) * 0.1).astype(np.float32),
        "w_dec_sd": (w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)).astype(np.float32),
        "b_dec_d": (r.standard_normal(D_OUT) * 0.1).astype(np.float32),
    }
    if arch == "jumprelu_transcoder":
        p["log_threshold_s"] = np.log(r.uniform(0.05, 0.5, S)).astype(np.float32)
    return p


def _xy(seed=1, n=B):
    r = np.random.default_rng(seed)
    return r.standard_normal((n, D_IN)).astype(np.float32), r.standard_normal((n, D_OUT)).astype(np.float32)


def _loss(arch, cfg, p, x, y, dead=None, buffers=None):
    a = get_architecture(arch)
    return a.loss(jax.tree.map(jnp.asarray, p), buffers if buffers is not None else {"threshold": jnp.float32(0)},
                  jnp.asarray(x), cfg, cfg.hparams(), None if dead is None else jnp.asarray(dead),
                  target_bd=jnp.asarray(y))


def test_batchtopk_transcoder_loss_and_gradients_match_numpy():
    cfg = _cfg(aux_coefficient=0.5)
    p, (x, y) = _params(), _xy()
    dead = np.random.default_rng(3).random(S) < 0.4
    want, acts, partials, _, new_t = np_nested(p, x, y, (S,), K, dead, coef=0.5, apply_b_dec=False)
    loss, out = _loss("batchtopk_transcoder", cfg, p, x, y, dead)
    assert set(out.losses) == {"mse_loss", "auxiliary_reconstruction_loss"}
    for name, v in want.items():
        np.testing.assert_allclose(out.losses[name], v, rtol=1e-5, atol=1e-6, err_msg=name)
    assert want["auxiliary_reconstruction_loss"] > 0  # k_aux = d_out / 2 on y's residual
    np.testing.assert_allclose(loss, sum(want.values()), rtol=1e-5)
    np.testing.assert_allclose(out.buffers["threshold"], new_t, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["fvu"], np.sum((y - partials[-1]) ** 2) / np.sum((y - y.mean(0)) ** 2),
                               rtol=1e-5)
    # gradients without dead latents: hand-derived, b_dec only through the decoder
    grads = jax.grad(lambda q: _loss("batchtopk_transcoder", cfg, q, x, y)[0])(jax.tree.map(jnp.asarray, p))
    g_want = np_nested_grads(p, x, y, (S,), acts, partials, apply_b_dec=False)
    for name, g in g_want.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-4, atol=1e-5, err_msg=name)


def test_jumprelu_transcoder_loss_and_gradients_match_numpy():
    cfg = _cfg("jumprelu_transcoder", l0_coefficient=0.3, jumprelu_bandwidth=0.1)
    p, (x, y) = _params("jumprelu_transcoder"), _xy()
    t = np.exp(p["log_threshold_s"])
    pre = x @ p["w_enc_sd"].T + p["b_enc_s"]
    acts = pre * (pre > t)
    y_hat = acts @ p["w_dec_sd"] + p["b_dec_d"]
    loss, out = _loss("jumprelu_transcoder", cfg, p, x, y, buffers={})
    np.testing.assert_allclose(out.losses["mse_loss"], np_mse(y, y_hat), rtol=1e-5)
    np.testing.assert_allclose(out.losses["l0_loss"], 0.3 * (pre > t).sum(1).mean(), rtol=1e-5)
    grads = jax.grad(lambda q: _loss("jumprelu_transcoder", cfg, q, x, y, buffers={})[0])(
        jax.tree.map(jnp.asarray, p))
    r = 2 * (y_hat - y) / B
    np.testing.assert_allclose(grads["w_dec_sd"], acts.T @ r, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["b_dec_d"], r.sum(0), rtol=1e-4, atol=1e-5)
    d_pre = (r @ p["w_dec_sd"].T) * (pre > t)
    np.testing.assert_allclose(grads["w_enc_sd"], d_pre.T @ x, rtol=1e-4, atol=1e-5)
    # threshold: Gemma Scope's pseudo-gradient of both terms, times dt/dlog t = t
    rect = (np.abs((pre - t) / 0.1) < 0.5).astype(np.float32)
    d_t = (-(t / 0.1) * rect * (r @ p["w_dec_sd"].T)).sum(0) + 0.3 * (-(1 / 0.1) * rect).sum(0) / B
    np.testing.assert_allclose(grads["log_threshold_s"], d_t * t, rtol=1e-4, atol=1e-5)


def _planted(n, seed=0, d_in=24, d_out=16, n_atoms=32, k=3):
    """A sparse linear map between two sites: code z (k active of n_atoms, positive), x = z A, y = z C."""
    r = np.random.default_rng(seed)
    a = r.standard_normal((n_atoms, d_in))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    c = r.standard_normal((n_atoms, d_out))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    z = np.zeros((n, n_atoms))
    for i in range(n):
        z[i, r.choice(n_atoms, k, replace=False)] = r.uniform(0.5, 1.5, k)
    return (z @ a * 3.0).astype(np.float32), (z @ c * 0.2 + 0.1).astype(np.float32), c  # different scales


def _recovered(w_dec, c):
    w = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
    return float(((c @ w.T).max(1) > 0.9).mean())


@pytest.mark.slow  # ~15-25 s on the shared 2-core machine
def test_transcoder_recovers_a_planted_sparse_map():
    steps, bs = 300, 256
    x, y, c = _planted(steps * bs + 512)
    cfg = SAEConfig("batchtopk_transcoder", 24, 96, k=3, d_out=16, apply_b_dec_to_input=False, input_site="a",
                    target_site="b", lr=1e-2, dead_steps=50, b_dec_init="mean")
    specs = {transcoder_key("a", "b"): [cfg]}
    tc = TrainConfig(total_steps=steps, warmup_steps=20, decay_steps=75)
    state = init_train_state(specs, tc, {"a": x[:512], "b": y[:512]})
    buf = state.sites["a-to-b"].buffers
    assert abs(float(buf["scale"][0]) - float(buf["target_scale"][0])) > 1  # the two scales differ
    step = make_train_step(specs, tc)
    for i in range(steps):
        sl = slice(512 + i * bs, 512 + (i + 1) * bs)
        state, m = step(state, {"a": x[sl], "b": y[sl], "unused": x[sl, :3]})  # extra sites are ignored
    found = _recovered(np.array(state.sites["a-to-b"].params["w_dec_sd"][0]), c)
    fvu = float(m["a-to-b"]["fvu"][0])
    print(f"planted map: {found:.2f} of the target atoms recovered, fvu {fvu:.3f}")
    assert found >= 0.9
    assert fvu < 0.1


def _trained_state(arch, seed=0):
    x, y = _xy(seed=seed, n=64)
    x, y = x * 3 + 1, y * 0.2 - 0.5  # scale != 1 and target_scale != 1, and different
    cfg = _cfg(arch, jumprelu_init_threshold=0.05)
    state = init_train_state({"t": [cfg]}, TrainConfig(total_steps=5), {X_SITE: x, Y_SITE: y})
    params, buffers = member_state(state, "t", 0)
    r = np.random.default_rng(2)
    params = {k: (v + 0.05 * r.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
    if arch == "batchtopk_transcoder":
        buffers["threshold"] = np.float32(0.3)
    return cfg, params, buffers, x, y


@pytest.mark.parametrize("arch", ["batchtopk_transcoder", "jumprelu_transcoder"])
def test_transcoder_export_loads_in_saelens_with_equal_numbers(arch, tmp_path):
    torch = pytest.importorskip("torch")
    from sae_lens import SAE, JumpReLUTranscoder

    cfg, params, buffers, x, _ = _trained_state(arch)
    assert abs(float(buffers["scale"]) - float(buffers["target_scale"])) > 0.5
    folder = export_sae(params, cfg, tmp_path / "tc", hook_name=X_SITE, buffers=buffers, model_name="m")
    cfg_json = json.loads((folder / "cfg.json").read_text())
    assert cfg_json["architecture"] == "jumprelu_transcoder"
    assert (cfg_json["d_in"], cfg_json["d_out"], cfg_json["apply_b_dec_to_input"]) == (D_IN, D_OUT, False)
    sae = SAE.load_from_disk(str(folder))
    assert isinstance(sae, JumpReLUTranscoder)
    assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out) == (X_SITE, Y_SITE)
    assert tuple(sae.W_dec.shape) == (S, D_OUT) and tuple(sae.b_dec.shape) == (D_OUT,)
    sae.eval()
    ours = np.array(encode(params, cfg, x, buffers))
    theirs = sae.encode(torch.from_numpy(x)).detach().numpy()
    assert (ours > 0).sum() > 0
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(theirs > 0, ours > 0)
    ours_y = np.asarray(decode(params, ours, buffers))
    np.testing.assert_allclose(sae.decode(torch.from_numpy(ours)).detach().numpy(), ours_y, rtol=1e-4, atol=1e-5)
    # the raw-space map equals the scaled one: y_hat_raw = (acts @ W_dec + b_dec) / target_scale
    np.testing.assert_allclose(ours_y * buffers["target_scale"], ours @ params["w_dec_sd"] + params["b_dec_d"],
                               rtol=1e-4, atol=1e-5)
    # and back into arcstream
    p2, c2, b2, _ = load_sae(folder)
    assert (c2.architecture, c2.d_out, c2.input_site, c2.target_site) == ("jumprelu_transcoder", D_OUT, X_SITE, Y_SITE)
    np.testing.assert_allclose(np.asarray(encode(p2, c2, x, b2)), theirs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(decode(p2, theirs, b2)), ours_y, rtol=1e-4, atol=1e-5)


def _square_exports(tmp_path, layers=(0, 1)):
    """Transcoders with d_in == d_out (circuit-tracer's per-layer shape), one per layer."""
    folders = []
    for layer in layers:
        cfg = SAEConfig("batchtopk_transcoder", D_IN, S, k=K, apply_b_dec_to_input=False,
                        input_site=f"blocks.{layer}.hook_resid_mid", target_site=f"blocks.{layer}.hook_mlp_out")
        x, _ = _xy(seed=layer, n=64)
        state = init_train_state({"t": [cfg]}, TrainConfig(total_steps=5),
                                 {cfg.input_site: x * 2, cfg.target_site: np.tanh(x) * 0.5 + 0.1})
        params, buffers = member_state(state, "t", 0)
        buffers["threshold"] = np.float32(0.2)
        folders.append(export_sae(params, cfg, tmp_path / f"l{layer}", hook_name=cfg.input_site, buffers=buffers,
                                  model_name="tiny"))
    return folders


def test_circuit_tracer_export_layout_and_errors(tmp_path):
    from safetensors.numpy import load_file

    folders = _square_exports(tmp_path)
    out = export_circuit_tracer(folders, tmp_path / "ct")
    text = (out / "config.yaml").read_text()
    fields = dict(line.split(": ", 1) for line in text.splitlines())
    assert {k: json.loads(v) for k, v in fields.items()} == {
        "model_kind": "transcoder_set", "model_name": "tiny", "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out"}
    for layer, folder in enumerate(folders):
        ct = load_file(str(out / f"layer_{layer}.safetensors"))
        ours = load_file(str(folder / "sae_weights.safetensors"))
        assert set(ct) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold"}
        np.testing.assert_array_equal(ct["W_enc"], ours["W_enc"].T)  # [d_sae, d_model] (F.linear)
        np.testing.assert_array_equal(ct["activation_function.threshold"], ours["threshold"])
    with pytest.raises(ValueError, match=r"leave out \[1\]"):
        export_circuit_tracer([folders[0], *_square_exports(tmp_path / "b", layers=(2,))], tmp_path / "x")
    cfg, params, buffers, _, _ = _trained_state("batchtopk_transcoder")
    wide = export_sae(params, cfg, tmp_path / "wide", hook_name=X_SITE, buffers=buffers)
    with pytest.raises(ValueError, match="d_in=8 to d_out=6"):
        export_circuit_tracer([wide], tmp_path / "y")


def test_circuit_tracer_loads_the_export(tmp_path):
    """Run when circuit-tracer is importable (it pins transformers < 5, so it is not a dependency)."""
    torch = pytest.importorskip("torch")
    slt = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")
    folders = _square_exports(tmp_path)
    out = export_circuit_tracer(folders, tmp_path / "ct")
    fields = {k: json.loads(v) for k, v in (ln.split(": ", 1) for ln in (out / "config.yaml").read_text().splitlines())}
    tset = slt.load_transcoder_set({i: str(out / f"layer_{i}.safetensors") for i in range(2)}, "scan",
                                   fields["feature_input_hook"], fields["feature_output_hook"],
                                   device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
    x = np.random.default_rng(5).standard_normal((16, D_IN)).astype(np.float32)
    for i, folder in enumerate(folders):
        params, cfg, buffers, _ = load_sae(folder)
        acts = np.asarray(encode(params, cfg, x, buffers))
        theirs = tset[i].encode(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(theirs, acts, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tset[i].decode(torch.from_numpy(acts)).detach().numpy(),
                                   np.asarray(decode(params, acts, buffers)), rtol=1e-4, atol=1e-5)


def test_transcoder_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="apply_b_dec_to_input=False"):
        SAEConfig("batchtopk_transcoder", D_IN, S, k=K, d_out=D_OUT)
    with pytest.raises(ValueError, match="is an autoencoder"):
        SAEConfig("batchtopk", D_IN, S, k=K, target_site=Y_SITE)
    with pytest.raises(ValueError, match="is an autoencoder"):
        SAEConfig("topk", D_IN, S, k=K, d_out=D_OUT)
    bare = SAEConfig("batchtopk_transcoder", D_IN, S, k=K, d_out=D_OUT, apply_b_dec_to_input=False)
    with pytest.raises(ValueError, match="set both"):
        make_train_step({"t": [bare]}, TrainConfig(total_steps=2))
    c = get_config().sae
    c.architecture, c.k = "batchtopk_transcoder", 4
    widths = {X_SITE: 8, Y_SITE: 6, "blocks.0.hook_resid_post": 8}
    with pytest.raises(ValueError, match="sae.input_site=''.*among"):
        site_specs(c, widths)
    c.input_site, c.target_site = X_SITE, "blocks.9.hook_mlp_out"
    with pytest.raises(ValueError, match="sae.target_site='blocks.9.hook_mlp_out'"):
        site_specs(c, widths)
    c.target_site = Y_SITE
    specs = site_specs(c, widths)
    (key, (cfg,)), = specs.items()
    assert key == transcoder_key(X_SITE, Y_SITE) and (cfg.d_in, cfg.d_out, cfg.d_sae) == (8, 6, 128)
    assert batch_sites(specs) == sorted([X_SITE, Y_SITE])
    c.architecture = "topk"
    with pytest.raises(ValueError, match="is an autoencoder"):
        site_specs(c, widths)
    # the step names a missing target site and a row mismatch
    tc = TrainConfig(total_steps=2)
    x, y = _xy()
    state = init_train_state(specs, tc, {X_SITE: x, Y_SITE: y})
    step = make_train_step(specs, tc)
    with pytest.raises(ValueError, match="no batch for sites.*hook_mlp_out"):
        step(state, {X_SITE: x})
    with pytest.raises(ValueError, match="rows must be the same tokens"):
        step(state, {X_SITE: x, Y_SITE: y[:8]})
    with pytest.raises(ValueError, match=r"d_out=6"):
        step(state, {X_SITE: x, Y_SITE: x})


def test_offline_trainer_reads_both_sites_of_the_same_tokens(tmp_path):
    """train_offline on a store of three sites: the transcoder reads only its two (rows aligned by the
    data pipeline's one permutation) and its export reconstructs the target from the input."""
    torch = pytest.importorskip("torch")
    from sae_lens import SAE

    x, y, c = _planted(8192, seed=1)
    src = InMemorySource({"blocks.0.hook_resid_mid": x, "blocks.0.hook_mlp_out": y,
                          "blocks.0.hook_resid_post": np.zeros((8192, 4), np.float32)})
    cfg = get_config()
    cfg.run_dir = str(tmp_path / "run")
    cfg.sae.architecture, cfg.sae.k, cfg.sae.d_sae = "batchtopk_transcoder", 3, 96
    cfg.sae.input_site, cfg.sae.target_site = "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"
    cfg.sae.batch_size, cfg.sae.chunk_rows, cfg.sae.train_tokens = 256, 16, 256 * 300
    cfg.sae.lr, cfg.sae.dead_steps, cfg.sae.warmup_steps, cfg.sae.b_dec_init = 1e-2, 50, 20, "mean"
    cfg.checkpoint_every, cfg.log_every = 0, 50
    summary = train_offline(cfg, src, log=lambda s: None)
    (folder,) = summary["exports"]
    assert folder.endswith("saes/blocks.0.hook_resid_mid-to-blocks.0.hook_mlp_out")
    sae = SAE.load_from_disk(folder)
    y_hat = sae.decode(sae.encode(torch.from_numpy(x[:2048]))).detach().numpy()
    fvu = float(np.sum((y[:2048] - y_hat) ** 2) / np.sum((y[:2048] - y[:2048].mean(0)) ** 2))
    print(f"offline transcoder: fvu {fvu:.3f} through SAELens's encode/decode")
    assert fvu < 0.2
    assert _recovered(sae.W_dec.detach().numpy(), c) >= 0.8


@pytest.mark.slow  # ~25 s: 8 fake devices on a 2-core machine
def test_transcoder_sharded_step_equals_unsharded(arch="batchtopk_transcoder"):
    """With an autoencoder beside it in the same step, reading the transcoder's input site.

    One transcoder architecture: the sharding rules are by parameter name, the same for both (a second
    compile of this step costs ~35 s of the suite)."""
    from tests.sae.test_matryoshka import assert_sharded_step_equals_unsharded

    r = np.random.default_rng(0)
    x = r.standard_normal((256, 16)).astype(np.float32) * 2 + 0.5
    y = (np.tanh(x[:, :12]) * 3 - 1).astype(np.float32)
    tc_cfg = SAEConfig(arch, 16, 64, k=4, d_out=12, apply_b_dec_to_input=False, input_site=X_SITE, target_site=Y_SITE,
                       dead_steps=1)
    specs = {transcoder_key(X_SITE, Y_SITE): [tc_cfg], X_SITE: [SAEConfig("batchtopk", 16, 64, k=4, dead_steps=1)]}
    assert_sharded_step_equals_unsharded(specs, {X_SITE: x, Y_SITE: y})


@pytest.mark.slow  # ~15-25 s on the shared 2-core machine
def test_transcoder_sweep_member_equals_its_single_run():
    x, y, _ = _planted(256)
    mk = lambda k, lr: SAEConfig("batchtopk_transcoder", 24, 64, k=k, d_out=16, apply_b_dec_to_input=False,  # noqa
                                 input_site="a", target_site="b", lr=lr, dead_steps=1)
    members = [mk(2, 1e-3), mk(5, 3e-4)]
    tc = TrainConfig(total_steps=10, warmup_steps=1, decay_steps=2)
    batch = {"a": x, "b": y}
    init = init_train_state({"t": members}, tc, batch)
    sweep, step_m = init, make_train_step({"t": members}, tc)
    for _ in range(3):
        sweep, m = step_m(sweep, batch)
    np.testing.assert_allclose(m["t"]["l0"], [2, 5], rtol=0.05)
    init = init_train_state({"t": members}, tc, batch)
    single = jax.tree.map(lambda a: a[1:2] if a.ndim else a, init)
    single = type(init)(sites=single.sites, step=init.step)
    step = make_train_step({"t": [members[1]]}, tc)
    for _ in range(3):
        single, _ = step(single, batch)
    for name, a in single.sites["t"].params.items():
        np.testing.assert_allclose(sweep.sites["t"].params[name][1], a[0], rtol=1e-5, atol=1e-6, err_msg=name)
