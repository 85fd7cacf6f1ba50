"""The context-use job (python -m arcstream.context_use): on the shipped model it reproduces the model card's
table; the prompt format comes from the model folder or is refused by name; bad source rows are counted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from arcstream import models
from arcstream.lm.context_job import REPORT_FILE, TABLE_FILE, ContextUseOptions, run_context_use
from arcstream.options import ConfigError
from tests.checkpoints import tiny_arc_checkpoint
from configs.context_use import get_config

REPO = Path(__file__).resolve().parents[2]


def _card_rows() -> dict[str, list[str]]:
    """The shipped card's context-use table: label -> its cells."""
    text = (Path(models.path("arcstream-tiny")) / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        if line.startswith("| model, "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_the_job_reproduces_the_shipped_cards_table(tmp_path):
    """As a user runs it, default config: the same test outputs, losses and accuracies as the card that
    train_lm's final evaluation wrote (a divergent prompt format or length policy changes them)."""
    out = tmp_path / "cu"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "arcstream.context_use", "--config=configs/context_use.py",
                        f"--config.output_dir={out}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "context gain" in p.stdout and "copy the test input" in p.stdout, p.stdout
    report = json.loads((out / REPORT_FILE).read_text())
    expected = {**models.prompt_format("arcstream-tiny"), "from": "model's arcstream_prompt.json"}
    assert report["prompt_format"] == expected
    card = (Path(models.path("arcstream-tiny")) / "README.md").read_text(encoding="utf-8")
    m = re.search(r"Teacher-forced answers on (\d+) test outputs of (\d+) held-out tasks", card)
    assert m, "the card has no context-use table"
    assert (report["test_outputs"], report["tasks"]) == (int(m[1]), int(m[2]))
    rows = _card_rows()
    labels = {"own": "model, own train pairs (the normal prompt)", "none": "model, no train pairs (test input only)",
              "other": "model, another task's train pairs"}
    for ctx, label in labels.items():
        loss, acc, same = rows[label][:3]
        got = report["model"][ctx]
        assert f"{got['loss']:.4f}" == loss and f"{got['accuracy']:.3f}" == acc, (ctx, got, rows[label])
        assert f"{got['same_shape_accuracy']:.3f}" == same
    # The shipped model reads the examples, a little: 10.4% on its card (the three-stage recipe), far from the 30%
    # goal; the stage-1 model shipped before it (6.0%) and the hidden-256 one before that (0.7%) fail this.
    assert report["context_gain"] > 0.08, report["context_gain"]
    table = (out / TABLE_FILE).read_text()
    assert "| model, own train pairs (the normal prompt) | " + " | ".join(rows[labels["own"]][:3]) in table


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    return tiny_arc_checkpoint(tmp_path_factory.mktemp("random_ckpt"))


def _tasks_dir(root: Path) -> Path:
    """Three valid tasks and one whose train input is ragged (not a grid)."""
    d = root / "tasks"
    d.mkdir()
    for k in range(3):
        a, b = [[k, 1], [2, 3]], [[3, 2], [1, k]]
        task = {"train": [{"input": a, "output": b}, {"input": b, "output": a}],
                "test": [{"input": [[k, k], [4, 5]], "output": [[5, 4], [k, k]]}]}
        (d / f"t{k}.json").write_text(json.dumps(task))
    bad = {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[1]], "output": [[2]]}]}
    (d / "t9_bad.json").write_text(json.dumps(bad))
    return d


def test_prompt_format_from_the_model_folder_and_bad_rows_counted(tmp_path, random_checkpoint):
    c = get_config()
    c.model, c.output_dir = str(random_checkpoint), str(tmp_path / "cu")
    c.data.source, c.data.max_tasks = str(_tasks_dir(tmp_path)), 0
    c.data.template, c.data.encoder, c.data.use_chat_template = "minimal", "plain", False

    c.prompt_format = "model"  # the folder has no arcstream_prompt.json
    with pytest.raises(ConfigError, match=r"--config.prompt_format=model: .* has no arcstream_prompt.json"):
        ContextUseOptions.from_config(c)

    c.prompt_format = "auto"  # no file: the data section's format
    r = run_context_use(ContextUseOptions.from_config(c), log=lambda s: None)
    assert r.prompt_format == {"template": "minimal", "encoder": "plain", "use_chat_template": False, "from": "config"}
    assert r.report.prompt_config["template"] == "minimal" and r.report.prompt_config["encoder"] == "plain"
    assert r.read == 4 and r.bad_tasks == {"invalid_ragged_grid": 1}
    assert r.report.tasks == r.report.test_outputs == 3
    assert "skipped: invalid_ragged_grid 1" in dict(r.summary_rows())["scored"]
    assert json.loads((tmp_path / "cu" / REPORT_FILE).read_text())["bad_tasks"] == r.bad_tasks

    (random_checkpoint / models.PROMPT_FORMAT_FILE).write_text(json.dumps(
        {"template": "minimal_stop", "encoder": "shape+plain", "use_chat_template": False}))
    try:
        r = run_context_use(ContextUseOptions.from_config(c), log=lambda s: None)
        assert r.prompt_format["from"] == "model's arcstream_prompt.json"
        assert r.report.prompt_config["template"] == "minimal_stop"
        assert r.report.prompt_config["encoder"] == "shape+plain"
        c.prompt_format = "config"  # the data section wins over the file
        r = run_context_use(ContextUseOptions.from_config(c), log=lambda s: None)
        assert r.report.prompt_config["encoder"] == "plain" and r.prompt_format["from"] == "config"
    finally:
        (random_checkpoint / models.PROMPT_FORMAT_FILE).unlink()
