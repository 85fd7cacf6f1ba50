"""What every benchmark records beside its figures (imported as `common`: scripts run from benchmarks/)."""

from __future__ import annotations

import os
import subprocess
import time

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


def timed_child(cmd: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
                capture: bool = False, stderr_path: str | None = None) -> tuple[float, float, int, str]:
    """Run one child process: (wall seconds, its peak RSS in GB from `wait4`, exit code, stdout if `capture`).

    `stderr_path`: the child's stderr (absl, Orbax, progress bars) goes to that file, not to ours."""
    err = open(stderr_path, "w") if stderr_path else None
    try:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE if capture else None, stderr=err, text=True)
        out = p.stdout.read() if capture else ""
        _, status, usage = os.wait4(p.pid, 0)
        return time.perf_counter() - t0, usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status), out
    finally:
        if err is not None:
            err.close()
