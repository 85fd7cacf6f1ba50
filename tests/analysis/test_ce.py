"""CE loss recovered against HF PyTorch on a tiny checkpoint: clean loss, zero ablation through a forward hook,
and the recovered fraction of an exact (identity) and of a useless (zero) SAE."""

from __future__ import annotations

import numpy as np
import pytest

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from arcstream.model import load_model
    from arcstream.model.testing import make_tiny_hf_checkpoint

    path = tmp_path_factory.mktemp("ce") / "tiny-qwen2"
    make_tiny_hf_checkpoint(path, "qwen2", num_hidden_layers=3)
    model, config = load_model(path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in (37, 300)]
    return path, model, config, prompts


def _hf_ce(path, prompts, zero_layer=None):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    handle = None
    if zero_layer is not None:
        handle = hf.model.layers[zero_layer].register_forward_hook(
            lambda m, i, o: (torch.zeros_like(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else torch.zeros_like(o))
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in prompts:
            t = torch.tensor(ids[None].astype(np.int64))
            out = hf(t, labels=t)
            total += float(out.loss) * (len(ids) - 1)
            count += len(ids) - 1
    if handle:
        handle.remove()
    return total / count


def _sae(d, kind):
    import jax.numpy as jnp

    from arcstream.sae import SAEConfig

    cfg = SAEConfig("standard", d, 2 * d, apply_b_dec_to_input=False)
    eye = np.eye(d, dtype=np.float32)
    if kind == "exact":  # relu(x) - relu(-x) = x: a perfect reconstruction
        w_enc = np.concatenate([eye, -eye])
        w_dec = np.concatenate([eye, -eye])
    else:
        w_enc = w_dec = np.zeros((2 * d, d), np.float32)
    params = {"w_enc_sd": jnp.asarray(w_enc), "b_enc_s": jnp.zeros(2 * d), "w_dec_sd": jnp.asarray(w_dec),
              "b_dec_d": jnp.zeros(d)}
    return params, cfg, {"scale": jnp.ones(())}


@pytest.mark.slow
def test_ce_clean_and_zero_ablated_equal_hf_and_recovered_is_one_for_an_exact_sae(tiny):
    import jax.numpy as jnp

    from arcstream.analysis.ce import ce_loss_recovered, spliced_logits
    from arcstream.model import forward

    path, model, config, prompts = tiny
    ids = jnp.asarray(prompts[0][None])
    seg, pos = jnp.ones_like(ids), jnp.arange(ids.shape[1])[None]
    np.testing.assert_allclose(np.asarray(spliced_logits(model, ids, seg, pos, SITE, None)),
                               np.asarray(forward(model, ids, seg, pos).logits), rtol=1e-5, atol=1e-5)
    params, cfg, buffers = _sae(config.hidden_size, "exact")
    r = ce_loss_recovered(model, prompts, SITE, params, cfg, buffers, pad_to=512)
    assert r["tokens"] == sum(len(p) - 1 for p in prompts) and r["prompts"] == 2
    np.testing.assert_allclose(r["ce_clean"], _hf_ce(path, prompts), rtol=1e-4)
    np.testing.assert_allclose(r["ce_zero"], _hf_ce(path, prompts, zero_layer=1), rtol=1e-4)
    np.testing.assert_allclose(r["ce_sae"], r["ce_clean"], rtol=1e-5)
    np.testing.assert_allclose(r["ce_loss_recovered"], 1.0, atol=1e-3)
    zero = ce_loss_recovered(model, prompts, SITE, *_sae(config.hidden_size, "zero"), pad_to=512)
    np.testing.assert_allclose(zero["ce_loss_recovered"], 0.0, atol=1e-6)
