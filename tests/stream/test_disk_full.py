"""A real full disk: the run job on a small tmpfs that fills mid-run.

The run must stop with an error that says the disk is full and how to go on, leave the rows it committed
equal to a clean run's, and, once the tmpfs is grown (`mount -o remount,size=`), the same command must
resume to a store equal to the clean run's. Mounting needs root (CI runs as root); elsewhere the test is
skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.stream import test_run as _run

tiny_ckpt = _run.tiny_ckpt  # a module-scoped fixture


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture
def tmpfs(tmp_path):
    """A mount point and a function (size in bytes) -> (re)mount a tmpfs of that size there."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    point.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        opts = f"size={size}" if not mounted else f"remount,size={size}"
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True,
                           text=True)
        if p.returncode != 0:
            if not mounted:
                pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
            raise RuntimeError(f"remount failed: {p.stderr}")
        mounted.append(size)
        return point

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.slow  # three runs of the tiny model (~1 min here)
def test_a_disk_that_fills_mid_run_stops_cleanly_and_resumes_to_the_clean_store(tiny_ckpt, tmp_path, tmpfs):
    from arcstream.store import open_run

    cmd = [sys.executable, "-m", "arcstream.run"]
    clean = tmp_path / "clean"
    p = subprocess.run(cmd + _run._cli_overrides(tiny_ckpt, clean), env=_run._env(1), cwd=_run.REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    total = _du(clean)
    full = json.loads((clean / "manifest.json").read_text())["step"]
    assert full >= 3, "the clean run needs several commits for a mid-run fill"

    # Room for about half the store: the run fills the disk part way through.
    point = tmpfs(max(total // 2, 64 * 1024))
    out = point / "run"
    p = subprocess.run(cmd + _run._cli_overrides(tiny_ckpt, out), env=_run._env(1), cwd=_run.REPO,
                       capture_output=True, text=True)
    err = p.stdout + p.stderr
    assert p.returncode != 0, "the run finished on a disk with half the room it needs"
    assert "the disk is full" in err and "rerun the same command" in err, err[-3000:]

    # What was committed is readable and equal to the clean run's first rows.
    manifest = out / "manifest.json"
    assert manifest.exists(), "the disk filled before the first commit: the test needs a mid-run fill"
    committed, ref = open_run(str(out)), open_run(str(clean))
    assert 1 <= json.loads(manifest.read_text())["step"] < full
    assert 0 < committed.rows < ref.rows
    for s in ref.sites:
        np.testing.assert_array_equal(np.asarray(committed.activations(s)[:]),
                                      np.asarray(ref.activations(s)[: committed.rows]))

    # Grow the disk and rerun the same command: the store equals the clean run's.
    tmpfs(total * 4)
    p = subprocess.run(cmd + _run._cli_overrides(tiny_ckpt, out), env=_run._env(1), cwd=_run.REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    ra, rb = open_run(str(clean)), open_run(str(out))
    assert ra.rows == rb.rows
    for s in ra.sites:
        np.testing.assert_array_equal(np.asarray(ra.activations(s)[:]), np.asarray(rb.activations(s)[:]))
    a, b = _run._rows_by_token(clean), _run._rows_by_token(out)
    assert a.keys() == b.keys()
