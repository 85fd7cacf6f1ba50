"""`python -m arcstream.train_sae` killed with SIGKILL at random moments, then the same command again:
the exported SAEs equal an uninterrupted run's byte for byte, and metrics.jsonl has every step once.

Real kills of the real entry point (no stop flag): a kill may land in a step, in an Orbax save, in a
metrics flush or in the exports.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.analysis.helpers import SITE, make_store
from tests.kill import REPO, has_checkpoint, kill_at_random_moments, lines, run_job

STEPS = 60


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "arcstream.train_sae", f"--config={REPO / 'configs/train_sae.py'}",
            f"--config.run_dir={run_dir}", f"--config.sites={SITE}", "--config.sae.architecture=batchtopk",
            "--config.sae.expansion_factor=2", "--config.sae.k=4", "--config.sae.batch_size=64",
            "--config.sae.chunk_rows=16", f"--config.sae.train_tokens={64 * STEPS}",
            "--config.sae.warmup_steps=2", "--config.sae.dead_steps=5", "--config.sae.sweep=k=2,4",
            "--config.checkpoint_every=3", "--config.log_every=1"]


@pytest.mark.slow  # three or four entry-point processes (~1 min here)
def test_train_sae_killed_at_random_moments_resumes_to_the_uninterrupted_exports(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    make_store(full)
    shutil.copytree(full, killed)
    run_job(_cmd(full))

    metrics = killed / "saes" / "metrics.jsonl"
    ckpts = killed / "saes" / "train_sae_checkpoints"
    delays = kill_at_random_moments(_cmd(killed), [
        # anywhere once it trains (its first new metrics line), before a checkpoint too
        lambda: lines(metrics) > 0,
        # then once a checkpoint is on disk, so the last run resumes from one
        lambda: has_checkpoint(ckpts) and lines(metrics) > 0,
    ])
    p = run_job(_cmd(killed))
    assert "resumed SAE training from step" in p.stderr, f"no resume after delays {delays}"
    # our INFO lines reach the user, Orbax's (dozens per save: threads, renames, throughputs) do not
    assert "checkpoint_manager.py" not in p.stderr and "async_checkpointer.py" not in p.stderr, p.stderr[-2000:]

    for member in ("m0_k2", "m1_k4"):
        for name in ("sae_weights.safetensors", "cfg.json"):
            a = (full / "saes" / SITE / member / name).read_bytes()
            b = (killed / "saes" / SITE / member / name).read_bytes()
            assert a == b, f"{member}/{name} differs after kills at delays {delays}"
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert sorted((r["step"], r["member"]) for r in recs) == sorted(
        (s, m) for s in range(1, STEPS + 1) for m in ("m0_k2", "m1_k4")), f"delays {delays}"
