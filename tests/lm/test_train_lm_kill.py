"""`python -m arcstream.train_lm` killed with SIGKILL at random moments, then the same command again: the
exported weights equal an uninterrupted run's byte for byte, and metrics.jsonl has every step once, with
the uninterrupted run's losses.

Real kills of the real entry point (no stop flag): a kill may land in a step, in an Orbax save (the model,
the optimiser and the data streams' state), in a metrics flush.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.kill import REPO, has_checkpoint, kill_at_random_moments, lines, run_job

STEPS = 16


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "arcstream.train_lm", f"--config={REPO / 'configs/train_lm.py'}:smoke",
            f"--config.output_dir={out}", "--config.export_dtype=float32", "--config.data.seq_len=512",
            "--config.data.max_prompt_len=512", "--config.data.max_tasks=12", f"--config.train.steps={STEPS}",
            "--config.train.checkpoint_every=3", "--config.train.log_every=1", "--config.train.eval_every=0",
            "--config.eval.accuracy=False", "--config.eval.context_tasks=0", "--config.eval.final_prompts=2"]


def _records(out: Path) -> list[tuple]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["tokens"], r["epoch"]) for r in recs if "loss" in r]


@pytest.mark.slow  # four entry-point processes (~1 min here)
def test_train_lm_killed_at_random_moments_resumes_to_the_uninterrupted_export(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_job(_cmd(full))
    metrics, ckpts = killed / "metrics.jsonl", killed / "checkpoints"
    delays = kill_at_random_moments(_cmd(killed), [
        lambda: lines(metrics) > 0,  # anywhere once it trains, a checkpoint or not
        lambda: has_checkpoint(ckpts) and lines(metrics) > 3,  # after a checkpoint: the last run resumes from one
    ])
    p = run_job(_cmd(killed))
    assert "resum" in p.stderr, f"no resume after delays {delays}: {p.stderr[-2000:]}"
    a = (full / "export" / "model.safetensors").read_bytes()
    b = (killed / "export" / "model.safetensors").read_bytes()
    assert a == b, f"exported weights differ after kills at delays {delays}"
    ra, rb = _records(full), _records(killed)
    assert [r[0] for r in ra] == list(range(1, STEPS + 1)), ra
    assert rb == ra, f"metrics after kills at delays {delays}"
