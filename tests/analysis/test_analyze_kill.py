"""`python -m arcstream.analyze` killed with SIGKILL at random moments, then the same command again: every
output equals an uninterrupted run's, and no kill leaves a torn file behind (each output is written to a
temporary name and renamed, so it is either the old file, absent, or whole).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.analysis.helpers import SITE, make_store, planted_sae
from tests.kill import REPO, after_seconds, kill_at_random_moments, run_job

OUTPUTS = ("analysis/features.json", "dashboard/index.html", "report.md")


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "arcstream.analyze", f"--config={REPO / 'configs/analyze.py'}",
            f"--config.run_dir={run_dir}", "--config.chunk_rows=512", "--config.ce_prompts=0"]


def _whole(run_dir: Path) -> None:
    """Every output present is complete: the JSON parses, the HTML ends, the report's last section is there."""
    f = run_dir / "analysis/features.json"
    if f.exists():
        json.loads(f.read_text())
    d = run_dir / "dashboard/index.html"
    if d.exists():
        assert d.read_text().rstrip().endswith("</html>")
    r = run_dir / "report.md"
    if r.exists():
        assert r.read_text().endswith("\n")


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in sorted(run_dir.rglob("*")) if f.is_file()}


@pytest.mark.slow  # four entry-point processes (~1 min here)
def test_analyze_killed_at_random_moments_reruns_to_the_uninterrupted_outputs(tmp_path):
    run = tmp_path / "run"  # one folder for both runs: the outputs name the run directory
    make_store(run)
    planted_sae(run / "saes" / SITE)
    inputs = set(_files(run))
    t0 = time.monotonic()
    run_job(_cmd(run))
    took = time.monotonic() - t0
    uninterrupted = {k: v for k, v in _files(run).items() if k not in inputs and not k.endswith(".lock")}
    assert set(OUTPUTS) <= set(uninterrupted), sorted(uninterrupted)
    for name in uninterrupted:
        (run / name).unlink()
    rng = np.random.default_rng()
    moments = [float(rng.uniform(0.2, 0.95)) * took for _ in range(2)]
    for m in moments:  # one kill at a time, each followed by a check that nothing is torn
        kill_at_random_moments(_cmd(run), [after_seconds(m)], max_delay=0.0)
        _whole(run)
    run_job(_cmd(run))
    again = {k: v for k, v in _files(run).items() if k not in inputs and not k.endswith(".lock")}
    assert sorted(again) == sorted(uninterrupted), f"after kills at {moments} s"
    for name, data in uninterrupted.items():
        assert again[name] == data, f"{name} differs after kills at {moments} s"
