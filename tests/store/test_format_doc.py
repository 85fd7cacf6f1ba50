"""docs/FORMAT.md is true: its code runs, and zarr-python / plain TensorStore read every array."""

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import zarr
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.storage import LocalStore, StorePath

from tests.store.helpers import SITES, bits, expected, write_two_processes

DOC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_format_doc_snippets_read_the_same_rows_as_the_writer_wrote(tmp_path, dtype):
    write_two_processes(tmp_path, range(3), dtype=dtype, rows_per_shard=16, rows_per_chunk=4)
    blocks = _doc_blocks()
    assert len(blocks) == 4, "FORMAT.md's python blocks changed: update this test"
    assert 'run_dir = "runs/demo"' in blocks[0]
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace('"runs/demo"', repr(str(tmp_path))), str(DOC), "exec"), namespace)
    acts, toks, prompts = expected({0: range(3), 1: range(3)}, DTYPES[dtype])
    site = namespace["site"]
    assert site == next(iter(SITES))
    np.testing.assert_array_equal(bits(namespace["first"]), bits(acts[site][:100]))
    for name in ("ts_acts", "zarr_acts"):
        assert namespace[name].dtype == DTYPES[dtype], name
        np.testing.assert_array_equal(bits(namespace[name]), bits(acts[site]), err_msg=name)
    np.testing.assert_array_equal(namespace["ts_prompt"], toks["prompt"])
    np.testing.assert_array_equal(namespace["zarr_colour"], toks["colour"])
    assert namespace["task_of_row_0"] == prompts[int(toks["prompt"][0])].task_id


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_zarr_python_opens_every_array_of_a_run(tmp_path, dtype):
    write_two_processes(tmp_path, range(2), dtype=dtype, rows_per_shard=16, rows_per_chunk=4)
    arrays = sorted(p.parent for p in tmp_path.rglob("zarr.json"))
    assert len(arrays) == 2 * (len(SITES) + 8)
    for path in arrays:
        reference = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()
        reference = reference.read().result()
        meta = json.loads((path / "zarr.json").read_text())
        if meta["data_type"] == "bfloat16":
            meta.update(data_type="uint16", fill_value=0)
            z = zarr.Array(zarr.AsyncArray(metadata=ArrayV3Metadata.from_dict(meta),
                                           store_path=StorePath(LocalStore(str(path), read_only=True))))
            got = z[:].view(ml_dtypes.bfloat16)
        else:
            got = zarr.open_array(str(path), mode="r")[:]
        assert got.dtype == reference.dtype and got.shape == reference.shape, path
        np.testing.assert_array_equal(got.view(np.uint8), reference.view(np.uint8), err_msg=str(path))
