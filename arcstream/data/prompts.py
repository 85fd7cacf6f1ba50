"""Prompts: one (task, test pair, augmentation) as tokens, with the grid cell behind every token.

`build_prompt` applies the augmentation, writes the prompt text from a
template and a grid encoder, tokenizes it, aligns every token with the grid
cells it covers, and applies the length policy. The result is an
`EncodedPrompt` (records.py).

Prompt layout (template "arc"; `minimal` is the same with shorter labels):

    <instruction>

    Example 1
    Input:
    <grid>
    Output:
    <grid>

    Example 2
    ...

    Test
    Input:
    <grid>
    Output:                 <- the answer prefix (plain prompts)
    <answer grid><eos>      <- only with include_answer and a known solution

With a chat template (when the tokenizer has one and `use_chat_template`),
everything up to the test input is the user message, and the assistant turn
is the answer: the answer prefix is the template's generation prompt, and the
answer is the assistant message's content.

Cell alignment, the contract the store and analysis rely on:
  - Per token: `grid_kind` (GRID_* from records.py), `pair_index` (the pair's
    index in the *augmented* task's train list, or the test index for the test
    input and answer), `row`, `col`, `colour` of the cell, all in the
    *augmented* grid as the model sees it; -1 (GRID_NONE) on other tokens.
    `EncodedPrompt.augmentation` maps back: original train index =
    `train_order[pair_index]`, original cell = `invert_grid`.
  - A token covers the cells whose first character lies inside its character
    span (from the tokenizer's offset mapping and the encoder's `cell_spans`).
    If it covers several (Llama 3 merges up to three digits), it records its
    *first* cell (lowest row-major position) and `n_cells` says how many; the
    next cells are (row, col+1) ... of the same row, since encoders write a row
    left to right and a token never spans a line break between digits. So
    every cell of every grid in the prompt is covered exactly once, and
    `colour` is the cell's value in the augmented grid. Where a tokenizer gives
    overlapping offsets (a multi-byte character split into byte tokens), a
    character belongs to the first token that covers it.
  - Digits outside grids (example numbers, row numbers, shape headers) are not
    cells: -1.

Answer tokens (`answer_mask`): the tokens overlapping the answer grid's text,
plus the special token right after it (eos in plain prompts, the end-of-turn
token such as `<|im_end|>` in chat prompts), since that is what a model must
emit to stop. `answer_start` is the first of them; without an answer the
prompt ends at the answer prefix and `answer_start == len(prompt)`.

Length policy: a prompt longer than `max_length` tokens loses train pairs one
at a time (`drop_last`, `drop_first`, or `drop_largest` by encoded size)
until it fits, keeping at least `min_train_pairs`; with `skip`, or when it
still does not fit, `InvalidTask("too_long")` names the task and the lengths.
The dropped pairs are listed in `metadata`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from arcstream.data.augment import Augmentation
from arcstream.data.encoders import DEFAULT_SPEC, DecodeError, GridEncoder, get_encoder
from arcstream.data.records import (GRID_KIND_NAMES, GRID_TEST_INPUT, GRID_TEST_OUTPUT, GRID_TRAIN_INPUT, GRID_TRAIN_OUTPUT,
                                    EncodedPrompt)
from arcstream.data.task import InvalidTask, Task
from arcstream.data.tokenizer import TokenizerRoundTripError, check_roundtrip, special_token_ids

DROP_POLICIES = ("drop_last", "drop_first", "drop_largest", "skip")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """The fixed text around the grids. `example_header` may use `{n}` (1-based example number)."""

    name: str
    instruction: str  # first paragraph; "" for none
    example_header: str  # before each train pair's input label
    input_label: str  # before every input grid
    output_label: str  # before every output grid; in plain prompts also the answer prefix
    pair_separator: str  # after each train pair
    test_header: str  # before the test input label
    # Write the tokenizer's eos after every train output grid too, as after the answer: every output ends
    # the same way, so a model trained on all outputs learns to stop (plain prompts only).
    stop_after_outputs: bool = False


_MINIMAL = PromptTemplate(
    name="minimal",
    instruction="",
    example_header="",
    input_label="I\n",
    output_label="O\n",
    pair_separator="\n",
    test_header="",
)

TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate(
            name="arc",
            instruction=("Each example below shows an input grid and the output grid that a hidden rule makes "
                         "of it. Cells are colours 0-9. Find the rule and apply it to the test input."),
            example_header="Example {n}\n",
            input_label="Input:\n",
            output_label="Output:\n",
            pair_separator="\n\n",
            test_header="Test\n",
        ),
        _MINIMAL,
        # minimal with eos after every train output (arcstream-tiny's format since its retraining)
        dataclasses.replace(_MINIMAL, name="minimal_stop", stop_after_outputs=True),
    )
}


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How a task becomes a prompt.

    encoder: grid encoder spec (encoders.py), e.g. "plain", "shape+rownum+space".
    template: a name in `TEMPLATES`.
    include_answer: append the test output (when the task has it), e.g. for LM
      training or to capture activations on the answer.
    use_chat_template: use the tokenizer's chat template when it has one.
    max_length: the most tokens a prompt may have (answer included); None = no limit.
    drop_policy: what happens over `max_length`: one of `DROP_POLICIES`.
    min_train_pairs: the dropping policies keep at least this many train pairs.
    """

    encoder: str = DEFAULT_SPEC
    template: str = "arc"
    include_answer: bool = False
    use_chat_template: bool = True
    max_length: int | None = None
    drop_policy: str = "drop_last"
    min_train_pairs: int = 1

    def __post_init__(self) -> None:
        get_encoder(self.encoder)  # raises ValueError naming the bad spec part
        if self.template not in TEMPLATES:
            raise ValueError(f"PromptConfig.template is {self.template!r}; expected one of {sorted(TEMPLATES)}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"PromptConfig.drop_policy is {self.drop_policy!r}; expected one of {DROP_POLICIES}")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length <= 0):
            raise ValueError(f"PromptConfig.max_length is {self.max_length!r}; expected a positive int or None")
        if not isinstance(self.min_train_pairs, int) or self.min_train_pairs < 0:
            raise ValueError(f"PromptConfig.min_train_pairs is {self.min_train_pairs!r}; expected an int >= 0")


# --- text with its grid segments ---------------------------------------------------------


@dataclasses.dataclass
class _Grid:
    """A grid placed in the text: where its encoding starts, and whose cells it holds."""

    offset: int  # character offset of `encode(grid)` in the full prompt text
    grid: np.ndarray
    kind: int
    pair_index: int
    starts: np.ndarray  # int64 [h*w]: each cell's first character within `encode(grid)`, row-major
    length: int  # len(encode(grid)): the grid's text is text[offset:offset + length]


class _TextBuilder:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.grids: list[_Grid] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def add_grid(self, encoded: tuple[str, np.ndarray], grid: np.ndarray, kind: int, pair_index: int) -> None:
        text, starts = encoded
        self.grids.append(_Grid(self.length, grid, kind, pair_index, starts, len(text)))
        self.add(text)

    def text(self) -> str:
        return "".join(self.parts)


# Encoded grids of one build_prompt call, by (train|test, pair index, 0=input|1=output): the text and the
# cells' first characters. Reused when the length policy re-renders with fewer pairs.
_Cache = dict[tuple[str, int, int], tuple[str, np.ndarray]]


def _uses_chat(tokenizer: PreTrainedTokenizerBase, config: PromptConfig) -> bool:
    return bool(config.use_chat_template and getattr(tokenizer, "chat_template", None))


def _render(task: Task, test_index: int, keep: Sequence[int], answer: bool, encoder: GridEncoder,
            template: PromptTemplate, tokenizer: PreTrainedTokenizerBase, chat: bool,
            cache: _Cache) -> tuple[str, list[_Grid], tuple[int, int] | None]:
    """The prompt text, its grids (offsets in that text) and the answer's character span (or None)."""
    b = _write_examples(task, test_index, keep, encoder, template, tokenizer, chat, cache)
    test = task.test[test_index]
    answer_enc = _cached_encoding(cache, encoder, ("test", test_index, 1), test.output) if answer else None
    if not chat:
        return _finish_plain(b, answer_enc, test.output, test_index, template, tokenizer)
    return _finish_chat(b, answer_enc, test.output, test_index, tokenizer)


def _cached_encoding(cache: _Cache, encoder: GridEncoder, key: tuple[str, int, int],
                     grid: np.ndarray) -> tuple[str, np.ndarray]:
    """The grid's text and its cells' first characters, encoded once per `build_prompt` call (see `_Cache`)."""
    if key not in cache:
        cache[key] = (encoder.encode(grid), encoder.cell_starts(grid))
    return cache[key]


def _write_examples(task: Task, test_index: int, keep: Sequence[int], encoder: GridEncoder, template: PromptTemplate,
                    tokenizer: PreTrainedTokenizerBase, chat: bool, cache: _Cache) -> _TextBuilder:
    """The text both layouts share: the instruction, the kept train pairs and the test input (a chat's user message)."""
    b = _TextBuilder()
    if template.instruction:
        b.add(template.instruction + "\n\n")
    for n, i in enumerate(keep):
        pair = task.train[i]
        b.add(template.example_header.format(n=n + 1) + template.input_label)
        b.add_grid(_cached_encoding(cache, encoder, ("train", i, 0), pair.input), pair.input, GRID_TRAIN_INPUT, i)
        b.add("\n" + template.output_label)
        b.add_grid(_cached_encoding(cache, encoder, ("train", i, 1), pair.output), pair.output, GRID_TRAIN_OUTPUT, i)
        if template.stop_after_outputs and not chat and tokenizer.eos_token:
            b.add(tokenizer.eos_token)
        b.add(template.pair_separator)
    test = task.test[test_index]
    b.add(template.test_header + template.input_label)
    b.add_grid(_cached_encoding(cache, encoder, ("test", test_index, 0), test.input), test.input, GRID_TEST_INPUT,
               test_index)
    return b


def _finish_plain(b: _TextBuilder, answer_enc: tuple[str, np.ndarray] | None, answer_grid: np.ndarray,
                  test_index: int, template: PromptTemplate,
                  tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[_Grid], tuple[int, int] | None]:
    """A plain prompt: the answer prefix, then (with an answer) the answer grid and eos; `_render`'s result."""
    b.add("\n" + template.output_label)
    answer_span = None
    if answer_enc is not None:
        answer_span = (b.length, b.length + len(answer_enc[0]))
        b.add_grid(answer_enc, answer_grid, GRID_TEST_OUTPUT, test_index)
        if tokenizer.eos_token:
            b.add(tokenizer.eos_token)
    return b.text(), b.grids, answer_span


def _finish_chat(b: _TextBuilder, answer_enc: tuple[str, np.ndarray] | None, answer_grid: np.ndarray,
                 test_index: int,
                 tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[_Grid], tuple[int, int] | None]:
    """A chat prompt: `b`'s text as the user message (and the answer as the assistant's) rendered by the chat
    template, then the user message and the answer found in the rendered text; `_render`'s result.

    Raises ValueError when the template changed either text, since grid cells could not be located.
    """
    content = b.text()
    messages: list[dict[str, str]] = [{"role": "user", "content": content}]
    prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if answer_enc is not None:
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer_enc[0]}],
                                             tokenize=False, add_generation_prompt=False)
    else:
        text = prefix
    base = text.find(content)
    if base < 0:
        raise ValueError(f"the chat template of {tokenizer.name_or_path or type(tokenizer).__name__} changed the "
                         "user message's text, so grid cells cannot be located; set use_chat_template=False")
    grids = [dataclasses.replace(g, offset=g.offset + base) for g in b.grids]
    answer_span = None
    if answer_enc is not None:
        answer_text, answer_starts = answer_enc
        if text.startswith(prefix) and text[len(prefix):].startswith(answer_text):
            a0 = len(prefix)
        else:  # a template whose full rendering differs from its generation prompt
            a0 = text.rfind(answer_text)
            if a0 < base + len(content):
                raise ValueError("the chat template changed the assistant message's text, so the answer cannot "
                                 "be located; set use_chat_template=False")
        answer_span = (a0, a0 + len(answer_text))
        grids.append(_Grid(a0, answer_grid, GRID_TEST_OUTPUT, test_index, answer_starts, len(answer_text)))
    return text, grids, answer_span


