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
from tests.kill import REPO, EndedByItself, after_seconds, kill_at_random_moments, run_job

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


def _kill_after(run_dir: Path, seconds: float, outputs: list[str]) -> float:
    """Kills the job `seconds` after its start; a run on a less loaded machine can finish sooner than the
    timed one, so an attempt that ended by itself has its outputs removed and is tried again at half the
    time (the job is mostly start-up: the kill has to come before the end to test anything)."""
    for _ in range(6):
        try:
            kill_at_random_moments(_cmd(run_dir), [after_seconds(seconds)], max_delay=0.0)
            return seconds
        except EndedByItself:
            for name in outputs:
                (run_dir / name).unlink(missing_ok=True)
            seconds /= 2
    raise AssertionError(f"the job ended by itself before every kill, the last at {seconds * 2:.2f} s")


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
    for i, m in enumerate(moments):  # one kill at a time, each followed by a check that nothing is torn
        moments[i] = _kill_after(run, m, list(uninterrupted))
        _whole(run)
    run_job(_cmd(run))
    again = {k: v for k, v in _files(run).items() if k not in inputs and not k.endswith(".lock")}
    assert sorted(again) == sorted(uninterrupted), f"after kills at {moments} s"
    for name, data in uninterrupted.items():
        assert again[name] == data, f"{name} differs after kills at {moments} s"
