"""What every benchmark records beside its figures (imported as `common`: scripts run from benchmarks/)."""

from __future__ import annotations

import os
import subprocess

_HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit() -> str:
    """The short commit hash of the checkout the benchmark ran from, `+dirty` when the library or the
    benchmarks have uncommitted changes (the figures then belong to no commit), or "unknown"."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=_HERE, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":/arcstream", ":/benchmarks"],
                               capture_output=True, text=True, cwd=_HERE).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