# --- alignment ---------------------------------------------------------------------------


def _align(offsets_n2: np.ndarray, grids: list[_Grid]) -> dict[str, np.ndarray]:
    """Per-token cell attributes (see the module docstring) from token offsets and cell start characters.

    Vectorised over tokens: the cells' first characters (increasing through the
    text) are searched for each token's span, so a token's cells are the
    contiguous range [lo, hi) of the prompt's cells in text order.
    """
    n = offsets_n2.shape[0]
    s = offsets_n2[:, 0].astype(np.int64)
    e = offsets_n2[:, 1].astype(np.int64)
    # A character belongs to the first token covering it: start each token after every earlier token's end.
    prev_end = np.maximum.accumulate(np.concatenate([[0], e[:-1]])) if n else e
    s_eff = np.maximum(s, prev_end)
    e_eff = np.maximum(e, s_eff)
    out = {"s_eff": s_eff, "e_eff": e_eff, "n_cells": np.zeros(n, np.int8)}
    for name, none in (("grid_kind", 0), ("pair_index", -1), ("row", -1), ("col", -1), ("colour", -1)):
        out[name] = np.full(n, none, np.int8)
    if not grids:
        return out
    starts_c = np.concatenate([g.offset + g.starts for g in grids])
    lo = np.searchsorted(starts_c, s_eff, side="left")
    hi = np.searchsorted(starts_c, e_eff, side="left")
    n_cells = hi - lo
    if n_cells.max() > 127:
        raise ValueError(f"a token covers {n_cells.max()} grid cells; at most 127 fit the int8 n_cells field")
    out["n_cells"] = n_cells.astype(np.int8)
    tok = np.flatnonzero(n_cells > 0)
    cell = lo[tok]  # the token's first cell, as an index into the prompt's cells in text order
    # Which grid each of those cells is in, and its row-major index within that grid.
    sizes = np.array([g.grid.size for g in grids], dtype=np.int64)
    first_cell_g = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    gi = np.searchsorted(first_cell_g, cell, side="right") - 1
    local = cell - first_cell_g[gi]
    width_g = np.array([g.grid.shape[1] for g in grids], dtype=np.int64)
    out["grid_kind"][tok] = np.array([g.kind for g in grids], dtype=np.int8)[gi]
    out["pair_index"][tok] = np.array([g.pair_index for g in grids], dtype=np.int8)[gi]
    out["row"][tok] = local // width_g[gi]
    out["col"][tok] = local % width_g[gi]
    out["colour"][tok] = np.concatenate([g.grid.reshape(-1) for g in grids])[cell]
    return out


