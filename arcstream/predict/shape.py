"""Shape-constrained greedy decoding: an answer can only be a grid of the predicted shape.

A small model that has not learnt where an answer ends writes one row of a
repeated digit until the token budget runs out (the first arcstream-tiny did,
for 931 tokens). With `predict.constrain_shape`, the predictions job first
predicts the output shape of every test input, then decodes under a token
*template* of that shape: every token that is not a cell (shape header, row
separators, line breaks, row numbers, code fences, the stop token) is forced,
and every cell position may only be one of the ten colour tokens. The
model still chooses every colour greedily, and the log-probabilities recorded
are the model's own (unmasked), so voting and re-scoring see what the model
believes.

Where the shape comes from (`predict_shape`, in the augmented frame the model
sees), first rule that holds on every train pair:

  same_as_input  every train output has its input's shape -> the test input's shape
  constant       every train output has the same shape -> that shape
  scale          output sides are fixed multiples (or divisors) of the input's -> the test input scaled
  header         no rule holds, and the grid encoder writes a shape header: the model writes the
                 header freely (a short greedy decode), and the body is decoded under that shape
  none           no rule and no header: decoded without a constraint (and counted)

A model-written header that does not parse as `HxW` with sides 1..30 is a
failure (`bad_shape_header`), counted by reason like every other decoding
failure; a template longer than the token budget is `too_long`.

Templates (`answer_template`) are built from the encoder and the tokenizer
themselves: the grid of the predicted shape is encoded once per colour
(all cells 0, all cells 1, ...) and tokenized; the ten tokenizations must have
the same length, agree on every non-cell token, and put exactly one token on
each cell (checked against the encoder's cell spans), else `ValueError` names
the tokenizer and the encoder (a tokenizer that merges digits, e.g. Llama 3 on
`plain`, needs the `space` encoder).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from arcstream.data.encoders import get_encoder
from arcstream.data.task import MAX_SIDE, NUM_COLOURS, Task

SHAPE_SOURCES = ("same_as_input", "constant", "scale", "header", "none")
HEADER_TOKENS = 8  # enough for "30x30\n" in any tokenizer that splits digits


@dataclasses.dataclass(frozen=True)
class ShapePrediction:
    """The shape an answer must have (None: decided by the model's header, or unconstrained) and why."""

    shape: tuple[int, int] | None
    source: str  # one of SHAPE_SOURCES


def _scale(a: int, b: int) -> tuple[int, int] | None:
    """b = a * num / den as a reduced integer ratio where one side divides the other, else None."""
    if b % a == 0:
        return b // a, 1
    if a % b == 0:
        return 1, a // b
    return None


def predict_shape(task: Task, test_index: int, *, has_header: bool) -> ShapePrediction:
    """The test output's shape from the task's train pairs (see the module docstring for the rules)."""
    pairs = [p for p in task.train if p.output is not None]
    x = np.asarray(task.test[test_index].input).shape
    if pairs:
        if all(np.shape(p.output) == np.shape(p.input) for p in pairs):
            return ShapePrediction((int(x[0]), int(x[1])), "same_as_input")
        shapes = {tuple(int(s) for s in np.shape(p.output)) for p in pairs}
        if len(shapes) == 1:
            return ShapePrediction(next(iter(shapes)), "constant")
        ratios = {tuple(_scale(int(a), int(b)) for a, b in zip(np.shape(p.input), np.shape(p.output)))
                  for p in pairs}
        if len(ratios) == 1 and None not in next(iter(ratios)):
            (hn, hd), (wn, wd) = next(iter(ratios))
            h, w = int(x[0]) * hn, int(x[1]) * wn
            if h % hd == 0 and w % wd == 0 and 1 <= h // hd <= MAX_SIDE and 1 <= w // wd <= MAX_SIDE:
                return ShapePrediction((h // hd, w // wd), "scale")
    return ShapePrediction(None, "header" if has_header else "none")


def has_shape_header(encoder_spec: str) -> bool:
    return "shape" in get_encoder(encoder_spec).wrappers


_HEADER = re.compile(r"\s*(\d{1,2})\s*x\s*(\d{1,2})\s*\n")


def parse_header(text: str) -> tuple[int, int] | None:
    """The `HxW` of a model-written header line (sides 1..30), or None."""
    m = _HEADER.match(text)
    if m is None:
        return None
    h, w = int(m.group(1)), int(m.group(2))
    return (h, w) if 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE else None


def answer_template(tokenizer: Any, shape: tuple[int, int], encoder_spec: str, stop_id: int) -> np.ndarray:
    """int32 [N, NUM_COLOURS]: the token ids allowed at each of the answer's N steps (-1 = unused).

    A forced step lists one id; a cell step lists the ten colour tokens (index
    = colour). The last step is `stop_id`.
    """
    return _build_template(tokenizer, (int(shape[0]), int(shape[1])), encoder_spec, int(stop_id))


def _build_template(tokenizer: Any, shape: tuple[int, int], encoder_spec: str, stop_id: int) -> np.ndarray:
    enc = get_encoder(encoder_spec)
    h, w = shape
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise ValueError(f"answer_template: shape {h}x{w} is outside 1..{MAX_SIDE}")
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    where = f"tokenizer {name!r} with encoder {encoder_spec!r}"
    ids_c: list[list[int]] = []
    cell_tok: np.ndarray | None = None
    for c in range(NUM_COLOURS):
        grid = np.full((h, w), c, np.int8)
        text = enc.encode(grid)
        e = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        ids_c.append(list(e.ids))
        if c == 0:
            starts = enc.cell_starts(grid)
            offsets = np.asarray(e.offsets, np.int64).reshape(-1, 2)
            # The token holding each cell's character; every cell must have its own token.
            cell_tok = np.searchsorted(offsets[:, 1], starts, side="right")
            one_each = (cell_tok < len(offsets)) & (offsets[np.minimum(cell_tok, len(offsets) - 1), 0] <= starts)
            if not one_each.all() or len(set(cell_tok.tolist())) != h * w:
                raise ValueError(f"shape-constrained decoding needs one token per grid cell; {where} merges cells "
                                 "into one token (use an encoder that separates cells, e.g. 'space', or "
                                 "predict.constrain_shape=False)")
    if len({len(x) for x in ids_c}) != 1:
        raise ValueError(f"shape-constrained decoding: {where} tokenizes grids of different colours to different "
                         "lengths, so no fixed template exists")
    assert cell_tok is not None
    ids_cn = np.asarray(ids_c, np.int64)  # [10, N]
    is_cell = np.zeros(ids_cn.shape[1], bool)
    is_cell[cell_tok] = True
    if np.any(ids_cn[:, ~is_cell] != ids_cn[:1, ~is_cell]):
        raise ValueError(f"shape-constrained decoding: {where} changes non-cell tokens with the cell colours")
    colours_n = ids_cn[:, is_cell]  # [10, h*w]
    if np.any(colours_n != colours_n[:, :1]):
        raise ValueError(f"shape-constrained decoding: {where} writes a colour as different tokens at different "
                         "cells")
    colour_ids = colours_n[:, 0]
    if len(set(colour_ids.tolist())) != NUM_COLOURS:
        raise ValueError(f"shape-constrained decoding: {where} gives two colours the same token")
    out = np.full((ids_cn.shape[1] + 1, NUM_COLOURS), -1, np.int32)
    out[~np.concatenate([is_cell, [False]]), 0] = np.concatenate([ids_cn[0, ~is_cell], [stop_id]])
    out[np.flatnonzero(is_cell)] = colour_ids[None, :]
    return out
