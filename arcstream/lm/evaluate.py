"""Does the model use the task's examples? Answer-cell loss and accuracy under three contexts, against baselines.

A low answer-cell loss alone does not show that a model solves ARC tasks: a
model that has learnt "colours repeat along a row" scores well below ln 10
without reading the train pairs at all. The first arcstream-tiny did exactly
that (its loss on 17cae0c1 was 1.52 / 1.40 / 1.35 nats with its own train
pairs / none / another task's), so the model card reports what the model does
*with* the examples, against predictors that cannot read them, all on the same
answer cells.

`context_use` teacher-forces every test output of held-out tasks (identity
augmentation, the training prompt format) under three contexts:

  own    the task's own train pairs: the normal prompt;
  none   no train pairs: only the test input, then the answer;
  other  another task's train pairs (task i gets task (i + other_offset) mod n's),
         with this task's test input and answer;

and scores the answer cells (`GRID_TEST_OUTPUT` tokens): mean next-token loss
(nats) and per-cell accuracy (argmax over the whole vocabulary == the true
cell token, what greedy decoding would write there). A test output is scored
only when all three prompts fit `max_len` (after the prompt config's
train-pair dropping policy); the others are counted in `skipped`, so every
figure below is over exactly the same cells.

`context_gain = 1 - loss_own / loss_other` is the share of the loss the task's
own examples remove compared with a wrong task's: 0 for a model that ignores
the train pairs, 1 for one that needs them to be right. The retrained model's
goal is `GOAL_CONTEXT_GAIN` (0.30).

Answer structure (also teacher-forced; positions are the ones *predicting*
the named token):
  - p(newline) at the true row ends (the last cell of a row but the last)
    vs "mid-row" (positions whose true next token is a cell (r, c >= 1));
  - p(stop) at the true end of the answer: the summed probability of the
    tokenizer's stop tokens (eos, end of turn) after the last cell;
  - `shape_right_teacher_forced`: the fraction of test outputs where the
    argmax is the newline at every row end, a stop token at the end, and
    neither a newline nor a stop token wherever the true next token is a cell.
    It is the shape greedy decoding would write if every earlier token were
    right: a cheap proxy for decoding, not a decoding result.

Baselines on the same cells (loss only where the predictor is a distribution):
  - uniform over the 10 colours: loss ln 10; accuracy is the expected accuracy
    of its argmax with ties broken at random (0.1);
  - the task's colour frequencies (all train output cells, add-one smoothed):
    loss, and the accuracy of its argmax (ties shared the same way);
  - repeat the previous cell (same answer row; a row's first cell repeats the
    cell above; cell (0, 0) is the most common train-output colour, lowest on
    ties): accuracy only;
  - copy the test input: accuracy on same-shape test outputs only.
Every predictor also gets its accuracy on the same-shape outputs' cells, so the
model compares with copy-the-test-input on equal terms.

Speed: the prompts are packed into rows of one length (a multiple of 256),
`batch_tokens` tokens per forward, so one evaluation compiles once (see
`_run_forwards`). The first 20 ARC-AGI-1 evaluation tasks (48 prompts, 7
forwards of 4 x 2048) take ~17 s on a shared 2-core CPU with arcstream-tiny
(~30 s when other jobs load the cores), plus ~6 s to load the model and data.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from arcstream.data.packing import pack_first_fit, prompt_element, rows_to_batch
from arcstream.data.pipeline import make_prompter
from arcstream.data.prompts import build_prompt
from arcstream.data.records import GRID_TEST_OUTPUT, EncodedPrompt
from arcstream.data.sources import open_source
from arcstream.data.task import NUM_COLOURS, InvalidTask, Task
from arcstream.data.tokenizer import stop_token_ids
from arcstream.model import forward_jit

CONTEXTS = ("own", "none", "other")
CONTEXT_LABELS = {
    "own": "model, own train pairs (the normal prompt)",
    "none": "model, no train pairs (test input only)",
    "other": "model, another task's train pairs",
}
BASELINES = ("uniform", "colour_frequency", "repeat_previous", "copy_test_input")
BASELINE_LABELS = {
    "uniform": "uniform over 10 colours",
    "colour_frequency": "the task's colour frequencies (train outputs, add-one)",
    "repeat_previous": "repeat the previous cell (cell above at a row start)",
    "copy_test_input": "copy the test input (same-shape outputs only)",
}
GOAL_CONTEXT_GAIN = 0.30  # the retrained model must remove >= 30% of a wrong context's answer-cell loss
PAD_MULTIPLE = 256  # prompts are padded to a multiple of this many tokens: one compile per padded length

# (tokens_bt, segment_ids_bt, positions_bt) int32 [B, T] -> logits [B, T, V]; segment 0 = padding.
LogitsFn = Callable[[np.ndarray, np.ndarray, np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class Scores:
    """One predictor on the answer cells."""

    loss: float | None  # mean nats per cell; None where the predictor is not a distribution
    accuracy: float | None  # per-cell accuracy over all cells; None where undefined (copy on other shapes)
    same_shape_accuracy: float | None  # per-cell accuracy over the cells of same-shape test outputs
    cells: int  # cells behind `loss` / `accuracy` (or behind `same_shape_accuracy` for copy_test_input)


@dataclasses.dataclass(frozen=True)
class Structure:
    """The answer's layout under teacher forcing, for one context."""

    p_newline_row_end: float  # mean p(newline) where the true next token is a row break; nan without any
    p_newline_mid_row: float  # mean p(newline) where the true next token is a cell (r, c >= 1)
    p_stop_end: float  # mean summed p(stop tokens) where the true next token is the stop token
    shape_right_teacher_forced: float  # fraction of test outputs whose argmax layout is right everywhere
    row_ends: int  # positions behind p_newline_row_end
    mid_row: int  # positions behind p_newline_mid_row


