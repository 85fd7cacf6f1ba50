"""Packing encoded prompts into fixed `[B, T]` rows, and the rows into `PackedBatch`es.

The packing itself is Grain's `FirstFitPackIterDataset` (first fit over
`num_bins` open rows; when a prompt fits in none, all open rows are emitted and
a new set is started with that prompt; rows are not shuffled). It already gives
what the model step needs: whole prompts only, segment ids 1, 2, ... per row
(0 on padding), positions restarting at 0 per segment, and a checkpointable
iterator whose state is the parent's state at the start of the open rows plus
the number of rows already emitted (so a restore re-packs the same rows).

This module adds what is specific to arcstream:
  - `prompt_element`: an `EncodedPrompt` as what Grain packs: two 2-D
    features (int32 token id + prompt index; int8 cell fields + answer mask)
    plus its `PromptInfo`, carried as a non-sequence feature;
  - `row_fields`: a packed row back as `PackedBatch` fields, each with its
    own padding value (`PADDING`);
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

# The per-token fields of a `PackedBatch`, with their dtype and value on padding.
FIELDS: dict[str, tuple[Any, Any]] = {
    "tokens": (np.int32, 0),
    "prompt_index": (np.int32, -1),  # a per-token copy of the prompt's global index
    "grid_kind": (np.int8, GRID_NONE),
    "pair_index": (np.int8, -1),
    "row": (np.int8, -1),
    "col": (np.int8, -1),
    "colour": (np.int8, -1),
    "answer_mask": (np.bool_, False),
    "output_mask": (np.bool_, False),
}
PADDING: dict[str, Any] = {name: pad for name, (_, pad) in FIELDS.items()}

# What Grain packs: the fields grouped by dtype into two 2-D features, because
# Grain's packer costs about the same per feature whatever its width (8 narrow
# features took ~4x the time of 2 wide ones). Column order is fixed below.
# Grain pads every column of a feature with one value (-1); `row_fields` puts
# each field's own padding value back.
_IDS_COLUMNS = ("tokens", "prompt_index")  # int32 [n, 2]
_CELL_COLUMNS = ("grid_kind", "pair_index", "row", "col", "colour", "answer_mask", "output_mask")  # int8 [n, 7]
IDS_FEATURE, CELLS_FEATURE = "ids", "cells"
SEQUENCE_FEATURES = (IDS_FEATURE, CELLS_FEATURE)
SEGMENT_IDS, POSITIONS = f"{IDS_FEATURE}_segment_ids", f"{IDS_FEATURE}_positions"
INFO_FEATURE = "info"  # the PromptInfo, a non-sequence feature: Grain gives a list per row
_GRAIN_PAD = -1


def prompt_element(prompt: EncodedPrompt, prompt_index: int) -> dict[str, Any]:
    """The dict Grain's packer takes for one prompt: its per-token arrays + its PromptInfo.

    Raises ValueError if a per-token array's length differs from `token_ids`
    (a broken `EncodedPrompt` would otherwise shift every later cell attribute).
    """
    n = len(prompt)
    columns = {
        "tokens": prompt.token_ids,
        "prompt_index": np.full((n,), prompt_index, dtype=np.int32),
        "grid_kind": prompt.grid_kind,
        "pair_index": prompt.pair_index,
        "row": prompt.row,
        "col": prompt.col,
        "colour": prompt.colour,
        "answer_mask": prompt.answer_mask,
        "output_mask": prompt.output_mask,
    }
    for name, a in columns.items():
        if np.shape(a) != (n,):
            raise ValueError(
                f"EncodedPrompt for task {prompt.task_id} test {prompt.test_index}: field {name!r} has shape "
                f"{np.shape(a)} but token_ids has ({n},); every per-token array must have the token count"
            )
    ids = np.empty((n, len(_IDS_COLUMNS)), np.int32)
    for j, name in enumerate(_IDS_COLUMNS):
        ids[:, j] = columns[name]
    cells = np.empty((n, len(_CELL_COLUMNS)), np.int8)
    for j, name in enumerate(_CELL_COLUMNS):
        cells[:, j] = columns[name]
    return {IDS_FEATURE: ids, CELLS_FEATURE: cells, INFO_FEATURE: prompt.info(prompt_index)}


def row_fields(row: dict[str, Any]) -> dict[str, np.ndarray]:
    """One packed row (from `pack` or `pack_first_fit`) as `PackedBatch` fields, each `[T]`.

    Also `segment_ids` and `positions`. Padding gets each field's `PADDING` value.
    """
    seg = np.asarray(row[SEGMENT_IDS], np.int32)
    pad = seg == 0
    out: dict[str, np.ndarray] = {"segment_ids": seg, "positions": np.asarray(row[POSITIONS], np.int32)}
    for feature, names in ((IDS_FEATURE, _IDS_COLUMNS), (CELLS_FEATURE, _CELL_COLUMNS)):
        x = np.asarray(row[feature])
        for j, name in enumerate(names):
            dtype, pad_value = FIELDS[name]
            col = x[:, j].astype(dtype)
            col[pad] = pad_value
            out[name] = col
    return out


def pack(parent: grain.IterDataset, *, seq_len: int, num_bins: int) -> grain.IterDataset:
    """Grain first-fit packing of `prompt_element` dicts into rows of `seq_len` tokens.

    Every element must be at most `seq_len` long (the pipeline skips and counts
    longer prompts before this stage; Grain raises on them). Rows come out one
    at a time as dicts with the `SEQUENCE_FEATURES`, their segment ids and
    positions, and `info` (the list of the row's PromptInfos in order);
    `row_fields` reads one as `PackedBatch` fields.
    """
    if seq_len <= 0 or num_bins <= 0:
        raise ValueError(f"packing needs seq_len > 0 and num_bins > 0, got seq_len={seq_len}, num_bins={num_bins}")
    return grain.experimental.FirstFitPackIterDataset(
        parent,
        length_struct={k: seq_len for k in SEQUENCE_FEATURES},
        num_packing_bins=num_bins,
        shuffle_bins=False,  # keep prompt order: deterministic, and rows read in prompt order
        meta_features=(INFO_FEATURE,),
        padding_struct={k: _GRAIN_PAD for k in SEQUENCE_FEATURES},
    )


def rows_to_batch(rows: Sequence[dict[str, Any]], *, batch_size: int, seq_len: int) -> PackedBatch:
    """Stacks packed rows (from `pack` or `pack_first_fit`) into one `PackedBatch` of `batch_size` rows.

    Fewer rows than `batch_size` (the end of a shard) are completed with
    padding rows, so every batch has the same `[B, T]` shape.
    """
    if not 0 < len(rows) <= batch_size:
        raise ValueError(f"a batch needs 1..{batch_size} rows, got {len(rows)}")
    per_row = [row_fields(r) for r in rows]
    empty = {name: np.full((seq_len,), pad, dtype) for name, (dtype, pad) in FIELDS.items()}
    empty.update(segment_ids=np.zeros((seq_len,), np.int32), positions=np.zeros((seq_len,), np.int32))
    per_row += [empty] * (batch_size - len(rows))
    x = {name: np.stack([r[name] for r in per_row]) for name in per_row[0]}  # each [B, T]
    prompts: tuple[PromptInfo, ...] = tuple(info for r in rows for info in r[INFO_FEATURE])
    return PackedBatch(
        tokens=x["tokens"],
        segment_ids=x["segment_ids"],
        positions=x["positions"],
        prompt_index=x["prompt_index"],
        grid_kind=x["grid_kind"],
        pair_index=x["pair_index"],
        row=x["row"],
        col=x["col"],
        colour=x["colour"],
        answer_mask=x["answer_mask"],
        output_mask=x["output_mask"],
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
        n = len(e[IDS_FEATURE])
        if n > seq_len:
            raise ValueError(f"prompt {e[INFO_FEATURE].prompt_index} has {n} tokens; the row length is {seq_len}")
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
    row: dict[str, Any] = {f: np.full((seq_len, e.shape[1]), _GRAIN_PAD, e.dtype)
                           for f, e in ((f, elements[0][f]) for f in SEQUENCE_FEATURES)}
    row[SEGMENT_IDS] = np.zeros((seq_len,), np.int32)
    row[POSITIONS] = np.zeros((seq_len,), np.int32)
    start = 0
    for seg, e in enumerate(elements, start=1):
        n = len(e[IDS_FEATURE])
        for f in SEQUENCE_FEATURES:
            row[f][start:start + n] = e[f]
        row[SEGMENT_IDS][start:start + n] = seg
        row[POSITIONS][start:start + n] = np.arange(n)
        start += n
    row[INFO_FEATURE] = [e[INFO_FEATURE] for e in elements]
    return row
