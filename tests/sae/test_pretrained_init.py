"""`sae.init_from`: training starts from a pretrained SAE (SAELens's own save_model output, or an arcstream
export), offline and online.

The property: the loaded SAE is the trainer's starting point in the trainer's own units, so with lr = 0 the
run exports the folder's weights back (the store's activations are far from E||x|| = sqrt(d_in), so a wrong
unit conversion shows), and in the trainer's units its encoder gives SAELens's latents on raw activations.
Folders that cannot start the configured SAE are refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.analysis.helpers import D_IN, SITE, make_store

torch = pytest.importorskip("torch")
D_SAE = 32  # expansion_factor 2 x D_IN


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    data = make_store(run_dir)
    return run_dir, data["x"]


def _saelens_jumprelu(folder, hook: str = SITE, d_in: int = D_IN, d_sae: int = D_SAE):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(3)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
        sae.W_dec.copy_(sae.W_enc.T * 0.7)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.2)
        sae.threshold.uniform_(0.2, 0.8)
    sae.save_model(str(folder))
    return sae


def _config(run_dir, **sae):
    from configs.train_sae import get_config

    c = get_config()
    c.run_dir = str(run_dir)
    c.compilation_cache_dir = ""
    c.sae.expansion_factor = 2
    c.sae.batch_size = 128
    c.sae.chunk_rows = 16
    c.sae.train_tokens = 128 * 3
    c.sae.warmup_steps = 1
    c.checkpoint_every = 100
    c.log_every = 1
    for k, v in sae.items():
        c.sae[k] = v
    return c


def _weights(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


def test_train_sae_from_a_saelens_jumprelu_with_lr_0_exports_its_weights(stored, tmp_path):
    from arcstream.sae import train_offline
    from arcstream.store import open_run

    run_dir, x = stored
    scale = np.sqrt(D_IN) / np.linalg.norm(x, axis=1).mean()
    assert abs(scale - 1) > 0.2  # the store is far from the trainer's units: a missing conversion shows
    _saelens_jumprelu(tmp_path / "gemma-scope-like")
    c = _config(run_dir, architecture="jumprelu", lr=0.0, init_from=str(tmp_path / "gemma-scope-like"))
    c.checkpoint_dir = str(tmp_path / "ck")
    c.run_dir = str(tmp_path / "out")  # exports go beside the copy below, the store stays read-only
    import shutil

    shutil.copytree(run_dir, tmp_path / "out")
    result = train_offline(c, open_run(str(tmp_path / "out")), log=lambda s: None)
    assert result["total_steps"] == 3
    got, want = _weights(tmp_path / "out" / "saes" / SITE), _weights(tmp_path / "gemma-scope-like")
    assert sorted(got) == sorted(want) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_in_the_trainers_units_the_loaded_jumprelu_gives_saelens_latents(stored, tmp_path):
    """apply_pretrained maps W_enc, W_dec, b_dec into scaled units: the architecture's encode on scaled inputs
    equals SAELens's encode on the raw ones (thresholds included), and decode maps back to x's space."""
    import jax.numpy as jnp

    from arcstream.sae import SAEOptions, init_train_state
    from arcstream.sae.architectures import get_architecture
    from arcstream.sae.pretrained import init_from_pretrained

    _, x = stored
    sae = _saelens_jumprelu(tmp_path / "s")
    opts = SAEOptions(architecture="jumprelu", expansion_factor=2, init_from=str(tmp_path / "s"))
    specs = opts.site_specs({SITE: D_IN})
    state = init_train_state(specs, opts.train_config(10, 0), {SITE: jnp.asarray(x[:512])})
    state = init_from_pretrained(state, specs, opts.init_from)
    site = state.sites[SITE]
    scale = float(site.buffers["scale"][0])
    params = {k: v[0] for k, v in site.params.items()}
    spec = specs[SITE][0]
    arch = get_architecture("jumprelu")
    rows = x[:400]
    acts = np.asarray(arch.encode(params, {k: v[0] for k, v in site.buffers.items()}, jnp.asarray(rows * scale),
                                  spec, spec.hparams()))
    with torch.no_grad():
        want = sae.encode(torch.from_numpy(rows)).numpy()
        recon = sae.decode(sae.encode(torch.from_numpy(rows))).numpy()
    assert 0.05 < (want > 0).mean() < 0.95
    np.testing.assert_allclose(acts, want, rtol=1e-4, atol=1e-5)
    ours = (acts @ np.asarray(params["w_dec_sd"]) + np.asarray(params["b_dec_d"])) / scale
    np.testing.assert_allclose(ours, recon, rtol=1e-4, atol=1e-4)


def test_a_topk_run_resumes_from_an_arcstream_export(stored, tmp_path):
    """A TopK SAE trained by arcstream, then a new run started from its export with lr = 0: the same weights."""
    import shutil

    from arcstream.sae import train_offline
    from arcstream.store import open_run

    run_dir, _ = stored
    shutil.copytree(run_dir, tmp_path / "first")
    train_offline(_config(tmp_path / "first", k=4), open_run(str(tmp_path / "first")), log=lambda s: None)
    shutil.copytree(run_dir, tmp_path / "second")
    c = _config(tmp_path / "second", k=4, lr=0.0, init_from=str(tmp_path / "first" / "saes" / SITE))
    c.seed = 7  # another fresh init: only init_from can make the weights equal
    train_offline(c, open_run(str(tmp_path / "second")), log=lambda s: None)
    a, b = _weights(tmp_path / "first" / "saes" / SITE), _weights(tmp_path / "second" / "saes" / SITE)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("make,sae,message", [
    (dict(d_sae=48), dict(architecture="jumprelu"),
     r"has d_sae=48 but the 'blocks.0.hook_resid_post' SAE this job trains has d_sae=32; set --config.sae.d_sae=48"),
    (dict(hook="blocks.5.hook_mlp_out"), dict(architecture="jumprelu"),
     r"is an SAE of 'blocks.5.hook_mlp_out' .* which this job does not train"),
    (dict(), dict(architecture="topk", k=4),
     r"cannot start sae.architecture='topk' .* set --config.sae.architecture to jumprelu"),
])
def test_a_folder_that_cannot_start_the_configured_sae_is_refused_by_name(stored, tmp_path, make, sae, message):
    from arcstream.sae import train_offline
    from arcstream.store import open_run

    run_dir, _ = stored
    _saelens_jumprelu(tmp_path / "s", **make)
    c = _config(run_dir, init_from=str(tmp_path / "s"), **sae)
    c.checkpoint_dir = str(tmp_path / "ck")
    with pytest.raises(ValueError, match=r"--config\.sae\.init_from: .*" + message):
        train_offline(c, open_run(str(run_dir)), log=lambda s: None)


RELEASE, SAE_ID = "gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical"  # in SAELens's shipped table


def test_a_saelens_release_is_checked_against_saelens_table_offline(monkeypatch, tmp_path):
    from arcstream.sae.pretrained import resolve_folder

    monkeypatch.setenv("ARCSTREAM_SAE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"--config\.saes: 'gemma-scope-2b-pt-rez' is not a release .*close: "
                                         r"\['gemma-scope-2b-pt-res'"):
        resolve_folder("sae_lens:gemma-scope-2b-pt-rez@layer_20/width_16k/canonical", flag="--config.saes")
    with pytest.raises(ValueError, match=r"release 'gemma-scope-2b-pt-res-canonical' has no SAE 'layer_99/x' "
                                         r"\(\d+ ids, e\.g\. \["):
        resolve_folder(f"sae_lens:{RELEASE}@layer_99/x")
    with pytest.raises(ValueError, match=r"is not sae_lens:RELEASE@SAE_ID"):
        resolve_folder(f"sae_lens:{RELEASE}")
    assert resolve_folder(str(tmp_path / "plain")) == str(tmp_path / "plain")  # a folder passes through


def test_a_release_that_cannot_be_downloaded_says_so_and_where_a_folder_would_be_read(monkeypatch, tmp_path):
    from arcstream.sae.pretrained import resolve_folder

    monkeypatch.setenv("ARCSTREAM_SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the test machine has no network either way
    with pytest.raises(ValueError, match=rf"downloading {RELEASE}@{SAE_ID} from the HF hub \(google/gemma-scope-2b-pt-res\) "
                                         rf"failed: .* or put one at {tmp_path}/cache/{RELEASE}/{SAE_ID}"):
        resolve_folder(f"sae_lens:{RELEASE}@{SAE_ID}")


def test_a_release_saved_in_the_cache_is_analysed_and_starts_training_without_the_network(stored, monkeypatch,
                                                                                       tmp_path):
    """The folder a download leaves (SAELens's save_model under the cache) is what both jobs read."""
    import shutil

    from arcstream.analysis import AnalyzeOptions, analyze
    from arcstream.sae import train_offline
    from arcstream.store import open_run

    run_dir, _ = stored
    monkeypatch.setenv("ARCSTREAM_SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _saelens_jumprelu(tmp_path / "cache" / RELEASE / SAE_ID)
    spec = f"sae_lens:{RELEASE}@{SAE_ID}"
    result = analyze(AnalyzeOptions(run_dir=str(run_dir), output_dir=str(tmp_path / "a"), saes=(spec,),
                                    chunk_rows=700, top_k=2, eval_rows=(1000, 2500), dashboard_features=2,
                                    examples_per_feature=1, invariance_groups=0, ce_prompts=0))
    assert [s.site for s in result.sites] == [SITE] and result.sites[0].d_sae == D_SAE
    shutil.copytree(run_dir, tmp_path / "out")
    c = _config(tmp_path / "out", architecture="jumprelu", lr=0.0, init_from=spec)
    train_offline(c, open_run(str(tmp_path / "out")), log=lambda s: None)
    got, want = _weights(tmp_path / "out" / "saes" / SITE), _weights(tmp_path / "cache" / RELEASE / SAE_ID)
    np.testing.assert_allclose(got["W_enc"], want["W_enc"], rtol=2e-5, atol=2e-6)