@dataclasses.dataclass(frozen=True)
class OutputScores:
    """One test output: its figures per context and per baseline (for drilling down into a task)."""

    task_id: str
    test_index: int
    other_task_id: str  # whose train pairs the "other" context shows
    shape: tuple[int, int]
    same_shape: bool  # test input and output have the same shape
    cells: int
    train_pairs: dict[str, int]  # context -> train pairs shown (after the length policy)
    loss: dict[str, float]  # context -> mean nats per cell
    accuracy: dict[str, float]  # context -> per-cell accuracy
    shape_right_teacher_forced: dict[str, bool]  # context -> layout right under teacher forcing
    baseline_accuracy: dict[str, float]  # baseline -> per-cell accuracy (copy_test_input nan unless same shape)


@dataclasses.dataclass(frozen=True)
class ContextUseReport:
    """What `context_use` measured (see the module docstring); `as_dict()` is JSON-able (nan -> None)."""

    tasks: int  # tasks with at least one scored test output
    test_outputs: int
    cells: int  # answer cells behind every all-cell figure
    same_shape_outputs: int  # test outputs whose input has the output's shape
    same_shape_cells: int
    skipped: dict[str, int]  # reason -> test outputs not scored ("own_too_long", "other_too_long", ...)
    model: dict[str, Scores]  # context -> the model's scores
    baselines: dict[str, Scores]  # baseline name -> scores on the same cells
    structure: dict[str, Structure]  # context -> answer layout
    context_gain: float  # 1 - model["own"].loss / model["other"].loss
    goal_context_gain: float
    max_len: int
    prompt_config: dict[str, Any]
    outputs: tuple[OutputScores, ...]

    def as_dict(self) -> dict[str, Any]:
        return _json_safe(dataclasses.asdict(self))

    @property
    def meets_goal(self) -> bool:
        return bool(self.context_gain >= self.goal_context_gain)


# --- baselines (pure NumPy; the tests check them against hand counts) -------------------------------------


