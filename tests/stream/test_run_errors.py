"""Errors of the run job stay visible: a write failure mid-run is the error the job ends with.

A real fault: the capture runs as `python -m arcstream.run` with RLIMIT_FSIZE
(what a full disk does to a write: the file cannot grow, EFBIG), so a shard
write fails part-way through the run. The job must exit non-zero with the
writer's own message (not a wrapper, not a later "failed earlier", not an
error raised while shutting down), the committed rows must be a clean run's
first rows, and a rerun without the limit must end equal to a clean run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.stream import test_run as _run

tiny_ckpt = _run.tiny_ckpt  # a module-scoped fixture
REPO = _run.REPO


def _with_file_size_limit(n_blocks: int, cmd: list[str]) -> list[str]:
    """`cmd` under `ulimit -f` (512-byte blocks), SIGXFSZ ignored: a write past it fails with EFBIG."""
    return ["sh", "-c", f'trap "" XFSZ; ulimit -f {n_blocks}; exec "$@"', "sh", *cmd]


@pytest.mark.slow
def test_a_write_failure_mid_run_is_the_error_the_job_ends_with_and_a_rerun_completes(tiny_ckpt, tmp_path):
    from arcstream.store import open_run
    from arcstream.stream.loop import run

    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    run(_run._config(tiny_ckpt, clean))
    cmd = [sys.executable, "-m", "arcstream.run", *_run._cli_overrides(tiny_ckpt, faulty)]
    # Shard files grow with each commit (the tail is rewritten): the first commits fit, a later one does not.
    p = subprocess.run(_with_file_size_limit(1400, cmd), env=_run._env(1), cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 1, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("arcstream.io.StoreWriteError: ") or \
        last.startswith("StoreWriteError: "), p.stderr[-3000:]
    assert "a file size limit was hit" in p.stderr and "Committed rows" in p.stderr
    assert "failed earlier" not in p.stderr and "the activation writer failed" not in p.stderr
    manifest = json.loads((faulty / "manifest.json").read_text())
    assert 1 <= manifest["step"] < open_run(str(clean)).step, "the fault came after a commit, before the end"
    a, b = open_run(str(clean)), open_run(str(faulty))
    assert 0 < b.rows < a.rows
    for s in a.sites:  # the durable rows are a clean run's first rows
        np.testing.assert_array_equal(np.asarray(b.activations(s)[:]), np.asarray(a.activations(s)[:b.rows]))
    p = subprocess.run(cmd, env=_run._env(1), cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    b = open_run(str(faulty))
    assert b.rows == a.rows and b.step == a.step
    for s in a.sites:
        np.testing.assert_array_equal(np.asarray(b.activations(s)[:]), np.asarray(a.activations(s)[:]))
