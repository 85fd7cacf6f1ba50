"""Deterministic synthetic batches and whole-run comparisons for the store tests.

Importable from a subprocess (the kill -9 test), so no pytest fixtures here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorstore as ts

from arcstream.data.records import PromptInfo
from arcstream.store import TOKEN_FIELDS, StoreWriter, open_run, write_manifest

SITES = {"blocks.0.hook_resid_post": 12, "blocks.1.hook_mlp_out": 5}
CONFIG = {"model": "tiny", "seed": 0, "sae": {"enabled": False, "k": 8}, "sites": ",".join(SITES)}


def make_batch(process_index: int, step: int, sites=SITES):
    """One step's rows for one process: 1-3 prompts of 3-20 tokens, values a pure function of (process, step)."""
    rng = np.random.default_rng([process_index, step])
    n_prompts = int(rng.integers(1, 4))
    prompts, tok = [], {f: [] for f in TOKEN_FIELDS}
    for j in range(n_prompts):
        index = process_index * 100_000 + step * 10 + j
        n = int(rng.integers(3, 21))
        ids = rng.integers(0, 1000, n).astype(np.int32)
        prompts.append(PromptInfo(index, f"task{index % 7}", j % 2, {"transpose": bool(j % 2), "colours": [1, 0]},
                                  ids, n - 2))
        cell = rng.random(n) < 0.6
        tok["prompt"].append(np.full(n, index))
        tok["position"].append(np.arange(n))
        tok["token_id"].append(ids)
        tok["grid_kind"].append(np.where(cell, rng.integers(1, 5, n), 0))
        for f in ("pair_index", "row", "col", "colour"):
            tok[f].append(np.where(cell, rng.integers(0, 30 if f in ("row", "col") else 10, n), -1))
    tokens = {f: np.concatenate(v) for f, v in tok.items()}
    n = len(tokens["prompt"])
    rows = {s: (rng.standard_normal((n, d)) * 3).astype(np.float32) for s, d in sites.items()}
    return rows, tokens, prompts


def write_steps(writer: StoreWriter, steps, *, commit: bool = True) -> None:
    for step in steps:
        writer.append(*make_batch(writer.process_index, step, writer.sites))
        if commit:
            writer.commit(step + 1, {"step_done": step})


def expected(process_steps: dict[int, range], dtype: np.dtype, sites=SITES):
    """What a reader must return: every process's batches concatenated in process order."""
    acts = {s: [] for s in sites}
    toks = {f: [] for f in TOKEN_FIELDS}
    prompts = {}
    for p in sorted(process_steps):
        for step in process_steps[p]:
            rows, tokens, infos = make_batch(p, step, sites)
            for s in sites:
                acts[s].append(rows[s].astype(dtype))
            for f in TOKEN_FIELDS:
                toks[f].append(tokens[f])
            prompts.update({i.prompt_index: i for i in infos})
    return ({s: np.concatenate(v) for s, v in acts.items()}, {f: np.concatenate(v) for f, v in toks.items()},
            prompts)


def bits(x: np.ndarray) -> np.ndarray:
    """Exact comparison for float arrays (bf16 included): their raw bits."""
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def assert_reader_equals(run_dir, process_steps: dict[int, range], dtype) -> None:
    reader = open_run(run_dir)
    acts, toks, prompts = expected(process_steps, dtype)
    assert reader.rows == len(toks["prompt"])
    for s in SITES:
        got = np.asarray(reader.activations(s)[:])
        assert got.dtype == dtype and got.shape == acts[s].shape, (s, got.dtype, got.shape, acts[s].shape)
        np.testing.assert_array_equal(bits(got), bits(acts[s]))
    got_tokens = reader.tokens()
    for f in TOKEN_FIELDS:
        np.testing.assert_array_equal(got_tokens[f], toks[f], err_msg=f)
        assert got_tokens[f].dtype == TOKEN_FIELDS[f]
    got_prompts = reader.prompts()
    assert list(got_prompts) == sorted(prompts)
    for i, info in prompts.items():
        g = got_prompts[i]
        assert (g.task_id, g.test_index, g.augmentation, g.answer_start) == \
            (info.task_id, info.test_index, info.augmentation, info.answer_start)
        np.testing.assert_array_equal(g.token_ids, info.token_ids)


def tree_files(run_dir) -> dict[str, bytes]:
    """Every file of a local run directory (relative path -> bytes)."""
    root = Path(run_dir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def raw_arrays(run_dir) -> dict[str, np.ndarray]:
    """Every zarr array of a local run, read whole with plain TensorStore (what a non-arcstream reader sees)."""
    out = {}
    for meta in sorted(Path(run_dir).rglob("zarr.json")):
        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(meta.parent)}}).result()
        out[str(meta.parent.relative_to(run_dir))] = store.read().result()
    return out


def run_uninterrupted(run_dir, steps: range, **kw) -> None:
    writer = StoreWriter.create_or_resume(os.fspath(run_dir), sites=SITES, config=CONFIG, **kw)
    write_steps(writer, steps)
    writer.close()


def write_two_processes(run_dir, steps: range, **kw) -> None:
    """Two writers in one process, as two hosts would: both commit a step, then process 0 merges the ledgers."""
    writers = [StoreWriter.create_or_resume(os.fspath(run_dir), sites=SITES, config=CONFIG, process_index=p,
                                            process_count=2, **kw) for p in (0, 1)]
    for step in steps:
        for w in writers:
            write_steps(w, [step])
        write_manifest(os.fspath(run_dir), 2)  # after the "barrier"
