"""The ARC Prize score of a submission against known solutions.

A test output counts as solved when either attempt equals it exactly (same
shape, same cells). The score is the mean over all test outputs of all tasks;
a task's score is the fraction of its test outputs solved; `mean_task_score`
(the mean over tasks of those fractions) is reported too, since the official
leaderboards weigh each task equally. A task without a prediction scores 0 on
each of its test outputs (a missing entry is never silently skipped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Score:
    """solved / total over test outputs; per task: solved flags per test output."""

    solved: int
    total: int
    per_task: dict[str, list[bool]]

    @property
    def score(self) -> float:
        return self.solved / self.total if self.total else 0.0

    @property
    def task_scores(self) -> dict[str, float]:
        return {t: (sum(f) / len(f) if f else 0.0) for t, f in self.per_task.items()}

    @property
    def mean_task_score(self) -> float:
        s = self.task_scores
        return sum(s.values()) / len(s) if s else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "solved": self.solved, "total": self.total,
                "mean_task_score": self.mean_task_score, "task_scores": self.task_scores,
                "per_task": self.per_task}


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    x, y = np.asarray(a), np.asarray(b)
    return x.shape == y.shape and bool(np.array_equal(x, y))


def score_predictions(predictions: Mapping[str, Sequence[Mapping[str, Any]]],
                      solutions: Mapping[str, Sequence[Any]]) -> Score:
    """Scores `predictions` (ARC Prize submission layout) against `solutions` (`{task_id: [output, ...]}`).

    Only tasks in `solutions` are scored. Raises ValueError naming the task when
    a prediction entry has the wrong number of test outputs or lacks an attempt.
    """
    per_task: dict[str, list[bool]] = {}
    for task_id, outputs in solutions.items():
        entries = predictions.get(task_id)
        if entries is None:
            per_task[task_id] = [False] * len(outputs)
            continue
        if len(entries) != len(outputs):
            raise ValueError(f"predictions[{task_id!r}] has {len(entries)} entries but the task has "
                             f"{len(outputs)} test outputs; expected one entry per test input")
        flags = []
        for i, (entry, truth) in enumerate(zip(entries, outputs)):
            missing = [k for k in ("attempt_1", "attempt_2") if k not in entry]
            if missing:
                raise ValueError(f"predictions[{task_id!r}][{i}] lacks {missing}; the ARC Prize layout needs "
                                 "attempt_1 and attempt_2")
            flags.append(_same(entry["attempt_1"], truth) or _same(entry["attempt_2"], truth))
        per_task[task_id] = flags
    solved = sum(sum(f) for f in per_task.values())
    total = sum(len(f) for f in per_task.values())
    return Score(solved, total, per_task)