def colour_frequencies(task: Task) -> np.ndarray:
    """float64 [10]: add-one smoothed frequencies of the colours of every train output cell."""
    counts = np.ones(NUM_COLOURS, np.float64)
    for p in task.train:
        counts += np.bincount(np.asarray(p.output, np.int64).reshape(-1), minlength=NUM_COLOURS)
    return counts / counts.sum()


def most_common_train_colour(task: Task) -> int:
    """The most common colour over the train outputs' cells (the lowest colour on ties)."""
    return int(np.argmax(colour_frequencies(task)))


def repeat_previous(output: np.ndarray, first: int) -> np.ndarray:
    """int [h, w]: each cell predicted as the previous cell of its row; a row's first cell as the cell above;
    (0, 0) as `first`."""
    out = np.asarray(output)
    pred = np.empty_like(out)
    pred[:, 1:] = out[:, :-1]
    pred[1:, 0] = out[:-1, 0]
    pred[0, 0] = first
    return pred


def tie_shared_accuracy(p_k: np.ndarray, y_n: np.ndarray) -> np.ndarray:
    """float [n]: the expected accuracy, per cell, of the argmax of distribution `p_k`, ties broken at random."""
    best = p_k == p_k.max()
    return best[np.asarray(y_n, np.int64)] / best.sum()


@dataclasses.dataclass(frozen=True)
class _BaselineCells:
    nll: dict[str, np.ndarray]  # name -> [n] nats, for distribution baselines
    correct: dict[str, np.ndarray]  # name -> [n] float (expected) correctness; copy_test_input only if same shape


def _baseline_cells(task: Task, test_index: int) -> _BaselineCells:
    out = np.asarray(task.test[test_index].output, np.int64)
    inp = np.asarray(task.test[test_index].input, np.int64)
    y = out.reshape(-1)
    uniform = np.full(NUM_COLOURS, 1.0 / NUM_COLOURS)
    freq = colour_frequencies(task)
    nll = {"uniform": -np.log(uniform[y]), "colour_frequency": -np.log(freq[y])}
    correct = {
        "uniform": tie_shared_accuracy(uniform, y),
        "colour_frequency": tie_shared_accuracy(freq, y),
        "repeat_previous": (repeat_previous(out, most_common_train_colour(task)).reshape(-1) == y).astype(float),
    }
    if inp.shape == out.shape:
        correct["copy_test_input"] = (inp.reshape(-1) == y).astype(float)
    return _BaselineCells(nll, correct)


# --- the answer's token layout in a prompt ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Positions of one prompt that predict the answer's tokens (position t predicts token t + 1)."""

    cell_pred: np.ndarray  # [h*w] positions predicting each answer cell, row-major
    cell_target: np.ndarray  # [h*w] the true cell tokens
    mid_row: np.ndarray  # bool [h*w]: the cell is not the first of its row
    row_end_pred: np.ndarray  # [h-1] positions predicting the row breaks
    end_pred: int  # the position predicting the stop token


def _layout(prompt: EncodedPrompt, output: np.ndarray, newline_id: int) -> _Layout:
    h, w = output.shape
    tok = np.flatnonzero(prompt.grid_kind == GRID_TEST_OUTPUT)
    where = f"task {prompt.task_id} test {prompt.test_index}"
    if tok.size != h * w or np.any(prompt.n_cells[tok] != 1):
        raise ValueError(f"{where}: {tok.size} answer tokens for a {h}x{w} answer (n_cells "
                         f"{sorted(set(prompt.n_cells[tok].tolist()))}); context_use scores one cell per token, so "
                         "it needs a tokenizer that never merges digits (e.g. arcstream's `digits`)")
    rows, cols = prompt.row[tok].astype(np.int64), prompt.col[tok].astype(np.int64)
    if not (np.array_equal(rows, np.repeat(np.arange(h), w)) and np.array_equal(cols, np.tile(np.arange(w), h))):
        raise ValueError(f"{where}: answer cells are not in row-major order in the prompt")
    if not np.array_equal(prompt.colour[tok], np.asarray(output).reshape(-1)):
        # identity augmentation: the prompt's answer must be the task's own (the baselines score that grid)
        raise ValueError(f"{where}: the prompt's answer cells differ from the task's test output")
    row_last = tok[np.arange(h - 1) * w + (w - 1)]
    breaks = prompt.token_ids[row_last + 1]
    if np.any(breaks != newline_id):
        raise ValueError(f"{where}: the token after a row's last answer cell is {sorted(set(breaks.tolist()))}, not "
                         f"the newline {newline_id}; context_use needs an encoder that ends each row with '\\n' "
                         f"right after its last cell (e.g. 'plain'), got {prompt.metadata.get('encoder')!r}")
    ans = np.flatnonzero(prompt.answer_mask)
    if ans.size == 0 or ans[-1] <= tok[-1]:
        raise ValueError(f"{where}: no stop token after the answer (the tokenizer has no eos / end-of-turn token?); "
                         "p(stop) and the shape check need one")
    return _Layout(cell_pred=tok - 1, cell_target=prompt.token_ids[tok].astype(np.int64), mid_row=cols >= 1,
                   row_end_pred=row_last, end_pred=int(ans[-1]) - 1)


