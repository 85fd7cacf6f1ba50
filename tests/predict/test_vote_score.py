"""Voting, tie-breaking, product ranking and ARC Prize scoring on hand-made cases."""

import numpy as np
import pytest

from arcstream.predict import Answer, attempts, grid_key, rank_by_product, score_predictions, vote

A = np.array([[1, 2], [3, 4]], np.int8)
B = np.array([[5]], np.int8)
C = np.array([[1, 2, 3, 4]], np.int8)  # same cells as A, other shape: a different grid
FALLBACK = np.zeros((1, 1), np.int8)


def test_grid_key_distinguishes_shape_not_dtype():
    assert grid_key(A) == grid_key(A.astype(np.int64))
    assert grid_key(A) != grid_key(C)


def test_most_votes_first_failures_ignored():
    answers = [Answer(0, B, -1.0), Answer(1, A, -5.0), Answer(2, None, 0.0, "ragged"), Answer(3, A, -5.0),
               Answer(4, C, -0.1)]
    ranked = vote(answers)
    # A has two votes despite the lowest log-probs; B and C tie on one vote and C's -0.1 beats B's -1.0
    # although B came first.
    assert [grid_key(c.grid) for c in ranked] == [grid_key(A), grid_key(C), grid_key(B)]
    assert [c.votes for c in ranked] == [2, 1, 1]
    assert ranked[0].augmentations == (1, 3) and ranked[0].logprob_sum == -10.0


def test_tie_on_votes_broken_by_summed_logprob_not_by_count_of_answers():
    # A: two votes summing to -3; B: two votes summing to -2.5 -> B first.
    answers = [Answer(0, A, -1.0), Answer(1, A, -2.0), Answer(2, B, -2.0), Answer(3, B, -0.5)]
    ranked = vote(answers)
    assert [grid_key(c.grid) for c in ranked] == [grid_key(B), grid_key(A)]
    assert ranked[0].logprob_sum == pytest.approx(-2.5)


def test_full_tie_keeps_first_seen():
    ranked = vote([Answer(0, B, -1.0), Answer(1, A, -1.0)])
    assert [grid_key(c.grid) for c in ranked] == [grid_key(B), grid_key(A)]


def test_attempts_fall_back_when_fewer_than_two_grids():
    a1, a2 = attempts(vote([Answer(0, A, 0.0)]), FALLBACK)
    assert np.array_equal(a1, A) and np.array_equal(a2, FALLBACK)
    a1, a2 = attempts(vote([Answer(0, None, 0.0, "no_stop")]), FALLBACK)
    assert np.array_equal(a1, FALLBACK) and np.array_equal(a2, FALLBACK)


def test_rank_by_product_reorders_by_summed_loglik_and_keeps_vote_order_on_ties():
    ranked = vote([Answer(0, A, 0.0), Answer(1, A, 0.0), Answer(2, B, 0.0), Answer(3, C, 0.0)])
    # vote order: A (2 votes), B, C. Products: A exp(-9), B exp(-3), C exp(-3).
    out = rank_by_product(ranked, {0: [-4.0, -5.0], 1: [-1.0, -2.0], 2: [-2.5, -0.5]})
    assert [grid_key(c.grid) for c in out] == [grid_key(B), grid_key(C), grid_key(A)]
    assert out[0].product_logprob == pytest.approx(-3.0) and out[2].product_logprob == pytest.approx(-9.0)
    with pytest.raises(ValueError, match="no scores for candidate 2"):
        rank_by_product(ranked, {0: [0.0], 1: [0.0]})


def test_score_against_hand_computed_figure():
    sol = {
        "a": [[[1]], [[2, 2]]],  # test 0 solved by attempt_2; test 1 wrong shape
        "b": [[[3], [4]]],  # solved by attempt_1
        "c": [[[5]], [[6]]],  # no prediction at all: 0 on both
    }
    pred = {
        "a": [{"attempt_1": [[0]], "attempt_2": [[1]]}, {"attempt_1": [[2], [2]], "attempt_2": [[2, 2, 2]]}],
        "b": [{"attempt_1": [[3], [4]], "attempt_2": [[0]]}],
        "extra": [{"attempt_1": [[1]], "attempt_2": [[1]]}],  # not in solutions: ignored
    }
    s = score_predictions(pred, sol)
    # 2 of 5 test outputs; per task 1/2, 1, 0 -> mean 0.5.
    assert (s.solved, s.total) == (2, 5)
    assert s.score == pytest.approx(0.4)
    assert s.task_scores == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert s.mean_task_score == pytest.approx(0.5)
    assert s.per_task["a"] == [True, False]


def test_score_rejects_wrong_entry_count_and_missing_attempt():
    with pytest.raises(ValueError, match=r"predictions\['a'\] has 1 entries but the task has 2"):
        score_predictions({"a": [{"attempt_1": [[1]], "attempt_2": [[1]]}]}, {"a": [[[1]], [[1]]]})
    with pytest.raises(ValueError, match="lacks \\['attempt_2'\\]"):
        score_predictions({"a": [{"attempt_1": [[1]]}]}, {"a": [[[1]]]})
