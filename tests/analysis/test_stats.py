"""Streaming feature statistics, labels and evaluation metrics against NumPy on whole arrays."""

from __future__ import annotations

import numpy as np
import pytest

from arcstream.analysis import (ACT_LOG10_EDGES, ATTRIBUTES, EvalAccumulator, FeatureAccumulator, attribute_codes,
                                label_features)


def _random_tokens(rng, n):
    kind = rng.integers(0, 5, n).astype(np.int8)
    cell = kind > 0
    return {"prompt": (np.arange(n) // 37).astype(np.int32), "position": (np.arange(n) % 37 * 40).astype(np.int32),
            "grid_kind": kind, "row": np.where(cell, rng.integers(0, 30, n), -1).astype(np.int8),
            "col": np.where(cell, rng.integers(0, 30, n), -1).astype(np.int8),
            "colour": np.where(cell, rng.integers(0, 10, n), -1).astype(np.int8)}


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("chunks", [(1000,), (7, 300, 693), (64,) * 15 + (40,)])
def test_streamed_statistics_equal_numpy_on_the_whole_array_whatever_the_chunking(chunks, sparse):
    rng = np.random.default_rng(0)
    n, s, k = sum(chunks), 12, 5
    acts = np.maximum(rng.standard_normal((n, s)) * np.exp(rng.uniform(-3, 3, s)), 0).astype(np.float32)
    if sparse:  # ~5% firing: the accumulator takes its sparse top-k path
        acts *= rng.random((n, s)) < 0.1
    acts[:, 3] = 0  # a dead latent
    acts[:, 4] = np.where(np.arange(n) % 400 == 0, 1.5, 0)  # fires on 3 rows only: fewer than k examples
    tok = _random_tokens(rng, n)
    acc = FeatureAccumulator(s, top_k=k)
    a = 0
    for c in chunks:
        acc.update(acts[a:a + c], {f: v[a:a + c] for f, v in tok.items()}, a)
        a += c
    st = acc.result()
    fires = acts > 0
    np.testing.assert_array_equal(st.fire_count_s, fires.sum(0))
    np.testing.assert_allclose(st.density_s, fires.mean(0))
    np.testing.assert_allclose(st.mean_act_s, acts.astype(np.float64).mean(0), rtol=1e-7)
    np.testing.assert_array_equal(st.act_max_s, acts.max(0))
    assert st.dead_mask().tolist() == [i == 3 for i in range(s)]
    for j in range(s):
        firing = np.nonzero(fires[:, j])[0]
        want = firing[np.argsort(-acts[firing, j], kind="stable")][:k]
        got = st.top_row_ks[:, j][st.top_row_ks[:, j] >= 0]
        np.testing.assert_array_equal(np.sort(acts[got, j])[::-1], acts[want, j])
        np.testing.assert_array_equal(st.top_prompt_ks[: len(got), j], tok["prompt"][got])
        h, _ = np.histogram(np.clip(np.log10(acts[firing, j]), ACT_LOG10_EDGES[0], ACT_LOG10_EDGES[-1] - 1e-9),
                            bins=ACT_LOG10_EDGES)
        np.testing.assert_array_equal(st.hist_sb[j], h)
    # Attribute firing counts and phi against a direct computation for a few values.
    codes = attribute_codes(tok)
    names = [(a, v) for a, vals in ATTRIBUTES.items() for v in vals]
    phi = st.phi_sv()
    for attr, value in [("colour", "3"), ("row", "0"), ("grid_kind", "answer"), ("colour_in_kind", "3@answer")]:
        v = names.index((attr, value))
        has = (codes == v).any(1)
        for j in (0, 5, 11):
            assert st.attr_fire_sv[j, v] == (fires[:, j] & has).sum()
            np.testing.assert_allclose(phi[j, v], np.corrcoef(fires[:, j], has)[0, 1], atol=1e-9)
    assert st.attr_total_v[names.index(("grid_kind", "none"))] == (tok["grid_kind"] == 0).sum()


def test_attribute_codes_put_each_cell_value_in_its_own_slot():
    tok = {"colour": np.array([3, -1], np.int8), "row": np.array([0, -1], np.int8), "col": np.array([29, -1], np.int8),
           "grid_kind": np.array([4, 0], np.int8), "position": np.array([5, 5000], np.int32)}
    names = [f"{a}={v}" for a, vals in ATTRIBUTES.items() for v in vals]
    codes = attribute_codes(tok)
    assert [names[c] for c in codes[0]] == ["colour=3", "row=0", "col=29", "grid_kind=answer", "position=0-15",
                                           "colour_in_kind=3@answer"]
    assert [names[c] if c >= 0 else None for c in codes[1]] == [None, None, None, "grid_kind=none",
                                                                "position=>=4096", None]


def _stats_for(fire_rule, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    tok = _random_tokens(rng, n)
    acts = np.zeros((n, 3), np.float32)
    acts[:, 0] = fire_rule(tok) * 2.0
    acts[:, 1] = rng.random(n) < 0.3  # noise: unclear
    acc = FeatureAccumulator(3, top_k=4)
    acc.update(acts, tok, 0)
    return label_features(acc.result())


def test_labels_name_the_attribute_value_the_latent_fires_on():
    lb = _stats_for(lambda t: (t["colour"] == 3))
    assert lb[0].text == "colour 3" and lb[0].phi > 0.99 and lb[0].precision == 1.0 and lb[0].recall == 1.0
    assert lb[1].text.startswith("unclear") and lb[1].attribute == ""
    assert lb[2].text == "dead"
    assert _stats_for(lambda t: (t["colour"] == 3) & (t["grid_kind"] == 4))[0].text == "colour 3 in answer grids"
    assert _stats_for(lambda t: (t["row"] == 0))[0].text == "first row"
    assert _stats_for(lambda t: (t["grid_kind"] == 2))[0].text == "train output grids"
    assert _stats_for(lambda t: (t["col"] == 7))[0].text == "column 7"


def test_eval_metrics_equal_numpy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 6)) * [1, 2, 3, 4, 5, 6] + 3
    x_hat = x + rng.standard_normal((500, 6)) * 0.5
    acts = np.maximum(rng.standard_normal((500, 9)), 0)
    acc = EvalAccumulator(6)
    for a in range(0, 500, 128):
        acc.update(x[a:a + 128], x_hat[a:a + 128], acts[a:a + 128])
    r = acc.result()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert r["rows"] == 500
    np.testing.assert_allclose(r["fvu"], fvu, rtol=1e-9)
    np.testing.assert_allclose(r["explained_variance"], 1 - fvu, rtol=1e-9)
    np.testing.assert_allclose(r["l0"], (acts > 0).sum(1).mean())
    np.testing.assert_allclose(r["mse"], ((x - x_hat) ** 2).mean())
    assert np.isnan(EvalAccumulator(3).result()["fvu"])