def _single_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"the tokenizer encodes {text!r} as {ids}; context_use needs it to be one token")
    return int(ids[0])


# --- forwards --------------------------------------------------------------------------------------------


def model_logits_fn(model: Any) -> LogitsFn:
    """The `LogitsFn` of a loaded arcstream `Decoder` (`forward_jit`: one compile per [B, T] shape)."""
    def logits(tokens_bt: np.ndarray, segment_ids_bt: np.ndarray, positions_bt: np.ndarray) -> np.ndarray:
        out = forward_jit(model, jnp.asarray(tokens_bt), jnp.asarray(segment_ids_bt), jnp.asarray(positions_bt),
                          sites=(), return_logits=True).logits
        return np.asarray(out).astype(np.float32)

    return logits


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class _Picked:
    """What one prompt's forward gives at its answer positions."""

    nll: np.ndarray  # [h*w] nats of the true cell token
    correct: np.ndarray  # bool [h*w] argmax == true cell token
    p_newline_cell: np.ndarray  # [h*w] p(newline) at the cell positions
    p_newline_row_end: np.ndarray  # [h-1]
    p_stop_end: float
    shape_right: bool


def _pick(logits_tv: np.ndarray, lay: _Layout, newline_id: int, stop_ids: np.ndarray) -> _Picked:
    pos = np.concatenate([lay.cell_pred, lay.row_end_pred, [lay.end_pred]])
    z = logits_tv[pos].astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    arg = np.argmax(z, -1)
    n, r = lay.cell_pred.size, lay.row_end_pred.size
    cell, row_end, end = slice(0, n), slice(n, n + r), n + r
    nll = -logp[np.arange(n), lay.cell_target]
    bad_in_cell = (arg[cell] == newline_id) | np.isin(arg[cell], stop_ids)
    shape_right = bool(np.all(arg[row_end] == newline_id) and np.isin(arg[end], stop_ids) and not bad_in_cell.any())
    return _Picked(nll=nll, correct=arg[cell] == lay.cell_target, p_newline_cell=np.exp(logp[cell, newline_id]),
                   p_newline_row_end=np.exp(logp[row_end, newline_id]),
                   p_stop_end=float(np.exp(logp[end, stop_ids]).sum()), shape_right=shape_right)


