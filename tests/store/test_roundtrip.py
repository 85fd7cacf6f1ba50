"""Write with several processes, read back one logical array per site: exact in every dtype."""

import json

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from arcstream.store import StoreWriter, open_run, write_manifest
from arcstream.store.layout import numpy_dtype
from tests.store.helpers import (CONFIG, SITES, assert_reader_equals, bits, expected, make_batch, raw_arrays,
                                 write_steps, write_two_processes)

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_two_processes_read_back_as_one_logical_array_in_every_dtype(tmp_path, dtype):
    # rows_per_shard=16 with 3-60 rows per step: whole-shard writes, tails, and tails completed later.
    write_two_processes(tmp_path, range(6), dtype=dtype, rows_per_shard=16, rows_per_chunk=4)
    assert numpy_dtype(dtype) == DTYPES[dtype]
    assert_reader_equals(tmp_path, {0: range(6), 1: range(6)}, DTYPES[dtype])
    reader = open_run(tmp_path)
    assert reader.step == 6 and reader.config == CONFIG and reader.sites == SITES
    offsets = reader.process_offsets
    # process 0's rows come first: the logical array is the concatenation in process order
    p0, _, _ = expected({0: range(6)}, DTYPES[dtype])
    site = next(iter(SITES))
    np.testing.assert_array_equal(bits(np.asarray(reader.activations(site)[: offsets[1]])), bits(p0[site]))
    assert offsets[-1] == reader.rows == len(reader)


def test_slices_and_index_arrays_cross_process_boundaries(tmp_path):
    write_two_processes(tmp_path, range(3), dtype="float32", rows_per_shard=8, rows_per_chunk=2)
    reader = open_run(tmp_path)
    acts, _, _ = expected({0: range(3), 1: range(3)}, np.dtype(np.float32))
    site = "blocks.1.hook_mlp_out"
    view = reader.activations(site)
    assert tuple(view.shape) == acts[site].shape
    b = int(reader.process_offsets[1])
    np.testing.assert_array_equal(np.asarray(view[b - 3: b + 4]), acts[site][b - 3: b + 4])
    idx = np.array([0, b, b - 1, len(acts[site]) - 1, 5])
    np.testing.assert_array_equal(view[idx].read().result(), acts[site][idx])
    np.testing.assert_array_equal(np.asarray(view[b:, 2]), acts[site][b:, 2])


def test_plain_readers_see_exactly_the_durable_rows_of_a_finished_run(tmp_path):
    write_two_processes(tmp_path, range(4), dtype="float16", rows_per_shard=16, rows_per_chunk=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    arrays = raw_arrays(tmp_path)
    assert len(arrays) == 2 * (len(SITES) + 8)
    for key, data in arrays.items():
        p = int(key.rsplit("/p", 1)[1])
        assert data.shape[0] == manifest["processes"][p]["rows"], key


def test_memory_and_file_urls_work_like_local_paths(tmp_path):
    for url in ("memory://roundtrip/run", f"file://{tmp_path}/run"):
        writer = StoreWriter.create_or_resume(url, sites=SITES, config=CONFIG, rows_per_shard=16)
        write_steps(writer, range(3))
        reader = open_run(url)
        acts, toks, _ = expected({0: range(3)}, np.dtype(ml_dtypes.bfloat16))
        for s in SITES:
            np.testing.assert_array_equal(bits(np.asarray(reader.activations(s))), bits(acts[s]))
        np.testing.assert_array_equal(reader.tokens(["token_id"])["token_id"], toks["token_id"])
        assert reader.manifest.step == 3 and len(reader.prompts()) == len(expected({0: range(3)}, np.float32)[2])
    assert (tmp_path / "run" / "manifest.json").exists()


def test_reader_sees_only_the_manifest_while_a_run_is_in_progress(tmp_path):
    writers = [StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=CONFIG, process_index=p,
                                            process_count=2, rows_per_shard=8, dtype="float32") for p in (0, 1)]
    for w in writers:
        write_steps(w, range(2))
    write_manifest(str(tmp_path), 2)
    # step 2: process 0 has committed its ledger, process 1 has only appended; no new manifest yet
    write_steps(writers[0], range(2, 4))
    write_steps(writers[1], range(2, 4), commit=False)
    writers[1].wait()
    assert_reader_equals(tmp_path, {0: range(2), 1: range(2)}, np.dtype(np.float32))
    with pytest.raises(Exception, match="different steps"):
        write_manifest(str(tmp_path), 2)
    assert open_run(tmp_path).step == 2


def test_writer_issues_whole_shard_writes_and_reports_pending_bytes(tmp_path):
    writer = StoreWriter.create_or_resume(str(tmp_path), sites={"s": 64}, config={}, rows_per_shard=32,
                                          dtype="float32")
    rows, tokens, prompts = make_batch(0, 0, {"s": 64})
    n = len(tokens["prompt"])
    big = {"s": np.tile(rows["s"], (8, 1))}
    big_tokens = {f: np.tile(v, 8) for f, v in tokens.items()}
    writer.append(big, big_tokens, prompts)
    assert writer.buffered_rows == (8 * n) % 32 and writer.rows == 8 * n
    assert writer.pending_bytes >= 0
    writer.wait()
    assert writer.pending_bytes == 0
    # whole shards are on disk before any commit; the manifest does not exist yet
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "activations/s/p00000")}}
    full = (8 * n) // 32 * 32
    on_disk = ts.open(spec).result()
    assert on_disk.shape[0] >= full  # the extent may run ahead of the rows between commits
    np.testing.assert_array_equal(np.asarray(on_disk[:full]), big["s"][:full])
    assert not (tmp_path / "manifest.json").exists()
    writer.commit(1)
    assert ts.open(spec).result().shape[0] == 8 * n  # a commit trims it to exactly the rows
    np.testing.assert_array_equal(np.asarray(open_run(tmp_path).activations("s")), big["s"])


def test_append_copies_its_input_so_the_caller_may_reuse_its_buffers(tmp_path):
    writer = StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=CONFIG, rows_per_shard=16,
                                          dtype="float32")
    rows, tokens, prompts = make_batch(0, 0)
    originals = {s: x.copy() for s, x in rows.items()}, {f: t.copy() for f, t in tokens.items()}
    writer.append(rows, tokens, prompts)
    for x in [*rows.values(), *tokens.values()]:
        x[...] = 0  # the drain thread reuses its host buffer for the next batch
    writer.commit(1)
    reader = open_run(tmp_path)
    for s in SITES:
        np.testing.assert_array_equal(np.asarray(reader.activations(s)), originals[0][s])
    np.testing.assert_array_equal(reader.tokens()["position"], originals[1]["position"])


def test_max_pending_bytes_zero_makes_append_wait_for_its_writes(tmp_path):
    writer = StoreWriter.create_or_resume(str(tmp_path), sites=SITES, config=CONFIG, rows_per_shard=8,
                                          max_pending_bytes=0)
    for step in range(4):
        writer.append(*make_batch(0, step))
        assert writer.pending_bytes == 0  # backpressure: nothing left in flight when append returns
    assert writer.rows > 16 and writer.durable_rows == 0