def _span_mask(mask: np.ndarray, token_ids: np.ndarray, s_eff: np.ndarray, e_eff: np.ndarray,
               span: tuple[int, int], specials: frozenset[int]) -> int | None:
    """Sets `mask` on the tokens overlapping the character span, plus a special token right after them
    (the eos / end-of-turn token a model must emit to stop); returns the first such token, or None."""
    a0, a1 = span
    idx = np.flatnonzero((s_eff < a1) & (e_eff > a0))
    if idx.size == 0:
        return None
    start, last = int(idx[0]), int(idx[-1])
    if last + 1 < token_ids.shape[0] and int(token_ids[last + 1]) in specials:
        last += 1
    mask[start:last + 1] = True
    return start


def _answer_mask(token_ids: np.ndarray, s_eff: np.ndarray, e_eff: np.ndarray, span: tuple[int, int] | None,
                 specials: frozenset[int]) -> tuple[np.ndarray, int]:
    n = token_ids.shape[0]
    mask = np.zeros(n, dtype=bool)
    start = None if span is None else _span_mask(mask, token_ids, s_eff, e_eff, span, specials)
    return mask, n if start is None else start


def _output_mask(token_ids: np.ndarray, s_eff: np.ndarray, e_eff: np.ndarray, grids: list[_Grid],
                 answer_mask: np.ndarray, specials: frozenset[int]) -> np.ndarray:
    """The tokens of every train output grid's text (header, cells, line breaks, a stop token after it),
    and the answer's."""
    mask = answer_mask.copy()
    for g in grids:
        if g.kind == GRID_TRAIN_OUTPUT:
            _span_mask(mask, token_ids, s_eff, e_eff, (g.offset, g.offset + g.length), specials)
    return mask