def _run_forwards(logits_fn: LogitsFn, prompts: Sequence[EncodedPrompt], layouts: Sequence[_Layout],
                  newline_id: int, stop_ids: np.ndarray, batch_tokens: int) -> list[_Picked]:
    """Every prompt's `_Picked`, from as few forwards and compiles as possible.

    The prompts are packed first-fit, longest first, into rows of one length T
    (the longest prompt rounded up to a multiple of PAD_MULTIPLE) with segment
    ids (`arcstream.data.packing`: causal attention within a prompt, positions
    restarting at 0, so a prompt's logits are those it has alone), and the rows
    go `batch_tokens // T` at a time, the last batch completed with padding
    rows: one [B, T] shape, one compile. Why not a length bucket per batch: on
    a 2-core CPU each new shape of arcstream-tiny compiles in 3-5 s, as long as
    several forwards, and 8 buckets of 256 cost more than the padding saved.
    """
    t = _round_up(max(len(p) for p in prompts), PAD_MULTIPLE)
    b = max(1, int(batch_tokens) // t)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows = pack_first_fit((prompt_element(prompts[i], i) for i in order), seq_len=t, num_bins=len(prompts))
    out: list[_Picked | None] = [None] * len(prompts)
    for k in range(0, len(rows), b):
        batch = rows_to_batch(rows[k:k + b], batch_size=b, seq_len=t)
        logits = np.asarray(logits_fn(batch.tokens, batch.segment_ids, batch.positions))
        if logits.ndim != 3 or logits.shape[:2] != (b, t):
            raise ValueError(f"logits_fn returned shape {logits.shape} for tokens of shape {(b, t)}; expected "
                             f"[{b}, {t}, vocab]")
        for info in batch.prompts:
            i = info.prompt_index
            row, col = np.argwhere(batch.prompt_index == i)[0]
            n = len(prompts[i])
            out[i] = _pick(logits[row, col:col + n], layouts[i], newline_id, stop_ids)
    return out  # type: ignore[return-value]


# --- the evaluation --------------------------------------------------------------------------------------


def context_use_from_logits(logits_fn: LogitsFn, tokenizer: Any, tasks: Sequence[Task], *, prompt_config: Any,
                            max_len: int = 2048, other_offset: int = 1,
                            batch_tokens: int = 8192) -> ContextUseReport:
    """The context-use evaluation of the model behind `logits_fn` (see the module docstring).

    tasks: held-out tasks with known test outputs (at least 2, for the "other" context); every test pair
      is scored, identity augmentation. Test pairs without an output are counted in `skipped`.
    prompt_config: the training prompt format (`PromptConfig`); `include_answer` is forced on and
      `max_length` set to `max_len`, so its `drop_policy` decides which train pairs a long prompt drops.
    other_offset: task i's "other" context shows the train pairs of task (i + other_offset) mod n.
    """
    tasks = list(tasks)
    for t in tasks:
        if not isinstance(t, Task):
            raise TypeError(f"context_use takes Task objects; got {type(t).__name__} ({t!r:.80}); filter out "
                            "the source's Skipped items first")
    if len(tasks) < 2:
        raise ValueError(f"context_use needs at least 2 tasks (the 'other' context borrows another task's train "
                         f"pairs); got {len(tasks)}")
    if other_offset % len(tasks) == 0:
        raise ValueError(f"other_offset={other_offset} pairs every task with itself for {len(tasks)} tasks; use an "
                         "offset that is not a multiple of the task count")
    cfg = dataclasses.replace(prompt_config, include_answer=True, max_length=int(max_len))
    newline_id = _single_token(tokenizer, "\n")
    stop_ids = np.asarray(stop_token_ids(tokenizer), np.int64)
    if stop_ids.size == 0:
        raise ValueError("the tokenizer has no eos / end-of-turn token: the answer has no stop token to score")

    skipped: Counter[str] = Counter()
    items: list[tuple[Task, int, Task, dict[str, EncodedPrompt]]] = []
    for i, task in enumerate(tasks):
        other = tasks[(i + other_offset) % len(tasks)]
        variants = {"own": task, "none": dataclasses.replace(task, train=()),
                    "other": dataclasses.replace(task, train=other.train)}
        for j, pair in enumerate(task.test):
            if pair.output is None:
                skipped["no_solution"] += 1
                continue
            prompts: dict[str, EncodedPrompt] = {}
            for ctx, variant in variants.items():
                try:
                    prompts[ctx] = build_prompt(variant, j, None, tokenizer, cfg)
                except InvalidTask as e:
                    if e.reason != "too_long":
                        raise
                    skipped[f"{ctx}_too_long"] += 1
                    break
            else:
                items.append((task, j, other, prompts))
    if not items:
        raise ValueError(f"context_use: no test output of {len(tasks)} tasks fits max_len={max_len} in all three "
                         f"contexts (skipped: {dict(skipped)}); raise max_len or pass shorter tasks")

    flat = [(n, ctx) for n in range(len(items)) for ctx in CONTEXTS]
    prompts = [items[n][3][ctx] for n, ctx in flat]
    layouts = [_layout(items[n][3][ctx], items[n][0].test[items[n][1]].output, newline_id) for n, ctx in flat]
    picked = dict(zip(flat, _run_forwards(logits_fn, prompts, layouts, newline_id, stop_ids, int(batch_tokens))))
    return _aggregate(items, picked, layouts=dict(zip(flat, layouts)), skipped=skipped, max_len=int(max_len),
                      cfg=cfg)


def _aggregate(items, picked, *, layouts, skipped, max_len, cfg) -> ContextUseReport:
    """The report from every (test output, context)'s `_Picked`: one `OutputScores` per test output, and the
    model's and the baselines' scores and the answer's structure over all of them."""
    picks = [{c: picked[n, c] for c in CONTEXTS} for n in range(len(items))]
    cells = [_baseline_cells(task, j) for task, j, _, _ in items]
    outputs = [_output_scores(item, p, bc) for item, p, bc in zip(items, picks, cells)]
    ss = np.concatenate([np.full(o.cells, o.same_shape) for o in outputs])  # per answer cell: its output's same_shape
    model = _model_scores(picks, ss)
    structure = {c: _structure([p[c] for p in picks], [layouts[n, c] for n in range(len(items))]) for c in CONTEXTS}
    return ContextUseReport(
        tasks=len({o.task_id for o in outputs}), test_outputs=len(outputs), cells=int(ss.size),
        same_shape_outputs=int(sum(o.same_shape for o in outputs)), same_shape_cells=int(ss.sum()),
        skipped=dict(sorted(skipped.items())), model=model,
        baselines=_baseline_scores(cells, [o.cells for o in outputs], ss), structure=structure,
        context_gain=1.0 - model["own"].loss / model["other"].loss, goal_context_gain=GOAL_CONTEXT_GAIN,
        max_len=max_len, prompt_config=dataclasses.asdict(cfg), outputs=tuple(outputs))


def _output_scores(item: tuple[Task, int, Task, dict[str, EncodedPrompt]], picks: dict[str, _Picked],
                   bc: _BaselineCells) -> OutputScores:
    """One test output's figures per context (`picks`) and per baseline (`bc`)."""
    task, j, other, prompts = item
    y = np.asarray(task.test[j].output)
    return OutputScores(
        task_id=task.id, test_index=j, other_task_id=other.id, shape=(int(y.shape[0]), int(y.shape[1])),
        same_shape="copy_test_input" in bc.correct, cells=int(y.size),
        train_pairs={c: len(prompts[c].metadata["train_pairs"]) for c in CONTEXTS},
        loss={c: float(picks[c].nll.mean()) for c in CONTEXTS},
        accuracy={c: float(picks[c].correct.mean()) for c in CONTEXTS},
        shape_right_teacher_forced={c: picks[c].shape_right for c in CONTEXTS},
        baseline_accuracy={b: float(np.mean(bc.correct[b])) if b in bc.correct else math.nan for b in BASELINES})


def _cat(xs: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(xs).astype(np.float64)


def _mean_or_none(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def _model_scores(picks: Sequence[dict[str, _Picked]], ss: np.ndarray) -> dict[str, Scores]:
    """Per context, the model's loss and accuracy over every answer cell (`ss`: the cells of same-shape outputs)."""
    model = {}
    for c in CONTEXTS:
        correct = _cat([p[c].correct for p in picks])
        model[c] = Scores(loss=float(_cat([p[c].nll for p in picks]).mean()), accuracy=float(correct.mean()),
                          same_shape_accuracy=_mean_or_none(correct[ss]), cells=int(ss.size))
    return model


def _baseline_scores(cells: Sequence[_BaselineCells], sizes: Sequence[int], ss: np.ndarray) -> dict[str, Scores]:
    """Per baseline, its scores over every answer cell; copy_test_input only over the cells of same-shape outputs
    (`ss`), where it is defined."""
    baselines: dict[str, Scores] = {}
    for b in BASELINES:
        acc = _cat([bc.correct.get(b, np.full(size, np.nan)) for bc, size in zip(cells, sizes)])
        if b == "copy_test_input":
            baselines[b] = Scores(loss=None, accuracy=None, same_shape_accuracy=_mean_or_none(acc[ss]),
                                  cells=int(ss.sum()))
        else:
            loss = float(_cat([bc.nll[b] for bc in cells]).mean()) if b in ("uniform", "colour_frequency") else None
            baselines[b] = Scores(loss=loss, accuracy=float(acc.mean()), same_shape_accuracy=_mean_or_none(acc[ss]),
                                  cells=int(ss.size))
    return baselines


def _structure(picks: Sequence[_Picked], layouts: Sequence[_Layout]) -> Structure:
    """One context's answer layout under teacher forcing, over every test output."""
    mid = np.concatenate([p.p_newline_cell[lay.mid_row] for p, lay in zip(picks, layouts)])
    row_end = np.concatenate([p.p_newline_row_end for p in picks])
    return Structure(
        p_newline_row_end=float(row_end.mean()) if row_end.size else math.nan,
        p_newline_mid_row=float(mid.mean()) if mid.size else math.nan,
        p_stop_end=float(np.mean([p.p_stop_end for p in picks])),
        shape_right_teacher_forced=float(np.mean([p.shape_right for p in picks])),
        row_ends=int(row_end.size), mid_row=int(mid.size))


def context_use(model: Any, tokenizer: Any, tasks: Sequence[Task], *, prompt_config: Any, max_len: int = 2048,
                other_offset: int = 1, batch_tokens: int = 8192) -> ContextUseReport:
    """`context_use_from_logits` with a loaded arcstream `Decoder` (`load_model(path, dtype="float32")`)."""
    return context_use_from_logits(model_logits_fn(model), tokenizer, tasks, prompt_config=prompt_config,
                                   max_len=max_len, other_offset=other_offset, batch_tokens=batch_tokens)


def context_use_of_run(config: Any, model: Any, tokenizer: Any, *, max_tasks: int = 20,
                       source: str = "") -> dict[str, Any]:
    """`context_use(...).as_dict()` for a train_lm run config: the first `max_tasks` tasks of `source` (default
    `config.eval.source`), in the run's prompt format (`config.data`: encoder, template, chat template, drop
    policy), prompts up to `config.data.max_prompt_len` (or `seq_len`) tokens."""
    spec = str(source or config.eval.source)
    opened = open_source(spec)
    tasks = [t for t in (opened[i] for i in range(min(int(max_tasks), len(opened)))) if isinstance(t, Task)]
    max_len = int(config.data.max_prompt_len) or int(config.data.seq_len)
    report = context_use(model, tokenizer, tasks, prompt_config=make_prompter(config.data, tokenizer).prompt_config,
                         max_len=max_len)
    return {"source": spec, **report.as_dict()}


def context_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The few figures of a context-use report (`as_dict()`) that a training log and the card's probe table show:
    the model's loss per context, the gain, and its same-shape per-cell accuracy against copy-the-test-input."""
    m = report["model"]
    return {"own": m["own"]["loss"], "none": m["none"]["loss"], "other": m["other"]["loss"],
            "gain": report["context_gain"], "test_outputs": report["test_outputs"],
            "same_shape_outputs": report["same_shape_outputs"],
            "same_shape_accuracy": m["own"]["same_shape_accuracy"],
            "copy_test_input": report["baselines"]["copy_test_input"]["same_shape_accuracy"]}


def describe_context(name: str, s: Mapping[str, Any]) -> str:
    """One log line of `context_summary`'s figures."""
    copy = ""
    if s["same_shape_accuracy"] is not None and s["copy_test_input"] is not None:
        copy = (f"; same-shape per-cell accuracy {s['same_shape_accuracy']:.3f} vs copy-the-test-input "
                f"{s['copy_test_input']:.3f} ({s['same_shape_outputs']} outputs)")
    gain = "undefined" if s["gain"] is None else f"{100 * s['gain']:.1f}%"
    return f"{name}: context gain {gain} on {s['test_outputs']} test outputs{copy}"


# --- the model card's section ----------------------------------------------------------------------------


def render_markdown(report: ContextUseReport | Mapping[str, Any]) -> list[str]:
    """Markdown lines for the model card: one table (the model in each context, each baseline) and the context
    gain against the goal. Takes the report or its `as_dict()` (what a run's JSON holds)."""
    d = report.as_dict() if isinstance(report, ContextUseReport) else _json_safe(dict(report))
    f = lambda x, p=3: "—" if x is None else f"{x:.{p}f}"  # noqa: E731
    skipped = ", ".join(f"{k} {v}" for k, v in d["skipped"].items()) or "none"
    where = f" of `{d['source']}`" if d.get("source") else ""
    lines = [
        f"Teacher-forced answers on {d['test_outputs']} test outputs of {d['tasks']} held-out tasks{where} "
        f"(identity augmentation, prompts up to {d['max_len']} tokens; {d['cells']:,} answer cells, "
        f"{d['same_shape_outputs']} same-shape outputs with {d['same_shape_cells']:,} cells; skipped: {skipped}). "
        "Every row is scored on the same cells. Accuracy is argmax == the true cell; \"shape right\" means that, "
        "fed the true answer so far, the argmax is a newline at every row end, the stop token at the end, and "
        "neither anywhere a cell comes next.", "",
        "| predictor | answer-cell loss (nats) | per-cell accuracy | accuracy, same-shape outputs "
        "| shape right (teacher-forced) | p(stop) at answer end | p(newline) at row ends / mid-row |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in CONTEXTS:
        m, s = d["model"][c], d["structure"][c]
        lines.append(f"| {CONTEXT_LABELS[c]} | {f(m['loss'], 4)} | {f(m['accuracy'])} | "
                     f"{f(m['same_shape_accuracy'])} | {f(s['shape_right_teacher_forced'], 2)} | "
                     f"{f(s['p_stop_end'])} | {f(s['p_newline_row_end'])} / {f(s['p_newline_mid_row'])} |")
    for b in BASELINES:
        m = d["baselines"][b]
        lines.append(f"| {BASELINE_LABELS[b]} | {f(m['loss'], 4)} | {f(m['accuracy'])} | "
                     f"{f(m['same_shape_accuracy'])} | — | — | — |")
    gain, goal = d["context_gain"], d["goal_context_gain"]
    met = gain is not None and gain >= goal
    shown = "undefined" if gain is None else f"{100 * gain:.1f}%"
    lines += ["", f"Context gain, 1 − loss(own) / loss(another task's train pairs): **{shown}**, "
                  f"{'meeting' if met else 'short of'} the goal of at least {100 * goal:.0f}%"
                  f"{'' if met else ': the model makes little use of the examples it is shown'}."]
    own, none = d["model"]["own"]["loss"], d["model"]["none"]["loss"]
    if own is not None and none:
        lines += ["", f"Its own train pairs against none (the test input only), 1 − loss(own) / loss(none): "
                      f"**{100 * (1 - own / none):.1f}%**: how much the task's examples help beyond its test input "
                      "(the context gain also counts how much another task's examples mislead it)."]
    return lines + [""]


def _json_safe(x: Any) -> Any:
    """dataclasses.asdict output with tuples as lists and non-finite floats as None (strict JSON)."""
    if isinstance(x, Mapping):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
