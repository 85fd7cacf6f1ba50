"""`skipped.jsonl`: one JSON object per task or prompt a job skipped, so nothing is dropped unnamed.

Each line is a `Skipped` record as JSON (`reason`, `message`, `source`,
`location`, `task_id`, and `row`, the task's row in the source, where known).
Every job that skips writes it through `SkippedLog`, in a local directory or a
kvstore URL alike (`RunLocation`):

- `replace(records)`: the whole file at once (jobs that write it at the end);
- `append(records)`: a job that commits as it goes appends the lines of each
  commit, and records `lines` in its commit record; a resumed run first
  `truncate`s to that count, so lines a killed attempt wrote after its last
  commit are not duplicated when the resumed run meets those skips again.

Every write replaces the whole file atomically (temp + fsync + rename locally,
one object write on a kvstore): a reader, or a kill, never sees a partial line.
Skips are rare (a few per thousand tasks), so rewriting the file costs nothing
measurable next to the activations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from arcstream.io import RunLocation, StoreError, process_name

SKIPPED_FILE = "skipped.jsonl"


def process_skipped_key(process_index: int) -> str:
    """One process's own log in a multi-process run (process 0 merges them into `skipped.jsonl`)."""
    return f"skipped/{process_name(process_index)}.jsonl"


def _line(record: Mapping[str, Any] | Any) -> str:
    obj = record.to_json() if hasattr(record, "to_json") else dict(record)
    return json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n"


class SkippedLog:
    """A `skipped.jsonl`-style file in a run directory (see the module docstring)."""

    def __init__(self, location: str | RunLocation, key: str = SKIPPED_FILE):
        self.location = location if isinstance(location, RunLocation) else RunLocation(location)
        self.key = key
        self._lines: list[str] | None = None  # the file's lines as last read or written

    def _load(self) -> list[str]:
        if self._lines is None:
            data = self.location.read_bytes(self.key)
            text = "" if data is None else data.decode("utf-8")
            # A file from another writer may end in a partial line; only complete lines count.
            self._lines = [ln + "\n" for ln in text.split("\n")[:-1]]
        return self._lines

    @property
    def lines(self) -> int:
        return len(self._load())

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self._load()]

    def _write(self, lines: list[str]) -> None:
        self.location.write_bytes_atomic(self.key, "".join(lines).encode("utf-8"))
        self._lines = lines

    def replace(self, records: Iterable[Mapping[str, Any] | Any]) -> None:
        """The file holds exactly `records` (written even when empty: a stale file would mislead)."""
        self._write([_line(r) for r in records])

    def append(self, records: Sequence[Mapping[str, Any] | Any]) -> int:
        """Adds `records` durably; returns the line count now (what a commit record keeps)."""
        if records:
            self._write(self._load() + [_line(r) for r in records])
        return self.lines

    def truncate(self, lines: int) -> None:
        """Keeps the first `lines` lines (a resume: drop what a killed attempt wrote after its commit)."""
        current = self._load()
        if len(current) < lines:
            raise StoreError(f"{self.location.url.rstrip('/')}/{self.key} has {len(current)} lines but the last "
                             f"commit recorded {lines}; the run directory is damaged")
        if len(current) > lines:
            self._write(current[:lines])


def merge_skipped(location: str | RunLocation, committed_lines: Sequence[int], key: str = SKIPPED_FILE) -> int:
    """Writes `skipped.jsonl` from every process's own log (`process_skipped_key`): the first
    `committed_lines[p]` lines of process p, ordered by source row (then process). Returns the count."""
    loc = location if isinstance(location, RunLocation) else RunLocation(location)
    records = []
    for p, n in enumerate(committed_lines):
        lines = SkippedLog(loc, process_skipped_key(p)).records()
        if len(lines) < n:
            raise StoreError(f"{loc.url.rstrip('/')}/{process_skipped_key(p)} has {len(lines)} lines but process "
                             f"{p}'s commit recorded {n}; the run directory is damaged")
        records += [(r.get("row") if r.get("row") is not None else math.inf, p, i, r) for i, r in
                    enumerate(lines[:n])]
    records.sort(key=lambda x: x[:3])
    SkippedLog(loc, key).replace(r for *_, r in records)
    return len(records)


__all__ = ["SKIPPED_FILE", "SkippedLog", "merge_skipped", "process_skipped_key"]
