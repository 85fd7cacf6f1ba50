"""The embedded default run as a user runs it: configs/default.py unchanged but for the output directory
(and one device, as on a user's CPU).

One run (a few minutes here), then what its first command must leave: the store, SAE exports, scored
predictions, and the analysis at the end (dashboard/index.html, report.md), with several views per task (so
the invariance study classifies features) and one meaning of "dead" in the run summary and the analysis.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    import importlib

    from arcstream.stream.loop import run

    sys.path.insert(0, str(REPO / "configs"))
    try:
        c = importlib.import_module("default").get_config()
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("default") / "run"
    c.output_dir = str(out)
    c.mesh.data = 1  # the test process has 8 fake CPU devices (tests/conftest.py); a user's CPU run has one
    return out, run(c)


@pytest.mark.slow
def test_the_first_command_ends_on_the_dashboard(default_run):
    out, result = default_run
    assert (out / "dashboard" / "index.html").stat().st_size > 10_000
    assert (out / "report.md").read_text().count("## ") >= 2
    assert (out / "predictions" / "predictions.json").exists() and (out / "predictions" / "score.json").exists()
    rows = dict(result.summary_rows())
    assert "analysis" in rows and "dashboard" in rows["analysis"]
    # The time is attributed to every stage, the analysis included.
    assert result.timings["analysis"] > 0 and result.timings["predict"] > 0
    # Shape-constrained decoding: no answer runs to the token budget.
    assert "no_stop" not in result.predictions.failures
    # every generation that had a prompt got a shape (prompts too long to build have none)
    p = result.predictions
    assert p.generations - p.failures.get("too_long", 0) <= sum(p.shape_sources.values()) <= p.generations


@pytest.mark.slow
def test_several_views_per_task_feed_the_invariance_study(default_run):
    out, result = default_run
    features = json.loads((out / "analysis" / "features.json").read_text())
    for site, s in features["saes"].items():
        classes = {f["invariance"]["class"] for f in s["features"] if f.get("invariance")}
        assert s["invariance_groups"] >= 4, site
        assert classes - {"untested"}, f"{site}: every feature untested"


@pytest.mark.slow
def test_dead_means_the_same_in_the_summary_and_the_analysis(default_run):
    out, result = default_run
    features = json.loads((out / "analysis" / "features.json").read_text())
    rows = dict(result.summary_rows())
    for site, s in features["saes"].items():
        line = rows[f"  {site.removeprefix('blocks.')}"] if f"  {site.removeprefix('blocks.')}" in rows else ""
        m = re.search(r"dead (\d+) of (\d+)", line)
        assert m, f"{site}: no dead count in the summary: {line!r}"
        assert int(m.group(1)) == s["dead"] and int(m.group(2)) == s["d_sae"]
        # Measured with every token drawn twice at lr 5e-4 (152k draws, 149 SAE steps): 7.7% and 1.6%. Drawn once
        # at 1e-3 it was 10.5% and 2.6%; with the fitted encoder scale (sae.fit_encoder_scale, off for this run)
        # 26.9% and 12.1%. Issue 14 asks for fewer than 10%.
        assert s["dead"] < 0.10 * s["d_sae"], f"{site}: {s['dead']} of {s['d_sae']} latents dead"
    assert not any("dead_fraction" in v for v in rows.values())
