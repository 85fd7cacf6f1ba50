"""The capture names what it skips: `skipped.jsonl` in the run directory, and every reason in the summary.

A Kaggle challenges file with good tasks between broken ones (a colour 12, a
ragged grid, a prompt too long for data.seq_len, a task that is not an
object): every broken task gets one line naming its row, task id, reason and
message; the summary box lists every reason in full (wrapped, never cut);
a run killed mid-way and resumed writes the same lines, none twice, even when
the killed attempt had written lines past its last commit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.data.test_fuzz_sources import task_files
from tests.stream import test_run as _run

tiny_ckpt = _run.tiny_ckpt  # a module-scoped fixture
REPO = _run.REPO


def _grid(h: int, w: int, colour: int = 1) -> list[list[int]]:
    return [[(colour + r + c) % 10 for c in range(w)] for r in range(h)]


def _good(i: int) -> dict:
    return {"train": [{"input": _grid(6, 7, i), "output": _grid(7, 6, i + 1)}],
            "test": [{"input": _grid(6, 6, i + 2), "output": _grid(6, 6, i + 3)}]}


# row -> (task id, reason, task JSON); the other rows are good tasks
BROKEN = {
    1: ("bad0colour", "bad_colour", {"train": [{"input": [[1, 12]], "output": [[1]]}],
                                     "test": [{"input": [[1]], "output": [[2]]}]}),
    9: ("ragged0grid", "ragged_grid", {"train": [{"input": [[1, 2], [3]], "output": [[1]]}],
                                       "test": [{"input": [[1]], "output": [[2]]}]}),
    14: ("far0too0long", "too_long", {"train": [{"input": _grid(30, 30), "output": _grid(30, 30, 2)}],
                                     "test": [{"input": _grid(30, 30, 3), "output": _grid(30, 30, 4)}]}),
    20: ("not0an0object", "wrong_type", [1, 2, 3]),
}
N_TASKS = 24  # about 4 steps of 2 rows


def _source(path: Path) -> Path:
    tasks = {}
    for row in range(N_TASKS):
        if row in BROKEN:
            tid, _, task = BROKEN[row]
        else:
            tid, task = f"good{row:04d}", _good(row)
        tasks[tid] = task
    path.write_text(json.dumps(tasks))
    return path


def _over(source: Path) -> dict:
    return {"data.source": str(source), "max_prompts": 0, "data.n_augmentations": 1}


def _cli(source: Path) -> tuple[str, ...]:
    return (f"--config.data.source={source}", "--config.max_prompts=0", "--config.data.n_augmentations=1")


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "skipped.jsonl").read_text().splitlines()]


def test_skipped_jsonl_names_every_broken_task_and_the_summary_every_reason(tiny_ckpt, tmp_path):
    from arcstream import cli
    from arcstream.stream.loop import run

    source = _source(tmp_path / "challenges.json")
    result = run(_run._config(tiny_ckpt, tmp_path / "run", **_over(source)))
    lines = _lines(tmp_path / "run")
    got = sorted((r["row"], r["task_id"], r["reason"]) for r in lines)
    assert got == sorted((row, tid, reason) for row, (tid, reason, _) in BROKEN.items())
    for r in lines:
        assert r["message"] and r["task_id"] in r["message"] or r["reason"] == "wrong_type"
        assert r["source"].startswith(str(source))
    too_long = next(r for r in lines if r["reason"] == "too_long")
    assert too_long["row"] == 14 and "far0too0long" in too_long["message"]
    assert "tokens with 1 train pairs, over max_length=768" in too_long["message"]
    assert result.prompts == N_TASKS - len(BROKEN)  # every good task was kept
    assert result.skips == {reason: 1 for _, reason, _ in BROKEN.values()}
    text = cli.format_summary("arcstream.run", result.summary_rows())
    assert "…" not in text
    body = " ".join(ln[2:-2].strip() for ln in text.splitlines()[1:-1])
    for reason in ("bad_colour: 1", "ragged_grid: 1", "too_long: 1", "wrong_type: 1"):
        assert reason in body, text
    assert "(each named in skipped.jsonl)" in body


@pytest.mark.slow
def test_a_killed_and_resumed_run_names_each_skip_once(tiny_ckpt, tmp_path):
    from arcstream.stream.loop import run

    source = _source(tmp_path / "challenges.json")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run(_run._config(tiny_ckpt, clean, **_over(source)))
    cmd = [sys.executable, "-m", "arcstream.run", *_run._cli_overrides(tiny_ckpt, killed, _cli(source))]
    env = _run._env(1)
    env["ARCSTREAM_FAULT_KILL_AT_STEP"] = "2"
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-3000:]
    committed = json.loads((killed / "manifest.json").read_text())["processes"][0]["extra"]["skipped_lines"]
    assert 0 < committed < len(BROKEN), "the kill came between skips: some named, some not yet"
    assert len(_lines(killed)) == committed
    # A kill between writing skipped.jsonl and the commit leaves lines the commit does not count: the resume
    # meets those skips again and must not name them twice.
    with open(killed / "skipped.jsonl", "a") as f:
        f.write((killed / "skipped.jsonl").read_text().splitlines()[-1] + "\n")
    p = subprocess.run(cmd, env=_run._env(1), cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed at 1" in p.stdout
    assert _lines(killed) == _lines(clean)
    assert len(_lines(clean)) == len(BROKEN)


@given(entries=task_files())
@settings(max_examples=3, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_the_run_job_on_a_randomly_broken_file_keeps_every_good_task_and_names_every_bad_one(
        tiny_ckpt, tmp_path_factory, entries):
    """Hypothesis-drawn Kaggle files (tests/data/test_fuzz_sources.py: wrong types, NaN, ragged, empty and
    huge grids, unicode and duplicate ids) through the whole capture: it never fails, stores one prompt per
    test pair of every good task, and names every other entry in skipped.jsonl by row and task id."""
    from arcstream.stream.loop import run

    d = tmp_path_factory.mktemp("fuzzrun")
    body = ", ".join(f"{json.dumps(tid)}: {json.dumps(obj)}" for tid, obj, _ in entries)
    (d / "challenges.json").write_text("{" + body + "}", encoding="utf-8")
    first: dict[str, int] = {}
    good_prompts, bad_rows = 0, []
    for row, (tid, obj, good) in enumerate(entries):
        first.setdefault(tid, row)
        if good and first[tid] == row:
            good_prompts += len(obj["test"])
        else:
            bad_rows.append((row, tid))
    result = run(_run._config(tiny_ckpt, d / "run", **_over(d / "challenges.json")))
    assert result.prompts == good_prompts
    named = sorted((r["row"], r["task_id"]) for r in _lines(d / "run")) if bad_rows else []
    assert named == bad_rows
    assert sum(result.skips.values()) == len(bad_rows)


def test_bad_tasks_after_the_last_good_one_and_a_file_of_only_bad_tasks_are_named(tiny_ckpt, tmp_path):
    """Skips after the packer's last row (found by the fuzz test above: they used to be counted in the
    summary but never written to skipped.jsonl), and a rerun of the finished run writes them once."""
    from arcstream.stream.loop import run

    bad = {"zz0list": [1], "zz0empty": {"train": [], "test": []}}
    for name, tasks in (("trailing", {**{f"good{i}": _good(i) for i in range(5)}, **bad}), ("only_bad", bad)):
        (tmp_path / f"{name}.json").write_text(json.dumps(tasks))
        for attempt in range(2):  # the second run resumes the finished one
            result = run(_run._config(tiny_ckpt, tmp_path / name, **_over(tmp_path / f"{name}.json")))
            assert result.skips == {"wrong_type": 1, "missing_pairs": 1}, (name, attempt)
            named = sorted((r["task_id"], r["reason"]) for r in _lines(tmp_path / name))
            assert named == [("zz0empty", "missing_pairs"), ("zz0list", "wrong_type")], (name, attempt)
