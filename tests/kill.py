"""Real SIGKILLs of a real entry point at random moments: one helper for every job's kill test."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


class EndedByItself(AssertionError):
    """An attempt of `kill_at_random_moments` finished before its moment came (a test whose moments are
    times may catch it and try an earlier one; every other test fails on it)."""


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a killed job: CPU, one device, no progress bars (a test reads stderr)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", ARCSTREAM_NO_PROGRESS="1", XLA_FLAGS="", **extra)


def run_job(cmd: Sequence[str], *, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `cmd` to the end from the repository root; fails the test, with its stderr, if it fails."""
    p = subprocess.run(list(cmd), cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd[:3])} failed ({p.returncode}):\n{p.stderr[-4000:]}"
    return p


def kill_at_random_moments(cmd: Sequence[str], moments: Sequence[Callable[[], bool]], *,
                           max_delay: float = 0.3, wait: float = 300) -> list[float]:
    """Starts `cmd` once per entry of `moments`; each time waits until that predicate holds, then a random
    0..max_delay s more, and sends SIGKILL. Returns the random delays (for the assertion messages); fails
    the test if an attempt ended by itself instead of being killed."""
    rng = np.random.default_rng()
    delays: list[float] = []
    for ready in moments:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while not ready() and proc.poll() is None and time.monotonic() - t0 < wait:
            time.sleep(0.01)
        delays.append(float(rng.uniform(0.0, max_delay)))
        time.sleep(delays[-1])
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        if proc.returncode != -signal.SIGKILL:
            raise EndedByItself(f"attempt ended by itself (exit {proc.returncode}) after delays {delays}: "
                                f"{err[-2000:]}")
    return delays


def lines(path: Path) -> int:
    """Lines in a file that may not exist yet (a job's metrics or details log)."""
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def has_checkpoint(folder: Path) -> bool:
    """Whether an Orbax checkpoint folder holds a finished step (a digit-named directory)."""
    return folder.exists() and any(d.name.isdigit() for d in folder.iterdir())


def after_seconds(seconds: float) -> Callable[[], bool]:
    """A moment for `kill_at_random_moments`: `seconds` after the attempt starts (its first poll)."""
    start: list[float] = []

    def ready() -> bool:
        if not start:
            start.append(time.monotonic())
        return time.monotonic() - start[0] >= seconds

    return ready
