"""`sae.select_dtype`: a bf16 selection matmul for TopK / BatchTopK, with f32 values, loss and gradients.

The reference is NumPy in float64: the latents a bf16 matmul keeps (inputs rounded to bf16, products
summed), then the loss of those latents with their exact pre-activations. The trainer's loss must be
that one to f32 precision, which it is only if the kept values are recomputed in f32 (the bf16
matmul's own values are ~1e-3 off, which moves the loss by far more than the tolerance).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from arcstream.sae import SAEConfig, SAEOptions, get_architecture
from arcstream.sae.architectures import base
from arcstream.sae.architectures import batchtopk as batchtopk_module

D, S, B, K = 48, 192, 96, 6


def _bf16(a: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def _problem(seed: int = 0):
    r = np.random.default_rng(seed)
    p = {"w_enc_sd": r.standard_normal((S, D)).astype(np.float32) * 0.3,
         "b_enc_s": r.standard_normal(S).astype(np.float32) * 0.05,
         "w_dec_sd": r.standard_normal((S, D)).astype(np.float32) * 0.3,
         "b_dec_d": r.standard_normal(D).astype(np.float32) * 0.1}
    x = r.standard_normal((B, D)).astype(np.float32)
    x[[3, 50]] *= 3.0  # a few heavy tokens (BatchTopK's whole-row path)
    return p, x


def _np_reference(p, x, arch: str):
    """(loss, kept mask, exact pre, bf16 pre) in float64: the mask chosen on bf16 inputs."""
    f = {n: np.asarray(v, np.float64) for n, v in p.items()}
    xc = x - f["b_dec_d"]
    exact = xc @ f["w_enc_sd"].T + f["b_enc_s"]
    approx = _bf16(x.astype(np.float32) - p["b_dec_d"]) @ _bf16(p["w_enc_sd"]).T + f["b_enc_s"]
    if arch == "topk":
        kept = np.zeros_like(exact, bool)
        np.put_along_axis(kept, np.argsort(-approx, axis=1)[:, :K], True, axis=1)
    else:  # BatchTopK: the K * B largest positive pre-activations of the batch
        kth = np.sort(approx.ravel())[-K * B]
        kept = (approx >= kth) & (approx > 0)
    acts = np.where(kept, np.maximum(exact, 0.0), 0.0)
    xh = acts @ f["w_dec_sd"] + f["b_dec_d"]
    return np.mean(np.sum((xh - x) ** 2, -1)), kept, exact, approx


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_bf16_selection_keeps_f32_loss_values_and_gradient(arch, monkeypatch):
    monkeypatch.setattr(batchtopk_module, "BATCHTOPK_DENSE_UP_TO", 0)  # BatchTopK's sparse tiers
    p, x = _problem()
    ref_loss, kept, exact, approx = _np_reference(p, x, arch)
    # the bf16 matmul's values are off by much more than f32 rounding: reading them would show
    assert np.abs(approx - exact)[kept].max() > 1e-3
    cfg = SAEConfig(arch, D, S, k=K, select_dtype="bfloat16")
    a = get_architecture(arch)
    buffers = a.init_buffers(cfg)
    jp = jax.tree.map(jnp.asarray, p)

    def loss(q):
        return a.loss(q, buffers, jnp.asarray(x), cfg, cfg.hparams(), None)

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(jp)
    if arch == "batchtopk":  # no token hit the per-token caps of the tiers: the reference is the definition
        assert float(out.metrics["batchtopk_capped_fraction"]) == 0.0
    np.testing.assert_allclose(out.losses["mse_loss"], ref_loss, rtol=2e-6)
    np.testing.assert_array_equal(out.fired_s, (kept & (exact > 0)).sum(0))

    # the gradient of the same loss with the kept set fixed, by dense autodiff in f32
    mask = jnp.asarray(kept)

    def dense(q):
        pre = (x - q["b_dec_d"]) @ q["w_enc_sd"].T + q["b_enc_s"]
        xh = jnp.where(mask, jax.nn.relu(pre), 0.0) @ q["w_dec_sd"] + q["b_dec_d"]
        return jnp.mean(jnp.sum((xh - x) ** 2, -1))

    g_ref = jax.grad(dense)(jp)
    for name in p:
        np.testing.assert_allclose(grads[name], g_ref[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_bf16_selection_is_a_native_bf16_dot_on_cpu():
    """XLA:CPU upcasts a bf16 `x @ w.T` to an f32 dot (no speed-up); the selection's form must stay bf16."""
    p, x = _problem()
    jp = jax.tree.map(jnp.asarray, p)
    for dtype, want in (("bfloat16", True), ("float32", False)):
        cfg = SAEConfig("topk", D, S, k=K, select_dtype=dtype)
        hlo = jax.jit(lambda q, xx: base.selection_preacts(q, xx, cfg)).lower(jp, jnp.asarray(x)).compile().as_text()
        dots = [block for block in hlo.split("\n\n") if " dot(" in block]
        assert dots, hlo
        assert any("bf16[" in b.split(" dot(")[0] and "parameter(" in b for b in dots) == want, (dtype, dots)
    ref = _np_reference(p, x, "topk")[3]
    got = jax.jit(lambda q, xx: base.selection_preacts(q, xx, SAEConfig("topk", D, S, k=K, select_dtype="bfloat16")))(
        jp, jnp.asarray(x))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)  # bf16 inputs, f32 accumulation


def test_select_dtype_is_a_checked_sae_key():
    opts = SAEOptions.from_config(ml_collections.ConfigDict({"architecture": "batchtopk", "select_dtype": "bfloat16"}))
    (spec,) = opts.site_specs({"blocks.0.hook_resid_post": D})["blocks.0.hook_resid_post"]
    assert spec.select_dtype == "bfloat16"
    # the default, auto: bf16 where the matmul only selects, float32 where training goes through it
    site = {"blocks.0.hook_resid_post": D}
    for arch, want in (("topk", "bfloat16"), ("batchtopk", "bfloat16"), ("jumprelu", "float32"),
                       ("standard", "float32"), ("matryoshka_batchtopk", "float32")):
        extra = {"matryoshka_widths": f"{D},{16 * D}"} if arch.startswith("matryoshka") else {}
        (spec,) = SAEOptions.from_config({"architecture": arch, **extra}).site_specs(site)[
            "blocks.0.hook_resid_post"]
        assert spec.select_dtype == want, arch
    with pytest.raises(ValueError, match="select_dtype='float16'.*expected one of"):
        SAEConfig("topk", D, S, k=K, select_dtype="float16")
    with pytest.raises(ValueError, match="jumprelu.*keeps float32"):
        SAEOptions.from_config({"architecture": "jumprelu", "select_dtype": "bfloat16"}).site_specs({"s": D})
    with pytest.raises(ValueError, match="--config.sae.select_dtype"):
        SAEOptions.from_config({"select_dtype": 16})
