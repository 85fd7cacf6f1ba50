"""An online SAE (trained on the ring during the run) equals an offline one trained on the same stored tokens.

The ring draws every token once, so the online SAE sees the tokens that the
store holds (all but each prompt's first, `sae.exclude_first_token`), in a
different order. Trained for the same number of steps with the same settings,
both must reconstruct the stored tokens equally well: the gap between them is
compared with the gap between two offline SAEs that differ only in their seed
(the noise of the comparison).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tests.stream.test_run import REPO, _config, tiny_ckpt  # noqa: F401  (fixture)

SITE = "blocks.1.hook_resid_post"


def _fvu(folder: Path, x_nd: np.ndarray) -> float:
    from arcstream.sae import load_sae
    from arcstream.sae.export import decode, encode

    params, cfg, buffers, _ = load_sae(folder)
    x_hat = np.asarray(decode(params, encode(params, cfg, jnp.asarray(x_nd), buffers), buffers))
    return float(np.sum((x_nd - x_hat) ** 2) / np.sum((x_nd - x_nd.mean(0)) ** 2))


def _offline(run_dir: Path, x_nd: np.ndarray, online_sae, steps: int, seed: int) -> float:
    from arcstream.sae.data import InMemorySource
    from arcstream.sae.offline import train_offline

    sys.path.insert(0, str(REPO / "configs"))
    try:
        import importlib

        c = importlib.import_module("train_sae").get_config()
    finally:
        sys.path.pop(0)
    c.run_dir = str(run_dir)
    c.seed = seed
    c.log_every = 1000
    for key in ("architecture", "expansion_factor", "k", "lr", "warmup_steps", "decay_fraction", "dead_steps",
                "b_dec_init", "clip_norm", "aux_coefficient", "batch_size", "fit_encoder_scale"):
        c.sae[key] = online_sae[key]
    c.sae.chunk_rows = 16
    c.sae.train_tokens = steps * int(online_sae.batch_size)
    summary = train_offline(c, InMemorySource({SITE: x_nd}), log=lambda _: None)
    assert summary["total_steps"] == steps
    return _fvu(run_dir / "saes" / SITE, x_nd)


@pytest.mark.slow
def test_an_online_sae_reconstructs_as_well_as_an_offline_one_on_the_same_tokens(tiny_ckpt, tmp_path):  # noqa: F811
    from arcstream.store import open_run
    from arcstream.stream.loop import run

    c = _config(tiny_ckpt, tmp_path / "run", **{
        "sites": SITE, "store.sites": SITE, "max_prompts": 16, "commit_every": 8,
        "sae.enabled": True, "sae.batch_size": 256, "sae.expansion_factor": 2, "sae.k": 8})
    result = run(c)
    store = open_run(str(tmp_path / "run"))
    positions = np.asarray(store.tokens(["position"])["position"])
    x_nd = np.asarray(store.activations(SITE).read().result(), np.float32)[positions > 0]
    n = result.sae_tokens
    assert n["captured"] == len(x_nd) and n["lost"] == 0 and n["reused"] < 256 * 3
    steps = result.sae_steps
    assert steps == -(-n["draws"] // 256) and steps >= 20

    online = _fvu(tmp_path / "run" / "saes" / SITE, x_nd)
    offline = [_offline(tmp_path / f"offline{s}", x_nd, c.sae, steps, seed=s) for s in (0, 1)]
    noise = abs(offline[0] - offline[1])
    print(f"FVU online {online:.4f}, offline {offline[0]:.4f} / {offline[1]:.4f} (seeds 0, 1), {steps} steps")
    assert online < 0.9  # it learned something (predicting the mean is FVU 1)
    assert abs(online - np.mean(offline)) <= max(3 * noise, 0.02 * np.mean(offline)), (online, offline)


@pytest.mark.slow
def test_an_online_transcoder_trains_from_two_ring_sites_and_loads_in_saelens(tiny_ckpt, tmp_path):  # noqa: F811
    """sae.architecture=batchtopk_transcoder in the run job: the ring's two sites at the same tokens train it,
    and the export maps the stored input rows to the stored target rows (checked through SAELens)."""
    torch = pytest.importorskip("torch")
    from sae_lens import SAE, JumpReLUTranscoder

    from arcstream.store import open_run
    from arcstream.stream.loop import run

    x_site, y_site = "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"
    c = _config(tiny_ckpt, tmp_path / "run", **{
        "sites": f"{x_site},{y_site}", "store.sites": "", "max_prompts": 16, "commit_every": 4,
        "sae.enabled": True, "sae.batch_size": 256, "sae.architecture": "batchtopk_transcoder", "sae.warmup_steps": 2,
        "sae.input_site": x_site, "sae.target_site": y_site, "sae.expansion_factor": 4, "sae.k": 8,
        "sae.lr": 1e-3})  # its few steps were sized at lr 1e-3 (the run's default is 5e-4, for twice the draws)
    result = run(c)
    folder = tmp_path / "run" / "saes" / f"{x_site}-to-{y_site}"
    assert [Path(p) for p in result.exports] == [folder]
    assert result.sae_tokens["captured"] > 0 and result.sae_steps == -(-result.sae_tokens["draws"] // 256)

    store = open_run(str(tmp_path / "run"))
    keep = np.asarray(store.tokens(["position"])["position"]) > 0
    x = np.asarray(store.activations(x_site).read().result(), np.float32)[keep]
    y = np.asarray(store.activations(y_site).read().result(), np.float32)[keep]
    sae = SAE.load_from_disk(str(folder))
    assert isinstance(sae, JumpReLUTranscoder)
    assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out) == (x_site, y_site)
    sae.eval()
    with torch.no_grad():
        y_hat = sae.decode(sae.encode(torch.from_numpy(x))).numpy()
    fvu = float(np.sum((y - y_hat) ** 2) / np.sum((y - y.mean(0)) ** 2))
    print(f"online transcoder {x_site} -> {y_site}: FVU {fvu:.3f} on {len(x)} stored tokens, "
          f"{result.sae_steps} steps")
    assert fvu < 0.9  # it learned the map from the input site (the mean would leave FVU 1)