def _check_grid_text(tokenizer: PreTrainedTokenizerBase, text: str, token_ids: np.ndarray,
                     offsets_n2: np.ndarray, grids: list[_Grid], task_id: str) -> None:
    """Every grid's text must come back from its tokens (digits, separators, line breaks).

    Guards against tokenizers that drop or replace characters silently: the
    transformers-5 `Qwen2Tokenizer` rebuild of a character vocabulary lost
    every " " and "\\n", and the model was fed grids without row breaks while
    cell alignment (which only looks at digits) still looked right. One decode
    per grid; raises `TokenizerRoundTripError` naming the task and the grid.
    """
    for g in grids:
        a0, a1 = g.offset, g.offset + g.length
        idx = np.flatnonzero((offsets_n2[:, 0] < a1) & (offsets_n2[:, 1] > a0))
        try:
            check_roundtrip(tokenizer, text[a0:a1], ids=token_ids[idx].tolist())
        except TokenizerRoundTripError as e:
            raise TokenizerRoundTripError(f"task {task_id}, {GRID_KIND_NAMES.get(g.kind, g.kind)} grid of pair "
                                          f"{g.pair_index}: {e}") from None


# --- the prompt builder ------------------------------------------------------------------


def _encode_once(task: Task, test_index: int, keep: Sequence[int], augmentation: Augmentation,
                 tokenizer: PreTrainedTokenizerBase, config: PromptConfig,
                 cache: _Cache) -> EncodedPrompt:
    encoder = get_encoder(config.encoder)
    template = TEMPLATES[config.template]
    chat = _uses_chat(tokenizer, config)
    answer = config.include_answer and task.test[test_index].output is not None
    text, grids, answer_span = _render(task, test_index, keep, answer, encoder, template, tokenizer, chat, cache)
    # Chat renderings already hold bos (if the template wants it); plain text gets the tokenizer's own policy.
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=not chat)
    token_ids = np.asarray(enc.ids, dtype=np.int32)
    offsets_n2 = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    _check_grid_text(tokenizer, text, token_ids, offsets_n2, grids, task.id)
    cells = _align(offsets_n2, grids)
    specials = special_token_ids(tokenizer)
    mask, answer_start = _answer_mask(token_ids, cells["s_eff"], cells["e_eff"], answer_span, specials)
    out_mask = _output_mask(token_ids, cells["s_eff"], cells["e_eff"], grids, mask, specials)
    return EncodedPrompt(
        task_id=task.id,
        test_index=test_index,
        augmentation=augmentation.to_json(),
        token_ids=token_ids,
        grid_kind=cells["grid_kind"],
        pair_index=cells["pair_index"],
        row=cells["row"],
        col=cells["col"],
        colour=cells["colour"],
        n_cells=cells["n_cells"],
        answer_mask=mask,
        answer_start=answer_start,
        output_mask=out_mask,
        metadata={
            "encoder": config.encoder,
            "template": config.template,
            "chat": chat,
            "answer_included": answer,
            "train_pairs": list(keep),
            "num_chars": len(text),
        },
    )


