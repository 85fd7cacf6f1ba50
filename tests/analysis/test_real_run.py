"""The analysis job on a real stored run: a tiny Qwen2 checkpoint, two augmentations per task, online SAEs.

Checks what only a real run exercises: SAEs exported by the run job load and are analysed, held-out L0/FVU
equal NumPy on the stored activations, CE loss recovered runs the model with the splice (finite, clean below
zero-ablated), tasks seen under two augmentations feed the invariance study, and the dashboard draws the
prompts' grids with the colours the store recorded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]
SITE = "blocks.1.hook_resid_post"


@pytest.mark.slow
def test_analysis_of_a_real_run_with_online_saes(tmp_path):
    import importlib

    from arcstream.analysis import AnalyzeOptions, analyze
    from arcstream.data.tokenizer import build_arc_tokenizer
    from arcstream.model.testing import make_tiny_hf_checkpoint
    from arcstream.store import open_run
    from arcstream.stream.loop import run

    ckpt = make_tiny_hf_checkpoint(tmp_path / "ckpt", "qwen2", num_hidden_layers=2, max_position_embeddings=4096)
    build_arc_tokenizer("digits").save_pretrained(ckpt)
    sys.path.insert(0, str(REPO / "configs"))
    try:
        c = importlib.import_module("default").get_config("nosae")
    finally:
        sys.path.pop(0)
    c.model, c.output_dir, c.sites, c.max_prompts = str(ckpt), str(tmp_path / "run"), SITE, 6
    c.commit_every, c.store.dtype, c.mesh.data = 1, "float32", 1
    c.data.seq_len = c.data.max_prompt_len = 768
    c.data.batch_size, c.data.n_augmentations = 2, 2
    c.sae.enabled, c.sae.batch_size = True, 256
    c.sae.expansion_factor, c.sae.k, c.sae.warmup_steps = 2, 4, 2
    run(c)

    result = analyze(AnalyzeOptions(run_dir=str(tmp_path / "run"), chunk_rows=512, ce_prompts=2, ce_pad_to=768,
                                    eval_fraction=0.5,
                                    dashboard_features=4, examples_per_feature=2))
    s = result.sites[0]
    e = s.eval
    reader = open_run(str(tmp_path / "run"))
    x = np.asarray(reader.activations(SITE)[e["start"]:e["stop"]], np.float64)
    w = load_file(str(tmp_path / "run" / "saes" / SITE / "sae_weights.safetensors"))
    cfg = json.loads((tmp_path / "run" / "saes" / SITE / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and s.architecture == "topk"
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # SAELens topk: keep the k largest, then ReLU
    keep = np.argsort(-pre, axis=1)[:, : cfg["k"]]
    acts = np.zeros_like(pre)
    np.put_along_axis(acts, keep, np.maximum(np.take_along_axis(pre, keep, 1), 0), 1)
    x_hat = acts @ w["W_dec"] + w["b_dec"]
    np.testing.assert_allclose(e["l0"], (acts > 0).sum(1).mean(), rtol=1e-3)
    np.testing.assert_allclose(e["fvu"], ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rtol=1e-3)
    assert e["prompts"] == 2 and np.isfinite(e["ce_loss_recovered"]) and e["ce_zero"] > e["ce_clean"]
    assert s.invariance_groups >= 1, "every task was stored under two augmentations"
    page = (tmp_path / "run" / "dashboard" / "index.html").read_text()
    assert page.count('class="grid"') >= 4 and "CE loss recovered" in (tmp_path / "run" / "report.md").read_text()
    tok = reader.tokens()
    p = s.examples[s.dashboard[0]][0]["prompt"]
    sel = (tok["prompt"] == p) & (tok["grid_kind"] > 0)
    drawn = {(g["kind_code"], g["pair"]): np.array(g["cells"]) for g in s.prompts[p]["grids"]}
    got = [drawn[(k, q)][r, c_] for k, q, r, c_ in zip(tok["grid_kind"][sel], tok["pair_index"][sel], tok["row"][sel],
                                                       tok["col"][sel])]
    np.testing.assert_array_equal(got, tok["colour"][sel])
