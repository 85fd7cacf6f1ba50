"""Where a run's files live, what each array looks like, and how small files are committed.

A run directory (a local path or any TensorStore kvstore URL) holds:

    config.json                        resolved config (process 0, at creation)
    manifest.json                      the run-level commit record (process 0, after each barrier)
    ledger/p00000.json                 one process's commit record (its own rows, step, prompt segments)
    activations/<site>/p00000/         zarr3 [rows, d], sharding codec, one array per (site, process)
    tokens/<field>/p00000/             zarr3 [rows], one array per (token field, process)
    prompts/p00000/000000.jsonl        prompt table segments, one per commit that added prompts

Every process owns the arrays named after it, so two processes never write the
same shard and no locking is needed. docs/FORMAT.md documents the layout for
readers that do not use arcstream.

This module holds the layout only: key names, array metadata, the prompt
table's JSON and the store's config error. Reading and writing a run directory
(local or kvstore URL) is `arcstream.io`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorstore as ts

from arcstream.io import StoreError, process_name

FORMAT_NAME = "arcstream-store"
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"

# Token metadata written row for row with the activations, and its on-disk dtype.
# `prompt` is the global prompt index, `position` the position within the prompt;
# the cell fields come from arcstream.data.records.CELL_FIELDS (-1 = none, grid_kind 0 = none).
TOKEN_FIELDS: dict[str, np.dtype] = {
    "prompt": np.dtype(np.int32),
    "position": np.dtype(np.int32),
    "token_id": np.dtype(np.int32),
    "grid_kind": np.dtype(np.int8),
    "pair_index": np.dtype(np.int8),
    "row": np.dtype(np.int8),
    "col": np.dtype(np.int8),
    "colour": np.dtype(np.int8),
}

DTYPES = ("bfloat16", "float16", "float32")


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a store dtype name (`bfloat16` is `ml_dtypes.bfloat16`)."""
    if name not in DTYPES:
        raise ValueError(f"store dtype={name!r} is not supported; expected one of {DTYPES}")
    return ts.dtype(name).numpy_dtype


def activation_key(site: str, process_index: int) -> str:
    return f"activations/{site}/{process_name(process_index)}"


def token_key(field: str, process_index: int) -> str:
    return f"tokens/{field}/{process_name(process_index)}"


def ledger_key(process_index: int) -> str:
    return f"ledger/{process_name(process_index)}.json"


def prompt_segment_key(process_index: int, segment: int) -> str:
    return f"prompts/{process_name(process_index)}/{segment:06d}.jsonl"


def check_site_name(site: str) -> None:
    """Site names become directory names: refuse the ones that would escape or collide."""
    if not isinstance(site, str) or not site or "/" in site or "\\" in site or site.startswith("."):
        raise ValueError(
            f"site name {site!r} cannot be stored: it becomes a directory name under activations/, "
            "so it must be a non-empty string without '/' or '\\' that does not start with '.' "
            "(e.g. 'blocks.11.hook_resid_post')")


def activation_metadata(d: int, dtype: str, rows_per_shard: int, rows_per_chunk: int,
                        site: str, process_index: int) -> dict[str, Any]:
    """zarr3 metadata of one activation array: `[rows, d]`, a shard = `rows_per_shard` rows.

    The sharding codec keeps the file count low (one file per shard) while readers
    still fetch `rows_per_chunk`-row pieces. No compression: activations in
    bf16 barely compress and the writer must keep up with the forward pass.
    """
    return {
        "shape": [0, d],
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rows_per_shard, d]}},
        "codecs": [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": [rows_per_chunk, d],
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "index_location": "end",
            },
        }],
        "fill_value": 0,
        "dimension_names": ["row", "d"],
        "attributes": {"arcstream": {"kind": "activations", "site": site, "process_index": process_index}},
    }


def token_metadata(field: str, rows_per_shard: int, process_index: int) -> dict[str, Any]:
    """zarr3 metadata of one token-metadata array: `[rows]`, one zstd chunk per shard of rows."""
    dtype = TOKEN_FIELDS[field]
    return {
        "shape": [0],
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rows_per_shard]}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                   {"name": "zstd", "configuration": {"level": 3, "checksum": False}}],
        "fill_value": -1,
        "dimension_names": ["row"],
        "attributes": {"arcstream": {"kind": "tokens", "field": field, "process_index": process_index}},
    }


class ConfigMismatchError(StoreError):
    """The run directory was written by a different config (or store layout)."""


def prompt_to_json(info: Any) -> dict[str, Any]:
    """One prompt table line (a `arcstream.data.records.PromptInfo` as JSON)."""
    return {"prompt_index": int(info.prompt_index), "task_id": str(info.task_id),
            "test_index": int(info.test_index), "augmentation": info.augmentation,
            "answer_start": int(info.answer_start),
            "token_ids": np.asarray(info.token_ids).astype(np.int64).tolist()}