def build_prompt(
    task: Task,
    test_index: int,
    augmentation: Augmentation | Mapping[str, Any] | None,
    tokenizer: PreTrainedTokenizerBase,
    config: PromptConfig = PromptConfig(),
) -> EncodedPrompt:
    """The prompt for test pair `test_index` of `task` under `augmentation` (None = identity).

    See the module docstring for the layout, the alignment contract and the
    length policy. `metadata` holds the encoder and template names, whether a
    chat template and an answer were used, `train_pairs` (the augmented
    indices shown, in order), `dropped_train_pairs` (augmented indices) and
    `dropped_train_pairs_original` (indices in the original task).

    Raises InvalidTask("too_long") when the length policy cannot make the
    prompt fit; ValueError on a bad test index, an augmentation that does not
    fit the task, or a tokenizer without offsets.
    """
    if not 0 <= test_index < len(task.test):
        raise ValueError(f"task {task.id}: test_index is {test_index}; the task has {len(task.test)} test pairs")
    if len(task.train) > 127 or len(task.test) > 127:
        raise ValueError(f"task {task.id}: {len(task.train)} train / {len(task.test)} test pairs; pair_index is "
                         "int8, so at most 127 of each")
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise TypeError(f"build_prompt needs a fast (tokenizers-backed) tokenizer for character offsets; got "
                        f"{type(tokenizer).__name__}")
    if augmentation is None:
        augmentation = Augmentation.identity()
    elif isinstance(augmentation, Mapping):
        augmentation = Augmentation.from_json(augmentation)
    aug_task = augmentation.apply_task(task)
    original_index = augmentation.train_order or tuple(range(len(task.train)))
    keep = list(range(len(aug_task.train)))
    dropped: list[int] = []
    cache: _Cache = {}
    while True:
        prompt = _encode_once(aug_task, test_index, keep, augmentation, tokenizer, config, cache)
        if config.max_length is None or len(prompt) <= config.max_length:
            break
        if config.drop_policy == "skip" or len(keep) <= config.min_train_pairs:
            why = ("policy is 'skip'" if config.drop_policy == "skip" else
                   f"policy {config.drop_policy!r} already dropped {len(dropped)} train pairs and keeps at least "
                   f"min_train_pairs={config.min_train_pairs}")
            raise InvalidTask(
                "too_long",
                f"prompt has {len(prompt)} tokens with {len(keep)} train pairs, over max_length="
                f"{config.max_length} ({why}); raise max_length or use a shorter encoder",
                task_id=task.id, where=f"test[{test_index}]")
        if config.drop_policy == "drop_last":
            victim = keep[-1]
        elif config.drop_policy == "drop_first":
            victim = keep[0]
        else:  # drop_largest: the pair with the longest encoding; the later one on ties
            victim = max(keep, key=lambda i: (len(cache[("train", i, 0)][0]) + len(cache[("train", i, 1)][0]), i))
        keep.remove(victim)
        dropped.append(victim)
    prompt.metadata["dropped_train_pairs"] = dropped
    prompt.metadata["dropped_train_pairs_original"] = [int(original_index[i]) for i in dropped]
    return prompt


def decode_answer(text: str, config: PromptConfig, *, stop: Sequence[str] = ()) -> np.ndarray | DecodeError:
    """The grid a model generated after the answer prefix, or the DecodeError saying why there is none.

    Returns (does not raise) the error, so a predictions job can count failures.
    The text is cut at the first `stop` string (e.g. the tokenizer's eos when
    decoding without `skip_special_tokens`) and at the first blank line (no
    encoder writes one, and a model that does not stop often starts a new
    paragraph), then decoded with the config's encoder. The grid is in the
    augmented frame: map it back with `Augmentation.invert_grid`.
    """
    encoder = get_encoder(config.encoder)
    if not isinstance(text, str):
        return DecodeError(f"expected generated text (str), got {type(text).__name__}", config.encoder)
    for s in stop:
        if s:
            text = text.split(s, 1)[0]
    text = text.strip().split("\n\n", 1)[0]
    try:
        return encoder.decode(text)
    except DecodeError as e:
        return e
