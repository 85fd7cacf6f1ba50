"""Does a model read the task's examples? The context-use table of any checkpoint.

Command:

    python -m arcstream.context_use --config=configs/context_use.py --config.output_dir=runs/context_use

What it does: teacher-forces every test output of the first `data.max_tasks`
tasks of `data.source` (default: 40 ARC-AGI-1 evaluation tasks, prompts up to
2,048 tokens) three times: with the task's own train pairs, with none, and with
another task's; scores the answer cells (loss, per-cell accuracy) against
predictors that cannot read the examples (uniform, colour frequencies, repeat
the previous cell, copy the test input on same-shape outputs). Writes
`context_use.json` (per test output too) and `context_use.md`, prints a summary.
The model defaults to arcstream-tiny; its prompt format comes from the model
folder's arcstream_prompt.json when there is one.
Runtime: about a minute for arcstream-tiny on a 2-core CPU.
Expected result: the context gain (1 - loss with own examples / loss with
another task's) near 0 for a model that ignores the examples; the card of
arcstream-tiny gives its own figures.

Other uses:
- which mechanism a model has, one generated rule at a time:
  `--config.data.source='synth:recolour?tasks=64&seed=7'` (copying the test input
  is the first: compare "same-shape accuracy" with copy-the-test-input);
- a chat model from the hub: `--config.model=Qwen/Qwen2.5-0.5B-Instruct --config.prompt_format=config
  --config.data.template=arc --config.data.use_chat_template=True --config.data.max_prompt_len=8192`.
"""

import ml_collections

from arcstream.lm.context_job import ContextUseOptions
from arcstream.options import section_of


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # Every key, its default and its meaning: arcstream/lm/context_job.py (ContextUseOptions; the `data`
    # section is arcstream/data/pipeline.py's, with this job's defaults in context_data_section).
    c = section_of(ContextUseOptions)
    if arg:
        raise ValueError(f"configs/context_use.py:{arg}: unknown variant; expected none")
    return c
