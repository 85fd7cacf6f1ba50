"""Export -> SAELens -> the same encode/decode numbers; SAELens folders load back."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcstream.sae import ARCHITECTURES, SAEConfig, TrainConfig, decode, encode, export_sae, init_train_state, load_sae
from arcstream.sae import member_state

D, S = 16, 64


def _trained(arch):
    """An initialised SAE with perturbed weights (non-zero b_enc, non-unit scale, a positive
    batchtopk threshold): export must carry all of it. Training itself is tested elsewhere."""
    x = np.random.default_rng(0).standard_normal((64, D)).astype(np.float32) * 3 + 1  # scale != 1
    cfg = SAEConfig(arch, D, S, k=4, dead_steps=1, jumprelu_init_threshold=0.05)
    state = init_train_state({"s": [cfg]}, TrainConfig(total_steps=5), {"s": x})
    params, buffers = member_state(state, "s", 0)
    r = np.random.default_rng(2)
    params = {k: (v + 0.05 * r.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
    if arch == "batchtopk":
        buffers["threshold"] = np.float32(0.3)
    return cfg, params, buffers, x


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_loads_in_saelens_with_equal_numbers(arch, tmp_path):
    torch = pytest.importorskip("torch")
    from sae_lens import SAE

    cfg, params, buffers, x = _trained(arch)
    assert abs(float(buffers["scale"]) - 1.0) > 0.05  # the fold is exercised
    folder = export_sae(params, cfg, tmp_path / "sae", hook_name="blocks.3.hook_resid_post", buffers=buffers)
    cfg_json = json.loads((folder / "cfg.json").read_text())
    assert cfg_json["architecture"] == ("jumprelu" if arch == "batchtopk" else arch)
    assert tuple(int(v) for v in cfg_json["sae_lens_version"].split(".")) >= (6, 0, 0)

    sae = SAE.load_from_disk(str(folder))
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert tuple(sae.W_enc.shape) == (D, S) and tuple(sae.W_dec.shape) == (S, D)
    ours = np.asarray(encode(params, cfg, x, buffers))
    theirs = sae.encode(torch.from_numpy(x)).detach().numpy()
    assert (ours > 0).sum() > 0
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(theirs > 0, ours > 0)
    ours_dec = np.asarray(decode(params, ours, buffers))
    theirs_dec = sae.decode(torch.from_numpy(ours)).detach().numpy()
    np.testing.assert_allclose(theirs_dec, ours_dec, rtol=1e-4, atol=1e-4)

    # and back into arcstream: same numbers on raw activations
    p2, c2, b2, _ = load_sae(folder)
    np.testing.assert_allclose(np.asarray(encode(p2, c2, x, b2)), theirs, rtol=1e-4, atol=1e-5)


def test_load_sae_reads_a_saelens_saved_folder(tmp_path):
    torch = pytest.importorskip("torch")
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=S, k=5, dtype="float32", device="cpu"))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    sae.save_model(str(tmp_path / "native"))
    params, cfg, buffers, _ = load_sae(tmp_path / "native")
    assert cfg.architecture == "topk" and cfg.k == 5
    x = np.random.default_rng(1).standard_normal((8, D)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(encode(params, cfg, x, buffers)),
                               sae.encode(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_load_sae_names_the_bad_tensor(tmp_path):
    cfg, params, buffers, _ = _trained("standard")
    folder = export_sae(params, cfg, tmp_path / "s", hook_name="h", buffers=buffers)
    c = json.loads((folder / "cfg.json").read_text())
    c["d_in"] = D + 1
    (folder / "cfg.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="W_enc"):
        load_sae(folder)
    with pytest.raises(ValueError, match="single sweep member"):
        export_sae(jax.tree.map(lambda a: np.stack([a, a]), params), cfg, tmp_path / "t", hook_name="h")
