"""SAEs from outside the run (`--config.saes=`): folders written by SAELens's own `save_model` (JumpReLU with
thresholds, with and without SAELens's run-time input normalisations, and TopK) are analysed on the site their
cfg.json names, and the analysis's latents and held-out reconstruction equal SAELens's `encode`/`decode` on the
stored activations. Wrong hooks and widths are refused by name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.analysis.helpers import D_IN, SITE, make_store

torch = pytest.importorskip("torch")
D_SAE = 24
EVAL = (1000, 2500)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("external") / "run"
    data = make_store(run_dir)
    return run_dir, data["x"]


def _saelens_sae(folder, arch: str, norm: str = "none", hook: str = SITE, d_in: int = D_IN):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(1)
    meta = SAEMetadata(hook_name=hook)
    if arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=D_SAE, normalize_activations=norm, metadata=meta))
    else:
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=D_SAE, k=3, metadata=meta))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
        sae.W_dec.copy_(sae.W_enc.T * 0.8)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.1, 0.6)
    sae.save_model(str(folder))
    return sae


def _analyse(run_dir, out, *saes, **over):
    from arcstream.analysis import AnalyzeOptions, analyze

    kw = dict(run_dir=str(run_dir), output_dir=str(out), saes=tuple(str(s) for s in saes), chunk_rows=700, top_k=4,
              eval_rows=EVAL, dashboard_features=4, examples_per_feature=2, invariance_groups=0, ce_prompts=0)
    kw.update(over)
    return analyze(AnalyzeOptions(**kw))


@pytest.mark.parametrize("arch,norm", [("jumprelu", "none"), ("jumprelu", "layer_norm"),
                                       ("jumprelu", "constant_norm_rescale"), ("topk", "none")])
def test_a_saelens_saved_sae_gives_saelens_latents_and_reconstruction(stored, tmp_path, arch, norm):
    run_dir, x = stored
    sae = _saelens_sae(tmp_path / "sae", arch, norm)
    result = _analyse(run_dir, tmp_path / "out", tmp_path / "sae")
    (site,) = result.sites
    assert site.site == SITE and site.d_sae == D_SAE
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x)).numpy()
        recon = sae.decode(sae.encode(torch.from_numpy(x))).numpy()  # SAELens undoes its normalisation here
    fired = acts > 0
    assert 0 < fired.mean() < 0.9  # the comparison is not of all-zero latents
    np.testing.assert_array_equal(site.stats.fire_count_s, fired.sum(0))
    np.testing.assert_allclose(site.stats.act_max_s, acts.max(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(site.stats.act_sum_s, acts.sum(0), rtol=1e-4)
    h = x[EVAL[0]:EVAL[1]].astype(np.float64)
    r = recon[EVAL[0]:EVAL[1]].astype(np.float64)
    fvu = ((h - r) ** 2).sum() / ((h - h.mean(0)) ** 2).sum()
    assert site.eval["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert site.eval["l0"] == pytest.approx(fired[EVAL[0]:EVAL[1]].sum(1).mean(), rel=1e-6)
    data = json.loads((tmp_path / "out" / "analysis" / "features.json").read_text())
    assert json.dumps(data).count(str(tmp_path / "sae")) >= 1  # the output names the SAE it analysed


def test_wrong_hook_width_or_folder_is_refused_by_name(stored, tmp_path):
    run_dir, _ = stored
    _saelens_sae(tmp_path / "other_hook", "topk", hook="blocks.7.hook_mlp_out")
    with pytest.raises(ValueError, match=r"other_hook/cfg.json reads hook_name='blocks.7.hook_mlp_out'.*does not "
                                         r"store \(it stores \['blocks.0.hook_resid_post'\]\)"):
        _analyse(run_dir, tmp_path / "o1", tmp_path / "other_hook")
    _saelens_sae(tmp_path / "wide", "topk", d_in=D_IN + 4)
    with pytest.raises(ValueError, match=rf"wide/cfg.json has d_in={D_IN + 4}, but site .* stores width {D_IN}"):
        _analyse(run_dir, tmp_path / "o2", tmp_path / "wide")
    with pytest.raises(FileNotFoundError, match=r"nowhere/cfg.json does not exist; expected a SAELens folder"):
        _analyse(run_dir, tmp_path / "o3", tmp_path / "nowhere")


def test_the_entry_point_takes_saes_from_the_flag(stored, tmp_path):
    import subprocess
    import sys

    from tests.kill import REPO, job_env

    run_dir, _ = stored
    _saelens_sae(tmp_path / "sae", "jumprelu")
    p = subprocess.run([sys.executable, "-m", "arcstream.analyze", f"--config={REPO / 'configs/analyze.py'}",
                        f"--config.run_dir={run_dir}", f"--config.output_dir={tmp_path / 'out'}",
                        f"--config.saes={tmp_path / 'sae'}", "--config.ce_prompts=0"],
                       cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "jumprelu d_sae=24" in p.stdout and (tmp_path / "out" / "dashboard" / "index.html").exists()
