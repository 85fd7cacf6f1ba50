"""`sae.fit_encoder_scale`: the initial encoder of the TopK family is scaled by the least-squares factor
that best reconstructs the first batch.

The reference is NumPy in float64: the same init (the decoder's transpose), the kept set by the
architecture's rule, the reconstruction r at scale 1 and the closed form c = <y - b_dec, r> / <r, r>.
The trainer's initial encoder must be c times the unfitted one, and c must be the minimum of the
batch's reconstruction error (a grid around it is worse), for TopK and BatchTopK.
"""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from arcstream.sae import SAEConfig, SAEOptions, TrainConfig, init_train_state

D, S, B, K = 32, 256, 128, 8
SITE = "blocks.0.hook_resid_post"


def _batch(seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    atoms = r.standard_normal((64, D))
    x = (r.random((B, 64)) < 0.1) * r.exponential(1.0, (B, 64)) @ atoms + 0.5 * r.standard_normal(D)
    x[[5, 77]] *= 6.0  # heavy tokens: BatchTopK gives them many latents
    return x.astype(np.float32)


def _init(arch: str, fit: bool, x: np.ndarray):
    cfg = SAEConfig(arch, D, S, k=K, b_dec_init="mean", fit_encoder_scale=fit)
    state = init_train_state({SITE: [cfg]}, TrainConfig(total_steps=10), {SITE: jnp.asarray(x)})
    site = state.sites[SITE]
    return ({n: np.asarray(v[0], np.float64) for n, v in site.params.items()}, float(site.buffers["scale"][0]))


def _np_recon(p: dict, xs: np.ndarray, arch: str) -> np.ndarray:
    """The reconstruction less b_dec, float64, with the architecture's kept set."""
    pre = (xs - p["b_dec_d"]) @ p["w_enc_sd"].T + p["b_enc_s"]
    acts = np.maximum(pre, 0.0)
    if arch == "topk":
        kept = np.zeros_like(pre, bool)
        np.put_along_axis(kept, np.argsort(-pre, axis=1)[:, :K], True, axis=1)
    else:
        kept = acts >= np.sort(acts.ravel())[-K * xs.shape[0]]
    return np.where(kept & (acts > 0), acts, 0.0) @ p["w_dec_sd"]


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_initial_encoder_is_scaled_by_the_least_squares_factor(arch):
    x = _batch()
    plain, scale = _init(arch, False, x)
    fitted, scale2 = _init(arch, True, x)
    assert scale == scale2
    for name in ("w_dec_sd", "b_dec_d", "b_enc_s"):
        np.testing.assert_array_equal(plain[name], fitted[name])
    xs = x.astype(np.float64) * scale
    y = xs - plain["b_dec_d"]
    r = _np_recon(plain, xs, arch)
    c = np.sum(y * r) / np.sum(r * r)
    assert 0.02 < c < 0.9, c  # the plain transpose overshoots on this batch: the fit must move it
    ratio = fitted["w_enc_sd"] / plain["w_enc_sd"]
    np.testing.assert_allclose(ratio, c, rtol=1e-4)
    # the fitted encoder's own reconstruction error is the smallest of a grid around it
    err = lambda p: np.sum((y - _np_recon(p, xs, arch)) ** 2)  # noqa: E731
    at_fit = err(fitted)
    for f in (0.8, 0.95, 1.05, 1.25):
        assert at_fit < err({**fitted, "w_enc_sd": fitted["w_enc_sd"] * f}), f
    assert at_fit < 0.9 * err(plain)


def test_threshold_architectures_keep_their_init_and_the_key_is_checked():
    x = _batch(1)
    cfg = lambda fit: SAEConfig("jumprelu", D, S, fit_encoder_scale=fit)  # noqa: E731
    a = init_train_state({SITE: [cfg(True)]}, TrainConfig(total_steps=10), {SITE: jnp.asarray(x)})
    b = init_train_state({SITE: [cfg(False)]}, TrainConfig(total_steps=10), {SITE: jnp.asarray(x)})
    np.testing.assert_array_equal(np.asarray(a.sites[SITE].params["w_enc_sd"]),
                                  np.asarray(b.sites[SITE].params["w_enc_sd"]))
    site = {SITE: D}
    (spec,) = SAEOptions.from_config(ml_collections.ConfigDict({"architecture": "topk"})).site_specs(site)[SITE]
    assert spec.fit_encoder_scale is True
    off = SAEOptions.from_config(ml_collections.ConfigDict({"architecture": "topk", "fit_encoder_scale": False}))
    assert off.site_specs(site)[SITE][0].fit_encoder_scale is False
    with pytest.raises(ValueError, match="fit_encoder_scale"):
        SAEOptions.from_config(ml_collections.ConfigDict({"architecture": "topk", "fit_encoder_scale": "yes"}))


@pytest.mark.parametrize("fit", [True, False])
def test_the_fitted_encoder_steps_at_its_own_scale(fit, tmp_path):
    """Adam's first step moves each parameter by lr * g / (|g| + eps) ~ lr, whatever its scale: an encoder
    shrunk by c must step c * lr (the trainer's `encoder_step`), or it churns 1/c times faster relative to
    itself (on the default run: 31.5% of the latents dead instead of 10.5%). The buffer is not exported."""
    from arcstream.sae import export_sae, load_sae, make_train_step, member_state

    x = _batch()
    lr = 1e-3
    cfg = SAEConfig("topk", D, S, k=K, b_dec_init="mean", fit_encoder_scale=fit, lr=lr)
    tc = TrainConfig(total_steps=10, clip_norm=0.0)
    state = init_train_state({SITE: [cfg]}, tc, {SITE: jnp.asarray(x)})
    plain, _ = _init("topk", False, x)
    before = {n: np.asarray(v[0], np.float64) for n, v in state.sites[SITE].params.items()}
    c = float(np.median(before["w_enc_sd"] / plain["w_enc_sd"]))
    assert (0.02 < c < 0.9) if fit else c == 1.0
    new, _ = make_train_step({SITE: [cfg]}, tc)(state, {SITE: jnp.asarray(_batch(2))})
    for name in ("w_enc_sd", "b_enc_s"):
        step = np.abs(np.asarray(new.sites[SITE].params[name][0], np.float64) - before[name])
        moved = step[step > 0.5 * c * lr]
        assert moved.size > 0.3 * step.size, name  # most entries have a gradient well above Adam's eps
        np.testing.assert_allclose(moved, c * lr, rtol=1e-2, err_msg=name)  # eps: entries with |g| ~ 1e-6
    params, buffers = member_state(new, SITE, 0)
    folder = export_sae(params, cfg, tmp_path / "sae", hook_name=SITE, buffers=buffers)
    loaded, _, loaded_buffers, _ = load_sae(folder)
    assert set(loaded) == {"w_enc_sd", "b_enc_s", "w_dec_sd", "b_dec_d"} and "encoder_step" not in loaded_buffers
