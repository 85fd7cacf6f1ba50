"""The run lock (arcstream.store.lock), with real processes on one directory.

- two jobs started together, and a few seconds apart: one runs, the other exits EXIT_LOCKED before
  writing, with a message naming the directory and the holder (host, pid, run id, since when);
- flock: after the holder is SIGKILLed the OS has released the lock; the next run proceeds and logs
  that it took over a lock its holder never released;
- lease (ARCSTREAM_RUN_LOCK=lease, the kvstore mechanism on a directory two processes share): a
  SIGKILLed holder's lease still refuses while fresh, and once stale is taken over with a warning;
- leases in one process on memory://: conditional writes let exactly one of two takers win, a
  released lease is free at once, a holder whose lease was taken over is told (on_lost);
- a 2-process job (launch/local.py): process 0 takes the lock and process 1 checks it; when another job
  holds it, both processes stop with EXIT_LOCKED, process 1 saying process 0 could not take it;
- two real `arcstream.run` jobs started together: one is refused, the store equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from arcstream.cli import EXIT_LOCKED
from arcstream.store.lock import RunLockedError, acquire_run_lock, check_run_lock

REPO = Path(__file__).resolve().parents[2]
JOB = [sys.executable, "-m", "tests.store.lock_job", f"--config={REPO / 'tests/store/lock_job.py'}"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", ARCSTREAM_NO_PROGRESS="1")
    env.pop("ARCSTREAM_RUN_LOCK", None)
    env.pop("ARCSTREAM_LEASE_TIMEOUT_S", None)
    env.update(extra)
    return env


def _start(out: Path, seconds: float, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(JOB + [f"--config.output_dir={out}", f"--config.seconds={seconds}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_started(out: Path, p: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "writes.log").exists() and f"{p.pid} start" in (out / "writes.log").read_text():
            return
        if p.poll() is not None:
            raise AssertionError(f"the job ended ({p.returncode}) before starting: {p.communicate()[1][-2000:]}")
        time.sleep(0.05)
    raise AssertionError("the job did not start")


def _writers(out: Path) -> list[tuple[int, str]]:
    return [(int(a), b) for a, b in (ln.split() for ln in (out / "writes.log").read_text().splitlines())]


def _assert_refused(p: subprocess.Popen, out: Path, holder: subprocess.Popen, how: str) -> str:
    _, err = p.communicate(timeout=60)
    assert p.returncode == EXIT_LOCKED, err[-3000:]
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    assert str(out) in line and "another lock_test job holds its lock .lock_test.lock" in line
    assert f"({how}" in line
    assert f"host {socket.gethostname()}, pid {holder.pid}, run id " in line and " since 20" in line
    assert "--config.output_dir=" in line  # what to change
    return line


@pytest.mark.parametrize("mode", ["flock", "lease"])
@pytest.mark.parametrize("delay", [0.0, 2.0])
def test_a_second_job_on_the_same_directory_is_refused_naming_the_holder(tmp_path, mode, delay):
    env = _env(ARCSTREAM_RUN_LOCK=mode)
    out = tmp_path / "run"
    a = _start(out, 120.0, env)
    if delay:
        _wait_started(out, a)
        time.sleep(delay)
    b = _start(out, 120.0, env)
    procs = {a.pid: a, b.pid: b}
    # Started together, either may win; the other is refused before its job starts.
    deadline = time.time() + 60
    while a.poll() is None and b.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    loser = a if a.poll() is not None else b
    winner = b if loser is a else a
    assert not delay or loser is b, "a few seconds apart, the second job is the refused one"
    _assert_refused(loser, out, winner, mode)
    (out / "stop").touch()
    winner.communicate(timeout=60)
    assert winner.returncode == 0
    assert _writers(out) == [(winner.pid, "start"), (winner.pid, "end")], "only the holder wrote the directory"
    assert set(procs) == {winner.pid, loser.pid}


def test_flock_of_a_sigkilled_holder_is_released_and_the_next_run_says_it_took_over(tmp_path):
    out = tmp_path / "run"
    a = _start(out, 120.0, _env())
    _wait_started(out, a)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    b = _start(out, 0.0, _env())
    _, err = b.communicate(timeout=60)
    assert b.returncode == 0, err[-3000:]
    assert f"ended without releasing it (killed?); taking it over" in err and f"pid {a.pid}," in err
    assert _writers(out) == [(a.pid, "start"), (b.pid, "start"), (b.pid, "end")]
    # b let go cleanly: a third run takes the lock without a warning.
    c = _start(out, 0.0, _env())
    _, err = c.communicate(timeout=60)
    assert c.returncode == 0 and "taking it over" not in err


def test_a_sigkilled_holders_lease_refuses_while_fresh_and_is_taken_over_once_stale(tmp_path):
    env = _env(ARCSTREAM_RUN_LOCK="lease", ARCSTREAM_LEASE_TIMEOUT_S="3")
    out = tmp_path / "run"
    a = _start(out, 120.0, env)
    _wait_started(out, a)
    time.sleep(1.0)  # at least one heartbeat
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    killed_at = time.time()
    # Right after the kill the lease is fresh (heartbeats every 0.75 s): refused. Asked in this process, since
    # a new job's start-up (several seconds on a busy 2-core machine) could outlast the 3 s timeout.
    with pytest.raises(RunLockedError) as refused:
        acquire_run_lock(out, "lock_test", mode="lease", timeout_s=3)
    line = str(refused.value)
    assert f"host {socket.gethostname()}, pid {a.pid}, run id " in line and "last heartbeat" in line
    time.sleep(max(0.0, killed_at + 3.5 - time.time()))
    c = _start(out, 0.0, env)
    _, err = c.communicate(timeout=60)
    assert c.returncode == 0, err[-3000:]
    assert "taking over a stale lease" in err and f"pid {a.pid}," in err
    assert _writers(out) == [(a.pid, "start"), (c.pid, "start"), (c.pid, "end")]
    # c released its lease at the end: nothing is left to take over.
    assert not (out / ".lock_test.lock").exists()


def test_leases_on_a_kvstore_url_exclude_release_and_report_a_takeover():
    url = f"memory://lock-test-{uuid.uuid4().hex[:8]}"
    lost: list[bool] = []
    first = acquire_run_lock(url, "run", timeout_s=0.4, on_lost=lambda: lost.append(True))
    with pytest.raises(RunLockedError, match=f"{url} is in use: another run job holds its lock .run.lock"):
        acquire_run_lock(url, "run", timeout_s=0.4)
    assert check_run_lock(url, "run", first.holder.run_id).pid == os.getpid()
    time.sleep(0.6)  # heartbeats keep it fresh past the timeout
    with pytest.raises(RunLockedError):
        acquire_run_lock(url, "run", timeout_s=0.4)
    # A stalled holder: its heartbeat stops (the thread is stopped as a hung process would stop it).
    first._stop.set()
    first._thread.join()
    time.sleep(0.5)
    second = acquire_run_lock(url, "run", timeout_s=0.4)
    assert second.taken_over is not None and second.taken_over.run_id == first.holder.run_id
    # The stalled holder wakes up: its next heartbeat finds the lease taken and reports it.
    first._stop.clear()
    first._start_heartbeat(0.4, lambda: lost.append(True))
    first._thread.join(timeout=5)
    assert lost == [True] and first.lost
    first.release()  # does not delete the new holder's lease
    assert check_run_lock(url, "run", second.holder.run_id)
    second.release()
    third = acquire_run_lock(url, "run", timeout_s=0.4)  # released: free at once, nothing taken over
    assert third.taken_over is None
    third.release()


def test_two_takers_racing_for_a_fresh_lease_only_one_wins():
    import threading

    url = f"memory://lock-race-{uuid.uuid4().hex[:8]}"
    won, refused = [], []
    start = threading.Barrier(8)

    def take():
        start.wait()
        try:
            won.append(acquire_run_lock(url, "run", timeout_s=5))
        except RunLockedError:
            refused.append(True)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    won[0].release()


def test_jobs_of_other_kinds_do_not_exclude_each_other(tmp_path):
    a = acquire_run_lock(tmp_path, "run")
    b = acquire_run_lock(tmp_path, "train_sae", flag="--config.run_dir")
    with pytest.raises(RunLockedError, match=r"--config\.run_dir=\.\.\."):
        acquire_run_lock(tmp_path, "train_sae", flag="--config.run_dir")
    a.release()
    b.release()
    acquire_run_lock(tmp_path, "run").release()


@pytest.mark.multiprocess
def test_a_two_process_job_takes_the_lock_once_and_both_processes_stop_when_it_is_held(tmp_path):
    out = tmp_path / "run"
    logs = tmp_path / "logs"
    launch = [sys.executable, str(REPO / "launch/local.py"), "--processes", "2", "--devices", "1", "--log_dir",
              str(logs), "--"]
    p = subprocess.run(launch + JOB + [f"--config.output_dir={out}", "--config.seconds=0"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    text = "".join(f.read_text() for f in sorted(logs.glob("*.log")))
    assert p.returncode == 0, (p.stderr + text)[-3000:]
    assert sorted(w for _, w in _writers(out)) == ["end", "end", "start", "start"]  # the job ran on both
    record = json.loads((out / ".lock_test.lock").read_text())  # process 0's, released at the end
    assert record["released"] and "process 1 of 2" not in record
    # Now another job holds the lock: neither process runs the job.
    (out / "writes.log").unlink()
    for f in logs.glob("*.log"):
        f.unlink()
    with acquire_run_lock(out, "lock_test") as held:
        p = subprocess.run(launch + JOB + [f"--config.output_dir={out}", "--config.seconds=0"], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=300)
    logs1 = (logs / "process_1.log").read_text()  # process 0 writes to the launcher's own stderr
    assert p.returncode == EXIT_LOCKED, (p.stderr + logs1)[-3000:]
    assert f"pid {os.getpid()}, run id {held.holder.run_id}" in p.stderr
    # Process 1 stops too: on its own (EXIT_LOCKED, naming process 0), or stopped by the launcher first.
    assert "process 0 could not take the run lock on" in logs1 or "a process exited with 75" in p.stderr
    assert not (out / "writes.log").exists()


@pytest.mark.slow
def test_two_capture_runs_started_together_one_refused_and_the_store_is_a_clean_runs(tmp_path):
    from tests.stream.test_run import _cli_overrides, _config, _env as run_env, _rows_by_token
    from arcstream.data.tokenizer import build_arc_tokenizer
    from arcstream.model.testing import make_tiny_hf_checkpoint
    from arcstream.stream.loop import run

    ckpt = tmp_path / "ckpt"
    make_tiny_hf_checkpoint(ckpt, "qwen2", num_hidden_layers=3, max_position_embeddings=4096)
    build_arc_tokenizer("digits").save_pretrained(ckpt)
    shared = tmp_path / "shared"
    cmd = [sys.executable, "-m", "arcstream.run", *_cli_overrides(ckpt, shared)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=run_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, EXIT_LOCKED], [err[-2000:] for _, _, err in results]
    refused = next(err for p, _, err in results if p.returncode == EXIT_LOCKED)
    assert f"{shared} is in use: another run job holds its lock .run.lock (flock): host " in refused
    run(_config(ckpt, tmp_path / "clean"))
    a, b = _rows_by_token(tmp_path / "clean"), _rows_by_token(shared)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        for s in a[k]:
            assert (a[k][s] == b[k][s]).all()
