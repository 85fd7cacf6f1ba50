"""The LM trainer end to end on a tiny model: it learns, stops and resumes exactly, exports and writes its card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs.train_lm import get_config


def _config(out: Path, **train):
    c = get_config("smoke")
    c.output_dir = str(out)
    c.mesh.data = 2  # the tests see 8 fake devices; 2 rows per step over 2 of them
    c.export_dtype = "float32"
    c.data.seq_len = c.data.max_prompt_len = 512
    c.data.max_tasks = 12  # a small epoch, so a short run crosses an epoch boundary
    c.train.steps = 8
    c.train.checkpoint_every = 4
    c.eval.accuracy_tasks = 1
    for k, v in train.items():
        c.train[k] = v
    return c


def _weights(export: str | Path) -> dict[str, np.ndarray]:
    return load_file(str(Path(export) / "model.safetensors"))


def _log(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from arcstream.lm.train import train

    out = tmp_path_factory.mktemp("straight")
    return train(_config(out), log=_log), out


@pytest.mark.slow
def test_training_lowers_the_loss_and_exports(straight):
    result, out = straight
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    evals = [r["held_out"] for r in records if "held_out" in r]
    assert evals and all(0 < e["context"]["own"] and e["context"]["gain"] == 1 - e["context"]["own"] /
                         e["context"]["other"] for e in evals)  # the context figure at every held-out eval
    assert records[-1]["loss"] < records[0]["loss"]
    assert result.epochs >= 1  # 12 tasks at 2 rows a step: the stream went round and re-augmented
    # The export loads in arcstream and reproduces the trainer's held-out numbers.
    from arcstream.model import load_model

    _, cfg = load_model(result.export_dir)
    assert cfg.num_layers == 2 and cfg.hidden_size == 64 and cfg.vocab_size == 108
    assert math.isfinite(result.held_out["answer_cell"]) and result.held_out["answer_cells"] > 0
    card = (Path(result.export_dir) / "README.md").read_text()
    assert f"{result.steps} steps" in card and f"{result.held_out['answer_cell']:.4f}" in card
    # The context-use table, with its own-context loss as computed (smoke config: 2 held-out tasks).
    cu = result.held_out["context_use"]
    assert cu["test_outputs"] >= 1 and "## Does it read the examples?" in card
    assert f"{cu['model']['own']['loss']:.4f}" in card and "copy the test input" in card
    assert (Path(result.export_dir) / "loss_curve.png").stat().st_size > 1000
    assert result.accuracy is not None and result.accuracy["total"] >= 1


@pytest.mark.slow
def test_stop_and_resume_equals_an_uninterrupted_run(straight, tmp_path):
    from arcstream.lm.train import train

    result, _ = straight
    first = train(_config(tmp_path, stop_after=4), log=_log)
    assert first.stopped_at == 4 and first.export_dir == ""
    assert not (tmp_path / "export").exists()
    second = train(_config(tmp_path), log=_log)
    assert second.resumed_from == 4 and second.steps == 8
    a, b = _weights(result.export_dir), _weights(second.export_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]  # nothing logged twice
    assert second.tokens_trained == result.tokens_trained


def test_a_changed_config_is_refused_on_resume(straight, tmp_path):
    from arcstream.lm.train import train

    train(_config(tmp_path, steps=4, stop_after=2, warmup_steps=1), log=_log)
    changed = _config(tmp_path, steps=4, warmup_steps=1)
    changed.train.lr = 1e-2
    with pytest.raises(ValueError, match="another configuration"):
        train(changed, log=_log)


def test_bad_schedule_names_the_flags(tmp_path):
    from arcstream.lm.train import train

    with pytest.raises(ValueError, match="train.warmup_steps"):
        train(_config(tmp_path, steps=4, warmup_steps=4), log=_log)


def test_a_source_that_skips_every_task_is_reported_with_its_skip_counts(tmp_path):
    from arcstream.data.tokenizer import build_arc_tokenizer
    from arcstream.lm.train import EpochStream, training_source

    c = _config(tmp_path)
    c.data.max_tasks = 3
    c.data.seq_len = c.data.max_prompt_len = 16  # no ARC prompt fits: every task is skipped
    stream = EpochStream(c, build_arc_tokenizer(str(c.tokenizer)), training_source(c))
    try:
        with pytest.raises(RuntimeError, match=r"yields no batch in a whole epoch: every task was skipped "
                                               r"\(skips so far: \{'[a-z_]+': \d+"):
            next(stream)
    finally:
        stream.close()
