"""Crash and resume: only committed rows are visible, and a resumed run ends identical to an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from arcstream.store import ConfigMismatchError, StoreWriter, open_run, write_manifest
from tests.store.helpers import (CONFIG, SITES, assert_reader_equals, raw_arrays, run_uninterrupted, tree_files,
                                 write_steps, write_two_processes)

BF16 = np.dtype(ml_dtypes.bfloat16)
REPO = Path(__file__).resolve().parents[2]
KW = dict(rows_per_shard=16, rows_per_chunk=4)


def _assert_same_store(a, b):
    files_a, files_b = tree_files(a), tree_files(b)
    assert sorted(files_a) == sorted(files_b)  # no stale shard, ledger or prompt segment left behind
    arrays_a, arrays_b = raw_arrays(a), raw_arrays(b)
    for key in arrays_a:
        np.testing.assert_array_equal(arrays_a[key].view(np.uint8), arrays_b[key].view(np.uint8), err_msg=key)
    for key in ("manifest.json", "config.json", "ledger/p00000.json"):
        assert files_a[key] == files_b[key], key


def test_uncommitted_rows_are_invisible_and_resume_rewrites_them_identically(tmp_path):
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    writer = StoreWriter.create_or_resume(str(crashed), sites=SITES, config=CONFIG, **KW)
    write_steps(writer, range(4))
    # steps 4..7 appended and their whole shards written, but never committed: then the "crash"
    write_steps(writer, range(4, 8), commit=False)
    writer.wait()
    assert writer.rows > writer.durable_rows
    del writer
    assert_reader_equals(crashed, {0: range(4)}, BF16)

    resumed = StoreWriter.create_or_resume(str(crashed), sites=SITES, config=CONFIG, **KW)
    assert resumed.resume_step == 4 and resumed.rows == resumed.durable_rows == open_run(crashed).rows
    write_steps(resumed, range(resumed.resume_step, 10))
    run_uninterrupted(clean, range(10), **KW)
    assert_reader_equals(crashed, {0: range(10)}, BF16)
    _assert_same_store(crashed, clean)


def test_two_process_resume_goes_back_to_the_manifest_when_a_ledger_ran_ahead(tmp_path):
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    write_two_processes(crashed, range(3), **KW)
    # step 3: process 0 commits its ledger, process 1 dies before committing; no manifest for step 3
    w0 = StoreWriter.create_or_resume(str(crashed), sites=SITES, config=CONFIG, process_index=0, process_count=2, **KW)
    w1 = StoreWriter.create_or_resume(str(crashed), sites=SITES, config=CONFIG, process_index=1, process_count=2, **KW)
    write_steps(w0, [3])
    write_steps(w1, [3], commit=False)
    w1.wait()
    del w0, w1
    assert_reader_equals(crashed, {0: range(3), 1: range(3)}, BF16)
    resumed = [StoreWriter.create_or_resume(str(crashed), sites=SITES, config=CONFIG, process_index=p,
                                            process_count=2, **KW) for p in (0, 1)]
    assert [w.resume_step for w in resumed] == [3, 3]
    for step in range(3, 6):
        for w in resumed:
            write_steps(w, [step])
        write_manifest(str(crashed), 2)
    write_two_processes(clean, range(6), **KW)
    _assert_same_store(crashed, clean)


@pytest.mark.multiprocess
def test_kill_9_at_a_random_moment_then_resume_equals_an_uninterrupted_run(tmp_path):
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from arcstream.store import StoreWriter\n"
        "from tests.store.helpers import CONFIG, SITES, write_steps\n"
        "w = StoreWriter.create_or_resume(sys.argv[2], sites=SITES, config=CONFIG, rows_per_shard=16, rows_per_chunk=4)\n"
        "write_steps(w, range(w.resume_step, 100000))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(REPO), str(crashed)], env={**os.environ})
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for a few commits, then kill mid-stream
        if (crashed / "manifest.json").exists() and open_run(crashed).step >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = open_run(crashed).step
    assert killed_at >= 5
    assert_reader_equals(crashed, {0: range(killed_at)}, BF16)
    end = killed_at + 4
    resumed = StoreWriter.create_or_resume(str(crashed), sites=SITES, config=CONFIG, **KW)
    assert resumed.resume_step == killed_at
    write_steps(resumed, range(killed_at, end))
    run_uninterrupted(clean, range(end), **KW)
    _assert_same_store(crashed, clean)


def test_a_different_config_raises_with_the_differing_keys(tmp_path):
    run_uninterrupted(tmp_path, range(2), **KW)
    other = {**CONFIG, "seed": 1, "sae": {"enabled": True, "k": 8}, "new_key": "x"}
    with pytest.raises(ConfigMismatchError) as info:
        StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=other, **KW)
    message = str(info.value)
    assert "seed: stored=0, requested=1" in message
    assert "sae.enabled: stored=False, requested=True" in message
    assert "new_key: stored=<absent>, requested='x'" in message
    assert "sae.k" not in message  # only what differs
    assert_reader_equals(tmp_path, {0: range(2)}, BF16)  # committed rows untouched


def test_a_different_store_layout_raises_naming_the_field(tmp_path):
    run_uninterrupted(tmp_path, range(2), **KW)
    with pytest.raises(ConfigMismatchError, match=r"dtype: stored='bfloat16', requested='float32'"):
        StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=CONFIG, dtype="float32", **KW)
    with pytest.raises(ConfigMismatchError, match=r"process_count: stored=1, requested=2"):
        StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=CONFIG, process_count=2, **KW)


def test_commit_refuses_a_step_that_goes_backwards(tmp_path):
    writer = StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=CONFIG, **KW)
    write_steps(writer, range(3))
    writer.commit(3)  # re-committing the same step is fine (idempotent)
    with pytest.raises(ValueError, match="step=2 must be an int >= the last committed step 3"):
        writer.commit(2)


def test_resume_removes_temporaries_a_kill_left_behind(tmp_path):
    """A kill between writing a small file's temporary and renaming it leaves `.NAME.tmp-*`; resume deletes them."""
    from arcstream.store import StoreWriter
    from tests.store.helpers import CONFIG, SITES, write_steps

    w = StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=CONFIG, rows_per_shard=16, rows_per_chunk=4)
    write_steps(w, range(3))
    w.close()
    stale = [tmp_path / "prompts" / "p00000" / ".000003.jsonl.tmp-1-abcd", tmp_path / "ledger" / ".p00000.json.tmp-1-ab",
             tmp_path / ".manifest.json.tmp-1-ab"]
    other = tmp_path / "ledger" / ".p00001.json.tmp-1-ab"  # another process's: not this writer's to remove
    for p in stale + [other]:
        p.write_text("partial")
    StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=CONFIG, rows_per_shard=16,
                                 rows_per_chunk=4).close()
    assert not any(p.exists() for p in stale) and other.exists()
