"""Faults: a full disk, an unwritable directory, a failure while replacing the manifest."""

import errno
import os
import resource
import signal
import subprocess

import ml_dtypes
import numpy as np
import pytest

from arcstream.store import StoreWriteError, StoreWriter, open_run
from arcstream import io as layout_module
from tests.store.helpers import CONFIG, SITES, assert_reader_equals, make_batch, run_uninterrupted, tree_files, write_steps

BF16 = np.dtype(ml_dtypes.bfloat16)
KW = dict(rows_per_shard=16, rows_per_chunk=4)


@pytest.fixture
def file_size_limit():
    """Lets a test cap the size of any file this process writes (EFBIG, as a full disk would refuse)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the errno, not a killed process

    def set_limit(n_bytes):
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))

    yield set_limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)


def test_a_failing_shard_write_raises_a_clear_error_and_leaves_committed_rows(tmp_path, file_size_limit):
    sites = {"wide": 64}
    config = {"what": "disk full"}
    writer = StoreWriter.create_or_resume(str(tmp_path), sites=sites, config=config, dtype="float32",
                                          rows_per_shard=32, rows_per_chunk=8)
    write_steps(writer, range(3))
    committed = open_run(tmp_path).rows
    before = tree_files(tmp_path)
    file_size_limit(4096)  # a 32-row float32 shard of width 64 is 8 KiB: every shard write now fails
    with pytest.raises(StoreWriteError) as info:
        for step in range(3, 20):
            writer.append(*make_batch(0, step, sites))
            writer.commit(step + 1)
    message = str(info.value)
    assert "a file size limit was hit" in message and "Committed rows" in message and "rerun" in message
    assert "activations/wide/p00000" in message
    with pytest.raises(StoreWriteError, match="failed earlier"):
        writer.commit(99)  # a failed writer refuses to go on
    file_size_limit(resource.RLIM_INFINITY)
    reader = open_run(tmp_path)
    assert reader.rows == committed and reader.step == 3
    for key in ("manifest.json", "ledger/p00000.json", "config.json"):
        assert tree_files(tmp_path)[key] == before[key]
    # fixing the cause and rerunning resumes from the committed rows
    resumed = StoreWriter.create_or_resume(str(tmp_path), sites=sites, config=config, dtype="float32",
                                           rows_per_shard=32, rows_per_chunk=8)
    assert resumed.resume_step == 3
    write_steps(resumed, range(3, 6))
    assert open_run(tmp_path).step == 6


def test_a_failure_while_replacing_the_manifest_keeps_the_old_one_whole(tmp_path, monkeypatch):
    writer = StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=CONFIG, **KW)
    write_steps(writer, range(2))
    old_manifest = (tmp_path / "manifest.json").read_bytes()
    writer.append(*make_batch(0, 2))

    def half_write_then_disk_full(path, data):
        if path.name.startswith(".manifest.json"):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, data)

    real_write = layout_module._write_and_fsync
    monkeypatch.setattr(layout_module, "_write_and_fsync", half_write_then_disk_full)
    with pytest.raises(StoreWriteError) as info:
        writer.commit(3)
    assert "the disk is full" in str(info.value) and "previous manifest.json" in str(info.value)
    assert (tmp_path / "manifest.json").read_bytes() == old_manifest
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # the half-written temp file is gone
    assert_reader_equals(tmp_path, {0: range(2)}, BF16)


def test_an_unwritable_output_dir_raises_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreWriteError, match=r"output_dir '.*a_file/run' is not writable.*--config.output_dir"):
        StoreWriter.create_or_resume(str(blocker / "run"), sites=SITES, config=CONFIG)


def test_a_read_only_output_dir_raises_and_keeps_committed_rows(tmp_path):
    """A store the job may no longer write: by directory permissions for a user; for root, which writes
    through them (CI runs as root), by a read-only bind mount of the same directory."""
    run_uninterrupted(tmp_path, range(2), **KW)
    if os.geteuid() != 0:
        os.chmod(tmp_path, 0o555)
        try:
            with pytest.raises(StoreWriteError, match="permission denied"):
                StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=CONFIG, **KW)
        finally:
            os.chmod(tmp_path, 0o755)
    else:
        point = tmp_path.parent / f"{tmp_path.name}-ro"
        point.mkdir()
        for args in (["--bind", str(tmp_path), str(point)], ["-o", "remount,ro,bind", str(point)]):
            p = subprocess.run(["mount", *args], capture_output=True, text=True)
            assert p.returncode == 0, f"root could not bind-mount {tmp_path} read-only: {p.stderr}"
        try:
            with pytest.raises(StoreWriteError, match="the file system is read-only"):
                StoreWriter.create_or_resume(str(point), sites=SITES, config=CONFIG, **KW)
        finally:
            subprocess.run(["umount", "-l", str(point)], check=False)
    assert_reader_equals(tmp_path, {0: range(2)}, BF16)
