"""Packing: whole prompts per row, segment ids 1.., positions 0..n-1, cell fields carried, nothing lost.

Grain's first-fit packer (as `packing.pack` configures it) is checked against
`pack_first_fit`, a plain loop written independently, and both against the
prompts they were given.
"""

from __future__ import annotations

import grain
import numpy as np
import pytest

from arcstream.data import packing
from arcstream.data.records import GRID_NONE, EncodedPrompt


def _prompt(i: int, n: int, rng: np.random.Generator) -> EncodedPrompt:
    """A random prompt of n tokens whose cell fields differ per token (so a shift would show)."""
    kind = rng.integers(0, 5, size=n).astype(np.int8)
    cell = kind != GRID_NONE
    field = lambda hi: np.where(cell, rng.integers(0, hi, size=n), -1).astype(np.int8)  # noqa: E731
    return EncodedPrompt(
        task_id=f"task{i}", test_index=i % 2, augmentation={"k": i},
        token_ids=rng.integers(5, 50_000, size=n).astype(np.int32), grid_kind=kind, pair_index=field(4),
        row=field(30), col=field(30), colour=field(10), n_cells=cell.astype(np.int8),
        answer_mask=rng.random(n) < 0.3, answer_start=n, output_mask=rng.random(n) < 0.5)


def _elements(lengths, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [_prompt(i, n, rng) for i, n in enumerate(lengths)]
    return prompts, [packing.prompt_element(p, 1000 + i) for i, p in enumerate(prompts)]


def _grain_rows(elements, *, seq_len, num_bins):
    ds = grain.MapDataset.source(elements).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return list(packing.pack(ds, seq_len=seq_len, num_bins=num_bins))


def _check_rows(rows, prompts, seq_len):
    """Each prompt appears exactly once, whole, at positions 0..n-1 of one segment, with its fields."""
    by_index = {1000 + i: p for i, p in enumerate(prompts)}
    seen = []
    for packed in rows:
        row = packing.row_fields(packed)
        seg = row["segment_ids"]
        assert seg.shape == (seq_len,)
        n_segments = int(seg.max())
        # Segments are 1..k, contiguous, in order, padding (0) only at the end.
        used = int(np.count_nonzero(seg))
        assert np.all(seg[used:] == 0) and np.all(np.diff(seg[:used]) >= 0)
        assert set(np.unique(seg[:used])) == set(range(1, n_segments + 1))
        infos = packed[packing.INFO_FEATURE]
        assert [i.prompt_index for i in infos] == [int(row["prompt_index"][seg == s][0]) for s in range(1, n_segments + 1)]
        for s, info in enumerate(infos, start=1):
            p = by_index[info.prompt_index]
            at = seg == s
            assert np.array_equal(row["positions"][at], np.arange(len(p)))
            assert np.array_equal(row["tokens"][at], p.token_ids)
            assert np.all(row["prompt_index"][at] == info.prompt_index)
            for f in ("grid_kind", "pair_index", "row", "col", "colour", "answer_mask", "output_mask"):
                assert np.array_equal(row[f][at], getattr(p, f)), f
                assert row[f].dtype == getattr(p, f).dtype, f
            assert info.task_id == p.task_id and np.array_equal(info.token_ids, p.token_ids)
            seen.append(info.prompt_index)
        pad = seg == 0
        for f, v in packing.PADDING.items():
            assert np.all(row[f][pad] == v), f
        assert np.all(row["positions"][pad] == 0)
    assert sorted(seen) == sorted(by_index), "every prompt exactly once"


@pytest.mark.parametrize("num_bins", [1, 3, 8])
def test_grain_packing_matches_plain_first_fit_and_keeps_every_prompt_whole(num_bins):
    lengths = np.random.default_rng(1).integers(1, 65, size=57).tolist() + [64, 1, 64]
    prompts, elements = _elements(lengths)
    got = _grain_rows(elements, seq_len=64, num_bins=num_bins)
    want = packing.pack_first_fit(elements, seq_len=64, num_bins=num_bins)
    _check_rows(got, prompts, 64)
    _check_rows(want, prompts, 64)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k in (*packing.SEQUENCE_FEATURES, packing.SEGMENT_IDS, packing.POSITIONS):
            assert np.array_equal(g[k], w[k]), k
        assert [i.prompt_index for i in g["info"]] == [i.prompt_index for i in w["info"]]


def test_several_prompts_share_a_row():
    prompts, elements = _elements([10, 20, 30, 5])
    rows = packing.pack_first_fit(elements, seq_len=64, num_bins=2)
    # first fit: 10+20+30 fill row 0 to 60; 5 no longer fits there, goes to row 1
    assert [len(r["info"]) for r in rows] == [3, 1]
    row0 = packing.row_fields(rows[0])
    assert row0["segment_ids"][:61].tolist() == [1] * 10 + [2] * 20 + [3] * 30 + [0]
    assert row0["positions"][10:13].tolist() == [0, 1, 2]


def test_rows_to_batch_stacks_rows_and_pads_to_batch_size():
    prompts, elements = _elements([30, 40, 50])
    rows = packing.pack_first_fit(elements, seq_len=64, num_bins=4)
    assert len(rows) == 3
    b = packing.rows_to_batch(rows, batch_size=5, seq_len=64)
    assert b.shape == (5, 64)
    assert [p.prompt_index for p in b.prompts] == [1000, 1001, 1002]
    assert b.tokens.dtype == np.int32 and b.colour.dtype == np.int8 and b.answer_mask.dtype == np.bool_
    assert not b.valid[3:].any() and np.all(b.prompt_index[3:] == -1) and np.all(b.grid_kind[3:] == GRID_NONE)
    assert int(b.valid.sum()) == 120
    for r in range(3):
        f = packing.row_fields(rows[r])
        assert np.array_equal(b.tokens[r], f["tokens"]) and np.array_equal(b.colour[r], f["colour"])
        assert np.array_equal(b.segment_ids[r], f["segment_ids"])
    with pytest.raises(ValueError, match="1..5 rows"):
        packing.rows_to_batch(rows * 2, batch_size=5, seq_len=64)


def test_prompt_element_rejects_misaligned_fields():
    rng = np.random.default_rng(0)
    p = _prompt(0, 8, rng)
    bad = EncodedPrompt(**{**p.__dict__, "colour": p.colour[:-1]})
    with pytest.raises(ValueError, match="'colour' has shape"):
        packing.prompt_element(bad, 0)


def test_plain_packer_names_an_overlong_prompt():
    _, elements = _elements([65])
    with pytest.raises(ValueError, match="65 tokens; the row length is 64"):
        packing.pack_first_fit(elements, seq_len=64, num_bins=2)
