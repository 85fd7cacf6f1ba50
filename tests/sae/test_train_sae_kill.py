"""`python -m arcstream.train_sae` killed with SIGKILL at random moments, then the same command again:
the exported SAEs equal an uninterrupted run's byte for byte, and metrics.jsonl has every step once.

Real kills of the real entry point (no stop flag): a kill may land in a step, in an Orbax save, in a
metrics flush or in the exports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.analysis.helpers import SITE, make_store

REPO = Path(__file__).resolve().parents[2]
STEPS = 60


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "arcstream.train_sae", f"--config={REPO / 'configs/train_sae.py'}",
            f"--config.run_dir={run_dir}", f"--config.sites={SITE}", "--config.sae.architecture=batchtopk",
            "--config.sae.expansion_factor=2", "--config.sae.k=4", "--config.sae.batch_size=64",
            "--config.sae.chunk_rows=16", f"--config.sae.train_tokens={64 * STEPS}",
            "--config.sae.warmup_steps=2", "--config.sae.dead_steps=5", "--config.sae.sweep=k=2,4",
            "--config.checkpoint_every=3", "--config.log_every=1"]


def _env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", ARCSTREAM_NO_PROGRESS="1", XLA_FLAGS="")


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow  # three or four entry-point processes (~1 min here)
def test_train_sae_killed_at_random_moments_resumes_to_the_uninterrupted_exports(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    make_store(full)
    shutil.copytree(full, killed)
    p = subprocess.run(_cmd(full), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    rng = np.random.default_rng()  # random moments; the delays are in the assertion messages
    metrics = killed / "saes" / "metrics.jsonl"
    delays = []
    ckpts = killed / "saes" / "checkpoints"
    for attempt in range(2):
        proc = subprocess.Popen(_cmd(killed), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        start = _lines(metrics)
        t0 = time.monotonic()

        def ready() -> bool:
            if attempt == 0:  # anywhere once it trains (its first new metrics line), before a checkpoint too
                return _lines(metrics) > start
            # the second attempt: once a checkpoint is on disk, so the last run resumes from one
            return ckpts.exists() and any(d.name.isdigit() for d in ckpts.iterdir())

        while not ready() and proc.poll() is None and time.monotonic() - t0 < 300:
            time.sleep(0.01)
        delays.append(float(rng.uniform(0.0, 0.3)))
        time.sleep(delays[-1])
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"attempt ended by itself after delays {delays}: {err[-2000:]}"
    p = subprocess.run(_cmd(killed), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
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
