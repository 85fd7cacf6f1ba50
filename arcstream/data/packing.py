"""Packing encoded prompts into fixed `[B, T]` rows, and the rows into `PackedBatch`es.

The packing itself is Grain's `FirstFitPackIterDataset` (first fit over
`num_bins` open rows; when a prompt fits in none, all open rows are emitted and
a new set is started with that prompt; rows are not shuffled). It already gives
what the model step needs: whole prompts only, segment ids 1, 2, ... per row
(0 on padding), positions restarting at 0 per segment, and a checkpointable
iterator whose state is the parent's state at the start of the open rows plus
the number of rows already emitted (so a restore re-packs the same rows).

This module adds what is specific to arcstream:
  - `prompt_element`: an `EncodedPrompt` as the flat dict of per-token arrays
    Grain packs (plus its `PromptInfo`, carried as a non-sequence feature);
  - `PADDING`: the values written on padding, per `PackedBatch` field;
  - `rows_to_batch`: the rows of one batch as a `PackedBatch`, padded to
    exactly `batch_size` rows (the last batch of a shard may have fewer rows of
    prompts; the jitted step wants one shape);
  - `pack_first_fit`: the same algorithm as a plain Python loop, independent of
    Grain, used as the reference in tests and the baseline in benchmarks.

Invariants of every batch: `tokens[b, t]` belongs to the prompt
`prompt_index[b, t]` at position `positions[b, t]` of that prompt; a prompt's
tokens are contiguous, in one row, in order; padding is at the end of a row
(`segment_ids == 0`, `prompt_index == -1`, cell fields -1 except `grid_kind`
which is `GRID_NONE`, `answer_mask` False, token 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np

from arcstream.data.records import GRID_NONE, EncodedPrompt, PackedBatch, PromptInfo

# Per-token features packed side by side; all have the prompt's length.
# `prompt_index` is a per-token copy of the prompt's global index.
SEQUENCE_FEATURES = ("tokens", "prompt_index", "grid_kind", "pair_index", "row", "col", "colour", "answer_mask")
INFO_FEATURE = "info"  # the PromptInfo, a non-sequence feature: Grain gives a list per row

# Value on padding for each packed field (see the module invariants).
PADDING: dict[str, Any] = {
    "tokens": 0,
    "prompt_index": -1,
    "grid_kind": GRID_NONE,
    "pair_index": -1,
    "row": -1,
    "col": -1,
    "colour": -1,
    "answer_mask": False,
}
_DTYPES = {
    "tokens": np.int32,
    "prompt_index": np.int32,
    "grid_kind": np.int8,
    "pair_index": np.int8,
    "row": np.int8,
    "col": np.int8,
    "colour": np.int8,
    "answer_mask": np.bool_,
}


def prompt_element(prompt: EncodedPrompt, prompt_index: int) -> dict[str, Any]:
    """The dict Grain's packer takes for one prompt: per-token arrays + its PromptInfo.

    Raises ValueError if a per-token array's length differs from `token_ids`
    (a broken `EncodedPrompt` would otherwise shift every later cell attribute).
    """
    n = len(prompt)
    arrays = {
        "tokens": prompt.token_ids,
        "grid_kind": prompt.grid_kind,
        "pair_index": prompt.pair_index,
        "row": prompt.row,
        "col": prompt.col,
        "colour": prompt.colour,
        "answer_mask": prompt.answer_mask,
    }
    out: dict[str, Any] = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.shape != (n,):
            raise ValueError(
                f"EncodedPrompt for task {prompt.task_id} test {prompt.test_index}: field {name!r} has shape "
                f"{a.shape} but token_ids has ({n},); every per-token array must have the token count"
            )
        out[name] = a.astype(_DTYPES[name], copy=False)
    out["prompt_index"] = np.full((n,), prompt_index, dtype=np.int32)
    out[INFO_FEATURE] = prompt.info(prompt_index)
    return out


def pack(parent: grain.IterDataset, *, seq_len: int, num_bins: int) -> grain.IterDataset:
    """Grain first-fit packing of `prompt_element` dicts into rows of `seq_len` tokens.

    Every element must be at most `seq_len` long (the pipeline skips and counts
    longer prompts before this stage; Grain raises on them). Rows come out one
    at a time as dicts with the `SEQUENCE_FEATURES`, `tokens_segment_ids`,
    `tokens_positions` and `info` (the list of the row's PromptInfos in order).
    """
    if seq_len <= 0 or num_bins <= 0:
        raise ValueError(f"packing needs seq_len > 0 and num_bins > 0, got seq_len={seq_len}, num_bins={num_bins}")
    return grain.experimental.FirstFitPackIterDataset(
        parent,
        length_struct={k: seq_len for k in SEQUENCE_FEATURES},
        num_packing_bins=num_bins,
        shuffle_bins=False,  # keep prompt order: deterministic, and rows read in prompt order
        meta_features=(INFO_FEATURE,),
        padding_struct=dict(PADDING),
    )


def rows_to_batch(rows: Sequence[dict[str, Any]], *, batch_size: int, seq_len: int) -> PackedBatch:
    """Stacks packed rows (from `pack` or `pack_first_fit`) into one `PackedBatch` of `batch_size` rows.

    Fewer rows than `batch_size` (the end of a shard) are completed with
    padding rows, so every batch has the same `[B, T]` shape.
    """
    if not 0 < len(rows) <= batch_size:
        raise ValueError(f"a batch needs 1..{batch_size} rows, got {len(rows)}")
    n_pad = batch_size - len(rows)

    def stack(rows_key: str, dtype, pad_value) -> np.ndarray:
        x_bt = np.stack([np.asarray(r[rows_key], dtype=dtype) for r in rows])
        if n_pad:
            x_bt = np.concatenate([x_bt, np.full((n_pad, seq_len), pad_value, dtype=dtype)])
        return x_bt

    fields = {name: stack(name, _DTYPES[name], PADDING[name]) for name in SEQUENCE_FEATURES}
    segment_ids = stack("tokens_segment_ids", np.int32, 0)
    positions = stack("tokens_positions", np.int32, 0)
    prompts: tuple[PromptInfo, ...] = tuple(info for r in rows for info in r[INFO_FEATURE])
    return PackedBatch(
        tokens=fields["tokens"],
        segment_ids=segment_ids,
        positions=positions,
        prompt_index=fields["prompt_index"],
        grid_kind=fields["grid_kind"],
        pair_index=fields["pair_index"],
        row=fields["row"],
        col=fields["col"],
        colour=fields["colour"],
        answer_mask=fields["answer_mask"],
        prompts=prompts,
    )


def pack_first_fit(elements: Iterable[dict[str, Any]], *, seq_len: int, num_bins: int) -> list[dict[str, Any]]:
    """First-fit packing as a plain Python loop: the reference and baseline for `pack`.

    Same algorithm and output rows as `pack`: `num_bins` open rows; a prompt
    goes into the first open row with room; when it fits in none, the open rows
    (those holding at least one prompt) are emitted in order and the prompt
    starts a fresh set. Written independently of Grain so tests can check
    Grain's result against it.
    """
    out: list[dict[str, Any]] = []
    open_rows: list[list[dict[str, Any]]] = []
    used: list[int] = []

    def flush() -> None:
        for row in open_rows:
            out.append(_materialise_row(row, seq_len))
        open_rows.clear()
        used.clear()

    for e in elements:
        n = len(e["tokens"])
        if n > seq_len:
            raise ValueError(f"prompt {int(e['prompt_index'][0])} has {n} tokens; the row length is {seq_len}")
        for i, u in enumerate(used):
            if u + n <= seq_len:
                open_rows[i].append(e)
                used[i] += n
                break
        else:
            if len(open_rows) == num_bins:
                flush()
            open_rows.append([e])
            used.append(n)
    flush()
    return out


def _materialise_row(elements: list[dict[str, Any]], seq_len: int) -> dict[str, Any]:
    row = {name: np.full((seq_len,), PADDING[name], dtype=_DTYPES[name]) for name in SEQUENCE_FEATURES}
    row["tokens_segment_ids"] = np.zeros((seq_len,), np.int32)
    row["tokens_positions"] = np.zeros((seq_len,), np.int32)
    start = 0
    for seg, e in enumerate(elements, start=1):
        n = len(e["tokens"])
        for name in SEQUENCE_FEATURES:
            row[name][start:start + n] = e[name]
        row["tokens_segment_ids"][start:start + n] = seg
        row["tokens_positions"][start:start + n] = np.arange(n)
        start += n
    row[INFO_FEATURE] = [e[INFO_FEATURE] for e in elements]
    return row
