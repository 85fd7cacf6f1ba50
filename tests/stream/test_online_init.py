"""Online SAEs started from a pretrained SAE (`sae.init_from`): the run job's trainer, on the ring, starts
from a SAELens-saved JumpReLU SAE of a captured site; with lr = 0 it exports that SAE's weights back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.stream.test_run import _config, tiny_ckpt  # noqa: F401  (fixture)

torch = pytest.importorskip("torch")
SITE = "blocks.1.hook_resid_post"


@pytest.mark.slow
def test_online_saes_start_from_a_saelens_folder(tiny_ckpt, tmp_path):  # noqa: F811
    from safetensors.numpy import load_file

    from arcstream.stream.loop import run
    from tests.sae.test_pretrained_init import _saelens_jumprelu

    d = json.loads((tiny_ckpt / "config.json").read_text())["hidden_size"]
    _saelens_jumprelu(tmp_path / "pre", hook=SITE, d_in=d, d_sae=2 * d)
    c = _config(tiny_ckpt, tmp_path / "run", **{
        "sites": SITE, "store.sites": SITE, "max_prompts": 4, "sae.enabled": True, "sae.batch_size": 256,
        "sae.architecture": "jumprelu", "sae.expansion_factor": 2, "sae.lr": 0.0,
        "sae.init_from": str(tmp_path / "pre")})
    result = run(c)
    assert result.sae_steps >= 2
    got, want = load_file(str(tmp_path / "run" / "saes" / SITE / "sae_weights.safetensors")), \
        load_file(str(tmp_path / "pre" / "sae_weights.safetensors"))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_an_online_init_from_for_a_site_not_captured_is_refused_before_the_model_runs(tiny_ckpt, tmp_path):  # noqa: F811
    from arcstream.stream.loop import run
    from tests.sae.test_pretrained_init import _saelens_jumprelu

    d = json.loads((tiny_ckpt / "config.json").read_text())["hidden_size"]
    _saelens_jumprelu(tmp_path / "pre", hook="blocks.2.hook_resid_post", d_in=d, d_sae=2 * d)
    c = _config(tiny_ckpt, tmp_path / "run", **{
        "sites": SITE, "store.sites": SITE, "sae.enabled": True, "sae.architecture": "jumprelu",
        "sae.expansion_factor": 2, "sae.init_from": str(tmp_path / "pre")})
    with pytest.raises(ValueError, match=r"--config\.sae\.init_from: .* 'blocks\.2\.hook_resid_post' .* does not "
                                         r"train \(it trains \['blocks\.1\.hook_resid_post'\]\)"):
        run(c)
    assert not (tmp_path / "run" / "manifest.json").exists()
