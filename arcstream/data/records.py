"""The records the data layer hands on: one encoded prompt, and one packed batch.

These are contracts: the prompt builder produces `EncodedPrompt`s, the Grain
pipeline packs them into `PackedBatch`es, and the stream / store / analysis
layers read the per-token cell attributes to record where each token came
from. Per-token arrays are aligned with `token_ids`; a value of -1 (or
`GRID_NONE`) means "this token is not a grid cell".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Which grid a token belongs to (`grid_kind`).
GRID_NONE = 0
GRID_TRAIN_INPUT = 1
GRID_TRAIN_OUTPUT = 2
GRID_TEST_INPUT = 3
GRID_TEST_OUTPUT = 4  # the answer: the test output, when the prompt includes it
GRID_KIND_NAMES = {
    GRID_NONE: "none",
    GRID_TRAIN_INPUT: "train_input",
    GRID_TRAIN_OUTPUT: "train_output",
    GRID_TEST_INPUT: "test_input",
    GRID_TEST_OUTPUT: "answer",
}

# Per-token cell attributes, in the order the store writes them; all int8, -1 = none
# (grid_kind uses GRID_NONE = 0 instead).
CELL_FIELDS = ("grid_kind", "pair_index", "row", "col", "colour")


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedPrompt:
    """A tokenized prompt for one (task, test pair, augmentation), with its cell alignment.

    Invariants: every per-token array has length `len(token_ids)`; `row`, `col`,
    `colour` are -1 where `grid_kind == GRID_NONE`. A token that covers several
    cells (merged digits) records its first cell and `n_cells` says how many.
    """

    task_id: str
    test_index: int  # which test pair of the task this prompt asks about
    augmentation: dict[str, Any]  # the JSON record of the augmentation (see augment.py)
    token_ids: np.ndarray  # int32 [n]
    grid_kind: np.ndarray  # int8 [n], GRID_*
    pair_index: np.ndarray  # int8 [n], index of the pair within train (or test); -1 none
    row: np.ndarray  # int8 [n], -1 none
    col: np.ndarray  # int8 [n], -1 none
    colour: np.ndarray  # int8 [n], 0-9, -1 none
    n_cells: np.ndarray  # int8 [n], cells covered by the token (0 for non-grid tokens)
    answer_mask: np.ndarray  # bool [n], True on the tokens of the answer (what a LM is trained to emit)
    answer_start: int  # index of the first answer token (== n when the prompt stops at the answer prefix)
    # bool [n]: the tokens of every output grid (train outputs and the answer: shape header, cells, line
    # breaks, the stop token after it where the template writes one), what the LM trainer learns to write.
    output_mask: np.ndarray
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. encoder/template names, pairs dropped

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def info(self, prompt_index: int) -> "PromptInfo":
        return PromptInfo(prompt_index, self.task_id, self.test_index, self.augmentation,
                          self.token_ids.astype(np.int32), self.answer_start)


@dataclasses.dataclass(frozen=True, eq=False)
class PromptInfo:
    """What the prompt table records of one prompt (prompt index -> task, augmentation, tokens)."""

    prompt_index: int  # global and stable: the same prompt has the same index on every host and resume
    task_id: str
    test_index: int
    augmentation: dict[str, Any]
    token_ids: np.ndarray  # int32 [n]
    answer_start: int


@dataclasses.dataclass(frozen=True, eq=False)
class PackedBatch:
    """`[B, T]` rows, each holding whole prompts back to back, padded at the end.

    `segment_ids` is 0 on padding and 1, 2, ... for the prompts of a row;
    `positions` restarts at 0 for every segment; `prompt_index` is the global
    prompt index (-1 on padding). `prompts` lists the prompts in this batch, in
    order of appearance.
    """

    tokens: np.ndarray  # int32 [B, T]
    segment_ids: np.ndarray  # int32 [B, T]
    positions: np.ndarray  # int32 [B, T]
    prompt_index: np.ndarray  # int32 [B, T]
    grid_kind: np.ndarray  # int8 [B, T]
    pair_index: np.ndarray  # int8 [B, T]
    row: np.ndarray  # int8 [B, T]
    col: np.ndarray  # int8 [B, T]
    colour: np.ndarray  # int8 [B, T]
    answer_mask: np.ndarray  # bool [B, T]
    output_mask: np.ndarray  # bool [B, T] (EncodedPrompt.output_mask)
    prompts: tuple[PromptInfo, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    @property
    def valid(self) -> np.ndarray:
        """bool [B, T]: True on real tokens."""
        return self.segment_ids > 0
